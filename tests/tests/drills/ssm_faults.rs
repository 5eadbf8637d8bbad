//! SSM throttled in bursts and briefly down, under three candidates.

use super::{figure, ms, scalers, R};
use agent_fleet_tests::bed::{eventually, Bed, FAST_DEADLINE_MS, FAST_LEASE_MS, FAST_RETRY_MS};
use agent_fleet_tests::moto::{monotonic_ns, Call};
use agent_fleet_tests::probe::{actions, assert_no_overlap, leading_term, step_downs};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// SSM throttled in bursts (400 ms, then 700 ms), then briefly down (two 1 s outages
/// answering 503), then throttled for 3 s; three candidates. (`election.rs` covers SSM
/// throttled throughout and one short outage; this is the intermittent kind.)
///
/// Must hold: no two leaders' windows overlap, ever; bursts shorter than the renew
/// interval (at most one failed renew in a row) cost the leader nothing — same leader,
/// same term, no step-down; the leader that loses SSM for longer than its renew deadline
/// steps down; once SSM is healthy a leader acts again within lease + renew deadline +
/// retry (+ slack); exactly one leads at the end. Printed: the SSM calls made, how many
/// were throttled or answered 503, the step-downs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssm_throttled_and_briefly_down_one_leader_at_a_time_and_leadership_recovers() -> R {
    const D: &str = "ssm_throttled";
    let bed = Bed::start("ssmdrill").await?;
    let group = "ssmdrill-agents";
    bed.moto.create_group(group, 0, 5, 0).await?;
    bed.put_config(&bed.fast_runtime_config(group)).await?;
    let cands = scalers(
        &bed,
        group,
        &[
            "i-0ssmdrillcand00",
            "i-0ssmdrillcand01",
            "i-0ssmdrillcand02",
        ],
        &[],
    )
    .await?;
    eventually("a leader acts", Duration::from_secs(20), || async {
        cands
            .iter()
            .any(|c| leading_term(&c.output()).is_some() && !actions(&c.output()).is_empty())
            .then_some(())
    })
    .await?;
    let first_terms: BTreeSet<u64> = cands
        .iter()
        .flat_map(|c| actions(&c.output()))
        .map(|a| a.0)
        .collect();
    let since = bed.moto.last_seq().await?;
    let drill_start = Instant::now();

    // 1. Throttling bursts of 400 ms, 1.1 s apart, for 15 s: shorter than the renew
    // interval, so at most one renew in a row fails — within the renew deadline.
    let leader_at_start = cands
        .iter()
        .position(|c| leading_term(&c.output()).is_some());
    let term_at_start = leader_at_start.and_then(|l| leading_term(&cands[l].output()));
    let downs_at_start: Vec<usize> = cands.iter().map(|c| step_downs(&c.output())).collect();
    for _ in 0..10 {
        bed.moto
            .inject_fault(serde_json::json!({"service": "ssm", "error": "ThrottlingException", "outage_ms": 400}))
            .await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let after_short: Vec<usize> = cands.iter().map(|c| step_downs(&c.output())).collect();
    assert_eq!(
        after_short, downs_at_start,
        "throttling shorter than the renew interval costs no leader its lease"
    );
    if let Some(l) = leader_at_start {
        assert_eq!(
            leading_term(&cands[l].output()),
            term_at_start,
            "same leader, same term"
        );
    }
    // 1b. Bursts of 700 ms: two renews in a row can fail, and 1.5 s between counted
    // renews is past the 1.4 s deadline, so the leader may fail-stop (by design).
    for _ in 0..6 {
        bed.moto
            .inject_fault(serde_json::json!({"service": "ssm", "error": "ThrottlingException", "outage_ms": 700}))
            .await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let after_bursts: Vec<usize> = cands.iter().map(|c| step_downs(&c.output())).collect();
    // 2. Two brief outages (503) of 1 s.
    for _ in 0..2 {
        bed.moto
            .inject_fault(serde_json::json!({"service": "ssm", "outage_ms": 1000}))
            .await?;
        tokio::time::sleep(Duration::from_millis(3000)).await;
    }
    // 3. Throttled for 3 s: longer than the renew deadline.
    let before_long: Vec<usize> = cands.iter().map(|c| step_downs(&c.output())).collect();
    let leader_before_long = cands
        .iter()
        .position(|c| leading_term(&c.output()).is_some());
    bed.moto
        .inject_fault(serde_json::json!({"service": "ssm", "error": "ThrottlingException", "outage_ms": 3000}))
        .await?;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let clear_mono = monotonic_ns();
    let cleared = Instant::now();
    bed.moto.clear_faults().await;
    if let Some(l) = leader_before_long {
        assert!(
            step_downs(&cands[l].output()) > before_long[l],
            "the leader stepped down when SSM was gone longer than its renew deadline"
        );
    }

    let recovered = eventually(
        "a leader acts after SSM recovered",
        Duration::from_secs(20),
        || async {
            cands
                .iter()
                .flat_map(|c| actions(&c.output()))
                .any(|a| a.1 > clear_mono)
                .then_some(())
        },
    )
    .await
    .map(|_| cleared.elapsed())?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let calls = bed.moto.calls(since).await?;
    let ssm: Vec<&Call> = calls.iter().filter(|c| c.service == "ssm").collect();
    let throttled = ssm
        .iter()
        .filter(|c| c.error.as_deref() == Some("ThrottlingException"))
        .count();
    let unavailable = ssm.iter().filter(|c| c.status == Some(503)).count();
    let all: Vec<(u64, u64, u64)> = cands.iter().flat_map(|c| actions(&c.output())).collect();
    let terms: BTreeSet<u64> = all.iter().map(|a| a.0).collect();
    let downs: Vec<usize> = cands.iter().map(|c| step_downs(&c.output())).collect();
    figure(
        D,
        format!(
            "{:.0} s of faults: {} SSM calls, {throttled} throttled, {unavailable} answered 503",
            (cleared - drill_start).as_secs_f64(),
            ssm.len()
        ),
    );
    figure(D, format!("step-downs per candidate: after 400 ms bursts {after_short:?}, after 700 ms bursts {after_bursts:?}, in all {downs:?}; terms {first_terms:?} -> {terms:?}"));
    let bound = Duration::from_millis(FAST_LEASE_MS + FAST_DEADLINE_MS + FAST_RETRY_MS);
    figure(
        D,
        format!(
            "leadership recovered {} after SSM came back (lease + deadline + retry = {})",
            ms(recovered),
            ms(bound)
        ),
    );
    assert!(
        recovered <= bound + Duration::from_millis(2500),
        "{recovered:?}"
    );
    assert_no_overlap(&all);
    let leading: Vec<usize> = (0..cands.len())
        .filter(|&i| leading_term(&cands[i].output()).is_some())
        .collect();
    assert_eq!(
        leading.len(),
        1,
        "exactly one leader at the end: {leading:?}"
    );
    Ok(())
}
