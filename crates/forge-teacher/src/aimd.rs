//! Adaptive concurrency: additive increase, multiplicative decrease (as TCP does).
//!
//! At most `limit` requests are in flight. Each success raises the limit by 1/limit (about one
//! more request per round trip), up to `max-parallel`. A 429 halves it — once per round of
//! requests, not once per rejected request — and pauses every new request until the server's
//! `Retry-After` has passed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub struct Aimd {
    max: usize,
    state: Mutex<State>,
    notify: Notify,
}

struct State {
    limit: f64,
    in_flight: usize,
    paused_until: Option<Instant>,
    last_decrease: Option<Instant>,
}

/// A slot; dropping it frees the slot.
pub struct Permit<'a> {
    aimd: &'a Aimd,
    /// When the request holding this permit was allowed to start.
    pub started: Instant,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.aimd.lock().in_flight -= 1;
        self.aimd.notify.notify_waiters();
    }
}

impl Aimd {
    /// Starts at `max` in flight: a well-behaved server is used at full speed from the start.
    pub fn new(max: usize) -> Aimd {
        let max = max.max(1);
        Aimd {
            max,
            state: Mutex::new(State { limit: max as f64, in_flight: 0, paused_until: None, last_decrease: None }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn limit(&self) -> f64 {
        self.lock().limit
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
                            return Permit { aimd: self, started: now };
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

    pub fn success(&self) {
        let mut s = self.lock();
        s.limit = (s.limit + 1.0 / s.limit).min(self.max as f64);
        drop(s);
        self.notify.notify_waiters();
    }

    /// The server said "too many requests" to a request that started at `started`.
    pub fn overloaded(&self, started: Instant, retry_after: Option<Duration>) {
        let mut s = self.lock();
        // Requests already in flight when the limit was cut report the same congestion.
        if s.last_decrease.is_none_or(|t| started >= t) {
            s.limit = (s.limit / 2.0).max(1.0);
            s.last_decrease = Some(Instant::now());
        }
        if let Some(d) = retry_after {
            let until = Instant::now() + d;
            s.paused_until = Some(s.paused_until.map_or(until, |p| p.max(until)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for _ in 0..100 {
            a.success();
        }
        assert!(a.limit() > 10.0, "{}", a.limit());
        for _ in 0..10_000 {
            a.success();
        }
        assert_eq!(a.limit(), 16.0);
    }

    #[tokio::test]
    async fn bounds_in_flight_and_honours_pauses() {
        let a = Aimd::new(2);
        let p1 = a.acquire().await;
        let p2 = a.acquire().await;
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
