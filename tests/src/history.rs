//! The history checker: from the reconcile records, proves that no key was
//! reconciled by two runtimes at once.

use std::collections::BTreeMap;

use crate::mesh::Record;

/// Two reconciles of the same key by different runtimes whose intervals
/// overlap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlap {
    /// The key.
    pub key: String,
    /// The earlier reconcile.
    pub first: Record,
    /// The reconcile that started before `first` ended.
    pub second: Record,
}

/// Every overlap between reconciles of one key by different runtimes.
/// Intervals are closed: touching ends count as overlap.
pub fn overlaps(records: &[Record]) -> Vec<Overlap> {
    let mut by_key: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_key.entry(&r.key).or_default().push(r);
    }
    let mut out = Vec::new();
    for (key, mut rs) in by_key {
        rs.sort_by_key(|r| (r.start_us, r.end_us));
        for (i, a) in rs.iter().enumerate() {
            // Sorted by start: once a reconcile starts after `a` ended, no
            // later one can overlap `a`.
            for b in rs[i + 1..].iter().take_while(|b| b.start_us <= a.end_us) {
                if a.runtime != b.runtime {
                    out.push(Overlap {
                        key: key.to_string(),
                        first: (*a).clone(),
                        second: (*b).clone(),
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, runtime: &str, start: u128, end: u128) -> Record {
        Record {
            key: key.into(),
            runtime: runtime.into(),
            subset: "v1".into(),
            version: "v1".into(),
            generation: 1,
            start_us: start,
            end_us: end,
            outcome: "ok".into(),
        }
    }

    #[test]
    fn finds_overlaps_across_runtimes_only() {
        let records = vec![
            rec("a", "r1", 0, 10),
            rec("a", "r1", 5, 20), // same runtime: not an overlap of owners
            rec("a", "r2", 30, 40),
            rec("b", "r1", 0, 10),
            rec("b", "r2", 10, 12), // touches: counts
            rec("c", "r1", 0, 100),
            rec("c", "r1", 10, 20),
            rec("c", "r2", 50, 60), // inside r1's long reconcile
        ];
        let found: Vec<(String, String, String)> = overlaps(&records)
            .into_iter()
            .map(|o| (o.key, o.first.runtime, o.second.runtime))
            .collect();
        assert_eq!(
            found,
            vec![
                ("b".into(), "r1".into(), "r2".into()),
                ("c".into(), "r1".into(), "r2".into()),
            ]
        );
    }
}
