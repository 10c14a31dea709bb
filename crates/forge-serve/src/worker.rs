//! One decoding thread per resident model, fed by a bounded queue: a request that finds the
//! queue full is turned away at once (503) rather than piling up. An answer starts when the
//! memory budget has room for its KV cache and activations ([`Memory`]); the thread streams
//! each answer's text back as it is generated and stops an answer whose client has gone.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use forge_infer::sampling::sample;
use forge_infer::tokenizer::TextStream;
use forge_infer::{Cache, QModel, Sampling};
use tokio::sync::mpsc::Sender;

/// One answer to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    /// Strings that end the answer (not part of it).
    pub stops: Vec<String>,
    /// The NPC's LoRA adapter on this model, if it has one.
    pub adapter: Option<Arc<forge_infer::Adapter>>,
    /// Bounded: a client that stops reading a stream holds the model until it reads on or
    /// hangs up (then the answer stops).
    pub events: Sender<Event>,
}

/// Why an answer ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop string.
    Stop,
    /// The token budget or the context ran out.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a job sends back.
#[derive(Debug)]
pub enum Event {
    /// Text that became final.
    Text(String),
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
    /// The memory budget stayed full (other models' answers held it) for
    /// [`crate::registry::LOAD_WAIT`].
    NoMemory(String),
}

/// Memory for the answers a worker runs, out of the server's budget.
pub trait Memory: Send + Sync {
    /// Reserves `bytes` (dropping idle models if need be); false if they do not fit now.
    fn reserve(&self, bytes: u64) -> bool;
    fn release(&self, bytes: u64);
}

/// The queue is full.
#[derive(Debug)]
pub struct Busy;

pub struct Worker {
    jobs: SyncSender<Job>,
    /// Jobs queued or being answered, and how many may be.
    pending: Arc<AtomicUsize>,
    room: usize,
    /// The model, for its tokenizer and context length (the thread decodes with it).
    pub model: Arc<QModel>,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    /// Starts the thread of `model`, with room for `queue` waiting jobs, its answers' memory
    /// reserved from `memory`.
    pub fn start(name: &str, model: QModel, batch: usize, queue: usize, memory: Arc<dyn Memory>) -> Worker {
        let batch = batch.max(1);
        let room = batch + queue;
        let (jobs, rx) = sync_channel(room);
        let model = Arc::new(model);
        let pending = Arc::new(AtomicUsize::new(0));
        let (theirs, left) = (model.clone(), pending.clone());
        let thread = std::thread::Builder::new()
            .name(format!("forge-serve-{name}"))
            .spawn(move || {
                run(&theirs, rx, &left, batch, &*memory);
                // Evicted: the weights go back to the system now, and so does what the
                // allocator kept of the tokenizer's many small pieces.
                drop(theirs);
                crate::trim_heap();
            })
            .expect("spawning a model thread");
        Worker { jobs, pending, room, model, thread }
    }

    /// Closes the queue and waits for the thread to end: the model's memory is back with the
    /// system when this returns.
    pub fn stop(self) {
        let Worker { jobs, model, thread, .. } = self;
        drop((jobs, model));
        let _ = thread.join();
    }

    /// Queues a job, or says the queue is full (the model is answering one request and as many
    /// as the queue holds wait).
    pub fn submit(&self, job: Job) -> Result<(), Busy> {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.room {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy);
        }
        self.jobs.try_send(job).map_err(|e| {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            match e {
                TrySendError::Full(_) | TrySendError::Disconnected(_) => Busy,
            }
        })
    }
}

/// An answer being generated.
struct Active<'m> {
    job: Job,
    cache: Cache,
    logits: Vec<f32>,
    rng: forge_infer::sampling::Rng,
    text: TextStream<'m>,
    tokens: usize,
    /// Bytes reserved for it.
    bytes: u64,
}

/// Why an active answer left the batch.
enum Leave {
    Done(Finish),
    Gone,
    Error(String),
}

/// The thread: up to `batch` answers at a time, their next tokens in one forward pass
/// (`QModel::step_many`), new requests joining between tokens; until the model is dropped.
fn run(model: &QModel, jobs: Receiver<Job>, pending: &AtomicUsize, batch: usize, memory: &dyn Memory) {
    let stop_ids = model.tokenizer.stop_ids(&model.cfg.eos);
    let mut active: Vec<Active<'_>> = Vec::new();
    // Taken from the queue, waiting for memory (oldest first), and since when.
    let mut waiting: VecDeque<(Job, Instant)> = VecDeque::new();
    let refuse = |job: Job, event: Event| {
        let events = job.events.clone();
        pending.fetch_sub(1, Ordering::AcqRel);
        let _ = events.blocking_send(event);
    };
    let finish = |a: Active<'_>, how: Leave| {
        memory.release(a.bytes);
        let events = a.job.events.clone();
        let last = match how {
            Leave::Done(finish) => {
                let mut text = a.text;
                let rest = text.finish();
                if !rest.is_empty() {
                    let _ = events.blocking_send(Event::Text(rest));
                }
                Some(Event::Done { finish, prompt_tokens: a.job.prompt.len(), completion_tokens: a.tokens })
            }
            Leave::Gone => None,
            Leave::Error(e) => Some(Event::Error(e)),
        };
        // Free the slot before the client hears the answer is over, so that its next request
        // finds room.
        pending.fetch_sub(1, Ordering::AcqRel);
        if let Some(e) = last {
            let _ = events.blocking_send(e);
        }
    };
    loop {
        // New requests: wait for one when nothing runs, else take what has arrived.
        while active.len() + waiting.len() < batch {
            let job = if active.is_empty() && waiting.is_empty() {
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            };
            waiting.push_back((job, Instant::now()));
        }
        // Start the oldest while the batch and the budget have room for them.
        while active.len() < batch {
            let Some((job, since)) = waiting.pop_front() else { break };
            if job.events.is_closed() {
                pending.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let positions = job.prompt.len() + job.sampling.max_tokens;
            let bytes = model.sequence_bytes(job.prompt.len(), positions) as u64;
            if !memory.reserve(bytes) {
                if active.is_empty() && since.elapsed() > crate::registry::LOAD_WAIT {
                    let why = format!(
                        "no memory for this answer ({}): other models' answers held the budget for {} s",
                        crate::bytes(bytes),
                        crate::registry::LOAD_WAIT.as_secs()
                    );
                    refuse(job, Event::NoMemory(why));
                    continue;
                }
                // Its turn comes when an answer here or elsewhere ends.
                waiting.push_front((job, since));
                break;
            }
            let mut cache = Cache::with_capacity(model, positions);
            match model.step_with(&job.prompt, &mut cache, job.adapter.as_deref()) {
                Ok(logits) => {
                    let rng = forge_infer::sampling::Rng::new(job.sampling.seed);
                    let text = TextStream::new(&model.tokenizer, job.stops.clone());
                    active.push(Active { job, cache, logits, rng, text, tokens: 0, bytes });
                }
                Err(e) => {
                    memory.release(bytes);
                    refuse(job, Event::Error(e.to_string()));
                }
            }
        }
        if active.is_empty() {
            // Waiting for memory that other models' answers hold: look again soon.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        // One token for each answer whose client keeps up (a full channel waits a round).
        let mut leaving: Vec<(usize, Leave)> = Vec::new();
        let mut next: Vec<(usize, u32)> = Vec::new();
        for (i, a) in active.iter_mut().enumerate() {
            if a.job.events.is_closed() {
                leaving.push((i, Leave::Gone));
                continue;
            }
            if a.job.events.capacity() == 0 {
                continue;
            }
            let token = sample(&a.logits, &a.job.sampling, &mut a.rng);
            if stop_ids.contains(&token) {
                leaving.push((i, Leave::Done(Finish::Stop)));
                continue;
            }
            a.tokens += 1;
            match a.text.push(token) {
                Ok(piece) => {
                    if !piece.is_empty() && a.job.events.try_send(Event::Text(piece)).is_err() {
                        leaving.push((i, Leave::Gone));
                        continue;
                    }
                }
                Err(e) => {
                    leaving.push((i, Leave::Error(e.to_string())));
                    continue;
                }
            }
            if a.text.stopped() {
                leaving.push((i, Leave::Done(Finish::Stop)));
            } else if a.tokens == a.job.sampling.max_tokens || a.cache.len() + 1 > model.cfg.max_positions {
                leaving.push((i, Leave::Done(Finish::Length)));
            } else {
                next.push((i, token));
            }
        }
        if !next.is_empty() {
            let mut refs: Vec<Option<&mut Active<'_>>> = active.iter_mut().map(Some).collect();
            let mut batch_rows: Vec<(u32, &mut Cache, Option<&forge_infer::Adapter>)> = Vec::with_capacity(next.len());
            let mut logits_of: Vec<usize> = Vec::with_capacity(next.len());
            let mut outs: Vec<&mut Vec<f32>> = Vec::with_capacity(next.len());
            for &(i, token) in &next {
                let a = refs[i].take().expect("once");
                batch_rows.push((token, &mut a.cache, a.job.adapter.as_deref()));
                outs.push(&mut a.logits);
                logits_of.push(i);
            }
            match model.step_many(&mut batch_rows) {
                Ok(all) => {
                    for (out, l) in outs.into_iter().zip(all) {
                        *out = l;
                    }
                }
                Err(e) => leaving.extend(logits_of.iter().map(|&i| (i, Leave::Error(e.to_string())))),
            }
        }
        if next.is_empty() && leaving.is_empty() {
            // Every answer waits for its client to read on: do not spin.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        leaving.sort_by_key(|l| std::cmp::Reverse(l.0));
        leaving.dedup_by_key(|l| l.0);
        for (i, how) in leaving {
            finish(active.swap_remove(i), how);
        }
    }
}
