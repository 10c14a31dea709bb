#!/usr/bin/env python3
"""Do forge's fine-tuned GGUF files load in llama.cpp, and decode as forge's decoder does?

For a built workspace (the root demo by default; `-C examples/gemma-defame` for Gemma 3), for
every `TARGET:gguf:<level>` it built and for the LoRA adapter GGUF on its base GGUF:
  1. loads the file in llama.cpp (llama-cpp-python) and reads its metadata with `gguf`;
  2. renders the first --prompts eval inputs with the file's own chat template (the one the
     model was trained with) and tokenizes them with llama.cpp;
  3. greedy-decodes --tokens tokens after each prompt in llama.cpp and with forge's decoder
     (`forge-decode --ids ... --greedy N`, the bench stage's decoder) on the same file, and
     compares the tokens.
Prints a table (prompts identical, tokens agreeing before the first difference, and the first
answer in both); exits 1 if a file does not load.

Usage:  scripts/.venv/bin/pip install llama-cpp-python gguf jinja2
        scripts/.venv/bin/python scripts/finetuned_check.py [-C DIR] [--target defame] [--prompts 8] [--tokens 64]
(build the workspace first: `forge -C DIR build`).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-C", dest="ws", default=".")
    ap.add_argument("--target", default="defame")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    import gguf
    import jinja2
    from llama_cpp import Llama

    sh(["cargo", "build", "--release", "-q", "--bin", "forge"], cwd=ROOT)
    sh(["cargo", "build", "--release", "-q", "-p", "forge-infer", "--bin", "forge-decode"], cwd=ROOT)
    forge, decode = ROOT / "target/release/forge", ROOT / "target/release/forge-decode"
    ws = (ROOT / args.ws).resolve()
    status = json.loads(sh([forge, "-C", ws, "status", "--json"]))
    fresh = [a["artifact"] for a in status["artifacts"] if a["status"] == "fresh"]
    path = lambda a: Path(sh([forge, "-C", ws, "artifact", "path", a]).strip())
    dataset = path(f"{args.target}:dataset")
    inputs = [json.loads(l)["input"] for l in (dataset / "eval.jsonl").read_text().splitlines()[: args.prompts]]
    files = [(a.split(":")[-1], path(a) / "model.gguf", None) for a in fresh if a.startswith(f"{args.target}:gguf:")]
    if f"{args.target}:gguf-adapter" in fresh:
        d = path(f"{args.target}:gguf-adapter")
        files.append(("adapter on base", d / "base.gguf", d / "adapter.gguf"))
    if not files:
        sys.exit(f"no fresh {args.target}:gguf artifacts in {ws}: run `forge -C {args.ws} build` first")

    rows, failed = [], False
    for level, model, lora in files:
        reader = gguf.GGUFReader(str(model))
        field = reader.fields.get("tokenizer.chat_template")
        template = bytes(field.parts[field.data[0]]).decode() if field else None
        if lora is not None:
            # The adapter's base carries the base's own template: use the fine-tuned file's.
            tuned = next((m for l, m, a in files if a is None), None)
            f2 = gguf.GGUFReader(str(tuned)).fields.get("tokenizer.chat_template") if tuned else None
            template = bytes(f2.parts[f2.data[0]]).decode() if f2 else template
        if template is None:
            sys.exit(f"{model}: no chat template in the file")
        try:
            llm = Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=1024, n_threads=2,
                        verbose=False, seed=0)
        except Exception as e:  # noqa: BLE001 - report any load failure
            rows.append(f"| {level} | does not load: {e} | | |")
            failed = True
            continue
        bos = llm.detokenize([llm.token_bos()]).decode("utf-8", "replace") if llm.token_bos() >= 0 else ""
        env = jinja2.Environment()
        env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(Exception(m))
        tpl = env.from_string(template)
        same, agree, total, first = 0, 0, 0, None
        for text in inputs:
            prompt = tpl.render(messages=[{"role": "user", "content": text}], add_generation_prompt=True,
                                bos_token=bos, eos_token="")
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            if llm.metadata.get("tokenizer.ggml.add_bos_token") == "true" and ids[:1] != [llm.token_bos()]:
                ids = [llm.token_bos()] + ids
            theirs = []
            llm.reset()
            for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                if t == llm.token_eos() or len(theirs) == args.tokens:
                    break
                theirs.append(t)
            cmd = [decode, model, "--ids", ",".join(map(str, ids)), "--greedy", str(len(theirs))]
            if lora is not None:
                cmd = [decode, path(f"{args.target}:gguf:f16") / "model.gguf", "--ids", ",".join(map(str, ids)),
                       "--greedy", str(len(theirs))] if f"{args.target}:gguf:f16" in fresh else cmd
            ours = json.loads(sh(cmd).strip().splitlines()[-1])["tokens"]
            n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            same += ours == theirs
            agree += n
            total += len(theirs)
            if first is None:
                first = llm.detokenize(theirs).decode("utf-8", "replace").replace("\n", " ")[:160]
        rows.append(f"| {level} | {same}/{len(inputs)} | {agree}/{total} | {first} |")
    print(f"\n{ws.name or ws}: {args.target}, {len(inputs)} eval prompts, up to {args.tokens} greedy tokens\n")
    print("| file | llama.cpp = forge (prompts) | tokens agreeing | llama.cpp's first answer |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
