//! The termination chain when Auto Scaling refuses: retries, `SetInstanceHealth`,
//! poweroff.

use super::{calls_of, figure, ms, R};
use agent_fleet_tests::bed::{eventually, Bed, TOKEN};
use agent_fleet_tests::fleet::Instance;
use agent_fleet_tests::moto::Call;
use std::time::{Duration, Instant};

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
