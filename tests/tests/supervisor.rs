//! End-to-end: real `agent-supervisor` processes against moto, a fake IMDS per instance,
//! the fake hub and the fake agent. No network beyond 127.0.0.1. The scenarios that are
//! run with the real agent too (one job, idle, idle at min size, a bad token, drains at
//! Semaphore's pace) are in `agents.rs`.

use agent_fleet_tests::bed::{eventually, Bed, TOKEN};
use agent_fleet_tests::fleet::{group_alive, Instance};
use agent_fleet_tests::hub::{JobSpec, JobState};
use agent_fleet_tests::probe::{starts, terminate_calls};
use nix::sys::signal::Signal;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

type R = anyhow::Result<()>;
fn assert_no_token(output: &str) {
    assert!(
        !output.contains(TOKEN),
        "the registration token leaked into the supervisor's output:\n{output}"
    );
}

async fn drain_case(
    stack: &str,
    job: &str,
    grace: u64,
    margin: u64,
) -> anyhow::Result<(Bed, Instance, String, Duration, std::process::ExitStatus)> {
    let bed = Bed::start(stack).await?;
    let group = format!("{stack}-agents");
    bed.moto.create_group(&group, 0, 2, 1).await?;
    let mut cfg = bed.runtime_config(&group);
    cfg.interruption_grace_secs = grace;
    bed.put_config(&cfg).await?;
    let id = bed.moto.group(&group).await?.in_service()[0].clone();
    let mut o = bed.instance(&id, &group);
    o.args = vec!["--drain-margin-secs".into(), margin.to_string()];
    let inst = Instance::start(o, None).await?;
    eventually("agent registered", Duration::from_secs(20), || async {
        (!bed.hub.live_agents().is_empty()).then_some(())
    })
    .await?;
    let job_id = bed.hub.enqueue_job(JobSpec {
        commands: vec![job.into()],
        env: vec![],
    });
    eventually("job running", Duration::from_secs(20), || async {
        bed.hub
            .job(&job_id)
            .filter(|j| j.state == JobState::Running)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    inst.signal(Signal::SIGTERM);
    let status = inst
        .wait_exit(Duration::from_secs(grace + margin + 10))
        .await?;
    Ok((bed, inst, job_id, t0.elapsed(), status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_a_short_job_finish_within_its_grace() -> R {
    let (grace, margin) = (5, 3);
    let (bed, inst, job, took, status) =
        drain_case("drainok", "sleep 2; echo done", grace, margin).await?;
    assert_eq!(status.code(), Some(0), "{}", inst.output());
    assert!(
        took < Duration::from_secs(grace + margin + 1),
        "took {took:?}"
    );
    let j = bed.hub.job(&job).expect("job");
    assert_eq!(
        j.result.as_deref(),
        Some("passed"),
        "the job got its grace: {j:?}"
    );
    for g in inst.agent_groups() {
        assert!(!group_alive(g), "agent process group {g} survived");
    }
    assert!(
        terminate_calls(&bed.moto.calls(0).await?).is_empty(),
        "a drain is not a termination"
    );
    assert_no_token(&inst.output());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_a_long_job_after_its_grace() -> R {
    let (grace, margin) = (2, 3);
    let (bed, inst, job, took, status) =
        drain_case("drainlong", "sleep 120", grace, margin).await?;
    assert_eq!(status.code(), Some(0), "{}", inst.output());
    assert!(
        took >= Duration::from_secs(grace),
        "the job got its grace: {took:?}"
    );
    assert!(
        took < Duration::from_secs(grace + margin + 1),
        "took {took:?}"
    );
    let j = bed.hub.job(&job).expect("job");
    assert_eq!(j.result.as_deref(), Some("stopped"), "{j:?}");
    for g in inst.agent_groups() {
        assert!(!group_alive(g), "agent process group {g} survived");
    }
    assert_no_token(&inst.output());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_aborts_the_drain() -> R {
    let bed = Bed::start("abort").await?;
    let group = "abort-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.interruption_grace_secs = 60;
    bed.put_config(&cfg).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let inst = Instance::start(bed.instance(&id, group), None).await?;
    eventually("agent registered", Duration::from_secs(20), || async {
        (!bed.hub.live_agents().is_empty()).then_some(())
    })
    .await?;
    let job = bed.hub.enqueue_job(JobSpec {
        commands: vec!["sleep 120".into()],
        env: vec![],
    });
    eventually("job running", Duration::from_secs(20), || async {
        bed.hub.job(&job).filter(|j| j.state == JobState::Running)
    })
    .await?;
    inst.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    inst.signal(Signal::SIGTERM);
    let status = inst.wait_exit(Duration::from_secs(10)).await?;
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "abort is prompt: {:?}",
        t0.elapsed()
    );
    assert_eq!(status.code(), Some(130), "{}", inst.output());
    for g in inst.agent_groups() {
        assert!(!group_alive(g), "agent process group {g} survived");
    }
    Ok(())
}

/// Runs a supervisor that must refuse to start; returns its output.
async fn refused(
    bed: &Bed,
    o: agent_fleet_tests::fleet::InstanceOptions,
) -> anyhow::Result<String> {
    let inst = Instance::start(o, None).await?;
    let status = inst.wait_exit(Duration::from_secs(30)).await?;
    let out = inst.output();
    assert_eq!(
        status.code(),
        Some(2),
        "exit code 2 on bad input ({:?}): {out}",
        status.signal()
    );
    assert_eq!(
        starts(&inst.agent_events()),
        0,
        "no agent may start on bad input: {out}"
    );
    assert_no_token(&out);
    let _ = bed;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_any_agent_starts() -> R {
    let bed = Bed::start("badinput").await?;
    let group = "badinput-agents";
    bed.moto.create_group(group, 0, 1, 1).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let good = serde_json::to_value(bed.runtime_config(group))?;

    // Missing config parameter.
    let out = refused(&bed, bed.instance(&id, group)).await?;
    assert!(
        out.contains(&bed.config_parameter) && out.contains("does not exist"),
        "{out}"
    );

    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "missing field",
            {
                let mut v = good.clone();
                v.as_object_mut().map(|o| o.remove("endpoint"));
                v
            },
            "missing field `endpoint`",
        ),
        (
            "wrong type",
            {
                let mut v = good.clone();
                v["idle_timeout_secs"] = "300".into();
                v
            },
            "key `idle_timeout_secs`: invalid type",
        ),
        (
            "bad value",
            {
                let mut v = good.clone();
                v["endpoint"] = "https://x.semaphoreci.com".into();
                v
            },
            "key `endpoint`",
        ),
    ];
    for (what, json, needle) in cases {
        bed.put_config_json(&json.to_string()).await?;
        let out = refused(&bed, bed.instance(&id, group)).await?;
        assert!(
            out.contains(needle) && out.contains(&bed.config_parameter),
            "{what}: wanted {needle:?} in:\n{out}"
        );
    }

    // Missing token parameter.
    let mut cfg = bed.runtime_config(group);
    cfg.token_parameter = "/agent-fleet/badinput/no-such-token".into();
    bed.put_config(&cfg).await?;
    let out = refused(&bed, bed.instance(&id, group)).await?;
    assert!(
        out.contains("/agent-fleet/badinput/no-such-token") && out.contains("token set"),
        "{out}"
    );

    // User data that names no stack.
    bed.put_config(&bed.runtime_config(group)).await?;
    let mut o = bed.instance(&id, group);
    o.user_data = Some("#!/bin/bash\necho hello\n".into());
    let out = refused(&bed, o).await?;
    assert!(out.contains("AGENT_FLEET_STACK"), "{out}");

    // Unreachable IMDS: bounded retries, then a clear error.
    let mut o = bed.instance(&id, group);
    o.imds_endpoint_override = Some("http://127.0.0.1:9".into());
    o.args = vec!["--imds-attempts".into(), "4".into()];
    let t0 = Instant::now();
    let out = refused(&bed, o).await?;
    assert!(
        out.contains("cannot read instance metadata after 4 attempts"),
        "{out}"
    );
    assert_eq!(out.matches("IMDS not answering yet").count(), 3, "{out}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "bounded: {:?}",
        t0.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_item_with_its_fix() -> R {
    let bed = Bed::start("preflight").await?;
    let group = "preflight-agents";
    bed.moto.create_group(group, 0, 1, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();

    let mut o = bed.instance(&id, group);
    o.command = "check".into();
    let inst = Instance::start(o.clone(), None).await?;
    let status = inst.wait_exit(Duration::from_secs(30)).await?;
    let out = inst.output();
    assert_eq!(status.code(), Some(0), "{out}");
    for item in [
        "imds",
        "stack",
        "runtime config",
        "token parameter",
        "group",
        "agent user",
        "agent binary",
    ] {
        assert!(out.contains(&format!("ok    {item}:")), "{item}: {out}");
    }
    assert!(out.contains(&format!("instance is in {group}")), "{out}");
    if agent_fleet_tests::fleet::cgroup_root().is_some() {
        assert!(out.contains("ok    agent cgroup:"), "{out}");
    }
    assert!(!out.contains("one job per VM"), "{out}");
    assert_no_token(&out);

    // Jobs' credentials: the job role is assumed as the supervisor would for jobs, and the
    // cache bucket is tried with its credentials (the agent role has no S3 access), here a
    // bucket that does not exist: FAIL with the fix, naming the job role.
    let mut cfg = bed.runtime_config(group);
    cfg.job_role_arn = Some(bed.create_job_role("job").await?);
    cfg.cache_bucket = Some("preflight-no-such-bucket".into());
    bed.put_config(&cfg).await?;
    let mut o3 = o.clone();
    o3.root = bed.root.join("third");
    let inst = Instance::start(o3, None).await?;
    let status = inst.wait_exit(Duration::from_secs(30)).await?;
    let out = inst.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("ok    job role: arn:aws:iam::"), "{out}");
    assert!(
        out.lines().any(
            |l| l.starts_with("FAIL  cache bucket: preflight-no-such-bucket")
                && l.contains("grant the job role")
        ),
        "{out}"
    );
    bed.put_config(&bed.runtime_config(group)).await?;

    // A missing token: one FAIL line with the fix, exit 1, still no secret printed.
    let mut cfg = bed.runtime_config(group);
    cfg.token_parameter = "/agent-fleet/preflight/missing".into();
    bed.put_config(&cfg).await?;
    let mut o2 = o.clone();
    o2.root = bed.root.join("second");
    // And a VM that ran a job: said, not failed.
    let work = o2.root.join(&id).join("work");
    std::fs::create_dir_all(&work)?;
    std::fs::write(
        work.join(agent_supervisor::coordinator::USED_MARKER),
        "agent a job j\n",
    )?;
    let inst = Instance::start(o2, None).await?;
    let status = inst.wait_exit(Duration::from_secs(30)).await?;
    let out = inst.output();
    assert_eq!(status.code(), Some(1), "{out}");
    let fail: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fail.len(), 1, "{out}");
    assert!(
        fail[0].contains("/agent-fleet/preflight/missing") && fail[0].contains("fix:"),
        "{out}"
    );
    assert!(out.contains("WARN  one job per VM"), "{out}");
    assert_no_token(&out);
    Ok(())
}
