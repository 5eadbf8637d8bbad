//! What the e2e tests read back: fields of the supervisor's log lines, the leader actions
//! and transitions they record, and the emulator's call log.

use crate::moto::Call;

/// `key=value` from a supervisor log line (value bare or double-quoted).
pub fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    match rest.strip_prefix('"') {
        Some(q) => q.split('"').next().map(str::to_string),
        None => rest.split_whitespace().next().map(str::to_string),
    }
}

pub fn num(line: &str, key: &str) -> Option<u64> {
    field(line, key)?.parse().ok()
}

/// (term, check_mono_ns, valid_until_mono_ns) of every leader action an instance logged.
pub fn actions(output: &str) -> Vec<(u64, u64, u64)> {
    output
        .lines()
        .filter(|l| l.contains("leader action"))
        .filter_map(|l| {
            Some((
                num(l, "term")?,
                num(l, "check_mono_ns")?,
                num(l, "valid_until_mono_ns")?,
            ))
        })
        .collect()
}

/// The term an instance leads, if its last leadership word was `leading`.
pub fn leading_term(output: &str) -> Option<u64> {
    let last = output.lines().rfind(|l| {
        l.contains(" leading term=")
            || l.contains("stepped down")
            || l.contains(" following term=")
            || l.contains("released the lease")
    })?;
    if last.contains(" leading term=") {
        num(last, "term")
    } else {
        None
    }
}

pub fn step_downs(output: &str) -> usize {
    output
        .lines()
        .filter(|l| l.contains("stepped down"))
        .count()
}

/// No older term's believed validity reaches past a newer term's first action (on
/// CLOCK_MONOTONIC, which every process on this machine shares).
pub fn assert_no_overlap(all: &[(u64, u64, u64)]) {
    for a in all {
        for b in all {
            if a.0 < b.0 {
                assert!(
                    a.2 <= b.1,
                    "leader windows overlap: term {} valid until {} but term {} acted at {}",
                    a.0,
                    a.2,
                    b.0,
                    b.1
                );
            }
        }
    }
}

/// How many times the fake agent started (its `start` events).
pub fn starts(events: &[serde_json::Value]) -> usize {
    events.iter().filter(|e| e["event"] == "start").count()
}

/// (instance, ShouldDecrementDesiredCapacity, error) of every terminate call.
pub fn terminate_calls(calls: &[Call]) -> Vec<(String, String, Option<String>)> {
    calls
        .iter()
        .filter(|c| c.is("autoscaling", "TerminateInstanceInAutoScalingGroup"))
        .map(|c| {
            (
                c.param("InstanceId").unwrap_or_default().to_string(),
                c.param("ShouldDecrementDesiredCapacity")
                    .unwrap_or_default()
                    .to_string(),
                c.error.clone(),
            )
        })
        .collect()
}
