//! Kubernetes label selectors: validation and matching.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Labels of an object.
pub(crate) type Labels = BTreeMap<String, String>;

/// Checks that a selector's operators and values are well formed.
pub(crate) fn validate(selector: &LabelSelector) -> Result<(), String> {
    for expr in selector.match_expressions.iter().flatten() {
        let values = expr.values.as_deref().unwrap_or_default();
        match expr.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!(
                    "operator {} on key {:?} needs at least one value",
                    expr.operator, expr.key
                ));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(format!(
                    "operator {} on key {:?} takes no values",
                    expr.operator, expr.key
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(format!(
                    "unknown operator {other:?} on key {:?} (use In, NotIn, Exists or DoesNotExist)",
                    expr.key
                ));
            }
        }
    }
    Ok(())
}

/// True when `labels` satisfy `selector`. An empty selector matches everything.
pub(crate) fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    by_labels
        && selector.match_expressions.iter().flatten().all(|expr| {
            let values = expr.values.as_deref().unwrap_or_default();
            let value = labels.get(&expr.key);
            match expr.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn match_labels_and_expressions() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "op")])),
            match_expressions: Some(vec![
                expr("tier", "In", &["gold", "silver"]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
        };
        assert!(matches(&sel, &labels(&[("app", "op"), ("tier", "gold")])));
        assert!(!matches(
            &sel,
            &labels(&[("app", "op"), ("tier", "bronze")])
        ));
        assert!(!matches(
            &sel,
            &labels(&[("app", "op"), ("tier", "gold"), ("legacy", "1")])
        ));
        assert!(matches(&LabelSelector::default(), &labels(&[])));
    }

    #[test]
    fn invalid_operators_are_named() {
        let sel = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("tier", "Contains", &["x"])]),
        };
        assert!(validate(&sel).unwrap_err().contains("Contains"));
        let sel = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("tier", "In", &[])]),
        };
        assert!(validate(&sel).unwrap_err().contains("at least one value"));
    }
}
