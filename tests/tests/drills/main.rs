//! Failure drills (issue 6, part 4): real `agent-supervisor` processes against moto, the
//! fake hub, fake IMDS and the fake agent, with one fault injected per drill. Each drill
//! says in its doc comment what must hold, asserts it, and prints its figures as
//! `DRILL <drill> <figure>` lines (`make drills` shows them; `cargo test` captures them
//! unless `--nocapture`).
//!
//! Timings are the e2e tests' short ones (lease 2 s, renew deadline 1.4 s, retry 0.5 s,
//! poll 1 s). The Semaphore outage lasts `DRILL_SEMAPHORE_OUTAGE_SECS` (20 s by default,
//! 150 s under `make drills`: "minutes" scaled to a 1 s poll, but long enough there that
//! the scaler's backoff reaches its 60 s cap).

use agent_fleet_tests::bed::{
    eventually, Bed, FAST_DEADLINE_MS, FAST_LEASE_MS, FAST_RETRY_MS, TOKEN,
};
use agent_fleet_tests::fleet::{group_alive, Instance, InstanceOptions};
use agent_fleet_tests::hub::{JobSpec, JobState};
use agent_fleet_tests::moto::{monotonic_ns, Call};
use agent_fleet_tests::probe::{actions, assert_no_overlap, leading_term, num, starts, step_downs};
use agent_supervisor::scaler::MAX_BACKOFF;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type R = anyhow::Result<()>;

fn figure(drill: &str, text: impl std::fmt::Display) {
    println!("DRILL {drill} {text}");
}

// ------------------------------------------------------------------ supervisor logs/// No older term's believed validity reaches past a newer term's first action (as in
/// Scaler-role candidates (no agent): election and scaling only.
async fn scalers(
    bed: &Bed,
    group: &str,
    names: &[&str],
    env: &[Vec<(String, String)>],
) -> anyhow::Result<Vec<Instance>> {
    let mut out = vec![];
    for (i, name) in names.iter().enumerate() {
        let mut o: InstanceOptions = bed.instance(name, group);
        o.args = vec!["--role".into(), "scaler".into()];
        o.env = env.get(i).cloned().unwrap_or_default();
        out.push(Instance::start(o, None).await?);
    }
    Ok(out)
}
fn calls_of<'a>(calls: &'a [Call], service: &str, action: &str) -> Vec<&'a Call> {
    calls.iter().filter(|c| c.is(service, action)).collect()
}

fn set_desired(calls: &[Call], group: &str) -> Vec<i64> {
    calls_of(calls, "autoscaling", "SetDesiredCapacity")
        .into_iter()
        .filter(|c| c.param("AutoScalingGroupName") == Some(group) && c.error.is_none())
        .filter_map(|c| c.param("DesiredCapacity").and_then(|v| v.parse().ok()))
        .collect()
}

/// Calls that would change the fleet: terminate, health, capacity.
fn churn(calls: &[Call]) -> Vec<&Call> {
    calls
        .iter()
        .filter(|c| {
            c.is("autoscaling", "TerminateInstanceInAutoScalingGroup")
                || c.is("autoscaling", "SetInstanceHealth")
                || c.is("autoscaling", "SetDesiredCapacity")
        })
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

// ------------------------------------------------------------------ Semaphore down

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
    eventually("both jobs ran", Duration::from_secs(60), || async {
        jobs.iter()
            .all(|j| {
                bed.hub.job(j).is_some_and(|j| {
                    j.state == JobState::Finished && j.result.as_deref() == Some("passed")
                })
            })
            .then_some(())
    })
    .await?;
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

// ------------------------------------------------------------------ SSM

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

// ------------------------------------------------------------------ terminate

struct TerminateRun {
    bed: Bed,
    inst: Instance,
    id: String,
    group: String,
    idle_at_mono: u64,
}

/// One agent instance (group min 0, desired 1) whose agent goes idle after 1 s, with
/// `faults` armed once it registered: its supervisor then runs the termination chain.
async fn terminate_run(
    stack: &str,
    faults: &[serde_json::Value],
    extra_args: &[&str],
) -> anyhow::Result<TerminateRun> {
    let bed = Bed::start(stack).await?;
    let group = format!("{stack}-agents");
    bed.moto.create_group(&group, 0, 2, 1).await?;
    let mut cfg = bed.runtime_config(&group);
    cfg.idle_timeout_secs = 2;
    cfg.scaler.enabled = false;
    bed.put_config(&cfg).await?;
    let id = bed.moto.group(&group).await?.in_service()[0].clone();
    let mut o = bed.instance(&id, &group);
    o.args = ["--aws-retry-ms", "200"]
        .iter()
        .chain(extra_args)
        .map(|s| s.to_string())
        .collect();
    let inst = Instance::start(o, None).await?;
    inst.wait_for_event("registered", Duration::from_secs(20), |e| {
        e.iter().any(|e| e["event"] == "registered")
    })
    .await?;
    for f in faults {
        bed.moto.inject_fault(f.clone()).await?;
    }
    let events = inst
        .wait_for_event("the agent went idle", Duration::from_secs(20), |e| {
            e.iter().any(|e| e["event"] == "shutdown")
        })
        .await?;
    let idle_at_mono = events
        .iter()
        .find(|e| e["event"] == "shutdown")
        .and_then(|e| e["mono_ns"].as_u64())
        .unwrap_or_default();
    Ok(TerminateRun {
        bed,
        inst,
        id,
        group,
        idle_at_mono,
    })
}

fn gaps_ms(calls: &[&Call]) -> Vec<u64> {
    calls
        .windows(2)
        .map(|w| w[1].t_ns.saturating_sub(w[0].t_ns) / 1_000_000)
        .collect()
}

/// `TerminateInstanceInAutoScalingGroup` fails three times (a reset connection, then
/// throttling twice) before Auto Scaling takes it.
///
/// Must hold: the chain retries with growing gaps (backoff from 200 ms, doubling, ±20 %),
/// the fourth call succeeds, the instance is gone and desired shrank (IDLE decrements);
/// no `SetInstanceHealth`, no poweroff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_errors_are_retried_with_backoff_then_the_instance_goes() -> R {
    const D: &str = "terminate_retry";
    let run = terminate_run(
        "termretry",
        &[
            serde_json::json!({"service": "autoscaling", "action": "TerminateInstanceInAutoScalingGroup", "mode": "reset", "count": 1}),
            serde_json::json!({"service": "autoscaling", "action": "TerminateInstanceInAutoScalingGroup", "error": "Throttling", "status": 400, "count": 2}),
        ],
        &[],
    )
    .await?;
    let bed = &run.bed;
    let done = eventually("the instance is gone", Duration::from_secs(30), || async {
        let g = bed.moto.group(&run.group).await.ok()?;
        g.state_of(&run.id).is_none().then_some(g)
    })
    .await?;
    let calls = bed.moto.calls(0).await?;
    let terms = calls_of(&calls, "autoscaling", "TerminateInstanceInAutoScalingGroup");
    let outcomes: Vec<String> = terms
        .iter()
        .map(|c| {
            c.fault
                .clone()
                .map(|f| format!("{f}:{}", c.error.clone().unwrap_or_default()))
                .unwrap_or_else(|| format!("{}", c.status.unwrap_or_default()))
        })
        .collect();
    let gaps = gaps_ms(&terms);
    let took = terms
        .last()
        .and_then(|c| c.end_ns)
        .unwrap_or_default()
        .saturating_sub(run.idle_at_mono);
    figure(
        D,
        format!(
            "{} terminate calls {outcomes:?}, gaps {gaps:?} ms; idle → accepted {} ms",
            terms.len(),
            took / 1_000_000
        ),
    );
    assert_eq!(terms.len(), 4, "{outcomes:?}");
    assert_eq!(terms[3].status, Some(200), "{outcomes:?}");
    assert!(terms
        .iter()
        .all(|c| c.param("ShouldDecrementDesiredCapacity") == Some("true")));
    assert!(
        gaps.windows(2).all(|w| w[1] as f64 >= 1.1 * w[0] as f64),
        "growing gaps: {gaps:?}"
    );
    assert!(gaps[0] >= 150, "a backoff, not a tight loop: {gaps:?}");
    assert_eq!(done.desired, 0, "IDLE shrank the group: {done:?}");
    assert!(calls_of(&calls, "autoscaling", "SetInstanceHealth").is_empty());
    assert!(!run.inst.dir.join("powered-off").exists(), "no poweroff");
    assert!(!run.inst.output().contains(TOKEN));
    Ok(())
}

/// `TerminateInstanceInAutoScalingGroup` is throttled every time.
///
/// Must hold: five tries with backoff, then `SetInstanceHealth Unhealthy` — the instance
/// is marked unhealthy (Auto Scaling replaces unhealthy instances); and when Auto Scaling
/// still has not stopped it after `--terminate-timeout-secs`, the supervisor powers off.
/// The termination is never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_throttled_throughout_falls_back_to_unhealthy_then_poweroff() -> R {
    const D: &str = "terminate_unhealthy";
    let run = terminate_run(
        "termunhealthy",
        &[serde_json::json!({"service": "autoscaling", "action": "TerminateInstanceInAutoScalingGroup", "error": "Throttling", "status": 400})],
        &["--terminate-timeout-secs", "3"],
    )
    .await?;
    let bed = &run.bed;
    let marked = eventually(
        "the instance is marked Unhealthy",
        Duration::from_secs(30),
        || async {
            let g = bed.moto.group(&run.group).await.ok()?;
            g.instances
                .iter()
                .any(|(i, _, h)| *i == run.id && h == "Unhealthy")
                .then(Instant::now)
        },
    )
    .await?;
    let calls = bed.moto.calls(0).await?;
    let terms = calls_of(&calls, "autoscaling", "TerminateInstanceInAutoScalingGroup");
    let health = calls_of(&calls, "autoscaling", "SetInstanceHealth");
    let gaps = gaps_ms(&terms);
    figure(
        D,
        format!(
            "{} terminate calls (all throttled), gaps {gaps:?} ms, then SetInstanceHealth {:?}",
            terms.len(),
            health.iter().map(|c| c.status).collect::<Vec<_>>()
        ),
    );
    assert_eq!(terms.len(), 5, "TERMINATE_ATTEMPTS tries");
    assert!(
        gaps.windows(2).all(|w| w[1] as f64 >= 1.1 * w[0] as f64),
        "growing gaps: {gaps:?}"
    );
    assert_eq!(health.len(), 1);
    assert_eq!(health[0].param("HealthStatus"), Some("Unhealthy"));
    assert!(terms.iter().all(|c| health[0].t_ns > c.t_ns));
    // Auto Scaling (moto) does not act on it here: after the terminate timeout, poweroff.
    let powered = run.inst.dir.join("powered-off");
    eventually("powered off", Duration::from_secs(10), || async {
        powered.exists().then_some(())
    })
    .await?;
    figure(
        D,
        format!(
            "powered off {} after the instance was marked unhealthy (--terminate-timeout-secs 3)",
            ms(marked.elapsed())
        ),
    );
    Ok(())
}

/// Both `TerminateInstanceInAutoScalingGroup` and `SetInstanceHealth` are refused
/// (AccessDenied, a permanent error).
///
/// Must hold: one terminate call (no retries of a permanent refusal), one
/// `SetInstanceHealth`, then the poweroff command runs at once — the launch template's
/// shutdown behaviour (terminate) ends the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_and_health_refused_fall_back_to_poweroff() -> R {
    const D: &str = "terminate_poweroff";
    let run = terminate_run(
        "termpoweroff",
        &[
            serde_json::json!({"service": "autoscaling", "action": "TerminateInstanceInAutoScalingGroup", "error": "AccessDenied", "status": 403}),
            serde_json::json!({"service": "autoscaling", "action": "SetInstanceHealth", "error": "AccessDenied", "status": 403}),
        ],
        &[],
    )
    .await?;
    let powered = run.inst.dir.join("powered-off");
    eventually("powered off", Duration::from_secs(20), || async {
        powered.exists().then_some(())
    })
    .await?;
    let calls = run.bed.moto.calls(0).await?;
    let terms = calls_of(&calls, "autoscaling", "TerminateInstanceInAutoScalingGroup");
    let health = calls_of(&calls, "autoscaling", "SetInstanceHealth");
    let last = health.last().and_then(|c| c.end_ns).unwrap_or_default();
    figure(
        D,
        format!(
            "terminate {:?}, SetInstanceHealth {:?}; idle → last refusal {} ms; poweroff ran",
            terms.iter().map(|c| c.error.clone()).collect::<Vec<_>>(),
            health.iter().map(|c| c.error.clone()).collect::<Vec<_>>(),
            last.saturating_sub(run.idle_at_mono) / 1_000_000
        ),
    );
    assert_eq!(terms.len(), 1, "a permanent refusal is not retried");
    assert_eq!(health.len(), 1);
    let out = run.inst.output();
    assert!(out.contains("powering off"), "{out}");
    Ok(())
}

// ------------------------------------------------------------------ IMDS

/// What the front of a fake IMDS does with a connection.
const REFUSE: u8 = 0;
const ERROR_500: u8 = 1;
const FORWARD: u8 = 2;

/// A TCP front for an instance's fake IMDS that the drill switches between closing
/// connections at once, answering 500, and forwarding.
struct ImdsFront {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    target: Arc<Mutex<Option<SocketAddr>>>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ImdsFront {
    async fn start(mode: u8) -> anyhow::Result<ImdsFront> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(AtomicU8::new(mode));
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let connections = Arc::new(AtomicU64::new(0));
        let (m, t, n) = (mode.clone(), target.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                n.fetch_add(1, Ordering::Relaxed);
                let mode = m.load(Ordering::SeqCst);
                let target = t.lock().ok().and_then(|g| *g);
                tokio::spawn(async move {
                    match (mode, target) {
                        (FORWARD, Some(target)) => {
                            if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                            }
                        }
                        (ERROR_500, _) => {
                            let mut buf = vec![0u8; 4096];
                            let mut seen = Vec::new();
                            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                                match conn.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                                }
                            }
                            let _ = conn
                                .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                .await;
                        }
                        _ => drop(conn),
                    }
                });
            }
        });
        Ok(ImdsFront {
            addr,
            mode,
            target,
            connections,
            task,
        })
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn forward_to(&self, endpoint: &str) {
        let addr = endpoint
            .trim_start_matches("http://")
            .parse::<SocketAddr>()
            .ok();
        if let Ok(mut g) = self.target.lock() {
            *g = addr;
        }
        self.mode.store(FORWARD, Ordering::SeqCst);
    }
}

impl Drop for ImdsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// IMDS is unreachable for the first ~1.5 s of the boot (connections closed), well
/// within the retry budget of `--imds-attempts 6` (backoff from 200 ms: 6.2 s).
///
/// Must hold: the supervisor retries (a warning per failed attempt), then boots as usual
/// once IMDS answers — the agent starts and registers; nothing is terminated.
/// (`supervisor.rs` covers IMDS unreachable throughout: exit 2 after bounded retries.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imds_down_at_boot_then_back_within_the_budget_boot_proceeds() -> R {
    const D: &str = "imds_back";
    let bed = Bed::start("imdsback").await?;
    let group = "imdsback-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let front = ImdsFront::start(REFUSE).await?;
    let mut o = bed.instance(&id, group);
    o.imds_endpoint_override = Some(front.endpoint());
    o.args = vec!["--imds-attempts".into(), "6".into()];
    let inst = Instance::start(o, None).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let refused = front.connections.load(Ordering::Relaxed);
    front.forward_to(&inst.imds.endpoint());
    let up = Instant::now();
    inst.wait_for_event("registered", Duration::from_secs(20), |e| {
        e.iter().any(|e| e["event"] == "registered")
    })
    .await?;
    let out = inst.output();
    let retries = out.matches("IMDS not answering yet").count();
    let started = inst
        .wait_for_line("agent started", Duration::from_secs(1))
        .await
        .is_ok();
    figure(D, format!("{refused} IMDS connections refused, {retries} retries logged; agent registered {} after IMDS came back", ms(up.elapsed())));
    assert!(retries >= 1, "it did retry: {out}");
    assert!(started, "{out}");
    assert!(inst.exit_status().is_none(), "still running: {out}");
    assert!(!out.contains("cannot read instance metadata"), "{out}");
    Ok(())
}

/// IMDS answers HTTP 500 to everything (the token PUT included) for the whole boot.
///
/// Must hold: bounded retries (`--imds-attempts 3`: two warnings), then one clear error
/// naming the fix, exit code 2, no agent started, nothing asked of Auto Scaling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imds_erroring_throughout_the_boot_exits_2_with_a_clear_error() -> R {
    const D: &str = "imds_500";
    let bed = Bed::start("imds500").await?;
    let group = "imds500-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let front = ImdsFront::start(ERROR_500).await?;
    let mut o = bed.instance(&id, group);
    o.imds_endpoint_override = Some(front.endpoint());
    o.args = vec!["--imds-attempts".into(), "3".into()];
    let t0 = Instant::now();
    let inst = Instance::start(o, None).await?;
    let status = inst.wait_exit(Duration::from_secs(30)).await?;
    let took = t0.elapsed();
    let out = inst.output();
    figure(
        D,
        format!(
            "exit {:?} after {} ({} requests answered 500)",
            status.code(),
            ms(took),
            front.connections.load(Ordering::Relaxed)
        ),
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("cannot read instance metadata after 3 attempts") && out.contains("fix:"),
        "{out}"
    );
    assert_eq!(out.matches("IMDS not answering yet").count(), 2, "{out}");
    assert!(took < Duration::from_secs(15), "bounded: {took:?}");
    assert_eq!(starts(&inst.agent_events()), 0);
    let calls = bed.moto.calls(0).await?;
    assert!(churn(&calls).is_empty(), "{:?}", churn(&calls));
    assert!(
        !calls.iter().any(|c| c.is("ssm", "GetParameter")
            && c.param("Name") == Some(bed.config_parameter.as_str())),
        "nothing read past IMDS"
    );
    Ok(())
}

// ------------------------------------------------------------------ work dir

/// Whether this process may make a mount namespace with a read-only bind mount.
fn can_remount_read_only() -> Result<(), String> {
    let probe = std::env::temp_dir().join(format!("drill-ro-probe-{}", std::process::id()));
    std::fs::create_dir_all(&probe).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" \"$0\" && mount -o remount,bind,ro \"$0\" \"$0\" && ! touch \"$0/x\" 2>/dev/null")
        .arg(&probe)
        .output();
    let _ = std::fs::remove_dir_all(&probe);
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "unshare --mount with a read-only bind mount failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run unshare: {e}")),
    }
}

/// Runs a supervisor whose work dir cannot be written; returns (exit status, output).
async fn unwritable(o: InstanceOptions) -> anyhow::Result<(i32, String, Instance)> {
    let inst = Instance::start(o, None).await?;
    let status = inst.wait_exit(Duration::from_secs(30)).await?;
    Ok((status.code().unwrap_or(-1), inst.output(), inst))
}

/// The work dir (`--work-dir`) cannot be written: (1) a file stands where it should be,
/// (2) it exists but is on a read-only mount (as root, permissions alone would not stop
/// the write, so the drill uses a read-only bind mount in a mount namespace; skipped,
/// with the reason printed, where mount namespaces are not allowed).
///
/// Must hold: a clear error that names the path, exit code 2, no agent started, no
/// registration, and no churn — nothing asked of Auto Scaling (no terminate, no
/// health change, no capacity change); a restart (as systemd's `Restart=on-failure`
/// does every 30 s) ends the same way and costs only the boot's reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_work_dir_is_refused_naming_the_path_without_churn() -> R {
    const D: &str = "workdir";
    let bed = Bed::start("workdir").await?;
    let group = "workdir-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();

    // 1. A file in the way.
    let root1 = bed.root.join("file-in-the-way");
    let work1 = root1.join(&id).join("work");
    std::fs::create_dir_all(root1.join(&id))?;
    std::fs::write(&work1, "not a directory")?;
    let mut o = bed.instance(&id, group);
    o.root = root1.clone();
    let seq = bed.moto.last_seq().await?;
    let (code, out, inst) = unwritable(o.clone()).await?;
    figure(
        D,
        format!(
            "file in the way: exit {code}: {}",
            out.lines()
                .rfind(|l| l.contains("work dir"))
                .unwrap_or_default()
        ),
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("cannot create work dir {}", work1.display())),
        "names the path: {out}"
    );
    assert_eq!(starts(&inst.agent_events()), 0, "no agent: {out}");
    let reads = bed.moto.calls(seq).await?.len();
    // A restart ends the same way.
    let (code2, out2, _) = unwritable(o).await?;
    assert_eq!(code2, 2, "{out2}");
    figure(
        D,
        format!("each attempt costs {reads} AWS calls (reads only)"),
    );

    // 2. Read-only.
    match can_remount_read_only() {
        Err(why) => println!("DRILL {D} SKIPPED read-only work dir: {why}"),
        Ok(()) => {
            let root2 = bed.root.join("read-only");
            let work2 = root2.join(&id).join("work");
            std::fs::create_dir_all(&work2)?;
            let mut o = bed.instance(&id, group);
            o.root = root2;
            o.wrapper = vec![
                "unshare".into(),
                "--mount".into(),
                "--propagation".into(),
                "private".into(),
                "sh".into(),
                "-c".into(),
                "mount --bind \"$0\" \"$0\" && mount -o remount,bind,ro \"$0\" \"$0\" && exec \"$@\"".into(),
                work2.display().to_string(),
            ];
            let (code, out, inst) = unwritable(o).await?;
            figure(
                D,
                format!(
                    "read-only: exit {code}: {}",
                    out.lines()
                        .rfind(|l| l.contains("cannot write"))
                        .unwrap_or_default()
                ),
            );
            assert_eq!(code, 2, "{out}");
            assert!(
                out.contains(&format!(
                    "cannot write {}",
                    work2.join("shutdown-hook.sh").display()
                )) && out.contains("Read-only file system"),
                "names the path and the cause: {out}"
            );
            assert_eq!(starts(&inst.agent_events()), 0, "no agent: {out}");
        }
    }

    let calls = bed.moto.calls(0).await?;
    let leader_writes = calls
        .iter()
        .filter(|c| {
            c.is("ssm", "PutParameter") && c.param("Name").is_some_and(|n| n.contains("/leader/"))
        })
        .count();
    figure(
        D,
        format!("leader-term writes by the refused supervisors: {leader_writes}"),
    );
    assert!(churn(&calls).is_empty(), "no churn: {:?}", churn(&calls));
    assert!(bed.hub.agents().is_empty(), "nothing registered");
    let g = bed.moto.group(group).await?;
    assert_eq!((g.desired, g.in_service()), (1, vec![id.clone()]));
    Ok(())
}

// ------------------------------------------------------------------ hanging hook

/// The agent hangs in its shutdown: (A) before its hook runs (`FAKE_AGENT_HOOK_SLEEP_SECS`:
/// the reason never reaches the supervisor through the hook), (B) in the hook, after the
/// script handed the reason over (`FAKE_AGENT_HOOK_HANG_SECS`). Both idle out (IDLE). The
/// supervisor bounds the agent's shutdown at 3 s here
/// (`AGENT_SUPERVISOR_AGENT_SHUTDOWN_TIMEOUT_SECS`; default 60 s).
///
/// Must hold: in both, the supervisor kills the agent's process group once the bound
/// has passed, acts on the reason the agent gave (A: by running the hook in its place)
/// and terminates the instance with decrement — within the bound plus a few seconds of
/// the agent's shutdown; nothing of the agent's group survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_agent_only_hanging_in_its_shutdown_hook_still_ends_the_instance() -> R {
    const D: &str = "hanging_hook";
    let bound = Duration::from_secs(3);
    let bed = Bed::start("hookhang").await?;
    let group = "hookhang-agents".to_string();
    bed.moto.create_group(&group, 0, 3, 2).await?;
    let ids = bed.moto.group(&group).await?.in_service();
    let cases: Vec<(&str, &str, String, String)> = [
        ("before", "FAKE_AGENT_HOOK_SLEEP_SECS"),
        ("in", "FAKE_AGENT_HOOK_HANG_SECS"),
    ]
    .into_iter()
    .zip(ids)
    .map(|((name, knob), id)| (name, knob, group.clone(), id))
    .collect();
    let mut cfg = bed.runtime_config(&group);
    cfg.idle_timeout_secs = 2;
    cfg.scaler.enabled = false;
    bed.put_config(&cfg).await?;
    let mut insts = vec![];
    for (_, knob, group, id) in &cases {
        let mut o = bed.instance(id, group);
        o.agent_env = vec![(knob.to_string(), "3600".into())];
        o.env = vec![(
            "AGENT_SUPERVISOR_AGENT_SHUTDOWN_TIMEOUT_SECS".into(),
            bound.as_secs().to_string(),
        )];
        insts.push(Instance::start(o, None).await?);
    }
    for ((name, _, group, id), inst) in cases.iter().zip(&insts) {
        let events = inst
            .wait_for_event(
                "the agent began its shutdown",
                Duration::from_secs(30),
                |e| e.iter().any(|e| e["event"] == "shutdown"),
            )
            .await?;
        let shutdown_mono = events
            .iter()
            .find(|e| e["event"] == "shutdown")
            .and_then(|e| e["mono_ns"].as_u64())
            .unwrap_or_default();
        let call = eventually(
            "the instance asked to terminate",
            bound + Duration::from_secs(15),
            || async {
                let calls = bed.moto.calls(0).await.ok()?;
                calls.into_iter().find(|c| {
                    c.is("autoscaling", "TerminateInstanceInAutoScalingGroup")
                        && c.param("InstanceId") == Some(id.as_str())
                })
            },
        )
        .await?;
        let took = Duration::from_nanos(call.t_ns.saturating_sub(shutdown_mono));
        figure(D, format!("hang {name} the hook: agent shutdown → TerminateInstanceInAutoScalingGroup {} (bound {})", ms(took), ms(bound)));
        assert_eq!(
            call.param("ShouldDecrementDesiredCapacity"),
            Some("true"),
            "IDLE"
        );
        assert!(took >= bound, "the agent got its bound: {took:?}");
        assert!(took <= bound + Duration::from_secs(4), "{took:?}");
        let out = inst.output();
        assert!(out.contains("after it began shutting down"), "{out}");
        if *name == "before" {
            assert!(out.contains("running the hook in its place"), "{out}");
        } else {
            let hook_ran = out.find("agent shutdown hook ran");
            let killed = out.find("after it began shutting down");
            assert!(hook_ran < killed, "the hook's reason came first: {out}");
        }
        eventually("the instance is gone", Duration::from_secs(10), || async {
            let g = bed.moto.group(group).await.ok()?;
            g.state_of(id).is_none().then_some(())
        })
        .await?;
        for g in inst.agent_groups() {
            assert!(!group_alive(g), "agent process group {g} survived");
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ wall clock

/// libfaketime's preload library, installing Debian's `faketime` package if it is
/// missing (the tests run as root; `.ci/run` installs it too). Err: why not.
fn libfaketime() -> Result<PathBuf, String> {
    let find = || -> Option<PathBuf> {
        for dir in [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
        ] {
            let p = Path::new(dir).join("faketime/libfaketime.so.1");
            if p.is_file() {
                return Some(p);
            }
        }
        None
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "libfaketime is not installed and this is not root (apt-get install faketime)".into(),
        );
    }
    println!("DRILL wall_clock installing faketime with apt-get");
    let ok = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !ok(&["install", "-y", "-qq", "faketime"]) {
        let _ = ok(&["update", "-qq"]);
        if !ok(&["install", "-y", "-qq", "faketime"]) {
            return Err("apt-get install faketime failed".into());
        }
    }
    find().ok_or_else(|| "faketime installed, but libfaketime.so.1 was not found".into())
}

/// The UTC date (`YYYY-MM-DD`) a tracing line starts with, if it does.
fn line_date(line: &str) -> Option<&str> {
    let d = line.get(..10)?;
    (d.as_bytes().get(4) == Some(&b'-') && d.as_bytes().get(7) == Some(&b'-')).then_some(d)
}

/// The wall clock of the leader jumps back a day, then forward two days; a follower's
/// jumps forward a day and back; a third candidate keeps real time. libfaketime (`LD_PRELOAD`,
/// `FAKETIME_TIMESTAMP_FILE` re-read on every call, the monotonic clock left alone)
/// changes the offset while they run.
///
/// Must hold: leadership relies on the monotonic clock only — the leader neither steps
/// down nor is replaced because of a jump (same term throughout, no `stepped down`, no
/// other candidate ever leads), and no two leaders' windows overlap. The drill checks
/// that the jumps took effect (the leader's log timestamps show the faked dates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_on_the_leader_move_no_leadership() -> R {
    const D: &str = "wall_clock";
    let lib = match libfaketime() {
        Ok(p) => p,
        Err(why) => {
            println!("DRILL {D} SKIPPED: {why}");
            return Ok(());
        }
    };
    let bed = Bed::start("clockjump").await?;
    let group = "clockjump-agents";
    bed.moto.create_group(group, 0, 5, 0).await?;
    bed.put_config(&bed.fast_runtime_config(group)).await?;
    let clock = |name: &str| -> anyhow::Result<(PathBuf, Vec<(String, String)>)> {
        let file = bed.root.join(format!("faketime-{name}"));
        std::fs::write(&file, "+0\n")?;
        let env = vec![
            ("LD_PRELOAD".to_string(), lib.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
            ("DONT_FAKE_MONOTONIC".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            // Every renew logs a (timestamped) line: the jumps show in the output.
            (
                "AGENT_SUPERVISOR_LOG".into(),
                "info,agent_supervisor::election=debug".into(),
            ),
        ];
        Ok((file, env))
    };
    let (leader_clock, leader_env) = clock("leader")?;
    let (follower_clock, follower_env) = clock("follower")?;
    let mut cands = scalers(&bed, group, &["i-0clockjumplead0"], &[leader_env]).await?;
    eventually(
        "the first candidate leads and acts",
        Duration::from_secs(20),
        || async {
            (leading_term(&cands[0].output()).is_some() && !actions(&cands[0].output()).is_empty())
                .then_some(())
        },
    )
    .await?;
    let term = leading_term(&cands[0].output());
    cands.extend(
        scalers(
            &bed,
            group,
            &["i-0clockjumpfol01", "i-0clockjumpfol02"],
            &[follower_env, vec![]],
        )
        .await?,
    );
    eventually(
        "the others follow that term",
        Duration::from_secs(10),
        || async {
            cands[1..]
                .iter()
                .all(|c| {
                    c.output()
                        .lines()
                        .rfind(|l| l.contains(" following term="))
                        .and_then(|l| num(l, "term"))
                        == term
                })
                .then_some(())
        },
    )
    .await?;
    let real_date = cands[0]
        .output()
        .lines()
        .find_map(line_date)
        .map(str::to_string)
        .unwrap_or_default();

    let hold = Duration::from_millis(FAST_LEASE_MS + FAST_DEADLINE_MS + 4 * FAST_RETRY_MS);
    let steps = [
        (&leader_clock, "-1d", "leader back a day"),
        (&leader_clock, "+2d", "leader forward two days"),
        (&follower_clock, "+1d", "follower forward a day"),
        (&leader_clock, "-3h", "leader back again"),
        (&follower_clock, "-1d", "follower back"),
    ];
    for (file, offset, what) in steps {
        std::fs::write(file, format!("{offset}\n"))?;
        tokio::time::sleep(hold).await;
        let now: Vec<Option<u64>> = cands.iter().map(|c| leading_term(&c.output())).collect();
        figure(
            D,
            format!(
                "after {what} ({offset}, then {} ms): leading terms {now:?}",
                hold.as_millis()
            ),
        );
    }
    std::fs::write(&leader_clock, "+0\n")?;
    std::fs::write(&follower_clock, "+0\n")?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let out = cands[0].output();
    let dates: BTreeSet<&str> = out.lines().filter_map(line_date).collect();
    figure(
        D,
        format!("the leader's log dates: {dates:?} (real {real_date})"),
    );
    assert!(
        dates.len() >= 3,
        "the jumps took effect on the leader's wall clock: {dates:?}"
    );
    assert_eq!(step_downs(&out), 0, "no step-down on a clock jump: {out}");
    assert_eq!(leading_term(&out), term, "still leading the same term");
    for c in &cands[1..] {
        let o = c.output();
        assert!(
            !o.contains(" leading term=") && actions(&o).is_empty(),
            "{} never led: {o}",
            c.id
        );
    }
    let all: Vec<(u64, u64, u64)> = cands.iter().flat_map(|c| actions(&c.output())).collect();
    let terms: BTreeSet<u64> = all.iter().map(|a| a.0).collect();
    assert_eq!(terms.len(), 1, "one term throughout: {terms:?}");
    assert_no_overlap(&all);
    Ok(())
}
