//! Adaptive concurrency: how many requests a teacher gets at once.
//!
//! At most `limit` requests are in flight, and `limit` follows the server:
//!
//! - **Slow start.** Unless the server's slot count is known ([`Aimd::set_capacity`], e.g. from
//!   llama.cpp's `GET /props`), the window starts at [`INITIAL_WINDOW`] and grows by one for
//!   each answer with flat latency to a request that started with the whole window in flight —
//!   doubling per round trip while the server keeps up — up to `max-parallel`. After the first
//!   congestion signal it grows by one per window of such answers (additive increase). A window
//!   the client does not fill is not grown: it has not been shown to work.
//! - **Congestion is a timeout, a 429/503, or queueing.** Each halves the window — once per
//!   round: requests already in flight when the window was cut report the same congestion.
//!   Queueing is read from latency: a server with fewer slots than requests in flight queues
//!   the rest, so their latency grows with the window (llama.cpp's server with one slot answers
//!   the eighth of eight requests after eight generations). Latency is normalised by the answer's
//!   length (seconds per completion token, plus a fixed allowance for the prompt) and compared
//!   with the lowest seen; at 1.8 times that (one request queued ahead doubles it) for a
//!   request that overlapped others of ours, the server is queueing. Latency above three
//!   quarters of the client's timeout, with others in flight, counts too: the next requests
//!   would time out. The window stops growing once latency is 1.4× the lowest or above half
//!   the timeout. (A noisy hosted API can trip the latency signal now and then; the window
//!   then grows back by one per window of answers.)
//! - A 429's `Retry-After` pauses every new request until it has passed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The window an unknown server starts at (or `max-parallel`, if smaller).
pub const INITIAL_WINDOW: usize = 4;

/// Latency at this multiple of the lowest (per unit of work), with others in flight: queueing.
const QUEUEING: f64 = 1.8;
/// The window does not grow while latency is above this multiple of the lowest.
const FLAT: f64 = 1.4;
/// Work added to every answer's completion tokens when normalising its latency (the prompt,
/// the connection): keeps very short answers from looking slow.
const WORK_ALLOWANCE: f64 = 32.0;

pub struct Aimd {
    timeout: Option<Duration>,
    state: Mutex<State>,
    notify: Notify,
}

struct State {
    max: usize,
    limit: f64,
    in_flight: usize,
    /// Requests started so far.
    started: u64,
    paused_until: Option<Instant>,
    last_decrease: Option<Instant>,
    slow_start: bool,
    /// Answers (of requests that started with the whole window in flight, and met flat
    /// latency) since the window last changed, in congestion avoidance.
    round_ok: usize,
    /// The lowest latency per unit of work seen: the server's speed without a queue.
    base: Option<f64>,
    decreases: u64,
}

/// When and how a request started: what its outcome is judged against.
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    /// When the request was allowed to start.
    pub started: Instant,
    /// Requests in flight when it started, itself included.
    pub in_flight: usize,
    /// Its number among the requests started (1-based): those with higher numbers started while
    /// it was in flight.
    pub seq: u64,
}

/// A slot; dropping it frees the slot.
pub struct Permit<'a> {
    aimd: &'a Aimd,
    /// When the request holding this permit was allowed to start.
    pub started: Instant,
    /// Requests in flight when it started, itself included.
    pub in_flight: usize,
    seq: u64,
}

impl Permit<'_> {
    pub fn ticket(&self) -> Ticket {
        Ticket { started: self.started, in_flight: self.in_flight, seq: self.seq }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.aimd.lock().in_flight -= 1;
        self.aimd.notify.notify_waiters();
    }
}

/// How many other requests were in flight at some time while `t` was: those in flight when it
/// started and those started since.
fn overlapped(s: &State, t: Ticket) -> usize {
    t.in_flight.saturating_sub(1) + s.started.saturating_sub(t.seq) as usize
}

impl Aimd {
    /// Starts at `max` in flight, without a latency limit (see [`Aimd::adaptive`]).
    pub fn new(max: usize) -> Aimd {
        Self::build(max, max, None)
    }

    /// Starts at [`INITIAL_WINDOW`] (or `max`, if smaller) in slow start, for a client whose
    /// requests time out after `timeout`.
    pub fn adaptive(max: usize, timeout: Duration) -> Aimd {
        Self::build(max, INITIAL_WINDOW, Some(timeout))
    }

    fn build(max: usize, start: usize, timeout: Option<Duration>) -> Aimd {
        let max = max.max(1);
        let start = start.clamp(1, max);
        Aimd {
            timeout,
            state: Mutex::new(State {
                max,
                limit: start as f64,
                in_flight: 0,
                started: 0,
                paused_until: None,
                last_decrease: None,
                slow_start: start < max,
                round_ok: 0,
                base: None,
                decreases: 0,
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn limit(&self) -> f64 {
        self.lock().limit
    }

    pub fn max(&self) -> usize {
        self.lock().max
    }

    /// How many times the window was cut.
    pub fn decreases(&self) -> u64 {
        self.lock().decreases
    }

    /// The server serves `slots` requests at once (more only wait in its queue): the window
    /// is that, and never grows past it.
    pub fn set_capacity(&self, slots: usize) {
        let mut s = self.lock();
        s.max = s.max.min(slots.max(1));
        s.limit = s.max as f64;
        s.slow_start = false;
        s.round_ok = 0;
        drop(s);
        self.notify.notify_waiters();
    }

    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = {
                let mut s = self.lock();
                let now = Instant::now();
                match s.paused_until {
                    Some(t) if t > now => Some(t - now),
                    _ => {
                        if s.in_flight < (s.limit.floor() as usize).max(1) {
                            s.in_flight += 1;
                            s.started += 1;
                            return Permit { aimd: self, started: now, in_flight: s.in_flight, seq: s.started };
                        }
                        None
                    }
                }
            };
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => notified.await,
            }
        }
    }

    /// Halves the window unless it was already cut after `started` (the same congestion).
    fn decrease(&self, s: &mut State, started: Instant) -> bool {
        s.slow_start = false;
        if s.last_decrease.is_some_and(|t| started < t) {
            return false;
        }
        let now = Instant::now();
        s.limit = (s.limit / 2.0).max(1.0);
        s.last_decrease = Some(now);
        s.round_ok = 0;
        s.decreases += 1;
        true
    }

    /// An answer to the request `t`, after `latency`, `work` completion tokens long.
    pub fn success(&self, t: Ticket, latency: Duration, work: u64) {
        let mut s = self.lock();
        let per = latency.as_secs_f64() / (work as f64 + WORK_ALLOWANCE);
        let others = overlapped(&s, t);
        let first = s.base.is_none();
        let base = match s.base {
            None => per,
            Some(b) if per < b => per,
            // No other request of ours overlapped it, so none was queued ahead of it: the
            // server's own speed now (it may have slowed down for good).
            Some(b) if others == 0 => b + (per - b) * 0.2,
            Some(b) => b,
        };
        s.base = Some(base);
        let ratio = if base > 0.0 { per / base } else { 1.0 };
        let frac_of_timeout = self.timeout.map_or(0.0, |to| latency.as_secs_f64() / to.as_secs_f64().max(1e-9));
        if others > 0 && (ratio >= QUEUEING || frac_of_timeout > 0.75) {
            self.decrease(&mut s, t.started);
        } else if !first && ratio < FLAT && frac_of_timeout <= 0.5 && t.in_flight >= s.limit.floor() as usize {
            // Flat latency with the whole window in use: room for more. Slow start adds one per
            // such answer (doubling per round trip), congestion avoidance one per window of them.
            if s.slow_start {
                s.limit += 1.0;
            } else {
                s.round_ok += 1;
                if s.round_ok as f64 >= s.limit.floor() {
                    s.limit += 1.0;
                    s.round_ok = 0;
                }
            }
            s.limit = s.limit.min(s.max as f64);
            if s.limit >= s.max as f64 {
                s.slow_start = false;
            }
        }
        drop(s);
        self.notify.notify_waiters();
    }

    /// The request `t` timed out: the server is too busy to answer in time. Returns whether
    /// the request was alone: no other request was in flight at any time during its life.
    pub fn timed_out(&self, t: Ticket) -> bool {
        let mut s = self.lock();
        self.decrease(&mut s, t.started);
        overlapped(&s, t) == 0
    }

    /// The server said "too many requests" (or "unavailable") to a request that started at
    /// `started`.
    pub fn overloaded(&self, started: Instant, retry_after: Option<Duration>) {
        let mut s = self.lock();
        self.decrease(&mut s, started);
        if let Some(d) = retry_after {
            let until = Instant::now() + d;
            s.paused_until = Some(s.paused_until.map_or(until, |p| p.max(until)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(in_flight: usize) -> Ticket {
        Ticket { started: Instant::now(), in_flight, seq: 0 }
    }

    #[tokio::test]
    async fn halves_once_per_round_and_grows_back() {
        let a = Aimd::new(16);
        assert_eq!(a.limit(), 16.0);
        let t = Instant::now();
        a.overloaded(t, None);
        a.overloaded(t, None); // same round
        assert_eq!(a.limit(), 8.0);
        let later = Instant::now() + Duration::from_millis(1);
        a.overloaded(later, None);
        assert_eq!(a.limit(), 4.0);
        // The first answer only tells the server's speed.
        a.success(ticket(1), Duration::from_millis(100), 10);
        assert_eq!(a.limit(), 4.0);
        // Additive increase: one more per window of flat-latency answers with the window full.
        for _ in 0..4 {
            a.success(ticket(4), Duration::from_millis(100), 10);
        }
        assert_eq!(a.limit(), 5.0);
        // Answers to requests that did not fill the window prove nothing.
        for _ in 0..20 {
            a.success(ticket(2), Duration::from_millis(100), 10);
        }
        assert_eq!(a.limit(), 5.0);
        for _ in 0..1000 {
            a.success(ticket(16), Duration::from_millis(100), 10);
        }
        assert_eq!(a.limit(), 16.0);
    }

    #[tokio::test]
    async fn slow_start_doubles_per_round_while_latency_is_flat() {
        let a = Aimd::adaptive(32, Duration::from_secs(10));
        assert_eq!(a.limit(), INITIAL_WINDOW as f64);
        let mut answers = 0;
        while a.limit() < 32.0 {
            a.success(ticket(a.limit() as usize), Duration::from_millis(200), 50);
            answers += 1;
        }
        // The first answer sets the baseline; then one more per answer: 4 → 8 → 16 → 32.
        assert_eq!(answers, 1 + 28);
        assert_eq!(a.decreases(), 0);
    }

    #[tokio::test]
    async fn a_queueing_server_shrinks_the_window_to_its_slots() {
        // One slot, 200 ms per answer: the k-th of n requests sent together answers after k × 200 ms.
        let a = Aimd::adaptive(8, Duration::from_secs(1));
        let t0 = Instant::now();
        for k in 1..=4 {
            a.success(Ticket { started: t0, in_flight: k, seq: 0 }, Duration::from_millis(200 * k as u64), 30);
        }
        assert_eq!(a.limit(), 2.0, "cut once for the whole round");
        // At two in flight one always waits for the other: cut again; then 1 ↔ 2.
        a.success(ticket(2), Duration::from_millis(400), 30);
        assert_eq!(a.limit(), 1.0);
        for _ in 0..20 {
            let n = a.limit().floor() as usize;
            a.success(ticket(n), Duration::from_millis(200 * n as u64), 30);
            assert!(a.limit() <= 2.0, "{}", a.limit());
        }
    }

    #[tokio::test]
    async fn timeouts_cut_the_window_and_latency_near_the_timeout_stops_growth() {
        let a = Aimd::adaptive(8, Duration::from_secs(1));
        let t = ticket(4);
        a.timed_out(t);
        a.timed_out(t); // the same round
        assert_eq!(a.limit(), 2.0);
        // 600 ms of a 1 s timeout with the window full: no growth.
        for _ in 0..10 {
            a.success(ticket(2), Duration::from_millis(600), 30);
        }
        assert_eq!(a.limit(), 2.0);
        // 800 ms: the next ones would time out; cut.
        a.success(ticket(2), Duration::from_millis(800), 30);
        assert_eq!(a.limit(), 1.0);
    }

    #[tokio::test]
    async fn a_known_capacity_is_the_window_and_its_ceiling() {
        let a = Aimd::adaptive(8, Duration::from_secs(1));
        a.set_capacity(1);
        assert_eq!((a.limit(), a.max()), (1.0, 1));
        for _ in 0..50 {
            a.success(ticket(1), Duration::from_millis(100), 30);
        }
        assert_eq!(a.limit(), 1.0);
        let b = Aimd::adaptive(2, Duration::from_secs(1));
        b.set_capacity(16);
        assert_eq!((b.limit(), b.max()), (2.0, 2), "never above max-parallel");
    }

    #[tokio::test]
    async fn bounds_in_flight_and_honours_pauses() {
        let a = Aimd::new(2);
        let p1 = a.acquire().await;
        let p2 = a.acquire().await;
        assert_eq!((p1.in_flight, p2.in_flight), (1, 2));
        let third = tokio::time::timeout(Duration::from_millis(50), a.acquire()).await;
        assert!(third.is_err(), "a third request waits");
        drop(p1);
        let p3 = tokio::time::timeout(Duration::from_millis(500), a.acquire()).await;
        assert!(p3.is_ok());
        drop(p3);
        drop(p2);
        a.overloaded(Instant::now(), Some(Duration::from_millis(200)));
        let t0 = Instant::now();
        let _p = a.acquire().await;
        assert!(t0.elapsed() >= Duration::from_millis(180), "{:?}", t0.elapsed());
    }
}
