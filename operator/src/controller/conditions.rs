//! A resource's status conditions, one per type: what every status writer (compile, TLS probe,
//! DKIM check) uses to put its condition in place of the previous one. Pure.

use mailroute_config::resources::Condition;

/// `conditions` with `condition` in place of the one of the same type.
pub fn merged(conditions: &[Condition], condition: Condition) -> Vec<Condition> {
    let mut out: Vec<Condition> = conditions
        .iter()
        .filter(|c| c.type_ != condition.type_)
        .cloned()
        .collect();
    out.push(condition);
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}
