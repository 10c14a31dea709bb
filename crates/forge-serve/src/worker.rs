//! One decoding thread per resident model, fed by a bounded queue: a request that finds the
//! queue full is turned away at once (503) rather than piling up. The thread streams each
//! answer's text back as it is generated and stops an answer whose client has gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

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
}

impl Worker {
    /// Starts the thread of `model`, with room for `queue` waiting jobs.
    pub fn start(name: &str, model: QModel, queue: usize) -> Worker {
        let room = queue + 1;
        let (jobs, rx) = sync_channel(room);
        let model = Arc::new(model);
        let pending = Arc::new(AtomicUsize::new(0));
        let (theirs, left) = (model.clone(), pending.clone());
        std::thread::Builder::new()
            .name(format!("forge-serve-{name}"))
            .spawn(move || run(&theirs, rx, &left))
            .expect("spawning a model thread");
        Worker { jobs, pending, room, model }
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

/// The thread: jobs one after another until the model is dropped (every sender gone).
fn run(model: &QModel, jobs: Receiver<Job>, pending: &AtomicUsize) {
    let stop_ids = model.tokenizer.stop_ids(&model.cfg.eos);
    while let Ok(job) = jobs.recv() {
        let events = job.events.clone();
        let last = if events.is_closed() {
            None
        } else {
            match answer(model, &stop_ids, job) {
                Ok(done) => done,
                Err(e) => Some(Event::Error(e.to_string())),
            }
        };
        // Free the slot before the client hears the answer is over, so that its next request
        // finds room.
        pending.fetch_sub(1, Ordering::AcqRel);
        if let Some(e) = last {
            let _ = events.blocking_send(e);
        }
    }
}

/// Generates the answer, sending its text; returns the final event to send (none when the
/// client has gone).
fn answer(model: &QModel, stop_ids: &[u32], job: Job) -> forge_infer::Result<Option<Event>> {
    let s = &job.sampling;
    let mut cache = Cache::with_capacity(model, job.prompt.len() + s.max_tokens);
    let adapter = job.adapter.as_deref();
    let mut logits = model.step_with(&job.prompt, &mut cache, adapter)?;
    let mut rng = forge_infer::sampling::Rng::new(s.seed);
    let mut text = TextStream::new(&model.tokenizer, &job.stops);
    let mut finish = Finish::Length;
    let mut n = 0;
    while n < s.max_tokens {
        if job.events.is_closed() {
            return Ok(None);
        }
        let token = sample(&logits, s, &mut rng);
        if stop_ids.contains(&token) {
            finish = Finish::Stop;
            break;
        }
        n += 1;
        let piece = text.push(token)?;
        if !piece.is_empty() && job.events.blocking_send(Event::Text(piece)).is_err() {
            return Ok(None);
        }
        if text.stopped() {
            finish = Finish::Stop;
            break;
        }
        if n == s.max_tokens || cache.len() + 1 > model.cfg.max_positions {
            break;
        }
        logits = model.step_with(&[token], &mut cache, adapter)?;
    }
    let rest = text.finish();
    if !rest.is_empty() {
        let _ = job.events.blocking_send(Event::Text(rest));
    }
    Ok(Some(Event::Done { finish, prompt_tokens: job.prompt.len(), completion_tokens: n }))
}
