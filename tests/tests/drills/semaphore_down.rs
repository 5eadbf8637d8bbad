//! Semaphore down for "minutes" (see the crate docs).

use super::{calls_of, figure, ms, scalers, R};
use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::hub::JobSpec;
use agent_fleet_tests::moto::{monotonic_ns, Call};
use agent_fleet_tests::probe::{leading_term, starts};
use agent_supervisor::scaler::MAX_BACKOFF;
use std::time::{Duration, Instant};

fn set_desired(calls: &[Call], group: &str) -> Vec<i64> {
    calls_of(calls, "autoscaling", "SetDesiredCapacity")
        .into_iter()
        .filter(|c| c.param("AutoScalingGroupName") == Some(group) && c.error.is_none())
        .filter_map(|c| c.param("DesiredCapacity").and_then(|v| v.parse().ok()))
        .collect()
}

fn outage_secs() -> u64 {
    std::env::var("DRILL_SEMAPHORE_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Semaphore's API (agent API and `/metrics`) down for "minutes" (see the module docs).
///
/// Must hold: the leader keeps leading and backs off — fewer `/metrics` requests than a
/// fixed-rate poller, each gap longer than the one before until the 60 s cap, none
/// above it; it never sets desired capacity while blind (no `SetDesiredCapacity` during the
/// outage, though jobs were queued meanwhile); once Semaphore answers again it raises
/// desired to exactly what the queue needs within one backoff period; the agent and its
/// supervisor keep running throughout (no restart, no termination) and take a job after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_down_leader_backs_off_never_misscales_and_recovers() -> R {
    const D: &str = "semaphore_down";
    let outage = Duration::from_secs(outage_secs());
    let bed = Bed::start("semdown").await?;
    let group = "semdown-agents";
    bed.moto.create_group(group, 0, 5, 0).await?;
    bed.put_config(&bed.fast_runtime_config(group)).await?;
    let fleet = bed.fleet(&[group], &[], &[]);
    // The scaler-role instance leads first; then one agent instance joins (as a follower).
    let scaler = scalers(&bed, group, &["i-0semdownscaler01"], &[]).await?;
    eventually(
        "the scaler leads and polls",
        Duration::from_secs(20),
        || async {
            (leading_term(&scaler[0].output()).is_some() && bed.hub.metrics_polls() >= 1)
                .then_some(())
        },
    )
    .await?;
    bed.moto
        .autoscaling()
        .await
        .set_desired_capacity()
        .auto_scaling_group_name(group)
        .desired_capacity(1)
        .honor_cooldown(false)
        .send()
        .await?;
    eventually("the agent registered", Duration::from_secs(30), || async {
        (bed.hub.live_agents().len() == 1).then_some(())
    })
    .await?;
    let term = leading_term(&scaler[0].output());
    let agent_id = fleet.launched()[0].clone();
    let poll = Duration::from_millis(1000);

    let down_mono = monotonic_ns();
    let t_down = Instant::now();
    bed.hub.set_down(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The jobs run until the drill releases them, so the first one (which the agent that
    // lived through the outage takes at once) still runs when the leader looks again.
    let release = bed.root.join("release-jobs");
    let jobs: Vec<String> = (0..2)
        .map(|i| {
            bed.hub.enqueue_job(JobSpec {
                commands: vec![format!(
                    "while [ ! -e '{}' ]; do sleep 0.2; done; echo job {i}",
                    release.display()
                )],
                env: vec![],
            })
        })
        .collect();
    tokio::time::sleep(outage.saturating_sub(Duration::from_secs(1))).await;
    let agent_alive = fleet
        .with_instance(&agent_id, |i| {
            i.exit_status().is_none() && starts(&i.agent_events()) == 1
        })
        .unwrap_or(false);
    let up_mono = monotonic_ns();
    let t_up = Instant::now();
    bed.hub.set_down(false);

    let during: Vec<Instant> = bed
        .hub
        .metrics_poll_times()
        .into_iter()
        .filter(|t| *t >= t_down && *t <= t_up)
        .collect();
    let gaps: Vec<Duration> = during.windows(2).map(|w| w[1] - w[0]).collect();
    let fixed_rate = (outage.as_millis() / poll.as_millis()) as usize;
    figure(
        D,
        format!(
            "outage {} s: {} /metrics requests (a fixed-rate poller: {fixed_rate}); gaps {:?}",
            outage.as_secs(),
            during.len(),
            gaps.iter().map(|g| g.as_millis()).collect::<Vec<_>>()
        ),
    );
    assert!(agent_alive, "the agent kept running through the outage");
    assert!(
        during.len() < fixed_rate.max(4) && during.len() >= 2,
        "backoff: {} requests in {outage:?}",
        during.len()
    );
    // Doubling with ±20 % jitter: each gap ≥ 1.33 × the one before in theory; 1.1 leaves
    // room for a busy machine. Past 30 s the 60 s cap flattens it.
    for w in gaps.windows(2) {
        if w[0] < MAX_BACKOFF / 2 {
            assert!(
                w[1].as_secs_f64() >= 1.1 * w[0].as_secs_f64(),
                "the backoff grows: {gaps:?}"
            );
        }
    }
    assert!(
        gaps.iter()
            .all(|g| *g <= MAX_BACKOFF + Duration::from_secs(1)),
        "capped at {MAX_BACKOFF:?}: {gaps:?}"
    );
    let calls = bed.moto.calls(0).await?;
    let blind: Vec<&Call> = calls_of(&calls, "autoscaling", "SetDesiredCapacity")
        .into_iter()
        .filter(|c| c.t_ns >= down_mono && c.t_ns <= up_mono)
        .collect();
    assert!(blind.is_empty(), "no scaling while blind: {blind:?}");
    assert_eq!(
        leading_term(&scaler[0].output()),
        term,
        "the outage is not the election's business"
    );

    // Recovery: one raise to what the queue needs.
    let raised = eventually(
        "desired raised for the queued jobs",
        Duration::from_secs(75),
        || async {
            let calls = bed.moto.calls(0).await.ok()?;
            calls_of(&calls, "autoscaling", "SetDesiredCapacity")
                .into_iter()
                .find(|c| c.t_ns > up_mono && c.error.is_none())
                .map(|c| c.t_ns)
        },
    )
    .await?;
    let recovery = Duration::from_nanos(raised.saturating_sub(up_mono));
    std::fs::write(&release, "")?;
    let last_gap = gaps.last().copied().unwrap_or(poll);
    figure(
        D,
        format!(
            "recovery: desired raised {} after Semaphore came back (last backoff gap {})",
            ms(recovery),
            ms(last_gap)
        ),
    );
    // The poll after the last failed one comes at most 2 × 1.2 / 0.8 = 3 gaps later, or
    // at the cap; then one HTTP call and one Auto Scaling call.
    assert!(
        recovery <= (last_gap * 3).min(MAX_BACKOFF) + Duration::from_secs(2),
        "recovers within one backoff period: {recovery:?} (last gap {last_gap:?})"
    );
    bed.jobs_passed(&jobs, Duration::from_secs(60)).await?;
    figure(
        D,
        format!(
            "both jobs done {} after the outage ended",
            ms(t_up.elapsed())
        ),
    );
    let calls: Vec<Call> = bed
        .moto
        .calls(0)
        .await?
        .into_iter()
        .filter(|c| c.t_ns > up_mono)
        .collect();
    assert_eq!(
        set_desired(&calls, group),
        vec![2],
        "exactly one raise, to the two queued jobs; never lowered"
    );
    let ran_on_old = jobs.iter().any(|j| {
        bed.hub
            .job(j)
            .and_then(|j| j.agent)
            .is_some_and(|a| a.starts_with(&agent_id))
    });
    assert!(
        ran_on_old,
        "the agent that lived through the outage took a job"
    );
    let all_calls = bed.moto.calls(0).await?;
    let terminated_before_up = calls_of(
        &all_calls,
        "autoscaling",
        "TerminateInstanceInAutoScalingGroup",
    )
    .iter()
    .any(|c| c.t_ns < up_mono);
    assert!(
        !terminated_before_up,
        "nothing was terminated during the outage"
    );
    fleet.shutdown().await;
    Ok(())
}
