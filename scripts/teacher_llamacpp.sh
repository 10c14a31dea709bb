#!/usr/bin/env bash
# Reproduces, by hand, the dataset stage of examples/openai-teacher against a llama.cpp server
# that answers one request at a time (llama-cpp-python's `llama_cpp.server`, which serialises
# requests behind a lock, like llama.cpp's `llama-server --parallel 1`), at max-parallel=8 with a
# timeout shorter than eight answers — the setting in which forge once sent 99 requests in 20
# minutes, 64 of which timed out, for 0 accepted samples.
#
# Prints: requests sent, timed out, answered; samples accepted; the final concurrency window; the
# tokens wasted on rejected answers; and how many requests the server itself logged.
#
# Usage: scripts/teacher_llamacpp.sh [--samples N] [--timeout S] [--max-parallel P] [--model FILE.gguf]
#                                    [--port PORT] [--forge PATH] [--keep]
# Needs: scripts/.venv with llama-cpp-python (scripts/setup.sh, then `pip install llama-cpp-python`);
# this script adds the server's extras (uvicorn, fastapi, ...) without rebuilding llama.cpp.
# The model defaults to SmolLM2-135M-Instruct's GGUF, looked for in /work/dl, the build cache
# and then the whole disk.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/scripts/.venv"
SAMPLES=12
TIMEOUT=30
PARALLEL=8
PORT=18089
MODEL="${MODEL:-}"
FORGE="${FORGE:-}"
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --samples) SAMPLES="$2"; shift 2 ;;
        --timeout) TIMEOUT="$2"; shift 2 ;;
        --max-parallel) PARALLEL="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --forge) FORGE="$2"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        *) sed -n '2,20p' "$0"; exit 2 ;;
    esac
done

PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "no $VENV: run scripts/setup.sh, then $VENV/bin/pip install llama-cpp-python" >&2
    exit 1
fi
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python is not installed in $VENV ($VENV/bin/pip install llama-cpp-python)" >&2
    exit 1
fi
if ! "$PY" -c "import llama_cpp.server.app, uvicorn, fastapi, sse_starlette, starlette_context, pydantic_settings, yaml" 2>/dev/null; then
    echo "installing llama-cpp-python's server extras into $VENV ..." >&2
    # The [server] extra's requirements, without reinstalling (rebuilding) llama-cpp-python.
    "$VENV/bin/pip" install -q 'uvicorn>=0.22.0' 'fastapi>=0.100.0' 'pydantic-settings>=2.0.1' \
        'sse-starlette>=1.6.1' 'starlette-context>=0.3.6,<0.4' 'PyYAML>=5.1'
fi

if [ -z "$MODEL" ]; then
    for candidate in /work/dl/SmolLM2-135M-Instruct*.gguf "$ROOT"/.forge-cache/cas-v1/*/*/*SmolLM2*.gguf; do
        if [ -f "$candidate" ]; then MODEL="$candidate"; break; fi
    done
fi
if [ -z "$MODEL" ]; then
    MODEL="$(find / -xdev -iname '*SmolLM2*135M*Instruct*.gguf' -type f 2>/dev/null | head -n 1 || true)"
fi
if [ -z "$MODEL" ] || [ ! -f "$MODEL" ]; then
    echo "no SmolLM2-135M-Instruct GGUF found; pass --model FILE.gguf" >&2
    exit 1
fi

if [ -z "$FORGE" ]; then
    if [ -x "$ROOT/target/release/forge" ]; then FORGE="$ROOT/target/release/forge"
    else
        echo "building forge (cargo build --release) ..." >&2
        (cd "$ROOT" && cargo build --release --quiet)
        FORGE="$ROOT/target/release/forge"
    fi
fi

WORK="$(mktemp -d -t forge-teacher-llamacpp.XXXXXX)"
SERVER_LOG="$WORK/server.log"
cleanup() {
    if [ -n "${SERVER_PID:-}" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    if [ "$KEEP" = 0 ]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}
trap cleanup EXIT

echo "model:   $MODEL"
echo "server:  llama_cpp.server on 127.0.0.1:$PORT, one request at a time (2 threads)"
"$PY" -m llama_cpp.server --model "$MODEL" --host 127.0.0.1 --port "$PORT" --n_ctx 2048 \
    --n_threads 2 --n_threads_batch 2 >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
up() { "$PY" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$PORT/v1/models" 2>/dev/null; }
for _ in $(seq 1 120); do
    if up; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "the server exited:" >&2; tail -n 30 "$SERVER_LOG" >&2; exit 1; fi
    sleep 0.5
done
up || { echo "the server did not start" >&2; tail -n 30 "$SERVER_LOG" >&2; exit 1; }

# examples/openai-teacher, with this server as its teacher and a small dataset.
WS="$WORK/ws"
mkdir -p "$WS"
cp -r "$ROOT/examples/openai-teacher/." "$WS/"
rm -rf "$WS/.forge-cache"
perl -0pi -e "s{teacher \"local\"[^\n]*\\\\\n[^\n]*\n}{teacher \"local\" kind=\"openai\" model=\"smollm2-135m\" base-url=\"http://127.0.0.1:$PORT/v1\" max-parallel=$PARALLEL timeout=$TIMEOUT max-retries=8\n}" "$WS/forge.kdl"
perl -0pi -e "s{dataset samples=\d+ eval=\d+}{dataset samples=$SAMPLES eval=2}; s{benchmark prompts=\d+}{benchmark prompts=2}" "$WS/forge.kdl"
grep -q "max-parallel=$PARALLEL timeout=$TIMEOUT" "$WS/forge.kdl" || { echo "could not set the teacher in $WS/forge.kdl" >&2; exit 1; }
grep -n '^teacher\|dataset samples' "$WS/forge.kdl"

echo "running: forge build defame:dataset (samples=$SAMPLES, max-parallel=$PARALLEL, timeout=${TIMEOUT}s)"
T0=$(date +%s)
set +e
"$FORGE" -C "$WS" build defame:dataset 2>&1 | tee "$WORK/build.txt" | grep -v "^Progress"
STATUS=${PIPESTATUS[0]}
set -e
T1=$(date +%s)
LOG="$WS/.forge-cache/logs-v1/defame--dataset.log"

echo
echo "=== results (exit $STATUS, $((T1 - T0)) s) ==="
grep -E '^Progress' "$WORK/build.txt" | tail -n 1 || true
if [ -f "$LOG" ]; then
    STATS="$(grep -E '^teacher `local`' "$LOG" | tail -n 1)"
    field() { sed -n "s/.*$1: \([0-9]*\).*/\1/p" <<<"$STATS"; }
    echo "requests sent:      $(field sent)"
    echo "requests timed out: $(field timeouts)"
    echo "answers received:   $(field ok)"
    echo "teacher:            ${STATS#*; }"
    grep -E '^tokens wasted' "$LOG" || true
else
    echo "(no dataset log at $LOG)"
fi
if [ "$STATUS" = 0 ]; then
    ACCEPTED="$SAMPLES"
else
    ACCEPTED=$(cat "$WS"/.forge-cache/work-v1/*/journal.jsonl 2>/dev/null | grep -c '^{"accepted"' || true)
fi
echo "samples accepted:   ${ACCEPTED:-0} of $SAMPLES"
echo "server logged:      $(grep -c 'POST /v1/chat/completions' "$SERVER_LOG" || true) chat requests answered, $(grep -c 'Disconnected from client' "$SERVER_LOG" || true) dropped before generation"
exit "$STATUS"
