//! A work queue with client-go semantics.
//!
//! - A key is never handed out twice at once: it is either queued (`dirty`)
//!   or being processed (`processing`), and an add while processing is kept
//!   as one pending copy that is queued when the worker calls [`Queue::done`].
//! - Failures back off per key exponentially (5 ms doubling to 1000 s),
//!   combined with an overall token bucket (10 qps, burst 100), taking the
//!   larger delay, as controller-runtime's default rate limiter does.
//! - Timing uses `tokio::time`, so tests run on a paused clock.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Mutex,
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

/// First retry delay of a failing key.
pub(crate) const BASE_DELAY: Duration = Duration::from_millis(5);
/// Longest retry delay of a failing key.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(1000);
/// Overall retry rate.
pub(crate) const BUCKET_QPS: f64 = 10.0;
/// Overall retry burst.
pub(crate) const BUCKET_BURST: f64 = 100.0;

/// A key taken from the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Item {
    /// The key; the worker must call [`Queue::done`] with it.
    pub(crate) key: String,
    /// How long the key waited in the queue.
    pub(crate) waited: Duration,
}

/// The queue. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub(crate) struct Queue {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Debug)]
struct State {
    queue: VecDeque<String>,
    dirty: HashSet<String>,
    processing: HashSet<String>,
    queued_at: HashMap<String, Instant>,
    /// Delayed adds, ordered by due time; `delayed_at` keeps each key's earliest.
    delayed: BTreeMap<(Instant, u64), String>,
    delayed_at: HashMap<String, (Instant, u64)>,
    next_seq: u64,
    failures: HashMap<String, u32>,
    tokens: f64,
    refilled: Instant,
    shut_down: bool,
}

// === impl Queue ===

impl Default for Queue {
    fn default() -> Self {
        Self::new()
    }
}

impl Queue {
    /// An empty queue.
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                dirty: HashSet::new(),
                processing: HashSet::new(),
                queued_at: HashMap::new(),
                delayed: BTreeMap::new(),
                delayed_at: HashMap::new(),
                next_seq: 0,
                failures: HashMap::new(),
                tokens: BUCKET_BURST,
                refilled: Instant::now(),
                shut_down: false,
            }),
            notify: Notify::new(),
        }
    }

    /// Marks `key` as needing processing. Returns true if this added a new
    /// pending copy (false if one was already pending).
    pub(crate) fn add(&self, key: &str) -> bool {
        let added = self.lock().add(key);
        self.notify.notify_one();
        added
    }

    /// Adds `key` after `delay`. An earlier pending delayed add wins.
    pub(crate) fn add_after(&self, key: &str, delay: Duration) {
        if delay.is_zero() {
            self.add(key);
            return;
        }
        let mut s = self.lock();
        if s.shut_down {
            return;
        }
        let due = Instant::now() + delay;
        if let Some(&(at, seq)) = s.delayed_at.get(key) {
            if at <= due {
                return;
            }
            s.delayed.remove(&(at, seq));
        }
        let seq = s.next_seq;
        s.next_seq += 1;
        s.delayed.insert((due, seq), key.to_string());
        s.delayed_at.insert(key.to_string(), (due, seq));
        drop(s);
        self.notify.notify_one();
    }

    /// Adds `key` after its rate-limited retry delay and counts a failure.
    /// Returns the delay.
    pub(crate) fn add_rate_limited(&self, key: &str) -> Duration {
        let delay = self.lock().when(key);
        self.add_after(key, delay);
        delay
    }

    /// Forgets `key`'s failures, resetting its backoff.
    pub(crate) fn forget(&self, key: &str) {
        self.lock().failures.remove(key);
    }

    /// How many times `key` has failed since it was last forgotten.
    #[cfg(test)]
    pub(crate) fn num_requeues(&self, key: &str) -> u32 {
        self.lock().failures.get(key).copied().unwrap_or(0)
    }

    /// Ends processing of `key`; if it was added meanwhile, it is queued again.
    pub(crate) fn done(&self, key: &str) {
        let mut s = self.lock();
        s.processing.remove(key);
        if s.dirty.contains(key) {
            s.queue.push_back(key.to_string());
            s.queued_at.insert(key.to_string(), Instant::now());
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Drops every trace of `key` (queued, delayed, failures), e.g. when the
    /// key is revoked. A worker still processing it must still call `done`.
    pub(crate) fn remove(&self, key: &str) {
        let mut s = self.lock();
        s.dirty.remove(key);
        s.queue.retain(|k| k != key);
        s.queued_at.remove(key);
        if let Some(at) = s.delayed_at.remove(key) {
            s.delayed.remove(&at);
        }
        s.failures.remove(key);
    }

    /// Drops every key, e.g. when the session with the manager is lost.
    pub(crate) fn clear(&self) {
        let mut s = self.lock();
        s.dirty.clear();
        s.queue.clear();
        s.queued_at.clear();
        s.delayed.clear();
        s.delayed_at.clear();
        s.failures.clear();
    }

    /// Keys ready to be handed out.
    pub(crate) fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// True when no key is ready.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops the queue: [`Queue::get`] returns `None` from now on.
    pub(crate) fn shut_down(&self) {
        self.lock().shut_down = true;
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Waits for the next ready key and marks it as processing.
    pub(crate) async fn get(&self) -> Option<Item> {
        loop {
            let notified = self.notify.notified();
            let next_due = {
                let mut s = self.lock();
                if s.shut_down {
                    return None;
                }
                s.promote_due(Instant::now());
                if let Some(key) = s.queue.pop_front() {
                    s.dirty.remove(&key);
                    s.processing.insert(key.clone());
                    let waited = s
                        .queued_at
                        .remove(&key)
                        .map(|t| t.elapsed())
                        .unwrap_or_default();
                    return Some(Item { key, waited });
                }
                s.delayed.keys().next().map(|(at, _)| *at)
            };
            match next_due {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain data; a panic elsewhere does not corrupt it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// === impl State ===

impl State {
    fn add(&mut self, key: &str) -> bool {
        if self.shut_down || self.dirty.contains(key) {
            return false;
        }
        self.dirty.insert(key.to_string());
        if !self.processing.contains(key) {
            self.queue.push_back(key.to_string());
            self.queued_at.insert(key.to_string(), Instant::now());
        }
        true
    }

    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.delayed_at.remove(&key);
            self.add(&key);
        }
    }

    /// The retry delay for `key`: the larger of its exponential backoff and
    /// the token bucket's delay.
    fn when(&mut self, key: &str) -> Duration {
        let failures = self.failures.entry(key.to_string()).or_insert(0);
        let exp = 2f64.powi(i32::try_from(*failures).unwrap_or(i32::MAX).min(64));
        *failures = failures.saturating_add(1);
        let backoff = BASE_DELAY.mul_f64(exp).min(MAX_DELAY);

        // Token bucket with reservations: tokens may go negative, and the
        // deficit is the wait, like golang.org/x/time/rate's Reserve.
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * BUCKET_QPS).min(BUCKET_BURST);
        self.refilled = now;
        self.tokens -= 1.0;
        let bucket = if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / BUCKET_QPS)
        };
        backoff.max(bucket)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    async fn next(q: &Queue) -> String {
        q.get().await.unwrap().key
    }

    #[tokio::test(start_paused = true)]
    async fn duplicate_adds_collapse_and_a_processing_key_is_not_handed_out_twice() {
        let q = Queue::new();
        assert!(q.add("a"));
        assert!(!q.add("a"));
        q.add("b");
        assert_eq!(next(&q).await, "a");
        // Added while processing: one pending copy, held until done.
        assert!(q.add("a"));
        assert!(!q.add("a"));
        assert_eq!(next(&q).await, "b");
        assert!(q.is_empty());
        q.done("a");
        assert_eq!(next(&q).await, "a");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_and_forget_resets() {
        let q = Queue::new();
        let delays: Vec<Duration> = (0..5).map(|_| q.lock().when("k")).collect();
        assert_eq!(
            delays,
            [5, 10, 20, 40, 80].map(Duration::from_millis).to_vec()
        );
        assert_eq!(q.num_requeues("k"), 5);
        q.forget("k");
        assert_eq!(q.lock().when("k"), Duration::from_millis(5));
        // The cap.
        let mut d = Duration::ZERO;
        for _ in 0..40 {
            d = q.lock().when("cap");
        }
        assert_eq!(d, MAX_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_bucket_limits_overall_retries_after_its_burst() {
        let q = Queue::new();
        // 100 distinct keys use up the burst at their base delay...
        for i in 0..100 {
            assert_eq!(q.lock().when(&format!("k{i}")), BASE_DELAY);
        }
        // ...then each further retry waits for a token at 10 qps.
        assert_eq!(q.lock().when("k100"), Duration::from_millis(100));
        assert_eq!(q.lock().when("k101"), Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn requeue_after_waits_on_the_clock() {
        let q = Arc::new(Queue::new());
        q.add_after("later", Duration::from_secs(30));
        let start = Instant::now();
        let got = tokio::spawn({
            let q = q.clone();
            async move { q.get().await.unwrap().key }
        });
        assert_eq!(got.await.unwrap(), "later");
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        // An earlier delayed add replaces a later one; a later one does not.
        q.done("later");
        q.add_after("x", Duration::from_secs(10));
        q.add_after("x", Duration::from_secs(60));
        q.add_after("x", Duration::from_secs(5));
        let start = Instant::now();
        assert_eq!(next(&q).await, "x");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_retries_arrive_after_the_backoff() {
        let q = Queue::new();
        q.add("k");
        let mut waits = Vec::new();
        for _ in 0..4 {
            let _ = next(&q).await;
            q.done("k");
            let start = Instant::now();
            q.add_rate_limited("k");
            let _ = q.get().await.unwrap();
            waits.push(start.elapsed());
            q.done("k");
            q.add("k");
        }
        assert_eq!(waits, [5, 10, 20, 40].map(Duration::from_millis).to_vec());
    }

    #[tokio::test(start_paused = true)]
    async fn removed_keys_vanish_and_shutdown_ends_get() {
        let q = Queue::new();
        q.add("a");
        q.add_after("b", Duration::from_secs(1));
        q.add_rate_limited("c");
        q.remove("a");
        q.remove("b");
        q.remove("c");
        assert_eq!(q.num_requeues("c"), 0);
        q.add("d");
        assert_eq!(next(&q).await, "d");
        q.shut_down();
        assert!(q.get().await.is_none());
    }

    proptest! {
        /// Whatever the order of adds, gets, dones and clears, a key is never
        /// handed out while it is processing, and every added key is
        /// eventually handed out once more after its last add (unless a
        /// clear dropped it).
        #[test]
        fn never_handed_out_twice(ops in prop::collection::vec((0u8..4, 0u8..4), 1..200)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let q = Queue::new();
                let mut processing: HashSet<String> = HashSet::new();
                let mut owed: HashSet<String> = HashSet::new();
                for (op, k) in ops {
                    let key = format!("k{k}");
                    match op {
                        0 => { q.add(&key); owed.insert(key); }
                        1 => {
                            if !q.is_empty() {
                                let item = q.get().await.unwrap();
                                prop_assert!(processing.insert(item.key.clone()), "{} handed out twice", item.key);
                                owed.remove(&item.key);
                            }
                        }
                        2 => {
                            if processing.remove(&key) { q.done(&key); }
                        }
                        // A lost session: queued keys go, keys being
                        // processed stay processing until done.
                        _ => { q.clear(); owed.clear(); }
                    }
                }
                for k in processing.drain() { q.done(&k); }
                while !q.is_empty() {
                    let item = q.get().await.unwrap();
                    owed.remove(&item.key);
                    q.done(&item.key);
                }
                prop_assert!(owed.is_empty(), "never handed out after their add: {:?}", owed);
                Ok(())
            })?;
        }
    }
}
