//! The models a server may run and the ones resident now, under a byte budget.
//!
//! A request takes its model from here: resident, it is marked most recently used and handed
//! over at once; being loaded by another request, it waits for that load alone; absent, it
//! starts the load itself, off the async threads. A load never holds the lock, so a request for
//! a resident model never waits on another model's load. When a model arrives, the least
//! recently used idle ones are dropped until the budget holds (bytes of weights, as
//! [`QModel::bytes`] counts them, and a load reserves its file's size before it starts). A model
//! that is answering requests is not dropped: when every resident model is busy a load waits
//! for one to become idle (up to [`LOAD_WAIT`], then the request gets 503), so the models in
//! memory never exceed the budget.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use forge_infer::{Adapter, QModel};
use tokio::sync::watch;

use crate::worker::{Memory, Worker};

/// A model the server can run: an NPC's GGUF file and how to talk to it.
#[derive(Clone)]
pub struct Npc {
    /// The name clients use (`/chat/{npc}`, the OpenAI `model` field).
    pub name: String,
    /// The GGUF file (the base, when `adapter` is set).
    pub file: PathBuf,
    /// A LoRA adapter GGUF applied on `file` per request; NPCs on one base share it in memory.
    pub adapter: Option<PathBuf>,
    /// A system message put before every conversation that has none.
    pub system: Option<String>,
    /// Sampling for requests that do not say (the target's benchmark settings).
    pub defaults: Defaults,
    /// The target's recipe judge (its verifiers and command verifiers), for requests that ask
    /// to retry until an answer passes.
    pub judge: Option<Arc<forge_bench::judge::Judge>>,
}

impl std::fmt::Debug for Npc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Npc").field("name", &self.name).field("file", &self.file).finish_non_exhaustive()
    }
}

/// Sampling defaults of an NPC.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<usize>,
    pub max_tokens: Option<usize>,
    /// Attempts for retry-until-success when a request asks for it without a number.
    pub attempts: usize,
}

impl Default for Defaults {
    /// OpenAI's: temperature 1, no truncation.
    fn default() -> Self {
        Defaults { temperature: 1.0, top_p: 1.0, top_k: None, max_tokens: None, attempts: 4 }
    }
}

impl Npc {
    /// An NPC with OpenAI's sampling defaults and no judge.
    pub fn new(name: &str, file: PathBuf) -> Npc {
        Npc { name: name.to_string(), file, adapter: None, system: None, defaults: Defaults::default(), judge: None }
    }
}

/// A resident model (a GGUF file, shared by every NPC on it), its decoding thread, and the
/// adapters loaded on it.
pub struct Loaded {
    /// The file's path: the registry's key.
    pub key: String,
    pub worker: Worker,
    pub bytes: u64,
    pub architecture: &'static str,
    adapters: Mutex<HashMap<PathBuf, Arc<Adapter>>>,
    /// Bytes of the adapters.
    adapter_bytes: AtomicU64,
    /// When it became resident.
    since: std::time::Instant,
    /// A load waits for its memory: the model finishes the answers it has and takes no more,
    /// then it is dropped (requests for it wait, then load it again).
    draining: std::sync::atomic::AtomicBool,
}

impl Loaded {
    /// Bytes of the model and its adapters.
    pub fn total_bytes(&self) -> u64 {
        self.bytes + self.adapter_bytes.load(Ordering::Relaxed)
    }

    fn adapter(&self, path: &Path) -> Option<Arc<Adapter>> {
        self.adapters.lock().expect("adapters").get(path).cloned()
    }
}

/// What a request runs on: its NPC, the resident model, and the NPC's adapter.
pub struct Handle {
    pub npc: Npc,
    pub model: Arc<Loaded>,
    pub adapter: Option<Arc<Adapter>>,
}

enum Slot {
    /// Being loaded: the watch turns `Some` when the load ends.
    /// (Not the model itself: a watch value outlives the load's last look at it, and a model
    /// held there would look busy to the eviction.)
    Loading(watch::Receiver<Option<Result<(), String>>>),
    Ready {
        model: Arc<Loaded>,
        used: u64,
    },
}

#[derive(Default)]
struct Resident {
    slots: HashMap<String, Slot>,
    clock: u64,
    /// Bytes reserved by loads in progress.
    reserved: u64,
    /// Bytes held by running answers (their KV caches and activations).
    working: u64,
    /// Models dropped for room, and their bytes: counted until their threads have freed them
    /// ([`Registry::reap`]), so that a load never allocates into memory not yet given back.
    /// Each with whether a reservation already counts its bytes (it was dropped to make room
    /// for that reservation, which waits for the reap).
    dropping: Vec<(Arc<Loaded>, bool)>,
    /// Bytes of the dropped models no reservation counts.
    freeing: u64,
    /// Bytes of answers ended since the heap was last trimmed.
    released: u64,
}

impl Resident {
    /// Bytes of the resident models, the answers they run, and the loads under way.
    fn used(&self) -> u64 {
        let models: u64 = self
            .slots
            .values()
            .map(|s| match s {
                Slot::Ready { model, .. } => model.total_bytes(),
                Slot::Loading(_) => 0,
            })
            .sum();
        models + self.working + self.reserved + self.freeing
    }

    /// A load waits for memory that busy models hold: the least recently used of those that had
    /// their [`MIN_TURN`] finishes what it runs and takes no more, so that every model gets its
    /// turn when more are wanted than fit (else the busiest few would hold the memory for ever).
    fn drain_one(&mut self, except: Option<&str>) {
        if self.slots.values().any(|s| matches!(s, Slot::Ready { model, .. } if model.draining.load(Ordering::Relaxed)))
        {
            return;
        }
        let lru = self
            .slots
            .values()
            .filter_map(|s| match s {
                Slot::Ready { model, used } if model.since.elapsed() >= MIN_TURN && except != Some(&model.key) => {
                    Some((*used, model))
                }
                _ => None,
            })
            .min_by_key(|(used, _)| *used);
        if let Some((_, model)) = lru {
            model.draining.store(true, Ordering::Relaxed);
        }
    }

    /// Drops idle models (counted in `evicted`) until `bytes` more fit in `budget` once they
    /// are freed, then reserves them, which takes over the dropped models' bytes (the caller
    /// reaps them, [`Registry::reap`], before it uses the memory); false if they cannot fit.
    fn try_reserve(&mut self, bytes: u64, budget: u64, evicted: &mut u64) -> bool {
        let (mut freed, first) = (0, self.dropping.len());
        while self.used() - freed + bytes > budget {
            match self.evict_idle() {
                Some(b) => {
                    freed += b;
                    *evicted += 1;
                }
                None => break,
            }
        }
        let fits = self.used() - freed + bytes <= budget;
        if fits {
            self.reserved += bytes;
            for d in &mut self.dropping[first..] {
                d.1 = true;
            }
            self.freeing -= freed;
        }
        fits
    }

    /// Drops the least recently used model no request holds (to [`Resident::dropping`]); its
    /// bytes, or `None` if there is none.
    fn evict_idle(&mut self) -> Option<u64> {
        let lru = self
            .slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Ready { model, used } if Arc::strong_count(model) == 1 => Some((*used, k.clone())),
                _ => None,
            })
            .min();
        let (_, victim) = lru?;
        let Some(Slot::Ready { model, .. }) = self.slots.remove(&victim) else { return None };
        let bytes = model.total_bytes();
        self.freeing += bytes;
        self.dropping.push((model, false));
        Some(bytes)
    }
}

/// What a resident model holds beyond [`QModel::bytes`] and its answers' bytes: its threads'
/// stacks, the tokenizer's cache of words, allocator slack (measured: with 4 models resident
/// under 64 clients, the process held at most 9 MiB beyond the count and its idle size).
pub const MODEL_OVERHEAD: u64 = 3 << 20;

/// The budget of which models may count `bytes`: 1/16 of a budget stays free for the
/// allocator.
pub fn budget_for(bytes: u64) -> u64 {
    (bytes * 16).div_ceil(15)
}

/// The bytes the budget counts for a resident model while it is idle.
pub fn resident_bytes(model: &QModel) -> u64 {
    model.bytes() as u64 + MODEL_OVERHEAD
}

/// The least time a model stays resident before a load that needs its memory drains it.
pub const MIN_TURN: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a load waits for memory held by busy models before it gives up.
pub const LOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What the registry did, for the metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub loads: u64,
    /// NPCs pointed at new files by a rebuild.
    pub reloads: u64,
    pub evictions: u64,
    pub failed_loads: u64,
}

pub struct Registry {
    /// The NPCs by name, and per NPC the key of its model (see [`key`]); a rebuild replaces
    /// an NPC's files ([`Registry::replace`]).
    npcs: std::sync::RwLock<(BTreeMap<String, Npc>, HashMap<String, String>)>,
    budget: u64,
    threads: usize,
    batch: usize,
    queue: usize,
    resident: Mutex<Resident>,
    counts: Mutex<Counts>,
}

/// Why a model could not be had.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("no model or NPC named `{0}`")]
    Unknown(String),
    #[error("{0}")]
    Load(String),
}

/// The registry as a model's worker sees it: memory for its answers.
struct Answers {
    registry: std::sync::Weak<Registry>,
    /// The model's key.
    key: String,
}

impl Memory for Answers {
    fn reserve(&self, bytes: u64) -> bool {
        let Some(reg) = self.registry.upgrade() else { return false };
        let mut evicted = 0;
        let fits = reg.grow(bytes, &mut evicted);
        let mut r = reg.resident.lock().expect("resident");
        if fits {
            r.reserved -= bytes;
            r.working += bytes;
        } else {
            // Other models' answers hold the memory: one of them takes no more.
            r.drain_one(Some(&self.key));
        }
        drop(r);
        reg.counts.lock().expect("counts").evictions += evicted;
        fits
    }

    fn release(&self, bytes: u64) {
        let Some(reg) = self.registry.upgrade() else { return };
        let trim = {
            let mut r = reg.resident.lock().expect("resident");
            r.working -= bytes;
            r.released += bytes;
            // Answers' caches and activations are many pieces under glibc's mapping threshold:
            // freed, they stay with the allocator (and the process) until trimmed.
            let trim = r.released >= TRIM_EVERY;
            if trim {
                r.released = 0;
            }
            trim
        };
        if trim {
            crate::trim_heap();
        }
    }
}

/// Freed answer memory is handed back to the system after this many bytes.
const TRIM_EVERY: u64 = 8 << 20;

impl Registry {
    pub fn new(npcs: Vec<Npc>, budget: u64, threads: usize, batch: usize, queue: usize) -> Registry {
        let keys = npcs.iter().map(|n| (n.name.clone(), key(n))).collect();
        Registry {
            npcs: std::sync::RwLock::new((npcs.into_iter().map(|n| (n.name.clone(), n)).collect(), keys)),
            budget,
            threads,
            batch,
            queue,
            resident: Mutex::new(Resident::default()),
            counts: Mutex::new(Counts::default()),
        }
    }

    /// Every NPC the server can run, by name.
    pub fn npcs(&self) -> Vec<Npc> {
        self.npcs.read().expect("npcs").0.values().cloned().collect()
    }

    /// Points NPC `npc.name` at new files (a rebuild published them); returns whether they
    /// changed. Requests already running finish on the old model, which is dropped from memory
    /// once no NPC uses it and they are done.
    pub fn replace(&self, npc: Npc) -> bool {
        // Artifacts are immutable: the same paths are the same files (and hashing a base for
        // its key every time the watcher looks would read it all again).
        let unchanged = |g: &(BTreeMap<String, Npc>, HashMap<String, String>)| {
            g.0.get(&npc.name).is_some_and(|old| old.file == npc.file && old.adapter == npc.adapter)
        };
        if unchanged(&self.npcs.read().expect("npcs")) {
            return false;
        }
        let new_key = key(&npc);
        let mut guard = self.npcs.write().expect("npcs");
        if unchanged(&guard) {
            return false;
        }
        let (npcs, keys) = &mut *guard;
        let old_key = keys.insert(npc.name.clone(), new_key);
        npcs.insert(npc.name.clone(), npc);
        if let Some(old) = old_key.filter(|k| !keys.values().any(|v| v == k)) {
            let mut r = self.resident.lock().expect("resident");
            if matches!(r.slots.get(&old), Some(Slot::Ready { .. })) {
                r.slots.remove(&old);
            }
        }
        self.counts.lock().expect("counts").reloads += 1;
        true
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The part of the budget models may count: 1/16 stays free for the allocator's
    /// fragmentation when models load while others answer (measured with `bench/serve.py`'s
    /// load test: up to 12 MiB of a 300 MiB budget beyond what the models count).
    fn usable(&self) -> u64 {
        self.budget - self.budget / 16
    }

    /// Reserves `bytes` now if they fit, dropping idle models (counted in `evicted`) and
    /// waiting until their memory is freed.
    fn grow(&self, bytes: u64, evicted: &mut u64) -> bool {
        let fits = self.resident.lock().expect("resident").try_reserve(bytes, self.usable(), evicted);
        self.reap();
        fits
    }

    /// Ends the threads of the models dropped for room, which frees their memory, and then
    /// stops counting it.
    fn reap(&self) {
        let gone = std::mem::take(&mut self.resident.lock().expect("resident").dropping);
        if gone.is_empty() {
            return;
        }
        for (model, promised) in gone {
            let bytes = model.total_bytes();
            // Out of its slot and held by no request (that is why it was dropped): the last.
            match Arc::try_unwrap(model) {
                Ok(loaded) => loaded.worker.stop(),
                Err(model) => drop(model),
            }
            if !promised {
                self.resident.lock().expect("resident").freeing -= bytes;
            }
        }
        crate::trim_heap();
    }

    /// Bytes counted against the budget now: resident models, running answers, loads under
    /// way, and dropped models not yet freed.
    pub fn used_bytes(&self) -> u64 {
        self.resident.lock().expect("resident").used()
    }

    /// Bytes the running answers hold (KV caches and activations), out of the budget.
    pub fn working_bytes(&self) -> u64 {
        self.resident.lock().expect("resident").working
    }

    pub fn counts(&self) -> Counts {
        *self.counts.lock().expect("counts")
    }

    /// The resident models: file name and bytes (with their adapters).
    pub fn resident(&self) -> Vec<(String, u64)> {
        let r = self.resident.lock().expect("resident");
        let mut v: Vec<(String, u64)> = r
            .slots
            .values()
            .filter_map(|s| match s {
                Slot::Ready { model, .. } => {
                    let name = match model.key.strip_prefix("blake3:") {
                        Some(h) => format!("base-{}", &h[..12]),
                        None => Path::new(&model.key)
                            .file_name()
                            .map_or(model.key.clone(), |n| n.to_string_lossy().into_owned()),
                    };
                    Some((name, model.total_bytes()))
                }
                Slot::Loading(_) => None,
            })
            .collect();
        v.sort();
        v
    }

    /// Whether NPC `name` would answer without a load: its model resident (with its adapter).
    pub fn is_resident(&self, name: &str) -> bool {
        let (npc, key) = {
            let g = self.npcs.read().expect("npcs");
            match (g.0.get(name), g.1.get(name)) {
                (Some(n), Some(k)) => (n.clone(), k.clone()),
                _ => return false,
            }
        };
        let r = self.resident.lock().expect("resident");
        match r.slots.get(&key) {
            Some(Slot::Ready { model, .. }) => npc.adapter.as_ref().is_none_or(|a| model.adapter(a).is_some()),
            _ => false,
        }
    }

    /// NPC `name`'s model (loaded if need be) and adapter (likewise).
    pub async fn get(self: &Arc<Self>, name: &str) -> Result<Handle, GetError> {
        let (npc, key) = {
            let g = self.npcs.read().expect("npcs");
            match (g.0.get(name), g.1.get(name)) {
                (Some(n), Some(k)) => (n.clone(), k.clone()),
                _ => return Err(GetError::Unknown(name.to_string())),
            }
        };
        let model = self.model(&npc, key).await?;
        let adapter = match &npc.adapter {
            None => None,
            Some(path) => match model.adapter(path) {
                Some(a) => Some(a),
                None => {
                    let (me, m, p, n) = (self.clone(), model.clone(), path.clone(), npc.name.clone());
                    let a = tokio::task::spawn_blocking(move || me.load_adapter(&m, &p, &n))
                        .await
                        .map_err(|e| GetError::Load(format!("loading `{name}`'s adapter: {e}")))?
                        .map_err(GetError::Load)?;
                    Some(a)
                }
            },
        };
        Ok(Handle { npc, model, adapter })
    }

    /// Loads an adapter onto its resident base, within the budget.
    fn load_adapter(&self, model: &Arc<Loaded>, path: &Path, npc: &str) -> Result<Arc<Adapter>, String> {
        if let Some(a) = model.adapter(path) {
            return Ok(a);
        }
        let estimate = std::fs::metadata(path).map_err(|e| format!("`{npc}`'s adapter {}: {e}", path.display()))?.len();
        let evicted = self.make_room(estimate, npc)?;
        let loaded = Adapter::load(path, &model.worker.model).map_err(|e| format!("`{npc}`'s adapter: {e}"));
        let mut r = self.resident.lock().expect("resident");
        r.reserved -= estimate;
        self.counts.lock().expect("counts").evictions += evicted;
        let adapter = Arc::new(loaded?);
        let mut adapters = model.adapters.lock().expect("adapters");
        let kept = adapters.entry(path.to_path_buf()).or_insert_with(|| {
            model.adapter_bytes.fetch_add(adapter.bytes() as u64, Ordering::Relaxed);
            adapter.clone()
        });
        Ok(kept.clone())
    }

    /// The model of `npc`'s file, loading it if it is not resident.
    async fn model(self: &Arc<Self>, npc: &Npc, name: String) -> Result<Arc<Loaded>, GetError> {
        loop {
            let rx = {
                let mut r = self.resident.lock().expect("resident");
                r.clock += 1;
                let now = r.clock;
                match r.slots.get_mut(&name) {
                    Some(Slot::Ready { model, used }) if !model.draining.load(Ordering::Relaxed) => {
                        *used = now;
                        return Ok(model.clone());
                    }
                    // Draining for another model's load: it comes back after that.
                    Some(Slot::Ready { .. }) => None,
                    Some(Slot::Loading(rx)) => Some(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        r.slots.insert(name.clone(), Slot::Loading(rx.clone()));
                        let (me, key, npc) = (self.clone(), name.clone(), npc.clone());
                        tokio::task::spawn_blocking(move || me.load(npc, key, tx));
                        Some(rx)
                    }
                }
            };
            let Some(mut rx) = rx else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let done = rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| GetError::Load(format!("loading `{name}` was abandoned")))?;
            // Loaded: take it from its slot (next turn of the loop); failed: say why.
            if let Some(Err(e)) = &*done {
                return Err(GetError::Load(e.clone()));
            }
        }
    }

    fn load(self: &Arc<Self>, npc: Npc, name: String, tx: watch::Sender<Option<Result<(), String>>>) {
        let result = self.load_within_budget(npc, name.clone());
        let mut r = self.resident.lock().expect("resident");
        let mut counts = self.counts.lock().expect("counts");
        match &result {
            Ok((model, _)) => {
                counts.loads += 1;
                r.clock += 1;
                let now = r.clock;
                r.slots.insert(name, Slot::Ready { model: model.clone(), used: now });
                r.reserved -= model.bytes;
            }
            Err(_) => {
                counts.failed_loads += 1;
                r.slots.remove(&name);
            }
        }
        if let Ok((_, evicted)) = &result {
            counts.evictions += evicted;
        }
        drop((r, counts));
        let _ = tx.send(Some(result.map(|_| ())));
    }

    /// Makes room (dropping idle models, waiting for busy ones) for the most the load holds at
    /// once, loads the model, and returns it with the number of models dropped for it.
    fn load_within_budget(self: &Arc<Self>, npc: Npc, key: String) -> Result<(Arc<Loaded>, u64), String> {
        let name = npc.name.clone();
        let file = npc.file.display().to_string();
        let size = std::fs::metadata(&npc.file).map_err(|e| format!("loading `{name}` ({file}): {e}"))?.len();
        let too_big = |what: &str, bytes: u64| {
            format!(
                "`{name}` {what} {}, more than the whole memory budget of {}",
                crate::bytes(bytes),
                crate::bytes(self.budget)
            )
        };
        if size > self.usable() {
            return Err(too_big("is a file of", size));
        }
        // The header is read within the file's size; the rest within the load's peak, which
        // the header tells. A load never waits while it holds memory (two loads each holding
        // part of what the other needs would wait for ever): if the peak does not fit at once,
        // it lets everything go, waits for room for the whole peak, and reads the file again.
        let release = |n: u64| self.resident.lock().expect("resident").reserved -= n;
        let (mut need, mut evicted) = (size, 0);
        let (mut model, held) = loop {
            evicted += self.make_room(need, &name)?;
            let mut held = need;
            let mut wanted = None;
            let mut reserve = |peak: u64| {
                // And what the model holds beyond its bytes once it runs.
                let peak = peak + MODEL_OVERHEAD;
                if peak > self.usable() {
                    return Err(too_big("needs", peak));
                }
                if peak > held {
                    if !self.grow(peak - held, &mut evicted) {
                        wanted = Some(peak);
                        return Err(format!("waiting for {} of memory", crate::bytes(peak)));
                    }
                    held = peak;
                }
                Ok(())
            };
            let loaded = QModel::load_reserving(&npc.file, forge_infer::Kernels::best(), &mut reserve);
            match (loaded, wanted) {
                (Ok(m), _) => break (m, held),
                (Err(_), Some(peak)) => {
                    release(held);
                    need = peak;
                }
                (Err(e), None) => {
                    release(held);
                    return Err(format!("loading `{name}` ({file}): {e}"));
                }
            }
        };
        // The header's values and the tensors as read are freed: give them back.
        crate::trim_heap();
        model.set_threads(self.threads);
        // Kept: what the model holds idle (the load's transient copies are gone) — within the
        // peak; were it more, the memory is in use all the same, and counted.
        let bytes = resident_bytes(&model);
        if bytes > held && !self.grow(bytes - held, &mut evicted) {
            self.resident.lock().expect("resident").reserved += bytes - held;
        }
        release(held.saturating_sub(bytes));
        let architecture = model.architecture();
        let memory: Arc<dyn Memory> = Arc::new(Answers { registry: Arc::downgrade(self), key: key.clone() });
        let worker = Worker::start(&name, model, self.batch, self.queue, memory);
        let loaded = Loaded {
            key,
            worker,
            bytes,
            architecture,
            adapters: Mutex::default(),
            adapter_bytes: AtomicU64::new(0),
            since: std::time::Instant::now(),
            draining: Default::default(),
        };
        // `bytes` stay reserved until the model is in its slot ([`Registry::load`]).
        Ok((Arc::new(loaded), evicted))
    }

    /// Reserves `bytes`, dropping idle models and waiting for busy ones to finish; returns the
    /// number of models dropped.
    fn make_room(&self, bytes: u64, name: &str) -> Result<u64, String> {
        if bytes > self.usable() {
            return Err(format!(
                "`{name}` needs {}, more than the whole memory budget of {}",
                crate::bytes(bytes),
                crate::bytes(self.budget)
            ));
        }
        let t0 = std::time::Instant::now();
        let mut evicted = 0;
        loop {
            if self.grow(bytes, &mut evicted) {
                return Ok(evicted);
            }
            self.resident.lock().expect("resident").drain_one(None);
            if t0.elapsed() > LOAD_WAIT {
                return Err(format!(
                    "no memory for `{name}`: the models in the {} budget stayed busy for {} s",
                    crate::bytes(self.budget),
                    LOAD_WAIT.as_secs()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// The registry's key for an NPC's model: its file, so that NPCs on one file share it; for an
/// NPC with an adapter, the base's content (every target's adapter artifact holds its own copy
/// of the base: equal bytes, one model in memory).
fn key(npc: &Npc) -> String {
    let path = std::fs::canonicalize(&npc.file).unwrap_or_else(|_| npc.file.clone());
    if npc.adapter.is_some() {
        let mut h = blake3::Hasher::new();
        if h.update_mmap_rayon(&path).is_ok() {
            return format!("blake3:{}", h.finalize().to_hex());
        }
    }
    path.display().to_string()
}
