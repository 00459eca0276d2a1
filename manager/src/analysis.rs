//! Compares a canary subset's reconciles with the stable subset's over the
//! same window: error rate, p99 duration, reconciles per generation (which
//! catches hot loops), reconciles whose writes were refused (fenced, or 409
//! Conflict) and generation lag (keys whose latest change has not been
//! reconciled in time, which catches a canary that stalls). Pure: the
//! numbers in, a verdict out.
//!
//! No verdict is given on too few reconciles: below `min_samples` on either
//! side the answer is [`Verdict::Wait`], saying how many there are. Lag is
//! the exception: a canary that stalls reports nothing, so lagging keys
//! fail it whatever the sample. The
//! error-rate check needs both a significant difference (a one-sided
//! two-proportion z-test, so noise between two identical versions rarely
//! fails it) and a practical one (a ratio to stable's rate), so a canary is
//! not rolled back for noise, nor for a difference too small to matter.

use std::collections::HashSet;

/// One reported reconcile, as the window keeps it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Sample {
    /// When it finished, in Unix milliseconds.
    pub(crate) at_ms: i64,
    /// True if it succeeded.
    pub(crate) ok: bool,
    /// How long it ran, in microseconds.
    pub(crate) duration_us: u64,
    /// The key.
    pub(crate) key: std::sync::Arc<str>,
    /// The generation it reconciled.
    pub(crate) generation: i64,
    /// Its writes that were refused: by the fence, or with 409 Conflict.
    pub(crate) refused_writes: u32,
}

/// One subset's numbers over a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Stats {
    /// Reconciles reported.
    pub(crate) reconciles: u64,
    /// Of which failed.
    pub(crate) errors: u64,
    /// 99th percentile duration, in milliseconds.
    pub(crate) p99_ms: f64,
    /// Reconciles per distinct (key, generation): 1 is one reconcile per
    /// change; a hot loop drives it up.
    pub(crate) per_generation: f64,
    /// Reconciles with at least one refused write (fenced, or 409
    /// Conflict).
    pub(crate) refused_writes: u64,
    /// Keys the side holds, for the lag check.
    pub(crate) keys: u64,
    /// Of which lag: their latest generation is not reconciled within the
    /// allowed time.
    pub(crate) lagging: u64,
}

/// The limits an analysis applies.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Thresholds {
    /// Reconciles each side needs before any verdict.
    pub(crate) min_samples: u64,
    /// The z-score above which the canary's error rate is significantly
    /// higher than stable's (3.29: one-sided p < 0.0005, so a rollout with
    /// several analyses is still very unlikely to roll back for noise).
    pub(crate) error_z: f64,
    /// And its error rate must exceed stable's times this.
    pub(crate) error_ratio: f64,
    /// The canary's p99 may be at most stable's times this…
    pub(crate) p99_ratio: f64,
    /// …plus this many milliseconds (so fast reconciles' jitter passes).
    pub(crate) p99_slack_ms: f64,
    /// Reconciles per generation above this, and above stable's times
    /// `per_generation_ratio`, is a hot loop.
    pub(crate) max_per_generation: f64,
    /// See `max_per_generation`.
    pub(crate) per_generation_ratio: f64,
    /// An absolute limit on the canary's error rate, whatever stable's.
    pub(crate) max_error_rate: Option<f64>,
    /// An absolute limit on the canary's share of reconciles with a
    /// refused write, whatever stable's.
    pub(crate) max_refused_write_rate: Option<f64>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_samples: 2000,
            error_z: 3.29,
            error_ratio: 1.5,
            p99_ratio: 2.0,
            p99_slack_ms: 50.0,
            max_per_generation: 5.0,
            per_generation_ratio: 3.0,
            max_error_rate: None,
            max_refused_write_rate: None,
        }
    }
}

/// An analysis's answer.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Verdict {
    /// The canary is no worse than stable by any measure.
    Pass,
    /// It is worse: why, with the numbers.
    Fail(Vec<String>),
    /// Too few reconciles to say: why.
    Wait(String),
}

// === impl Stats ===

impl Stats {
    /// The numbers of `samples`.
    pub(crate) fn of<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Self {
        let mut durations = Vec::new();
        let mut errors = 0;
        let mut refused_writes = 0;
        let mut changes: HashSet<(&str, i64)> = HashSet::new();
        for s in samples {
            durations.push(s.duration_us);
            if !s.ok {
                errors += 1;
            }
            if s.refused_writes > 0 {
                refused_writes += 1;
            }
            changes.insert((&s.key, s.generation));
        }
        let reconciles = durations.len() as u64;
        durations.sort_unstable();
        let p99_ms = match durations.len() {
            0 => 0.0,
            n => durations[((n * 99).div_ceil(100)).saturating_sub(1).min(n - 1)] as f64 / 1000.0,
        };
        Self {
            reconciles,
            errors,
            p99_ms,
            per_generation: if changes.is_empty() {
                0.0
            } else {
                reconciles as f64 / changes.len() as f64
            },
            refused_writes,
            keys: 0,
            lagging: 0,
        }
    }

    /// The same numbers, with `lagging` of `keys` held keys lagging.
    pub(crate) fn with_lag(self, keys: u64, lagging: u64) -> Self {
        Self {
            keys,
            lagging,
            ..self
        }
    }

    /// Failed reconciles per reconcile.
    pub(crate) fn error_rate(&self) -> f64 {
        rate(self.errors, self.reconciles)
    }

    /// Reconciles with a refused write per reconcile.
    pub(crate) fn refused_write_rate(&self) -> f64 {
        rate(self.refused_writes, self.reconciles)
    }

    /// Lagging keys per held key.
    fn lag_rate(&self) -> f64 {
        rate(self.lagging, self.keys)
    }
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Compares `canary` with `stable` under `t`.
pub(crate) fn analyse(canary: &Stats, stable: &Stats, t: &Thresholds) -> Verdict {
    // Lag needs no sample: a canary that stalls reports no reconciles.
    if canary.lagging > 0 && canary.lag_rate() > stable.lag_rate() * t.error_ratio {
        return Verdict::Fail(vec![format!(
            "{} of its {} keys lag (their latest generation is not reconciled in time) \
             against stable's {} of {}",
            canary.lagging, canary.keys, stable.lagging, stable.keys
        )]);
    }
    if canary.reconciles < t.min_samples || stable.reconciles < t.min_samples {
        return Verdict::Wait(format!(
            "waiting for {} reconciles on each side: the canary has {}, stable {}",
            t.min_samples, canary.reconciles, stable.reconciles
        ));
    }
    let mut why = Vec::new();
    let (rc, rs) = (canary.error_rate(), stable.error_rate());
    let z = proportion_z(
        (canary.errors, canary.reconciles),
        (stable.errors, stable.reconciles),
    );
    if z > t.error_z && rc > rs * t.error_ratio {
        why.push(format!(
            "error rate {:.2}% against stable's {:.2}% (z = {z:.1})",
            rc * 100.0,
            rs * 100.0
        ));
    }
    if let Some(max) = t.max_error_rate
        && rc > max
    {
        why.push(format!(
            "error rate {:.2}% above the limit of {:.2}%",
            rc * 100.0,
            max * 100.0
        ));
    }
    let (wc, ws) = (canary.refused_write_rate(), stable.refused_write_rate());
    let z = proportion_z(
        (canary.refused_writes, canary.reconciles),
        (stable.refused_writes, stable.reconciles),
    );
    if z > t.error_z && wc > ws * t.error_ratio {
        why.push(format!(
            "writes refused (fenced or 409 Conflict) in {:.2}% of reconciles against stable's \
             {:.2}% (z = {z:.1})",
            wc * 100.0,
            ws * 100.0
        ));
    }
    if let Some(max) = t.max_refused_write_rate
        && wc > max
    {
        why.push(format!(
            "writes refused in {:.2}% of reconciles, above the limit of {:.2}%",
            wc * 100.0,
            max * 100.0
        ));
    }
    let p99_limit = stable.p99_ms * t.p99_ratio + t.p99_slack_ms;
    if canary.p99_ms > p99_limit {
        why.push(format!(
            "p99 {:.1} ms against stable's {:.1} ms (limit {:.1} ms)",
            canary.p99_ms, stable.p99_ms, p99_limit
        ));
    }
    if canary.per_generation > t.max_per_generation
        && canary.per_generation > stable.per_generation * t.per_generation_ratio
    {
        why.push(format!(
            "{:.1} reconciles per generation against stable's {:.1}: a hot loop",
            canary.per_generation, stable.per_generation
        ));
    }
    if why.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Fail(why)
    }
}

/// The one-sided two-proportion z-score of the canary's rate (`part` of
/// `whole`) over stable's: 0 when neither has any, and negative when the
/// canary is better.
fn proportion_z(canary: (u64, u64), stable: (u64, u64)) -> f64 {
    let (nc, ns) = (canary.1 as f64, stable.1 as f64);
    if nc == 0.0 || ns == 0.0 {
        return 0.0;
    }
    let pooled = (canary.0 + stable.0) as f64 / (nc + ns);
    let se = (pooled * (1.0 - pooled) * (1.0 / nc + 1.0 / ns)).sqrt();
    if se == 0.0 {
        return 0.0;
    }
    (rate(canary.0, canary.1) - rate(stable.0, stable.1)) / se
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A deterministic generator (xorshift64*), so the replayed runs below
    /// are the same every time.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// `n` reconciles of distinct changes, each failing with `p`, lasting
    /// 5–15 ms with a tail to 40 ms.
    fn run(rng: &mut Rng, n: usize, p: f64) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                at_ms: i as i64,
                ok: rng.next() >= p,
                duration_us: (5_000.0 + 10_000.0 * rng.next() + 25_000.0 * rng.next().powi(20))
                    as u64,
                key: Arc::from(format!("ns/app-{i}").as_str()),
                generation: 1,
                refused_writes: 0,
            })
            .collect()
    }

    /// How many of `runs` analyses of canary rate `pc` against stable rate
    /// `ps`, `n` reconciles each, fail.
    fn fails(runs: usize, n: usize, pc: f64, ps: f64, seed: u64) -> usize {
        let mut rng = Rng(seed);
        let t = Thresholds::default();
        (0..runs)
            .filter(|_| {
                let canary = Stats::of(&run(&mut rng, n, pc));
                let stable = Stats::of(&run(&mut rng, n, ps));
                matches!(analyse(&canary, &stable, &t), Verdict::Fail(_))
            })
            .count()
    }

    #[test]
    fn identical_versions_pass_nearly_always() {
        // A/A: 500 analyses at the minimum sample, 5% errors on both
        // sides. The error check alone would fail 0.05% of them (one in
        // 2,000); measured here:
        let false_rollbacks = fails(500, 2000, 0.05, 0.05, 0x5eed);
        eprintln!("A/A at 5%: {false_rollbacks} of 500 analyses failed");
        assert_eq!(false_rollbacks, 0);
        // And at 1% and 20% base rates, and with no errors at all.
        assert_eq!(fails(200, 2000, 0.01, 0.01, 7), 0);
        assert_eq!(fails(200, 2000, 0.20, 0.20, 11), 0);
        assert_eq!(fails(50, 2000, 0.0, 0.0, 13), 0);
    }

    #[test]
    fn twice_stables_error_rate_is_caught_at_the_minimum_sample() {
        // 10% against 5%, 2,000 reconciles each: the expected z is 6.0.
        let caught = fails(200, 2000, 0.10, 0.05, 0xbad);
        eprintln!("10% against 5%: caught {caught} of 200");
        assert!(caught >= 196, "caught {caught} of 200");
        // A canary that fails everything is caught every time.
        assert_eq!(fails(20, 2000, 1.0, 0.05, 3), 20);
    }

    #[test]
    fn too_few_reconciles_wait_and_say_how_many() {
        let mut rng = Rng(1);
        let canary = Stats::of(&run(&mut rng, 1999, 1.0));
        let stable = Stats::of(&run(&mut rng, 5000, 0.0));
        match analyse(&canary, &stable, &Thresholds::default()) {
            Verdict::Wait(why) => assert!(why.contains("the canary has 1999"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hot_loops_and_slow_canaries_fail_with_their_numbers() {
        let mut rng = Rng(2);
        let stable = Stats::of(&run(&mut rng, 2000, 0.0));
        // The same 100 changes reconciled 20 times each.
        let looping: Vec<Sample> = run(&mut rng, 2000, 0.0)
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                s.key = Arc::from(format!("ns/app-{}", i % 100).as_str());
                s
            })
            .collect();
        match analyse(&Stats::of(&looping), &stable, &Thresholds::default()) {
            Verdict::Fail(why) => {
                assert!(why[0].contains("20.0 reconciles per generation"), "{why:?}")
            }
            other => panic!("{other:?}"),
        }
        let slow: Vec<Sample> = run(&mut rng, 2000, 0.0)
            .into_iter()
            .map(|mut s| {
                s.duration_us += 200_000;
                s
            })
            .collect();
        match analyse(&Stats::of(&slow), &stable, &Thresholds::default()) {
            Verdict::Fail(why) => assert!(why[0].starts_with("p99 2"), "{why:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refused_writes_fail_like_errors_and_lag_fails_without_a_sample() {
        let mut rng = Rng(3);
        let stable = Stats::of(&run(&mut rng, 2000, 0.0));
        // One reconcile in ten hits a 409 on the canary, none on stable.
        let conflicting: Vec<Sample> = run(&mut rng, 2000, 0.0)
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                s.refused_writes = u32::from(i % 10 == 0);
                s
            })
            .collect();
        let canary = Stats::of(&conflicting);
        assert_eq!(canary.refused_writes, 200);
        match analyse(&canary, &stable, &Thresholds::default()) {
            Verdict::Fail(why) => assert!(why[0].contains("10.00% of reconciles"), "{why:?}"),
            other => panic!("{other:?}"),
        }
        // The same on both sides passes.
        let both = Stats::of(&conflicting);
        assert_eq!(
            analyse(&canary, &both, &Thresholds::default()),
            Verdict::Pass
        );
        // A canary that reports nothing but holds lagging keys fails at
        // once; stable lagging as much does not make it fail.
        let stalled = Stats::default().with_lag(2, 1);
        match analyse(
            &stalled,
            &stable.clone().with_lag(38, 0),
            &Thresholds::default(),
        ) {
            Verdict::Fail(why) => assert!(why[0].starts_with("1 of its 2 keys lag"), "{why:?}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            analyse(&stalled, &stable.with_lag(38, 19), &Thresholds::default()),
            Verdict::Wait(_)
        ));
    }

    #[test]
    fn stats_count_errors_percentiles_and_changes() {
        let s = |ok, ms: u64, key: &str, generation| Sample {
            at_ms: 0,
            ok,
            duration_us: ms * 1000,
            key: Arc::from(key),
            generation,
            refused_writes: 0,
        };
        let stats = Stats::of(&[
            s(true, 1, "a", 1),
            s(false, 2, "a", 1),
            s(true, 3, "a", 2),
            s(true, 100, "b", 1),
        ]);
        assert_eq!((stats.reconciles, stats.errors), (4, 1));
        assert_eq!(stats.error_rate(), 0.25);
        assert_eq!(stats.p99_ms, 100.0);
        assert_eq!(stats.per_generation, 4.0 / 3.0);
    }
}
