//! The leader's authority, and a model of two managers competing for one
//! Lease over a network that delays, drops and partitions.

use super::*;
use proptest::prop_assert;

#[test]
fn a_leader_stops_before_its_lease_could_be_taken_over() {
    let authority = Authority::new(true);
    let now = Instant::now();
    assert!(!authority.leading(now), "no renewal yet");
    let duration = Duration::from_secs(15);
    authority.lead_until(Some(now + duration - margin(duration)));
    assert!(authority.leading(now + Duration::from_secs(13)));
    // By its own clock, whatever the apiserver says.
    assert!(!authority.leading(now + Duration::from_millis(13_500)));
    // Runtime leases are renewed only while the coordinator runs.
    let ttl = Duration::from_secs(3);
    assert!(!authority.may_renew(now, ttl));
    authority.coordinator_ran(now);
    assert!(authority.may_renew(now + Duration::from_secs(1), ttl));
    assert!(!authority.may_renew(now + Duration::from_secs(2), ttl));
    // A manager without an election always leads.
    assert!(Authority::new(false).leading(now + Duration::from_secs(3600)));
}

/// A model of two managers competing for one Lease through an apiserver,
/// over a network that delays, drops and partitions, with managers that
/// stall (SIGSTOP) and clocks that run at slightly different rates. It runs
/// the election's own rules: renew every `D/3`, give up an attempt after
/// `D/3`, lead until `sent + D - margin` after a successful write, and take
/// over only after [`Observed`] says the holder's record has not changed
/// for `D`. The property: the two managers never lead at the same instant.
mod model {
    use std::{cmp::Reverse, collections::BinaryHeap};

    use proptest::test_runner::{Config, RngAlgorithm, TestRunner};

    use super::*;

    const D_US: u64 = 3_000_000;
    const PERIOD_US: u64 = D_US / 3;
    const RUN_US: u64 = 60_000_000;

    #[derive(Clone, Debug, Default)]
    struct Store {
        holder: Option<usize>,
        renewals: u64,
        rv: u64,
    }

    #[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Ev {
        Attempt(usize),
        GetArrives(usize, u64),
        GetReply(usize, u64, Option<usize>, u64, u64),
        PutArrives(usize, u64, u64),
        PutReply(usize, u64, bool),
    }

    struct Manager {
        rate: f64,
        observed: Observed<(usize, u64)>,
        attempt: u64,
        sent_local: u64,
        /// Leads until this local instant.
        until: Option<u64>,
        /// Real-time intervals during which it led.
        led: Vec<(u64, u64)>,
        partitions: Vec<(u64, u64)>,
        stalls: Vec<(u64, u64)>,
    }

    struct Sim {
        rng: u64,
        base: Instant,
        store: Store,
        m: [Manager; 2],
        queue: BinaryHeap<Reverse<(u64, u64, Ev)>>,
        seq: u64,
        takeovers: usize,
    }

    impl Manager {
        fn local(&self, real: u64) -> u64 {
            (real as f64 * self.rate) as u64
        }

        fn real(&self, local: u64) -> u64 {
            (local as f64 / self.rate).ceil() as u64
        }

        fn cut_off(&self, t: u64) -> bool {
            self.partitions.iter().any(|(a, b)| (*a..*b).contains(&t))
        }

        /// When a stalled manager gets to handle what arrives at `t`.
        fn awake_at(&self, t: u64) -> u64 {
            self.stalls
                .iter()
                .find(|(a, b)| (*a..*b).contains(&t))
                .map_or(t, |(_, b)| *b)
        }

        /// Sets how long it leads, as of real time `t`.
        fn lead_until(&mut self, t: u64, until: Option<u64>) {
            if let Some(last) = self.led.last_mut()
                && last.1 > t
            {
                last.1 = t;
            }
            if let Some(u) = until {
                let end = self.real(u);
                if end > t {
                    self.led.push((t, end));
                }
            }
            self.until = until;
        }
    }

    impl Sim {
        fn next(&mut self) -> u64 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng
        }

        /// A network delay: often short, often longer than the margin but
        /// within an attempt, sometimes longer than an attempt may take.
        fn delay(&mut self) -> u64 {
            match self.next() % 100 {
                0..45 => self.next() % 50_000,
                45..85 => 500_000 + self.next() % 450_000,
                _ => 50_000 + self.next() % 1_450_000,
            }
        }

        fn at(&mut self, t: u64, ev: Ev) {
            self.seq += 1;
            self.queue.push(Reverse((t, self.seq, ev)));
        }

        fn instant(&self, local: u64) -> Instant {
            self.base + Duration::from_micros(local)
        }

        fn current(&self, i: usize, id: u64, t: u64) -> bool {
            let m = &self.m[i];
            id == m.attempt && m.local(t) <= m.sent_local + PERIOD_US
        }

        fn run(&mut self) {
            self.at(0, Ev::Attempt(0));
            let second = self.next() % PERIOD_US;
            self.at(second, Ev::Attempt(1));
            while let Some(Reverse((t, _, ev))) = self.queue.pop() {
                if t > RUN_US {
                    break;
                }
                let i = match &ev {
                    Ev::Attempt(i) | Ev::GetReply(i, ..) | Ev::PutReply(i, ..) => Some(*i),
                    Ev::GetArrives(..) | Ev::PutArrives(..) => None,
                };
                // A stalled manager handles nothing until it resumes.
                if let Some(i) = i {
                    let awake = self.m[i].awake_at(t);
                    if awake > t {
                        self.at(awake, ev);
                        continue;
                    }
                }
                self.step(t, ev);
            }
        }

        fn step(&mut self, t: u64, ev: Ev) {
            match ev {
                Ev::Attempt(i) => {
                    let m = &mut self.m[i];
                    m.attempt += 1;
                    m.sent_local = m.local(t);
                    let (id, next) = (m.attempt, m.real(m.sent_local + PERIOD_US));
                    let cut = m.cut_off(t);
                    self.at(next, Ev::Attempt(i));
                    if !cut {
                        let d = self.delay();
                        self.at(t + d, Ev::GetArrives(i, id));
                    }
                }
                Ev::GetArrives(i, id) => {
                    let s = self.store.clone();
                    let d = self.delay();
                    if !self.m[i].cut_off(t + d) {
                        self.at(t + d, Ev::GetReply(i, id, s.holder, s.renewals, s.rv));
                    }
                }
                Ev::GetReply(i, id, holder, renewals, rv) => {
                    if !self.current(i, id, t) {
                        return;
                    }
                    let read_at = self.instant(self.m[i].local(t));
                    if let Some(h) = holder
                        && h != i
                        && !self.m[i].observed.expired(
                            (h, renewals),
                            read_at,
                            Duration::from_micros(D_US),
                        )
                    {
                        self.m[i].lead_until(t, None);
                        return;
                    }
                    let d = self.delay();
                    if !self.m[i].cut_off(t) {
                        self.at(t + d, Ev::PutArrives(i, id, rv));
                    }
                }
                Ev::PutArrives(i, id, rv) => {
                    let ok = self.store.rv == rv;
                    if ok {
                        if self.store.holder.is_some_and(|h| h != i) {
                            self.takeovers += 1;
                        }
                        self.store = Store {
                            holder: Some(i),
                            renewals: self.store.renewals + 1,
                            rv: rv + 1,
                        };
                    }
                    let d = self.delay();
                    if !self.m[i].cut_off(t + d) {
                        self.at(t + d, Ev::PutReply(i, id, ok));
                    }
                }
                Ev::PutReply(i, id, ok) => {
                    if !self.current(i, id, t) {
                        return;
                    }
                    let d = Duration::from_micros(D_US);
                    let until =
                        ok.then(|| self.m[i].sent_local + D_US - margin(d).as_micros() as u64);
                    self.m[i].lead_until(t, until);
                }
            }
        }
    }

    fn windows(rng: &mut u64, max: u64, longest: u64) -> Vec<(u64, u64)> {
        let mut next = || {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng
        };
        (0..next() % (max + 1))
            .map(|_| {
                let start = next() % (RUN_US - 10_000_000);
                (start, start + 200_000 + next() % longest)
            })
            .collect()
    }

    #[test]
    fn two_managers_never_lead_at_once() {
        let mut runner = TestRunner::new(Config {
            cases: 1000,
            failure_persistence: None,
            rng_algorithm: RngAlgorithm::XorShift,
            ..Config::default()
        });
        let takeovers = std::cell::Cell::new(0usize);
        let led = std::cell::Cell::new(0usize);
        runner
            .run(
                &(1u64..u64::MAX, 0.95f64..1.05, 0.95f64..1.05),
                |(seed, r0, r1)| {
                    let mut rng = seed;
                    let mut manager = |rate: f64| Manager {
                        rate,
                        observed: Observed::new(),
                        attempt: 0,
                        sent_local: 0,
                        until: None,
                        led: Vec::new(),
                        partitions: windows(&mut rng, 8, 2 * D_US),
                        stalls: windows(&mut rng, 2, 2 * D_US),
                    };
                    let m = [manager(r0), manager(r1)];
                    let mut sim = Sim {
                        rng: seed,
                        base: Instant::now(),
                        store: Store::default(),
                        m,
                        queue: BinaryHeap::new(),
                        seq: 0,
                        takeovers: 0,
                    };
                    sim.run();
                    takeovers.set(takeovers.get() + sim.takeovers);
                    led.set(led.get() + sim.m.iter().map(|m| m.led.len()).sum::<usize>());
                    for a in &sim.m[0].led {
                        for b in &sim.m[1].led {
                            prop_assert!(
                                a.1 <= b.0 || b.1 <= a.0,
                                "both led: manager 0 {a:?}, manager 1 {b:?} (µs of real time)"
                            );
                        }
                    }
                    Ok(())
                },
            )
            .unwrap();
        // The model must exercise changes of leader, not one manager
        // renewing quietly.
        let (takeovers, led) = (takeovers.get(), led.get());
        eprintln!("leader model: {takeovers} takeovers, {led} leadership terms");
        assert!(takeovers >= 300, "only {takeovers} takeovers in 1000 runs");
        assert!(led >= 4000, "only {led} leadership terms in 1000 runs");
    }
}
