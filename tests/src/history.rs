//! The history checker. From the operators' records and the order in which
//! their writes landed on the apiserver it proves three things:
//!
//! - no key was reconciled twice at once, by two runtimes or by one;
//! - no write by an old owner landed after a newer owner's write (a stale
//!   write);
//! - how many handoffs met a reconcile in flight ("contested"), so a run
//!   can tell whether it tested anything.
//!
//! A reconcile whose process died before it recorded its end is read as
//! ending when the process was seen dead; one whose pod was frozen (SIGSTOP)
//! past its lease is read as ending at the freeze: from then on it could not
//! act, and what it did after the thaw is judged by its writes.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use serde::Deserialize;

use crate::mesh::Record;

/// Two reconciles of the same key whose intervals overlap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlap {
    /// The key.
    pub key: String,
    /// The earlier reconcile.
    pub first: Record,
    /// The reconcile that started before `first` ended.
    pub second: Record,
}

/// Every overlap between two reconciles of one key, whoever ran them: two
/// runtimes must never, and one runtime's queue never hands a key out
/// twice. Intervals are closed: touching ends count as overlap.
pub fn overlaps(records: &[Record]) -> Vec<Overlap> {
    let mut out = Vec::new();
    for (key, rs) in by_key(records) {
        for (i, a) in rs.iter().enumerate() {
            // Sorted by start: once a reconcile starts after `a` ended, no
            // later one can overlap `a`.
            for b in rs[i + 1..].iter().take_while(|b| b.start_us <= a.end_us) {
                out.push(Overlap {
                    key: key.to_string(),
                    first: (*a).clone(),
                    second: (*b).clone(),
                });
            }
        }
    }
    out
}

/// Each key's reconciles, sorted by start.
fn by_key(records: &[Record]) -> BTreeMap<&str, Vec<&Record>> {
    let mut by_key: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_key.entry(&r.key).or_default().push(r);
    }
    for rs in by_key.values_mut() {
        rs.sort_by_key(|r| (r.start_us, r.end_us));
    }
    by_key
}

/// What happened to the processes of a run, for reading reconciles that
/// never recorded their end.
#[derive(Clone, Debug, Default)]
pub struct Deaths {
    /// When each operator process was seen dead, in µs since the epoch.
    pub exited: HashMap<u32, u128>,
    /// Per pod name, the times (µs) it was frozen and thawed again.
    pub frozen: HashMap<String, Vec<(u128, u128)>>,
}

/// One line of a records file (an internally tagged enum cannot hold
/// `u128`s in serde, so the tag is a field).
#[derive(Deserialize)]
struct Line {
    event: String,
    id: String,
    key: String,
    #[serde(default)]
    runtime: String,
    #[serde(default)]
    pid: u32,
    #[serde(default)]
    subset: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    generation: i64,
    #[serde(default)]
    start_us: u128,
    #[serde(default)]
    end_us: u128,
    #[serde(default)]
    outcome: String,
}

impl From<Line> for Record {
    fn from(l: Line) -> Self {
        Record {
            id: l.id,
            key: l.key,
            runtime: l.runtime,
            pid: l.pid,
            subset: l.subset,
            version: l.version,
            generation: l.generation,
            start_us: l.start_us,
            end_us: l.end_us,
            outcome: l.outcome,
        }
    }
}

/// Every reconcile in the records files at `paths`, including those whose
/// process died first (outcome `killed`, ending when `deaths` saw the
/// process dead, or `running` and ending `now_us` if it is still alive).
/// Reconciles running when their pod was frozen end at the freeze, outcome
/// `frozen`, if they ended only after the thaw.
pub fn read(paths: &[&Path], deaths: &Deaths, now_us: u128) -> Vec<Record> {
    let mut starts: BTreeMap<String, Record> = BTreeMap::new();
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines() {
            let Ok(line) = serde_json::from_str::<Line>(line) else {
                continue;
            };
            match line.event.as_str() {
                "start" => {
                    starts.insert(line.id.clone(), line.into());
                }
                "end" => {
                    starts.remove(&line.id);
                    out.push(line.into());
                }
                _ => {}
            }
        }
    }
    for (_, mut r) in starts {
        let (end_us, outcome) = match deaths.exited.get(&r.pid) {
            Some(t) => (*t, "killed"),
            None => (now_us, "running"),
        };
        r.end_us = end_us;
        r.outcome = outcome.into();
        out.push(r);
    }
    for r in &mut out {
        let pod = r.runtime.rsplit('/').next().unwrap_or_default();
        for (freeze, thaw) in deaths.frozen.get(pod).into_iter().flatten() {
            if r.start_us <= *freeze && r.end_us >= *thaw {
                r.end_us = *freeze;
                r.outcome = "frozen".into();
            }
        }
    }
    out
}

/// One API write as the operator recorded it when it returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The reconcile that made it.
    pub id: String,
    /// The primary key.
    pub key: String,
    /// What was written: `configmap` or `status`.
    pub target: String,
    /// `ok` or `error: ...`.
    pub outcome: String,
}

/// Every write recorded in the records file at `path` as returned.
pub fn read_writes(path: &Path) -> Vec<Write> {
    read_events(path, "write")
}

/// The ids of the reconciles in the records file at `path` that recorded
/// `event` (`working`, `writing`, ...), with the target for writes.
pub fn events(path: &Path, event: &str) -> Vec<Write> {
    read_events(path, event)
}

fn read_events(path: &Path, event: &str) -> Vec<Write> {
    #[derive(Deserialize)]
    struct W {
        event: String,
        id: String,
        key: String,
        #[serde(default)]
        target: String,
        #[serde(default)]
        outcome: String,
    }
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<W>(l).ok())
        .filter(|w| w.event == event)
        .map(|w| Write {
            id: w.id,
            key: w.key,
            target: w.target,
            outcome: w.outcome,
        })
        .collect()
}

/// Now, in µs since the epoch, the clock the records use.
pub fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}

/// The reconcile of `key` at `generation` in the records file at `path`,
/// once it has read what it needs and started working (`reconcileMs`).
pub fn working(path: &Path, key: &str, generation: i64) -> Option<Record> {
    let r = read(&[path], &Deaths::default(), now_us())
        .into_iter()
        .find(|r| r.key == key && r.generation == generation)?;
    events(path, "working")
        .iter()
        .any(|e| e.id == r.id)
        .then_some(r)
}

/// A write as it landed on the apiserver: the object's resourceVersion
/// after it, and the reconcile that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Landed {
    /// The primary key the write was for.
    pub key: String,
    /// The resourceVersion the write produced.
    pub resource_version: u64,
    /// The id of the reconcile that wrote it.
    pub writer: String,
}

/// A write by an older owner that landed after a newer owner's write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleWrite {
    /// The key.
    pub key: String,
    /// The newer owner's reconcile, whose write landed first.
    pub newer: Record,
    /// The older owner's reconcile, whose write landed after it.
    pub stale: Record,
}

/// The writes that landed after a write by a later reconcile of another
/// owner (runtime and process) of the same key. Since one key's reconciles
/// never overlap, writes must land in the order their reconciles started.
/// Writes by reconciles missing from `records` are an error: the history is
/// incomplete.
pub fn stale_writes(landed: &[Landed], records: &[Record]) -> anyhow::Result<Vec<StaleWrite>> {
    let by_id: HashMap<&str, &Record> = records.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut per_key: BTreeMap<&str, Vec<&Landed>> = BTreeMap::new();
    for l in landed {
        per_key.entry(&l.key).or_default().push(l);
    }
    let mut out = Vec::new();
    for (key, mut ws) in per_key {
        ws.sort_by_key(|w| w.resource_version);
        // The latest-starting reconcile whose write has landed so far.
        let mut newest: Option<&Record> = None;
        for w in ws {
            let Some(r) = by_id.get(w.writer.as_str()).copied() else {
                anyhow::bail!(
                    "{key}: a write by reconcile {:?} landed, but no record has that id",
                    w.writer
                );
            };
            match newest {
                Some(n)
                    if n.start_us > r.start_us && (&n.runtime, n.pid) != (&r.runtime, r.pid) =>
                {
                    out.push(StaleWrite {
                        key: key.to_string(),
                        newer: n.clone(),
                        stale: r.clone(),
                    });
                }
                Some(n) if n.start_us >= r.start_us => {}
                _ => newest = Some(r),
            }
        }
    }
    Ok(out)
}

/// Handoffs that met a reconcile in flight: consecutive reconciles of a key
/// by different runtimes where the earlier one was running when a fault
/// struck (`faults`, µs), or was stopped (cancelled, killed or frozen)
/// rather than finishing.
pub fn contested_handoffs(records: &[Record], faults: &[u128]) -> usize {
    let mut faults = faults.to_vec();
    faults.sort_unstable();
    let struck = |r: &Record| {
        let i = faults.partition_point(|t| *t < r.start_us);
        faults.get(i).is_some_and(|t| *t <= r.end_us)
    };
    let stopped = |r: &Record| matches!(r.outcome.as_str(), "cancelled" | "killed" | "frozen");
    by_key(records)
        .values()
        .map(|rs| {
            rs.windows(2)
                .filter(|w| w[0].runtime != w[1].runtime && (stopped(w[0]) || struck(w[0])))
                .count()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, runtime: &str, start: u128, end: u128) -> Record {
        Record {
            id: format!("{runtime}-{key}-{start}"),
            key: key.into(),
            runtime: runtime.into(),
            pid: 1,
            subset: "v1".into(),
            version: "v1".into(),
            generation: 1,
            start_us: start,
            end_us: end,
            outcome: "ok".into(),
        }
    }

    #[test]
    fn finds_every_overlap_of_one_key() {
        let records = vec![
            rec("a", "r1", 0, 10),
            rec("a", "r1", 5, 20), // one runtime twice at once: an overlap too
            rec("a", "r2", 30, 40),
            rec("b", "r1", 0, 10),
            rec("b", "r2", 10, 12), // touches: counts
            rec("c", "r1", 0, 100),
            rec("c", "r2", 50, 60), // inside r1's long reconcile
            rec("d", "r1", 0, 10),
            rec("d", "r2", 11, 20), // after: fine
        ];
        let found: Vec<(String, String, String)> = overlaps(&records)
            .into_iter()
            .map(|o| (o.key, o.first.runtime, o.second.runtime))
            .collect();
        assert_eq!(
            found,
            vec![
                ("a".into(), "r1".into(), "r1".into()),
                ("b".into(), "r1".into(), "r2".into()),
                ("c".into(), "r1".into(), "r2".into()),
            ]
        );
    }

    #[test]
    fn reads_killed_and_frozen_reconciles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let start = |id: &str, pid: u32, t: u128| {
            format!(
                r#"{{"event":"start","id":"{id}","key":"ns/a","runtime":"ns/p","pid":{pid},"subset":"v1","version":"v1","generation":1,"start_us":{t}}}"#
            )
        };
        let end = |id: &str, pid: u32, s: u128, e: u128| {
            format!(
                r#"{{"event":"end","id":"{id}","key":"ns/a","runtime":"ns/p","pid":{pid},"subset":"v1","version":"v1","generation":1,"start_us":{s},"end_us":{e},"outcome":"ok"}}"#
            )
        };
        let lines = [
            start("1-0", 1, 10),
            r#"{"event":"write","id":"1-0","key":"ns/a","target":"status","outcome":"ok","end_us":15}"#
                .to_string(),
            end("1-0", 1, 10, 20),
            start("1-1", 1, 30), // killed
            start("2-0", 2, 100),
            end("2-0", 2, 100, 900), // frozen 200..800
            start("2-1", 2, 950),    // still running
        ];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let deaths = Deaths {
            exited: HashMap::from([(1, 50)]),
            frozen: HashMap::from([("p".into(), vec![(200, 800)])]),
        };
        let mut rs = read(&[&path], &deaths, 1000);
        rs.sort_by_key(|r| r.start_us);
        let got: Vec<(&str, u128, u128, &str)> = rs
            .iter()
            .map(|r| (r.id.as_str(), r.start_us, r.end_us, r.outcome.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("1-0", 10, 20, "ok"),
                ("1-1", 30, 50, "killed"),
                ("2-0", 100, 200, "frozen"),
                ("2-1", 950, 1000, "running"),
            ]
        );
    }

    #[test]
    fn a_write_by_an_old_owner_after_the_new_owners_is_stale() {
        let old = rec("a", "r1", 0, 10);
        let new = rec("a", "r2", 20, 30);
        let later = rec("a", "r1", 40, 50);
        let records = vec![old.clone(), new.clone(), later.clone()];
        let landed = |order: &[&Record]| -> Vec<Landed> {
            order
                .iter()
                .enumerate()
                .map(|(i, r)| Landed {
                    key: "a".into(),
                    resource_version: i as u64 + 1,
                    writer: r.id.clone(),
                })
                .collect()
        };
        // In order, including the key coming back to r1: nothing stale.
        assert!(
            stale_writes(&landed(&[&old, &new, &later]), &records)
                .unwrap()
                .is_empty()
        );
        // r1's old write lands after r2's: stale.
        let found = stale_writes(&landed(&[&new, &old, &later]), &records).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].newer.id.as_str(), found[0].stale.id.as_str()),
            (new.id.as_str(), old.id.as_str())
        );
        // A write nobody recorded makes the history incomplete.
        let mut unknown = landed(&[&old]);
        unknown[0].writer = "9-9".into();
        assert!(stale_writes(&unknown, &records).is_err());
    }

    #[test]
    fn counts_handoffs_that_stopped_a_reconcile() {
        let mut cancelled = rec("a", "r1", 0, 10);
        cancelled.outcome = "cancelled".into();
        let records = vec![
            cancelled,
            rec("a", "r2", 20, 30), // contested: r1's reconcile was stopped
            rec("a", "r1", 40, 50), // r2's ended before any fault: not contested
            rec("a", "r2", 60, 70), // a fault struck r1's at 45: contested
            rec("a", "r2", 80, 90), // same runtime: no handoff
            rec("b", "r1", 0, 10),
        ];
        assert_eq!(contested_handoffs(&records, &[45, 100]), 2);
    }
}
