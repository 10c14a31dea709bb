//! The models a server may run and the ones resident now, under a byte budget.
//!
//! A request takes its model from here: resident, it is marked most recently used and handed
//! over at once; being loaded by another request, it waits for that load alone; absent, it
//! starts the load itself, off the async threads. A load never holds the lock, so a request for
//! a resident model never waits on another model's load. When a model arrives, the least
//! recently used resident ones are dropped until the budget holds (bytes of weights, as
//! [`QModel::bytes`] counts them); requests already running on a dropped model finish on it,
//! and its memory goes with the last of them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use forge_infer::QModel;
use tokio::sync::watch;

use crate::worker::Worker;

/// A model the server can run: an NPC's GGUF file and how to talk to it.
#[derive(Clone)]
pub struct Npc {
    /// The name clients use (`/chat/{npc}`, the OpenAI `model` field).
    pub name: String,
    /// The GGUF file.
    pub file: PathBuf,
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
        Npc { name: name.to_string(), file, system: None, defaults: Defaults::default(), judge: None }
    }
}

/// A resident model and its decoding thread.
pub struct Loaded {
    pub npc: Npc,
    pub worker: Worker,
    pub bytes: u64,
    pub architecture: &'static str,
}

enum Slot {
    /// Being loaded: the watch turns `Some` when the load ends.
    Loading(watch::Receiver<Option<Result<Arc<Loaded>, String>>>),
    Ready {
        model: Arc<Loaded>,
        used: u64,
    },
}

#[derive(Default)]
struct Resident {
    slots: HashMap<String, Slot>,
    clock: u64,
}

/// What the registry did, for the metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub loads: u64,
    pub evictions: u64,
    pub failed_loads: u64,
}

pub struct Registry {
    npcs: BTreeMap<String, Npc>,
    budget: u64,
    threads: usize,
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

impl Registry {
    pub fn new(npcs: Vec<Npc>, budget: u64, threads: usize, queue: usize) -> Registry {
        Registry {
            npcs: npcs.into_iter().map(|n| (n.name.clone(), n)).collect(),
            budget,
            threads,
            queue,
            resident: Mutex::new(Resident::default()),
            counts: Mutex::new(Counts::default()),
        }
    }

    /// Every model the server can run, by name.
    pub fn npcs(&self) -> impl Iterator<Item = &Npc> {
        self.npcs.values()
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn counts(&self) -> Counts {
        *self.counts.lock().expect("counts")
    }

    /// The resident models: name and bytes.
    pub fn resident(&self) -> Vec<(String, u64)> {
        let r = self.resident.lock().expect("resident");
        let mut v: Vec<(String, u64)> = r
            .slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Ready { model, .. } => Some((k.clone(), model.bytes)),
                Slot::Loading(_) => None,
            })
            .collect();
        v.sort();
        v
    }

    /// The model `name`, loading it if it is not resident.
    pub async fn get(self: &Arc<Self>, name: &str) -> Result<Arc<Loaded>, GetError> {
        let npc = self.npcs.get(name).ok_or_else(|| GetError::Unknown(name.to_string()))?.clone();
        let mut rx = {
            let mut r = self.resident.lock().expect("resident");
            r.clock += 1;
            let now = r.clock;
            match r.slots.get_mut(name) {
                Some(Slot::Ready { model, used }) => {
                    *used = now;
                    return Ok(model.clone());
                }
                Some(Slot::Loading(rx)) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    r.slots.insert(name.to_string(), Slot::Loading(rx.clone()));
                    let me = self.clone();
                    tokio::task::spawn_blocking(move || me.load(npc, tx));
                    rx
                }
            }
        };
        let done = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| GetError::Load(format!("loading `{name}` was abandoned")))?;
        done.clone().expect("waited for it").map_err(GetError::Load)
    }

    fn load(&self, npc: Npc, tx: watch::Sender<Option<Result<Arc<Loaded>, String>>>) {
        let name = npc.name.clone();
        let loaded = QModel::load(&npc.file).map_err(|e| format!("loading `{name}` ({}): {e}", npc.file.display()));
        let result = loaded.and_then(|mut model| {
            model.set_threads(self.threads);
            let bytes = model.bytes() as u64;
            if bytes > self.budget {
                return Err(format!(
                    "`{name}` needs {} of memory, more than the whole budget of {}",
                    crate::bytes(bytes),
                    crate::bytes(self.budget)
                ));
            }
            let architecture = model.architecture();
            Ok(Arc::new(Loaded { worker: Worker::start(&name, model, self.queue), npc, bytes, architecture }))
        });
        let mut r = self.resident.lock().expect("resident");
        let mut counts = self.counts.lock().expect("counts");
        match &result {
            Ok(model) => {
                counts.loads += 1;
                // Drop the least recently used until the new one fits.
                loop {
                    let used: u64 = r
                        .slots
                        .values()
                        .map(|s| match s {
                            Slot::Ready { model, .. } => model.bytes,
                            Slot::Loading(_) => 0,
                        })
                        .sum();
                    if used + model.bytes <= self.budget {
                        break;
                    }
                    let lru = r
                        .slots
                        .iter()
                        .filter_map(|(k, s)| match s {
                            Slot::Ready { used, .. } => Some((*used, k.clone())),
                            Slot::Loading(_) => None,
                        })
                        .min();
                    let Some((_, victim)) = lru else { break };
                    r.slots.remove(&victim);
                    counts.evictions += 1;
                }
                r.clock += 1;
                let now = r.clock;
                r.slots.insert(name, Slot::Ready { model: model.clone(), used: now });
            }
            Err(_) => {
                counts.failed_loads += 1;
                r.slots.remove(&name);
            }
        }
        drop((r, counts));
        let _ = tx.send(Some(result));
    }
}
