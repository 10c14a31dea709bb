//! Deciding what is stale and building it.
//!
//! [`Engine::evaluate`] gives every selected artifact a [`Status`], dependencies first: its
//! fingerprint can only be computed once every upstream artifact's *content* digest is known,
//! so an artifact downstream of a stale one is [`Status::Pending`] until that upstream is
//! rebuilt. [`Engine::build`] then runs the stale actions in parallel (under `-j` and the
//! manifest's resource pools) and re-checks each pending artifact when its upstream finishes:
//! if the rebuilt upstream has the same content as before, the pending artifact's key is
//! unchanged and it stays fresh (early cutoff).
//!
//! An action's output is staged in a temporary directory, published to the content store, and
//! only then recorded in the action cache, so a failed or killed action is never taken as fresh.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forge_cache::{ACTION_SCHEMA, ActionEntry, BuildState, CacheError, ContentProblem, Digest, StateEntry, Tree};
use forge_manifest::{ArtifactId, glob};
use petgraph::graph::NodeIndex;
use rayon::prelude::*;

use crate::dirty::{DirtyReason, diff};
use crate::events::{Event, EventSink, Summary};
use crate::executor::{ActionContext, ActionError, CancelToken, Estimate, EstimateContext, Log};
use crate::fingerprint::{FINGERPRINT_SCHEMA, Fingerprint};
use crate::workspace::Workspace;

#[derive(Clone, Debug)]
pub enum Status {
    /// Built with the current action key; the content is intact.
    Fresh { key: Digest, tree: Tree },
    /// Must be rebuilt, for these reasons.
    Stale { key: Digest, fingerprint: Box<Fingerprint>, reasons: Vec<DirtyReason> },
    /// Waits for `upstream` to be rebuilt; may turn out fresh (early cutoff).
    Pending { upstream: ArtifactId },
    /// Cannot be built: no executor, a missing input, or an upstream that cannot be built.
    Blocked { reason: String, upstream: Option<ArtifactId> },
}

impl Status {
    pub fn is_fresh(&self) -> bool {
        matches!(self, Status::Fresh { .. })
    }
}

#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub jobs: usize,
    pub keep_going: bool,
    pub dry_run: bool,
    pub cancel: CancelToken,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            keep_going: false,
            dry_run: false,
            cancel: CancelToken::new(),
        }
    }
}

/// The build state is saved at least this often during a long build.
const STATE_SAVE_INTERVAL: Duration = Duration::from_secs(2);

pub struct Engine<'w> {
    ws: &'w Workspace,
    state: Mutex<BuildState>,
    state_dirty: Mutex<bool>,
    warnings: Mutex<Vec<String>>,
}

enum Outcome {
    Done(Tree),
    Failed,
    Skipped,
}

struct Job {
    node: NodeIndex,
    key: Digest,
    fingerprint: Box<Fingerprint>,
}

/// A finished action: its node, key, time, and its tree (and whether it came from the remote cache).
type JobResult = (NodeIndex, Digest, Duration, Result<(Tree, bool), (ActionError, Option<PathBuf>)>);

impl<'w> Engine<'w> {
    pub fn new(ws: &'w Workspace) -> Engine<'w> {
        let mut warnings = Vec::new();
        let state = ws.cache.load_state(&mut |w| warnings.push(w));
        Engine { ws, state: Mutex::new(state), state_dirty: Mutex::new(false), warnings: Mutex::new(warnings) }
    }

    pub fn workspace(&self) -> &Workspace {
        self.ws
    }

    /// Problems found along the way (corrupt cache entries, ...), each reported once.
    pub fn take_warnings(&self) -> Vec<String> {
        if let Some(remote) = &self.ws.remote {
            lock(&self.warnings).extend(remote.take_warnings());
        }
        std::mem::take(&mut *lock(&self.warnings))
    }

    fn warn(&self, w: String) {
        lock(&self.warnings).push(w);
    }

    /// The content of `n`'s current build, when it is fresh.
    pub fn recorded(&self, id: &ArtifactId) -> Option<StateEntry> {
        lock(&self.state).artifacts.get(&id.to_string()).cloned()
    }

    /// The fingerprint `n` was last built with, if the action cache still has it.
    pub fn last_fingerprint(&self, id: &ArtifactId) -> Option<(ActionEntry, Fingerprint)> {
        let rec = self.recorded(id)?;
        let entry = self.ws.cache.read_action(&rec.key).ok()??;
        let fp = Fingerprint::from_json(&entry.fingerprint)?;
        Some((entry, fp))
    }

    /// What rebuilding `n` would change and spend, when its stage can tell (see
    /// [`Executor::estimate`]); meant for stale artifacts.
    pub fn estimate(&self, n: NodeIndex) -> Option<Result<Estimate, String>> {
        let node = &self.ws.plan.graph[n];
        let exec = node.executor.as_ref()?;
        let previous = self.last_fingerprint(&node.id).map(|(_, fp)| fp.params);
        exec.estimate(&EstimateContext {
            decl: &node.decl,
            manifest: &self.ws.manifest,
            workspace: &self.ws.root,
            cache: &self.ws.cache,
            shared_calls: self.ws.shared_calls(),
            previous: previous.as_ref(),
        })
    }

    /// Resolves `n`'s input patterns to files and their digests.
    fn inputs(&self, n: NodeIndex) -> Result<BTreeMap<String, Digest>, String> {
        let node = &self.ws.plan.graph[n];
        let mut out = BTreeMap::new();
        for pattern in &node.plan.inputs {
            let files = glob::expand(&self.ws.root, pattern).map_err(|e| format!("input `{pattern}`: {e}"))?;
            if files.is_empty() {
                return Err(format!("input `{pattern}` matches no file"));
            }
            for f in files {
                let path = self.ws.root.join(&f);
                let d = self.ws.stat.digest(&path).map_err(|e| format!("cannot read input {f}: {e}"))?;
                out.insert(f, d);
            }
        }
        Ok(out)
    }

    /// Discards damaged content and the entry pointing at it, and reports it once.
    fn discard(&self, id: &ArtifactId, key: &Digest, tree: &Tree, problem: &ContentProblem) -> DirtyReason {
        self.warn(format!("corrupt cache entry for {id}: {problem}; rebuilding it"));
        let _ = self.ws.cache.remove_action(key);
        let _ = self.ws.cache.discard_content(&tree.digest());
        DirtyReason::ContentDamaged { detail: problem.to_string() }
    }

    fn entry_damaged(&self, id: &ArtifactId, key: &Digest, e: &CacheError) -> DirtyReason {
        self.warn(format!("{e}; rebuilding {id}"));
        let _ = self.ws.cache.remove_action(key);
        DirtyReason::EntryCorrupt { detail: e.to_string() }
    }

    fn set_state(&self, id: &ArtifactId, key: Digest, tree: Tree) {
        lock(&self.state).artifacts.insert(id.to_string(), StateEntry { key, tree });
        *lock(&self.state_dirty) = true;
    }

    /// The status of `n`, given the content digests of its upstream artifacts.
    pub fn check(&self, n: NodeIndex, upstream: BTreeMap<String, Digest>) -> Status {
        let node = &self.ws.plan.graph[n];
        let Some(exec) = &node.executor else {
            return Status::Blocked {
                reason: format!("this forge ({}) cannot build `{}` stages yet", self.ws.forge_version, node.kind()),
                upstream: None,
            };
        };
        let inputs = match self.inputs(n) {
            Ok(i) => i,
            Err(reason) => return Status::Blocked { reason, upstream: None },
        };
        let fp = Fingerprint {
            schema: FINGERPRINT_SCHEMA,
            forge: self.ws.forge_version.clone(),
            stage: exec.kind().to_string(),
            format: exec.format_version(),
            params: node.plan.params.clone(),
            upstream,
            inputs,
            tools: node.plan.tools.clone(),
        };
        let key = fp.key();
        let id = &node.id;
        let recorded = self.recorded(id);
        let mut damage = None;
        match &recorded {
            Some(rec) if rec.key == key => match self.ws.cache.check_tree(&rec.tree, &self.ws.stat) {
                // The state file says it is built; the entry that `verify`, `why` and the next
                // machine rely on must be there and intact too.
                Ok(()) => match self.ws.cache.check_action(&key, &self.ws.stat) {
                    Ok(()) => return Status::Fresh { key, tree: rec.tree.clone() },
                    Err(e) => damage = Some(self.entry_damaged(id, &key, &e)),
                },
                Err(p) => damage = Some(self.discard(id, &key, &rec.tree, &p)),
            },
            _ => match self.ws.cache.read_action(&key) {
                Ok(Some(entry)) => match self.ws.cache.check_tree(&entry.tree, &self.ws.stat) {
                    Ok(()) => {
                        // Built before with these exact inputs (e.g. a reverted edit): reuse.
                        self.set_state(id, key, entry.tree.clone());
                        return Status::Fresh { key, tree: entry.tree };
                    }
                    Err(p) => damage = Some(self.discard(id, &key, &entry.tree, &p)),
                },
                Ok(None) => {}
                Err(e) => damage = Some(self.entry_damaged(id, &key, &e)),
            },
        }
        let reasons = match (damage, recorded) {
            (Some(d), _) => vec![d],
            (None, None) => vec![DirtyReason::NeverBuilt],
            (None, Some(rec)) => {
                let old = self.ws.cache.read_action(&rec.key).ok().flatten();
                match old.and_then(|e| Fingerprint::from_json(&e.fingerprint)) {
                    Some(old_fp) => {
                        let d = diff(&old_fp, &fp);
                        if d.is_empty() { vec![DirtyReason::RecordMissing] } else { d }
                    }
                    None => vec![DirtyReason::RecordMissing],
                }
            }
        };
        Status::Stale { key, fingerprint: Box::new(fp), reasons }
    }

    /// Derives `n`'s status from its upstream statuses, checking it when all are fresh.
    fn derive(&self, n: NodeIndex, upstream_status: &dyn Fn(NodeIndex) -> Option<Status>) -> Status {
        let mut upstream = BTreeMap::new();
        for d in self.ws.plan.deps(n) {
            let dep_id = self.ws.plan.graph[d].id.clone();
            match upstream_status(d) {
                Some(Status::Fresh { tree, .. }) => {
                    upstream.insert(dep_id.to_string(), tree.digest());
                }
                Some(Status::Blocked { .. }) => {
                    return Status::Blocked {
                        reason: format!("needs {dep_id}, which cannot be built"),
                        upstream: Some(dep_id),
                    };
                }
                _ => return Status::Pending { upstream: dep_id },
            }
        }
        self.check(n, upstream)
    }

    /// The status of every artifact in `selection` (which must include its dependencies).
    /// Artifacts of one dependency depth are checked in parallel.
    pub fn evaluate(&self, selection: &[NodeIndex]) -> HashMap<NodeIndex, Status> {
        let plan = &self.ws.plan;
        let mut depth: HashMap<NodeIndex, usize> = HashMap::new();
        for &n in selection {
            let d = plan.deps(n).iter().filter_map(|d| depth.get(d)).map(|d| d + 1).max().unwrap_or(0);
            depth.insert(n, d);
        }
        let max_depth = depth.values().copied().max().unwrap_or(0);
        let mut levels: Vec<Vec<NodeIndex>> = vec![Vec::new(); max_depth + 1];
        for &n in selection {
            levels[depth[&n]].push(n);
        }
        let mut statuses: HashMap<NodeIndex, Status> = HashMap::with_capacity(selection.len());
        for level in levels {
            let done: Vec<(NodeIndex, Status)> =
                level.par_iter().map(|&n| (n, self.derive(n, &|d| statuses.get(&d).cloned()))).collect();
            statuses.extend(done);
        }
        statuses
    }

    /// Saves the build state and the stat cache.
    pub fn persist(&self) -> Result<(), forge_cache::CacheError> {
        let mut dirty = lock(&self.state_dirty);
        if *dirty {
            self.ws.cache.save_state(&lock(&self.state))?;
            *dirty = false;
        }
        self.ws.save_stat_cache()
    }

    /// Builds the stale artifacts of `selection` (which must include its dependencies).
    pub fn build(&self, selection: &[NodeIndex], opts: &BuildOptions, sink: &dyn EventSink) -> Summary {
        let started = Instant::now();
        let plan = &self.ws.plan;
        let statuses = self.evaluate(selection);
        for w in self.take_warnings() {
            sink.emit(Event::Warning { message: w });
        }
        let fresh = statuses.values().filter(|s| s.is_fresh()).count();
        let jobs = opts.jobs.max(1);
        sink.emit(Event::Plan { artifacts: selection.len(), fresh, to_check: selection.len() - fresh, jobs });

        let mut summary = Summary { dry_run: opts.dry_run, ..Summary::default() };
        if opts.dry_run {
            for &n in selection {
                let artifact = plan.graph[n].id.to_string();
                match &statuses[&n] {
                    Status::Fresh { .. } => {
                        summary.fresh += 1;
                        sink.emit(Event::Fresh { artifact, cutoff: false });
                    }
                    Status::Stale { reasons, .. } => {
                        summary.not_run += 1;
                        let estimate = match self.estimate(n) {
                            Some(Ok(e)) => Some(e),
                            Some(Err(e)) => {
                                sink.emit(Event::Warning { message: format!("cannot estimate {artifact}: {e}") });
                                None
                            }
                            None => None,
                        };
                        if let Some(e) = &estimate {
                            *summary.cost.get_or_insert_default() += e.cost;
                        }
                        sink.emit(Event::WouldBuild { artifact, reasons: reasons.clone(), estimate });
                    }
                    Status::Pending { upstream } => {
                        summary.not_run += 1;
                        sink.emit(Event::WouldCheck { artifact, upstream: upstream.to_string() });
                    }
                    Status::Blocked { reason, upstream } => {
                        if let Some(u) = upstream {
                            summary.skipped += 1;
                            sink.emit(Event::Skip { artifact, because: u.to_string() });
                        } else {
                            summary.failed += 1;
                            sink.emit(Event::Fail { artifact, error: reason.clone(), io: false, log: None });
                        }
                    }
                }
            }
            summary.duration_ms = started.elapsed().as_millis() as u64;
            sink.emit(Event::Done(summary.clone()));
            return summary;
        }

        let selected: HashSet<NodeIndex> = selection.iter().copied().collect();
        let mut outcome: HashMap<NodeIndex, Outcome> = HashMap::new();
        let mut waiting: HashMap<NodeIndex, usize> = HashMap::new();
        let mut runnable: VecDeque<Job> = VecDeque::new();
        let mut settled: VecDeque<NodeIndex> = VecDeque::new();
        for &n in selection {
            let artifact = plan.graph[n].id.to_string();
            match statuses[&n].clone() {
                Status::Fresh { tree, .. } => {
                    summary.fresh += 1;
                    sink.emit(Event::Fresh { artifact, cutoff: false });
                    outcome.insert(n, Outcome::Done(tree));
                }
                Status::Stale { key, fingerprint, .. } => runnable.push_back(Job { node: n, key, fingerprint }),
                Status::Pending { .. } => {
                    let unfinished = plan.deps(n).iter().filter(|d| !outcome.contains_key(d)).count();
                    waiting.insert(n, unfinished);
                }
                Status::Blocked { reason, upstream } => {
                    if let Some(u) = upstream {
                        summary.skipped += 1;
                        sink.emit(Event::Skip { artifact, because: u.to_string() });
                        outcome.insert(n, Outcome::Skipped);
                    } else {
                        summary.failed += 1;
                        sink.emit(Event::Fail { artifact, error: reason, io: false, log: None });
                        outcome.insert(n, Outcome::Failed);
                    }
                    settled.push_back(n);
                }
            }
        }
        // Start events carry the reasons computed up front.
        let mut reasons: HashMap<NodeIndex, Vec<DirtyReason>> = statuses
            .into_iter()
            .filter_map(|(n, s)| match s {
                Status::Stale { reasons, .. } => Some((n, reasons)),
                _ => None,
            })
            .collect();

        let pools = &self.ws.manifest.workspace.pools;
        let mut pool_use: HashMap<String, usize> = HashMap::new();
        let mut running = 0usize;
        // An exclusive action runs (it is then the only one).
        let mut exclusive_running = false;
        let mut stop = summary.failed > 0 && !opts.keep_going;
        let mut last_save = Instant::now();
        let (tx, rx) = mpsc::channel::<JobResult>();

        std::thread::scope(|scope| {
            loop {
                // Settle dependents of everything that finished: skip them, check them, or
                // queue them.
                while let Some(done) = settled.pop_front() {
                    let failed = !matches!(outcome.get(&done), Some(Outcome::Done(_)));
                    for d in plan.dependents(done).filter(|d| selected.contains(d)).collect::<Vec<_>>() {
                        let Some(count) = waiting.get_mut(&d) else { continue };
                        *count -= 1;
                        if *count > 0 && !failed {
                            continue;
                        }
                        let artifact = plan.graph[d].id.to_string();
                        if failed {
                            waiting.remove(&d);
                            summary.skipped += 1;
                            sink.emit(Event::Skip { artifact, because: plan.graph[done].id.to_string() });
                            outcome.insert(d, Outcome::Skipped);
                            settled.push_back(d);
                            continue;
                        }
                        waiting.remove(&d);
                        let status = self.derive(d, &|u| match outcome.get(&u) {
                            Some(Outcome::Done(tree)) => {
                                Some(Status::Fresh { key: Digest::default(), tree: tree.clone() })
                            }
                            _ => None,
                        });
                        match status {
                            Status::Fresh { tree, .. } => {
                                summary.fresh += 1;
                                sink.emit(Event::Fresh { artifact, cutoff: true });
                                outcome.insert(d, Outcome::Done(tree));
                                settled.push_back(d);
                            }
                            Status::Stale { key, fingerprint, reasons: r } => {
                                reasons.insert(d, r);
                                runnable.push_back(Job { node: d, key, fingerprint });
                            }
                            Status::Blocked { reason, .. } => {
                                summary.failed += 1;
                                sink.emit(Event::Fail { artifact, error: reason, io: false, log: None });
                                outcome.insert(d, Outcome::Failed);
                                settled.push_back(d);
                                stop |= !opts.keep_going;
                            }
                            Status::Pending { .. } => unreachable!("all upstream artifacts are done"),
                        }
                    }
                    for w in self.take_warnings() {
                        sink.emit(Event::Warning { message: w });
                    }
                }
                if opts.cancel.is_cancelled() {
                    stop = true;
                    summary.interrupted = true;
                }
                // Start what fits. An exclusive action (a benchmark) waits until nothing runs,
                // and while one waits or runs nothing else starts.
                let alone = |j: &Job| {
                    plan.graph[j.node].executor.as_ref().is_some_and(|e| e.exclusive(&plan.graph[j.node].decl))
                };
                while !stop && running < jobs && !exclusive_running {
                    let waiting_alone = runnable.iter().any(alone);
                    let pos = runnable.iter().position(|j| {
                        let fits = match &plan.graph[j.node].decl.pool {
                            Some(p) => {
                                pool_use.get(p).copied().unwrap_or(0)
                                    < pools.get(p).map(|p| p.capacity as usize).unwrap_or(usize::MAX)
                            }
                            None => true,
                        };
                        fits && if waiting_alone { alone(j) && running == 0 } else { true }
                    });
                    let Some(pos) = pos else { break };
                    let job = runnable.remove(pos).expect("position is in range");
                    exclusive_running = alone(&job);
                    let node = &plan.graph[job.node];
                    if let Some(p) = &node.decl.pool {
                        *pool_use.entry(p.clone()).or_default() += 1;
                    }
                    running += 1;
                    sink.emit(Event::Start {
                        artifact: node.id.to_string(),
                        reasons: reasons.remove(&job.node).unwrap_or_default(),
                    });
                    let deps: BTreeMap<ArtifactId, PathBuf> = plan
                        .deps(job.node)
                        .into_iter()
                        .filter_map(|d| match outcome.get(&d) {
                            Some(Outcome::Done(tree)) => {
                                Some((plan.graph[d].id.clone(), self.ws.cache.cas_dir(&tree.digest())))
                            }
                            _ => None,
                        })
                        .collect();
                    let tx = tx.clone();
                    let cancel = opts.cancel.clone();
                    scope.spawn(move || {
                        let t0 = Instant::now();
                        let result = self.run_action(&job, &deps, &cancel, sink);
                        let _ = tx.send((job.node, job.key, t0.elapsed(), result));
                    });
                }
                if running == 0 {
                    break;
                }
                let (n, key, elapsed, result) = match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(r) => r,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                };
                running -= 1;
                exclusive_running = false;
                let node = &plan.graph[n];
                if let Some(p) = &node.decl.pool
                    && let Some(u) = pool_use.get_mut(p)
                {
                    *u -= 1;
                }
                let artifact = node.id.to_string();
                match result {
                    Ok((tree, fetched)) => {
                        summary.fetched += fetched as usize;
                        let previous = self.recorded(&node.id).map(|r| r.tree.digest());
                        let content = tree.digest();
                        self.set_state(&node.id, key, tree.clone());
                        summary.built += 1;
                        sink.emit(Event::Finish {
                            artifact,
                            content,
                            duration_ms: elapsed.as_millis() as u64,
                            unchanged: previous == Some(content),
                        });
                        outcome.insert(n, Outcome::Done(tree));
                    }
                    Err((err, log)) => {
                        if matches!(err, ActionError::Cancelled) {
                            summary.interrupted = true;
                        }
                        summary.failed += 1;
                        let io = err.is_io();
                        summary.io_failed += io as usize;
                        let error = match (&err, &log) {
                            (ActionError::Cancelled, _) | (_, None) => err.to_string(),
                            (_, Some(log)) => {
                                let tail = Log::tail_of(log, 12);
                                if tail.is_empty() { err.to_string() } else { format!("{err}\n{}", tail.join("\n")) }
                            }
                        };
                        sink.emit(Event::Fail { artifact, error, io, log: log.map(|l| l.display().to_string()) });
                        outcome.insert(n, Outcome::Failed);
                        stop |= !opts.keep_going;
                    }
                }
                settled.push_back(n);
                if last_save.elapsed() > STATE_SAVE_INTERVAL {
                    if let Err(e) = self.persist() {
                        sink.emit(Event::Warning { message: format!("could not save the build state: {e}") });
                    }
                    last_save = Instant::now();
                }
            }
        });
        summary.not_run = selection.len() - outcome.len();
        if let Err(e) = self.persist() {
            sink.emit(Event::Warning { message: format!("could not save the build state: {e}") });
        }
        summary.duration_ms = started.elapsed().as_millis() as u64;
        sink.emit(Event::Done(summary.clone()));
        summary
    }

    /// Runs one action in a staging directory and publishes its output. Nothing is recorded
    /// unless the action succeeded and its output is in the content store.
    fn run_action(
        &self,
        job: &Job,
        deps: &BTreeMap<ArtifactId, PathBuf>,
        cancel: &CancelToken,
        sink: &dyn EventSink,
    ) -> Result<(Tree, bool), (ActionError, Option<PathBuf>)> {
        let cache = &self.ws.cache;
        let node = &self.ws.plan.graph[job.node];
        let exec = node.executor.as_ref().expect("only nodes with an executor are run");
        let staging = cache.staging_dir().map_err(|e| (ActionError::from(e), None))?;
        let log_path = cache.log_path(&node.id.file_stem());
        let log = Log::create(&log_path).map_err(|e| (ActionError::io(&log_path, e), None))?;
        let inputs: Vec<String> = job.fingerprint.inputs.keys().cloned().collect();
        let artifact = node.id.to_string();
        let progress = |done: u64, total: u64, message: &str| {
            sink.emit(Event::Progress { artifact: artifact.clone(), done, total, message: message.to_string() })
        };
        let started = Instant::now();
        let ctx = ActionContext {
            artifact: &node.id,
            key: &job.key,
            decl: &node.decl,
            manifest: &self.ws.manifest,
            params: &node.plan.params,
            workspace: &self.ws.root,
            out_dir: &staging,
            deps,
            inputs: &inputs,
            cache,
            shared_calls: self.ws.shared_calls(),
            log: &log,
            cancel,
            progress: &progress,
        };
        if let Some(remote) = &self.ws.remote
            && let Some(tree) = remote.fetch(&job.key, &artifact, cache, &self.ws.stat)
        {
            let _ = forge_cache::fsutil::remove_tree(&staging);
            sink.emit(Event::Fetched { artifact: artifact.clone() });
            return Ok((tree, true));
        }
        let result = exec.run(&ctx).and_then(|()| {
            let tree = cache.publish(&staging, &self.ws.stat)?;
            let entry = ActionEntry {
                schema: ACTION_SCHEMA,
                artifact: artifact.clone(),
                key: job.key,
                fingerprint: job.fingerprint.to_json(),
                tree: tree.clone(),
                created_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                duration_ms: started.elapsed().as_millis() as u64,
            };
            cache.write_action(&entry)?;
            if let Some(remote) = &self.ws.remote {
                remote.push(&entry, cache);
            }
            Ok(tree)
        });
        if result.is_err() {
            let _ = forge_cache::fsutil::remove_tree(&staging);
        }
        result.map(|t| (t, false)).map_err(|e| (e, Some(log_path)))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
