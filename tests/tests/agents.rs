//! The scenarios that matter, each run with both agents: the test bed's fake and the real
//! Semaphore agent (built from `../shared/real-agent`; see `fleet::real_agent`). The agent
//! is a parameter of the bed ([`AgentKind`]), not a fork of the tests: every scenario is one
//! function, and `both_agents!` makes a `<scenario>::fake` and a `<scenario>::real` test
//! of it. Where `../shared/real-agent` is absent, `::real` prints one line and passes.
//!
//! The tests assert what a user would see — the hub's record of agents and jobs, Auto
//! Scaling's calls, the supervisor's log fields, the files on the instance — never the
//! fake agent's private events file.
//!
//! The drains run with the hub's sync at 5 s, the real server's pace: Semaphore's
//! `stop-job` then reaches the agent up to 5 s after the grace, and the job's stopped
//! result must still reach the hub before the supervisor would kill the agent.

use agent_fleet_tests::bed::{eventually, Bed, TOKEN};
use agent_fleet_tests::fleet::{real_agent, real_agent_skip_line, AgentKind, Fleet, Instance};
use agent_fleet_tests::hub::{HubOptions, JobInfo, JobSpec, JobState};
use agent_fleet_tests::probe::{field, terminate_calls};
use agent_supervisor::agent::config_file::TOKEN_REMOVED;
use agent_supervisor::config::{LifecycleHookConfig, RuntimeConfig};
use nix::sys::signal::Signal;
use std::sync::Arc;
use std::time::Duration;

type R = anyhow::Result<()>;

/// `mod <scenario> { fake, real }`: the scenario with each agent.
macro_rules! both_agents {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fake() -> R {
                super::$scenario(AgentKind::Fake).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn real() -> R {
                match real_agent()? {
                    Some(path) => super::$scenario(AgentKind::Real(path)).await,
                    None => {
                        println!("{}", real_agent_skip_line(concat!(stringify!($scenario), "::real")));
                        Ok(())
                    }
                }
            }
        }
    )*};
}

both_agents!(
    one_job_then_terminate_without_decrement,
    failed_job_then_terminate_without_decrement,
    idle_then_terminate_with_decrement,
    idle_at_min_size_restarts_in_place,
    bad_token_backs_off_without_churn,
    drain_on_systemd_stop_reports_the_job_stopped,
    drain_on_spot_notice_reports_the_job_stopped,
    drain_at_the_lifecycle_hooks_limit_reports_the_job_stopped,
    the_demo_scales_up_from_zero_runs_the_wave_and_back,
    a_job_that_kills_its_agent_gets_no_second_agent_on_its_vm,
    a_process_a_job_moves_out_of_the_agents_group_dies_with_the_agent,
);

/// The kill line of `RunningAgent::stop`: the agent did not exit within its drain budget.
const KILLED: &str = "killing its process group";

fn stack(name: &str, agent: &AgentKind) -> String {
    format!("{name}-{}", agent.label())
}

fn fleet(bed: &Bed, group: &str, agent: &AgentKind, life_cycle: Option<&str>) -> Fleet {
    let mut o = bed.fleet_options(&[group], &[], &[]);
    o.agent = agent.clone();
    if let Some(lc) = life_cycle {
        o.group_life_cycle.insert(group.to_string(), lc.to_string());
    }
    Fleet::start(Arc::clone(&bed.moto), o)
}

/// On failure prints every supervisor's output; always stops the fleet.
async fn finish(fleet: Fleet, result: R) -> R {
    if result.is_err() {
        eprintln!("{}", fleet.all_output());
    }
    fleet.shutdown().await;
    result
}

fn instance_of(job: &JobInfo) -> String {
    job.agent
        .as_deref()
        .and_then(|a| a.split("__").next())
        .unwrap_or_default()
        .to_string()
}

async fn registered(bed: &Bed, n: usize, within: Duration) -> R {
    eventually(&format!("{n} agent(s) registered"), within, || async {
        (bed.hub.live_agents().len() >= n).then_some(())
    })
    .await
}

async fn finished(bed: &Bed, job: &str, within: Duration) -> anyhow::Result<JobInfo> {
    eventually("the job finished at the hub", within, || async {
        bed.hub.job(job).filter(|j| j.state == JobState::Finished)
    })
    .await
}

/// Waits until the job's own output reached the hub: it really runs on the agent.
async fn job_printed(bed: &Bed, job: &str, needle: &str, within: Duration) -> R {
    eventually(&format!("the job printed {needle:?}"), within, || async {
        bed.hub
            .job_output(job)
            .iter()
            .any(|l| l.contains(needle))
            .then_some(())
    })
    .await
}

/// The terminate call of `id`: `(decrement, error code)`.
async fn terminate_call(
    bed: &Bed,
    id: &str,
    within: Duration,
) -> anyhow::Result<(String, Option<String>)> {
    eventually(
        &format!("{id} asked Auto Scaling to terminate it"),
        within,
        || async {
            let calls = bed.moto.calls(0).await.ok()?;
            terminate_calls(&calls)
                .into_iter()
                .find(|(i, _, _)| i == id)
                .map(|(_, d, e)| (d, e))
        },
    )
    .await
}

/// The first supervisor line of `output` containing `message`.
fn line_with<'a>(output: &'a str, message: &str) -> Option<&'a str> {
    output.lines().find(|l| l.contains(message))
}

fn assert_no_token(output: &str) {
    assert!(
        !output.contains(TOKEN),
        "the registration token leaked into the supervisor's output"
    );
}

/// One job: it runs in one shell session, passes, and its instance ends without decrement
/// (a clean machine per job); the registration token left `config.yaml` once the agent
/// registered.
async fn one_job_then_terminate_without_decrement(agent: AgentKind) -> R {
    let bed = Bed::start(&stack("onejob", &agent)).await?;
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 0, 3, 1).await?;
    bed.put_config(&bed.runtime_config(&group)).await?;
    let fleet = fleet(&bed, &group, &agent, None);
    let result = async {
        registered(&bed, 1, Duration::from_secs(30)).await?;
        let id = fleet.launched()[0].clone();
        // The token is gone from the agent's config, and the agent still works.
        let cfg = fleet
            .with_instance(&id, |i| {
                std::fs::read_to_string(i.dir.join("work/config.yaml"))
            })
            .transpose()?
            .unwrap_or_default();
        assert!(!cfg.contains(TOKEN), "the token is still in config.yaml");
        assert!(cfg.contains(TOKEN_REMOVED), "{cfg}");
        let mode = fleet
            .with_instance(&id, |i| std::fs::metadata(i.dir.join("work/config.yaml")))
            .transpose()?
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
        assert_eq!(
            mode,
            Some(0o600),
            "config.yaml is private to the agent user"
        );

        let job = bed.hub.enqueue_job(JobSpec {
            commands: vec![
                "export GREETING=hello-from-one-session".into(),
                "echo \"$GREETING\"".into(),
            ],
            env: vec![],
        });
        let done = finished(&bed, &job, Duration::from_secs(60)).await?;
        assert_eq!(done.result.as_deref(), Some("passed"), "{done:?}");
        assert_eq!(instance_of(&done), id);
        job_printed(
            &bed,
            &job,
            "hello-from-one-session",
            Duration::from_secs(10),
        )
        .await?;

        let (decrement, error) = terminate_call(&bed, &id, Duration::from_secs(30)).await?;
        assert_eq!((decrement.as_str(), error), ("false", None));
        eventually(
            "a clean replacement launched",
            Duration::from_secs(30),
            || async { (fleet.launched().len() >= 2).then_some(()) },
        )
        .await?;
        assert_eq!(bed.moto.group(&group).await?.desired, 1, "capacity kept");
        let out = fleet.with_instance(&id, |i| i.output()).unwrap_or_default();
        let exited = line_with(&out, "agent exited").unwrap_or_default();
        assert_eq!(
            field(exited, "exit_reason").as_deref(),
            Some("JOB_FINISHED"),
            "{out}"
        );
        let ending = line_with(&out, "terminating this instance").unwrap_or_default();
        assert_eq!(
            field(ending, "decrement").as_deref(),
            Some("false"),
            "{ending}"
        );
        assert_no_token(&fleet.all_output());
        Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// A failed job is reported failed, and its instance ends like any used one.
async fn failed_job_then_terminate_without_decrement(agent: AgentKind) -> R {
    let bed = Bed::start(&stack("failjob", &agent)).await?;
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 0, 3, 1).await?;
    bed.put_config(&bed.runtime_config(&group)).await?;
    let fleet = fleet(&bed, &group, &agent, None);
    let result = async {
        registered(&bed, 1, Duration::from_secs(30)).await?;
        let job = bed.hub.enqueue_job(JobSpec {
            commands: vec![
                "echo before".into(),
                "false".into(),
                "echo never-printed".into(),
            ],
            env: vec![],
        });
        let done = finished(&bed, &job, Duration::from_secs(60)).await?;
        assert_eq!(done.result.as_deref(), Some("failed"), "{done:?}");
        let id = instance_of(&done);
        let (decrement, error) = terminate_call(&bed, &id, Duration::from_secs(30)).await?;
        assert_eq!((decrement.as_str(), error), ("false", None));
        assert!(
            !bed.hub
                .job_output(&job)
                .iter()
                .any(|l| l.contains("never-printed")),
            "commands after the failing one must not run"
        );
        Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// An idle agent's instance ends with decrement: the fleet shrinks.
async fn idle_then_terminate_with_decrement(agent: AgentKind) -> R {
    let bed = Bed::start(&stack("idle", &agent)).await?;
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 0, 3, 1).await?;
    let mut cfg = bed.runtime_config(&group);
    cfg.idle_timeout_secs = 2;
    bed.put_config(&cfg).await?;
    let fleet = fleet(&bed, &group, &agent, None);
    let result = async {
        registered(&bed, 1, Duration::from_secs(30)).await?;
        let id = fleet.launched()[0].clone();
        let (decrement, error) = terminate_call(&bed, &id, Duration::from_secs(40)).await?;
        assert_eq!((decrement.as_str(), error), ("true", None));
        let g = bed.moto.group(&group).await?;
        assert_eq!(g.desired, 0, "desired 1 → 0: {g:?}");
        assert!(
            !bed.moto
                .calls(0)
                .await?
                .iter()
                .any(|c| c.is("autoscaling", "SetDesiredCapacity")),
            "the group shrinks through the terminate call alone"
        );
        let agents = bed.hub.agents();
        assert!(
            agents
                .iter()
                .any(|a| a.name.starts_with(&id) && a.disconnected.as_deref() == Some("idle")),
            "the hub told the agent it was idle and saw it leave: {agents:?}"
        );
        let out = fleet.with_instance(&id, |i| i.output()).unwrap_or_default();
        let exited = line_with(&out, "agent exited").unwrap_or_default();
        assert_eq!(
            field(exited, "exit_reason").as_deref(),
            Some("IDLE"),
            "{out}"
        );
        Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// Idle at the group's min size: the agent restarts in place, no instance churns.
async fn idle_at_min_size_restarts_in_place(agent: AgentKind) -> R {
    let bed = Bed::start(&stack("atmin", &agent)).await?;
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 1, 2, 1).await?;
    let mut cfg = bed.runtime_config(&group);
    cfg.idle_timeout_secs = 1;
    bed.put_config(&cfg).await?;
    let fleet = fleet(&bed, &group, &agent, None);
    let result = async {
        let id = eventually("instance launched", Duration::from_secs(20), || async {
            fleet.launched().first().cloned()
        })
        .await?;
        // Three registrations from this one instance: two restarts in place.
        eventually("two restarts in place", Duration::from_secs(60), || async {
            (bed.hub
                .agents()
                .iter()
                .filter(|a| a.name.starts_with(&id))
                .count()
                >= 3)
                .then_some(())
        })
        .await?;
        let g = bed.moto.group(&group).await?;
        assert_eq!(
            g.in_service(),
            vec![id.clone()],
            "same single instance: {g:?}"
        );
        assert_eq!(fleet.launched().len(), 1, "no launch");
        let terms = terminate_calls(&bed.moto.calls(0).await?);
        assert!(
            terms.iter().all(|(i, d, e)| *i == id
                && d == "true"
                && e.as_deref() == Some("ValidationError")),
            "{terms:?}"
        );
        let out = fleet.all_output();
        assert!(out.contains("restarting the agent in place"), "{out}");
        Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// A revoked token: the supervisor backs off, names the token parameter, and never
/// replaces the instance (the fault is fleet-wide); a fixed token heals it in place.
async fn bad_token_backs_off_without_churn(agent: AgentKind) -> R {
    let bed = Bed::start(&stack("badtoken", &agent)).await?;
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 0, 2, 1).await?;
    bed.put_config(&bed.runtime_config(&group)).await?;
    bed.moto
        .put_parameter(&bed.token_parameter, "revoked-token-0000", true)
        .await?;
    let id = bed.moto.group(&group).await?.in_service()[0].clone();
    let mut o = bed.instance(&id, &group);
    o.agent = agent.clone();
    if !agent.is_real() {
        // The real agent tries 30 times 1 s apart; the fake is told to give up at once.
        o.agent_env = vec![("FAKE_AGENT_REGISTER_TRIES".into(), "1".into())];
    }
    let inst = Instance::start(o, None).await?;
    let line = inst
        .wait_for_line("agent failed to register (", Duration::from_secs(60))
        .await?;
    assert!(
        line.contains(&bed.token_parameter),
        "names the token parameter: {line}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = bed.moto.calls(0).await?;
    assert!(
        terminate_calls(&calls).is_empty(),
        "a fleet-wide fault must not churn instances"
    );
    assert!(!calls
        .iter()
        .any(|c| c.is("autoscaling", "SetInstanceHealth")));
    assert!(inst.exit_status().is_none(), "the supervisor keeps running");
    assert!(bed.hub.live_agents().is_empty());

    bed.moto
        .put_parameter(&bed.token_parameter, TOKEN, true)
        .await?;
    registered(&bed, 1, Duration::from_secs(90)).await?;
    assert!(terminate_calls(&bed.moto.calls(0).await?).is_empty());
    assert_no_token(&inst.output());
    Ok(())
}

/// A bed whose hub syncs every 5 s, one group (min 0, max 2, desired 1), and the runtime
/// config to put (a 2 s interruption grace).
async fn drain_bed(name: &str, agent: &AgentKind) -> anyhow::Result<(Bed, String, RuntimeConfig)> {
    let bed = Bed::start_with(
        &stack(name, agent),
        HubOptions {
            next_sync_after_ms: 5000,
            ..HubOptions::default()
        },
    )
    .await?;
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 0, 2, 1).await?;
    let mut cfg = bed.runtime_config(&group);
    cfg.interruption_grace_secs = 2;
    Ok((bed, group, cfg))
}

/// Enqueues a long job and waits until its output reaches the hub.
async fn long_job(bed: &Bed) -> anyhow::Result<(String, String)> {
    let job = bed.hub.enqueue_job(JobSpec {
        commands: vec!["echo job-is-running; sleep 600".into()],
        env: vec![],
    });
    job_printed(bed, &job, "job-is-running", Duration::from_secs(40)).await?;
    let info = bed.hub.job(&job).expect("enqueued");
    Ok((job, instance_of(&info)))
}

/// What every drain must show: Semaphore's stop reached the agent, the agent reported the
/// job stopped, and the supervisor never had to kill it.
async fn assert_clean_drain(bed: &Bed, job: &str, output: impl Fn() -> String) -> R {
    let done = finished(bed, job, Duration::from_secs(40)).await?;
    assert_eq!(done.result.as_deref(), Some("stopped"), "{done:?}");
    let out = eventually("the drain ended", Duration::from_secs(30), || async {
        let out = output();
        line_with(&out, "drained").is_some().then_some(out)
    })
    .await?;
    assert!(
        line_with(&out, KILLED).is_none(),
        "the agent was killed before it reported the job: {out}"
    );
    let drained = line_with(&out, "drained").unwrap_or_default();
    assert_eq!(
        field(drained, "exit_reason").as_deref(),
        Some("INTERRUPTED"),
        "{drained}"
    );
    Ok(())
}

/// `systemctl stop`: SIGTERM to the supervisor mid-job.
async fn drain_on_systemd_stop_reports_the_job_stopped(agent: AgentKind) -> R {
    let (bed, group, cfg) = drain_bed("stopdrain", &agent).await?;
    bed.put_config(&cfg).await?;
    let id = bed.moto.group(&group).await?.in_service()[0].clone();
    let mut o = bed.instance(&id, &group);
    o.agent = agent.clone();
    let inst = Instance::start(o, None).await?;
    registered(&bed, 1, Duration::from_secs(30)).await?;
    let (job, _) = long_job(&bed).await?;
    inst.signal(Signal::SIGTERM);
    assert_clean_drain(&bed, &job, || inst.output()).await?;
    let status = inst.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(0), "{}", inst.output());
    let left = inst.agent_processes();
    assert!(left.is_empty(), "the agent left processes behind: {left:?}");
    assert!(
        terminate_calls(&bed.moto.calls(0).await?).is_empty(),
        "a stop is not a termination"
    );
    Ok(())
}

/// A spot interruption notice mid-job.
async fn drain_on_spot_notice_reports_the_job_stopped(agent: AgentKind) -> R {
    let (bed, group, cfg) = drain_bed("spotdrain", &agent).await?;
    bed.put_config(&cfg).await?;
    let fleet = fleet(&bed, &group, &agent, Some("spot"));
    let result = async {
        registered(&bed, 1, Duration::from_secs(30)).await?;
        let (job, id) = long_job(&bed).await?;
        fleet.with_instance(&id, |i| i.imds.set_spot_interruption("terminate", 120));
        assert_clean_drain(&bed, &job, || {
            fleet.with_instance(&id, |i| i.output()).unwrap_or_default()
        })
        .await?;
        let (decrement, _) = terminate_call(&bed, &id, Duration::from_secs(30)).await?;
        assert_eq!(decrement, "false");
        let out = fleet.with_instance(&id, |i| i.output()).unwrap_or_default();
        let ending = line_with(&out, "terminating this instance").unwrap_or_default();
        assert_eq!(
            field(ending, "interruption").as_deref(),
            Some("spot"),
            "{ending}"
        );
        Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// Auto Scaling terminates a busy instance through the lifecycle hook, and the job outlasts
/// what the hook can hold: the supervisor drains the agent in time for a clean stop, then
/// completes the lifecycle action. The hook's hold ends 100 heartbeat timeouts after it
/// began; to reach that point in seconds, the runtime config tells the supervisor the
/// timeout is 1 s (a 100 s hold: the drain starts 100 − 16 − 60 = 24 s in) while the
/// emulated hook's is 30 s, so that heartbeats polled every 2 s keep it held meanwhile.
async fn drain_at_the_lifecycle_hooks_limit_reports_the_job_stopped(agent: AgentKind) -> R {
    let (bed, group, mut cfg) = drain_bed("hookdrain", &agent).await?;
    bed.moto
        .put_termination_hook(&group, "agent-fleet-drain", 30)
        .await?;
    cfg.lifecycle_hook = Some(LifecycleHookConfig {
        name: "agent-fleet-drain".into(),
        heartbeat_timeout_secs: 1,
    });
    bed.put_config(&cfg).await?;
    let fleet = fleet(&bed, &group, &agent, None);
    let result = async {
        registered(&bed, 1, Duration::from_secs(30)).await?;
        let (job, id) = long_job(&bed).await?;
        bed.moto.terminate_instance(&id, true).await?;
        let out_of = || fleet.with_instance(&id, |i| i.output()).unwrap_or_default();
        eventually(
            "the forced drain began",
            Duration::from_secs(45),
            || async {
                out_of()
                    .contains("the lifecycle hook's wait is nearly over")
                    .then_some(())
            },
        )
        .await?;
        assert_clean_drain(&bed, &job, out_of).await?;
        eventually(
            "the lifecycle action completed",
            Duration::from_secs(30),
            || async {
                let calls = bed.moto.calls(0).await.ok()?;
                calls
                    .iter()
                    .find(|c| {
                        c.is("autoscaling", "CompleteLifecycleAction")
                            && c.param("InstanceId") == Some(id.as_str())
                            && c.status == Some(200)
                    })
                    .cloned()
            },
        )
        .await?;
        let ending = out_of();
        let ending = line_with(&ending, "terminating this instance").unwrap_or_default();
        assert_eq!(
            field(ending, "interruption").as_deref(),
            Some("lifecycle"),
            "{ending}"
        );
        Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// `make demo` (`fleet-demo --agent fake|real`): a scaler-role instance leads, raises
/// desired capacity for a wave of 8 jobs, agents run one job each and the group idles
/// back to 0. The demo exits non-zero unless every job passed and desired is 0 again.
async fn the_demo_scales_up_from_zero_runs_the_wave_and_back(agent: AgentKind) -> R {
    let demo = agent_fleet_tests::fleet::bin_dir()?.join("fleet-demo");
    let mut cmd = tokio::process::Command::new(demo);
    cmd.args(["--agent", agent.label()]).kill_on_drop(true);
    if let AgentKind::Real(p) = &agent {
        cmd.env("AGENT_FLEET_REAL_AGENT", p);
    }
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("jobs: 8/8 finished, 8 passed"), "{stdout}");
    assert!(stdout.contains("group now: desired 0"), "{stdout}");
    assert!(stdout.contains("is the leader"), "{stdout}");
    Ok(())
}

/// One job per VM, enforced: a job that kills its agent (to get a fresh one on the VM it
/// has tampered with) does not get one. The instance is replaced — no restart in place, no
/// token written back to disk — and the supervisor says why.
async fn a_job_that_kills_its_agent_gets_no_second_agent_on_its_vm(agent: AgentKind) -> R {
    let bed = Bed::start(&stack("killagent", &agent)).await?;
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 0, 3, 1).await?;
    bed.put_config(&bed.runtime_config(&group)).await?;
    let fleet = fleet(&bed, &group, &agent, None);
    let result = async {
        registered(&bed, 1, Duration::from_secs(30)).await?;
        let id = bed.moto.group(&group).await?.in_service()[0].clone();
        bed.hub.enqueue_job(JobSpec {
            commands: vec![
                "echo hostile".into(),
                "kill -KILL $PPID".into(),
                "sleep 30".into(),
            ],
            env: vec![],
        });
        let (decrement, error) = terminate_call(&bed, &id, Duration::from_secs(60)).await?;
        assert_eq!((decrement.as_str(), error), ("false", None));
        // Long enough for a restart's backoff (1 s) to have shown.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let agents: Vec<String> = bed
            .hub
            .agents()
            .iter()
            .map(|a| a.name.clone())
            .filter(|n| n.starts_with(&id))
            .collect();
        assert_eq!(agents.len(), 1, "a second agent on the used VM: {agents:?}");
        let out = fleet.all_output();
        let ending = line_with(&out, "terminating this instance").unwrap_or_default();
        assert!(ending.contains("one job per VM"), "{out}");
        assert!(out.contains("this instance serves no other"), "{out}");
        assert_no_token(&out);
        Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// A job that starts a process in a session of its own (out of the agent's process group,
/// which the supervisor kills after every run) does not leave it running: the agent's
/// cgroup is emptied when the agent exits.
async fn a_process_a_job_moves_out_of_the_agents_group_dies_with_the_agent(agent: AgentKind) -> R {
    if agent_fleet_tests::fleet::cgroup_root().is_none() {
        println!("no writable cgroup v2 on this machine: skipped");
        return Ok(());
    }
    let bed = Bed::start(&stack("leftover", &agent)).await?;
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 0, 3, 1).await?;
    bed.put_config(&bed.runtime_config(&group)).await?;
    let fleet = fleet(&bed, &group, &agent, None);
    let pid_file = bed.root.join("leftover.pid");
    let result = async {
        registered(&bed, 1, Duration::from_secs(30)).await?;
        let job = bed.hub.enqueue_job(JobSpec {
            commands: vec![
                format!(
                    "setsid sh -c 'echo $$ > {0}.tmp && mv {0}.tmp {0}; exec sleep 600' < /dev/null > /dev/null 2>&1 &",
                    pid_file.display()
                ),
                // The job ends once the process is running on its own.
                format!("while [ ! -s {} ]; do sleep 0.05; done", pid_file.display()),
            ],
            env: vec![],
        });
        let done = finished(&bed, &job, Duration::from_secs(60)).await?;
        assert_eq!(done.result.as_deref(), Some("passed"), "{done:?}");
        let id = instance_of(&done);
        let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
        let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid)));
        terminate_call(&bed, &id, Duration::from_secs(30)).await?;
        eventually(
            "the job's leftover process is gone",
            Duration::from_secs(5),
            || async {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                (stat.is_empty() || stat.contains(") Z ")).then_some(())
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e} (it ran in session {sid:?})"))?;
        let out = fleet.all_output();
        assert!(
            out.contains("processes of the agent's run were still alive"),
            "{out}"
        );
        Ok(())
    }
    .await;
    finish(fleet, result).await
}
