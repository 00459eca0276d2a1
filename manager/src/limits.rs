//! Bounds on what connecting runtimes can make the manager do: hellos per
//! second, hellos being admitted at once, and sessions at once. Whatever is
//! over a bound is refused at once with `RESOURCE_EXHAUSTED`, before its
//! hello is read, so a flood of connections costs neither the apiserver
//! (token reviews) nor the coordinator anything, and the sessions in place
//! keep their heartbeats.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Refusal;

/// Hellos read and admitted at once; each may be large (held keys) and
/// waits for the apiserver.
const ADMITTING: usize = 16;

/// The manager's limits.
#[derive(Debug)]
pub(crate) struct Limits {
    max_sessions: usize,
    sessions: Arc<Semaphore>,
    admitting: Arc<Semaphore>,
    hellos: Mutex<Bucket>,
}

/// A token bucket: `rate` tokens a second, at most `rate` saved up.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

// === impl Limits ===

impl Limits {
    /// At most `max_sessions` sessions, and `hellos_per_second` hellos a
    /// second on average (a second's worth at once).
    pub(crate) fn new(max_sessions: usize, hellos_per_second: u64) -> Self {
        let rate = hellos_per_second as f64;
        Self {
            max_sessions,
            sessions: Arc::new(Semaphore::new(max_sessions)),
            admitting: Arc::new(Semaphore::new(ADMITTING)),
            hellos: Mutex::new(Bucket {
                rate,
                tokens: rate,
                at: Instant::now(),
            }),
        }
    }

    /// Lets one more hello in, if the rate and the admissions in progress
    /// allow; the permit is held until it is admitted or refused.
    pub(crate) fn hello(&self, now: Instant) -> Result<OwnedSemaphorePermit, Refusal> {
        let busy = |why: &str| {
            Refusal::Busy(format!(
                "the manager is admitting {why}; retry with backoff"
            ))
        };
        let permit = self
            .admitting
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy(&format!("{ADMITTING} runtimes already")))?;
        let mut b = self.hellos.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * b.rate).min(b.rate);
        b.at = now;
        if b.tokens < 1.0 {
            return Err(busy(&format!(
                "more than {} runtimes a second",
                b.rate as u64
            )));
        }
        b.tokens -= 1.0;
        Ok(permit)
    }

    /// A slot for one session, held for as long as it lasts.
    pub(crate) fn session(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        self.sessions.clone().try_acquire_owned().map_err(|_| {
            Refusal::Busy(format!(
                "the manager serves its maximum of {} sessions (--max-sessions)",
                self.max_sessions
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn hellos_beyond_the_rate_wait_for_the_bucket_to_refill() {
        let limits = Limits::new(10, 5);
        let t0 = Instant::now();
        for _ in 0..5 {
            drop(limits.hello(t0).unwrap());
        }
        let err = limits.hello(t0).unwrap_err().to_string();
        assert!(err.contains("more than 5 runtimes a second"), "{err}");
        // A fifth of a second later, one more.
        let t1 = t0 + Duration::from_millis(200);
        drop(limits.hello(t1).unwrap());
        assert!(limits.hello(t1).is_err());
        // Saving up is capped at a second's worth.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..5 {
            drop(limits.hello(t2).unwrap());
        }
        assert!(limits.hello(t2).is_err());
    }

    #[test]
    fn admissions_and_sessions_are_bounded_while_held() {
        let limits = Limits::new(2, 1_000);
        let now = Instant::now();
        let held: Vec<_> = (0..ADMITTING).map(|_| limits.hello(now).unwrap()).collect();
        let err = limits.hello(now).unwrap_err().to_string();
        assert!(err.contains("already"), "{err}");
        drop(held);
        assert!(limits.hello(now).is_ok());

        let a = limits.session().unwrap();
        let _b = limits.session().unwrap();
        let err = limits.session().unwrap_err().to_string();
        assert!(err.contains("maximum of 2 sessions"), "{err}");
        drop(a);
        assert!(limits.session().is_ok());
    }
}
