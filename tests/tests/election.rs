//! End-to-end: leader election over (emulated) SSM and demand-driven scale-up, with real
//! `agent-supervisor` processes. Short timings: lease 2 s, renew deadline 1.4 s, retry 0.5 s.

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::{Instance, InstanceOptions};
use agent_fleet_tests::hub::JobSpec;
use agent_fleet_tests::probe::{actions, assert_no_overlap, leading_term, num};

use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

type R = anyhow::Result<()>;

use agent_fleet_tests::bed::{
    FAST_DEADLINE_MS as DEADLINE_MS, FAST_LEASE_MS as LEASE_MS, FAST_RETRY_MS as RETRY_MS,
};
async fn candidates(bed: &Bed, group: &str, n: usize) -> anyhow::Result<Vec<Instance>> {
    let mut out = vec![];
    for i in 0..n {
        let mut o: InstanceOptions = bed.instance(&format!("i-cand{i:013}"), group);
        o.args = vec!["--role".into(), "scaler".into()];
        out.push(Instance::start(o, None).await?);
    }
    Ok(out)
}

async fn setup(stack: &str) -> anyhow::Result<(Bed, String)> {
    let bed = Bed::start(stack).await?;
    let group = format!("{stack}-agents");
    bed.moto.create_group(&group, 0, 5, 0).await?;
    bed.put_config(&bed.fast_runtime_config(&group)).await?;
    Ok((bed, group))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_then_failover_after_sigkill() -> R {
    let (bed, group) = setup("elect").await?;
    let t0 = Instant::now();
    let cands = candidates(&bed, &group, 5).await?;
    let leader = eventually("a leader", Duration::from_secs(15), || async {
        let l: Vec<usize> = (0..cands.len())
            .filter(|&i| leading_term(&cands[i].output()).is_some())
            .collect();
        (l.len() == 1).then(|| l[0])
    })
    .await?;
    let took = t0.elapsed();
    println!(
        "first leader after {took:?} (lease + retry = {} ms, plus process start)",
        LEASE_MS + RETRY_MS
    );
    let term = leading_term(&cands[leader].output()).unwrap_or_default();
    // Everyone else follows that term.
    eventually(
        "all follow the same term",
        Duration::from_secs(10),
        || async {
            (0..cands.len())
                .filter(|&i| i != leader)
                .all(|i| {
                    let out = cands[i].output();
                    out.lines()
                        .rfind(|l| l.contains(" following term="))
                        .and_then(|l| num(l, "term"))
                        == Some(term)
                })
                .then_some(())
        },
    )
    .await?;
    assert_eq!(
        (0..cands.len())
            .filter(|&i| leading_term(&cands[i].output()).is_some())
            .count(),
        1
    );

    // SIGKILL the leader: another candidate performs a leader action within
    // lease + renew_deadline + retry (+ jitter and scheduling slack).
    cands[leader].signal(Signal::SIGKILL);
    let killed = Instant::now();
    let before: Vec<usize> = cands.iter().map(|c| actions(&c.output()).len()).collect();
    let next = eventually("a new leader acts", Duration::from_secs(20), || async {
        (0..cands.len())
            .filter(|&i| i != leader)
            .find(|&i| actions(&cands[i].output()).len() > before[i])
    })
    .await?;
    let failover = killed.elapsed();
    let bound = Duration::from_millis(LEASE_MS + DEADLINE_MS + RETRY_MS);
    println!("failover after SIGKILL: {failover:?} (bound {bound:?} + jitter)");
    assert!(
        failover <= bound + Duration::from_millis(1500),
        "failover {failover:?} > {bound:?} + slack"
    );
    let new_term = leading_term(&cands[next].output()).unwrap_or_default();
    assert!(new_term > term, "new term {new_term} after {term}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_leaders_overlap_across_sigstop() -> R {
    let (bed, group) = setup("overlap").await?;
    let cands = candidates(&bed, &group, 3).await?;
    let mut terms_seen = std::collections::BTreeSet::new();
    for round in 0..20 {
        let leader = eventually("a leader", Duration::from_secs(15), || async {
            (0..cands.len()).find(|&i| {
                leading_term(&cands[i].output()).is_some()
                    && !actions(&cands[i].output()).is_empty()
            })
        })
        .await?;
        terms_seen.insert(leading_term(&cands[leader].output()).unwrap_or_default());
        cands[leader].signal(Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(LEASE_MS + DEADLINE_MS + 700)).await;
        cands[leader].signal(Signal::SIGCONT);
        tokio::time::sleep(Duration::from_millis(300 + (round % 3) * 200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all: Vec<(u64, u64, u64)> = cands.iter().flat_map(|c| actions(&c.output())).collect();
    let terms: std::collections::BTreeSet<u64> = all.iter().map(|a| a.0).collect();
    println!("{} leader actions over {} terms", all.len(), terms.len());
    assert!(
        terms.len() >= 15,
        "leadership should have moved at nearly every stop: {terms:?}"
    );
    assert_no_overlap(&all);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssm_faults_make_the_leader_step_down_and_leadership_recovers() -> R {
    let (bed, group) = setup("ssmfault").await?;
    let cands = candidates(&bed, &group, 3).await?;
    let leader = eventually("a leader", Duration::from_secs(15), || async {
        (0..cands.len()).find(|&i| leading_term(&cands[i].output()).is_some())
    })
    .await?;
    let term = leading_term(&cands[leader].output()).unwrap_or_default();

    // Throttling on every SSM call: the leader cannot renew and must step down by its deadline.
    bed.moto
        .inject_fault(serde_json::json!({"service": "ssm", "error": "ThrottlingException", "status": 400, "count": 100000}))
        .await?;
    let faulted = Instant::now();
    eventually("the leader steps down", Duration::from_secs(10), || async {
        leading_term(&cands[leader].output())
            .is_none()
            .then_some(())
    })
    .await?;
    let stepped = faulted.elapsed();
    println!(
        "stepped down {stepped:?} after SSM started throttling (renew deadline {DEADLINE_MS} ms)"
    );
    assert!(
        stepped <= Duration::from_millis(DEADLINE_MS + RETRY_MS + 1000),
        "{stepped:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        cands.iter().all(|c| leading_term(&c.output()).is_none()),
        "nobody leads while SSM is down"
    );

    // A short outage next, then recovery.
    bed.moto.clear_faults().await;
    bed.moto
        .inject_fault(serde_json::json!({"service": "ssm", "outage_ms": 1500}))
        .await?;
    let recovered = eventually("leadership recovers", Duration::from_secs(20), || async {
        cands
            .iter()
            .find_map(|c| leading_term(&c.output()).filter(|t| *t > term))
    })
    .await?;
    println!(
        "recovered with term {recovered} after {:?}",
        faulted.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all: Vec<(u64, u64, u64)> = cands.iter().flat_map(|c| actions(&c.output())).collect();
    assert_no_overlap(&all);
    Ok(())
}

fn set_desired_calls(calls: &[agent_fleet_tests::moto::Call], group: &str) -> Vec<i64> {
    calls
        .iter()
        .filter(|c| {
            c.is("autoscaling", "SetDesiredCapacity")
                && c.param("AutoScalingGroupName") == Some(group)
        })
        .filter_map(|c| c.param("DesiredCapacity").and_then(|v| v.parse().ok()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_up_from_zero_through_the_scaler_role_and_runs_the_jobs() -> R {
    let (bed, group) = setup("fromzero").await?;
    let mut cfg = bed.fast_runtime_config(&group);
    cfg.idle_timeout_secs = 3;
    bed.put_config(&cfg).await?;
    let fleet = bed.fleet(&[&group], &[], &[]);
    let scaler = candidates(&bed, &group, 1).await?;
    eventually("the scaler leads", Duration::from_secs(15), || async {
        leading_term(&scaler[0].output()).map(|_| ())
    })
    .await?;

    let jobs: Vec<String> = (0..3)
        .map(|i| {
            bed.hub.enqueue_job(JobSpec {
                commands: vec![format!("sleep 1; echo {i}")],
                env: vec![],
            })
        })
        .collect();
    let queued = Instant::now();
    eventually(
        "desired 3 within one poll",
        Duration::from_secs(5),
        || async { (bed.moto.group(&group).await.ok()?.desired == 3).then_some(()) },
    )
    .await?;
    println!(
        "desired 0 → 3 {:?} after the jobs were queued",
        queued.elapsed()
    );
    bed.jobs_passed(&jobs, Duration::from_secs(60)).await?;
    assert!(fleet.launched().len() >= 3);
    // One call per change of the computed target; the leader never lowered desired.
    let calls = bed.moto.calls(0).await?;
    let sets = set_desired_calls(&calls, &group);
    assert_eq!(
        sets,
        vec![3],
        "exactly one SetDesiredCapacity for target 3: {sets:?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.is("autoscaling", "SuspendProcesses")),
        "AZRebalance suspended"
    );
    // Idle scale-in back to 0 is the instances' own doing.
    eventually("idle scale-in to 0", Duration::from_secs(60), || async {
        (bed.moto.group(&group).await.ok()?.desired == 0).then_some(())
    })
    .await?;
    assert_eq!(
        set_desired_calls(&bed.moto.calls(0).await?, &group),
        vec![3],
        "the leader never lowered desired"
    );
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_token_is_read_again_after_a_401() -> R {
    let (bed, group) = setup("rotate").await?;
    let scaler = candidates(&bed, &group, 1).await?;
    eventually(
        "the scaler leads and polls",
        Duration::from_secs(15),
        || async {
            (leading_term(&scaler[0].output()).is_some() && bed.hub.metrics_polls() > 0)
                .then_some(())
        },
    )
    .await?;
    let rotated = "reg-token-rotated-5e2b";
    bed.hub.set_registration_token(rotated);
    bed.moto
        .put_parameter(&bed.token_parameter, rotated, true)
        .await?;
    let job = bed.hub.enqueue_job(JobSpec {
        commands: vec!["true".into()],
        env: vec![],
    });
    eventually(
        "scale-up with the rotated token",
        Duration::from_secs(10),
        || async { (bed.moto.group(&group).await.ok()?.desired == 1).then_some(()) },
    )
    .await?;
    let _ = job;
    let out = scaler[0].output();
    assert!(
        !out.contains(rotated) && !out.contains(agent_fleet_tests::bed::TOKEN),
        "token leaked:\n{out}"
    );
    Ok(())
}
