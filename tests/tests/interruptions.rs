//! End-to-end: what ends an instance other than its own agent — spot interruption notices,
//! rebalance recommendations, Auto Scaling terminating it (through the termination
//! lifecycle hook), and its age — with real `agent-supervisor` processes against moto (its
//! lifecycle waits are the bed wrapper's), fake IMDS, the fake hub and the fake agent.
//!
//! Figures are printed as `FIGURE <name> <value> <unit>` (`--nocapture` shows them).

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::{group_alive, Fleet, FleetOptions};
use agent_fleet_tests::hub::{JobSpec, JobState};
use agent_fleet_tests::moto::{monotonic_ns, Call, Moto};
use agent_fleet_tests::probe::terminate_calls;
use agent_supervisor::config::{LifecycleHookConfig, Settings};
use anyhow::{bail, Context};
use std::sync::Arc;
use std::time::Duration;

type R = anyhow::Result<()>;

const HOOK: &str = "agent-fleet-drain";

fn figure(name: &str, value: f64, unit: &str) {
    println!("FIGURE {name} {value:.0} {unit}");
}
/// Calls of `action` for `instance`.
fn calls_for<'a>(calls: &'a [Call], action: &str, instance: &str) -> Vec<&'a Call> {
    calls
        .iter()
        .filter(|c| c.is("autoscaling", action) && c.param("InstanceId") == Some(instance))
        .collect()
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// A fleet over `group` whose instances report `life_cycle` at IMDS, with a 2 s drain margin.
fn fleet(bed: &Bed, group: &str, life_cycle: &str) -> Fleet {
    let mut o: FleetOptions = bed.fleet_options(&[group], &["--drain-margin-secs", "2"], &[]);
    o.group_life_cycle
        .insert(group.to_string(), life_cycle.to_string());
    Fleet::start(Arc::clone(&bed.moto), o)
}

fn hook_config(heartbeat_timeout_secs: u64) -> Option<LifecycleHookConfig> {
    Some(LifecycleHookConfig {
        name: HOOK.into(),
        heartbeat_timeout_secs,
    })
}

fn events_of(fleet: &Fleet, id: &str) -> Vec<serde_json::Value> {
    fleet
        .with_instance(id, |i| i.agent_events())
        .unwrap_or_default()
}

fn has_event(fleet: &Fleet, id: &str, kind: &str) -> Option<serde_json::Value> {
    events_of(fleet, id)
        .into_iter()
        .find(|e| e["event"] == kind)
}

/// The instance id an agent name starts with (`<instance id>__<hex>`).
fn instance_of(agent: Option<&str>) -> String {
    agent
        .and_then(|a| a.split("__").next())
        .unwrap_or_default()
        .to_string()
}

async fn registered(bed: &Bed, n: usize) -> R {
    eventually(
        &format!("{n} agents registered"),
        Duration::from_secs(30),
        || async { (bed.hub.live_agents().len() >= n).then_some(()) },
    )
    .await
}

/// Enqueues `command` and waits until it runs; returns the job id and its instance.
async fn running_job(bed: &Bed, command: &str) -> anyhow::Result<(String, String)> {
    let job = bed.hub.enqueue_job(JobSpec {
        commands: vec![command.into()],
        env: vec![],
    });
    let info = eventually("the job runs", Duration::from_secs(30), || async {
        bed.hub.job(&job).filter(|j| j.state == JobState::Running)
    })
    .await?;
    Ok((job, instance_of(info.agent.as_deref())))
}

/// On failure prints every supervisor's output; always stops the fleet.
async fn finish(fleet: Fleet, result: R) -> R {
    if result.is_err() {
        eprintln!("{}", fleet.all_output());
    }
    fleet.shutdown().await;
    result
}

fn output_of(fleet: &Fleet, id: &str) -> String {
    fleet.with_instance(id, |i| i.output()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_notice_drains_the_agent_stops_its_job_in_the_grace_and_replaces_the_instance() -> R {
    let bed = Bed::start("spot").await?;
    let group = "spot-agents";
    bed.moto.create_group(group, 0, 3, 1).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.interruption_grace_secs = 3;
    bed.put_config(&cfg).await?;
    let fleet = fleet(&bed, group, "spot");
    let result = async {
        registered(&bed, 1).await?;
        let (job, id) = running_job(&bed, "sleep 120").await?;
        // Nothing yet: the supervisor polls the notice path every 2 s and finds 404.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let polls_before = fleet
            .with_instance(&id, |i| {
                i.imds.gets("/latest/meta-data/spot/instance-action")
            })
            .unwrap_or_default();
        assert!(polls_before >= 2, "polled {polls_before} times");
        let t0 = monotonic_ns();
        fleet.with_instance(&id, |i| i.imds.set_spot_interruption("terminate", 120));
        let interrupted = eventually("the agent got SIGTERM", Duration::from_secs(10), || async {
            has_event(&fleet, &id, "interrupted")
        })
        .await?;
        let sigterm_ms = ms(interrupted["mono_ns"]
            .as_u64()
            .unwrap_or_default()
            .saturating_sub(t0));
        figure("spot_notice_to_agent_sigterm_ms", sigterm_ms, "ms");
        assert!(sigterm_ms < 3000.0, "notice → SIGTERM took {sigterm_ms} ms");

        // The job gets its grace (3 s), then Semaphore stops it; the agent reports it.
        let stopped = eventually("the job stopped", Duration::from_secs(15), || async {
            bed.hub.job(&job).filter(|j| j.state == JobState::Finished)
        })
        .await?;
        assert_eq!(stopped.result.as_deref(), Some("stopped"), "{stopped:?}");
        let stop_ms = ms(monotonic_ns().saturating_sub(t0));
        figure("spot_notice_to_job_stopped_ms", stop_ms, "ms");

        // Then the instance ends without decrement, and Auto Scaling replaces it.
        eventually(
            "terminate without decrement",
            Duration::from_secs(20),
            || async {
                let calls = bed.moto.calls(0).await.ok()?;
                terminate_calls(&calls)
                    .into_iter()
                    .find(|(i, d, e)| *i == id && d == "false" && e.is_none())
            },
        )
        .await?;
        eventually(
            "a replacement launched",
            Duration::from_secs(20),
            || async { (fleet.launched().len() >= 2).then_some(()) },
        )
        .await?;
        assert_eq!(bed.moto.group(group).await?.desired, 1, "capacity kept");
        let out = output_of(&fleet, &id);
        for needle in [
            "spot interruption notice",
            "spot_action=terminate",
            "interruption=\"spot\"",
            "terminating this instance",
        ] {
            assert!(
                out.contains(needle) || out.contains(&needle.replace('"', "")),
                "{needle:?} missing:\n{out}"
            );
        }
        // One SpotInterruptions datum for the stack.
        eventually(
            "SpotInterruptions in CloudWatch",
            Duration::from_secs(10),
            || async {
                bed.moto
                    .list_metrics("Semaphore")
                    .await
                    .ok()?
                    .into_iter()
                    .find(|(m, d)| {
                        m == "SpotInterruptions" && d.contains(&"StackName=spot".to_string())
                    })
            },
        )
        .await?;
        let exited = fleet
            .with_instance(&id, |i| i.agent_groups())
            .unwrap_or_default();
        eventually(
            "the agent's group is gone",
            Duration::from_secs(10),
            || async { exited.iter().all(|g| !group_alive(*g)).then_some(()) },
        )
        .await?;
        anyhow::Ok(())
    }
    .await;
    finish(fleet, result).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_replaces_an_idle_instance_at_once_and_a_busy_one_after_its_job() -> R {
    let bed = Bed::start("rebalance").await?;
    let group = "rebalance-agents";
    bed.moto.create_group(group, 0, 4, 2).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let fleet = fleet(&bed, group, "spot");
    let result = async {
        registered(&bed, 2).await?;
        let (job, busy) = running_job(&bed, "sleep 6; echo done").await?;
        let idle = fleet
            .launched()
            .into_iter()
            .find(|i| *i != busy)
            .context("the idle instance")?;
        let since = bed.moto.last_seq().await?;
        let t0 = monotonic_ns();
        for id in [&idle, &busy] {
            fleet.with_instance(id, |i| i.imds.set_rebalance_now());
        }
        // Idle: drained and replaced at once.
        let call = eventually(
            "the idle instance replaced",
            Duration::from_secs(15),
            || async {
                let calls = bed.moto.calls(since).await.ok()?;
                calls.into_iter().find(|c| {
                    c.is("autoscaling", "TerminateInstanceInAutoScalingGroup")
                        && c.param("InstanceId") == Some(idle.as_str())
                })
            },
        )
        .await?;
        assert_eq!(call.param("ShouldDecrementDesiredCapacity"), Some("false"));
        figure(
            "rebalance_idle_to_terminate_ms",
            ms(call.t_ns.saturating_sub(t0)),
            "ms",
        );
        assert!(
            has_event(&fleet, &idle, "interrupted").is_some(),
            "the idle agent was drained"
        );
        // Busy: its job passes, untouched; then the instance is replaced.
        let done = eventually("the job finished", Duration::from_secs(20), || async {
            bed.hub.job(&job).filter(|j| j.state == JobState::Finished)
        })
        .await?;
        assert_eq!(done.result.as_deref(), Some("passed"), "{done:?}");
        assert!(
            has_event(&fleet, &busy, "interrupted").is_none(),
            "the busy agent was not interrupted: {:?}",
            events_of(&fleet, &busy)
        );
        eventually(
            "the busy instance replaced after its job",
            Duration::from_secs(20),
            || async {
                let calls = bed.moto.calls(since).await.ok()?;
                terminate_calls(&calls)
                    .into_iter()
                    .find(|(i, d, _)| *i == busy && d == "false")
            },
        )
        .await?;
        eventually("two replacements", Duration::from_secs(20), || async {
            (fleet.launched().len() >= 4).then_some(())
        })
        .await?;
        assert_eq!(bed.moto.group(group).await?.desired, 2, "capacity kept");
        let out = output_of(&fleet, &busy);
        assert!(
            out.contains("spot rebalance recommendation: replacing this instance after its job"),
            "{out}"
        );
        assert!(
            out.contains("interruption=\"rebalance\"") || out.contains("interruption=rebalance"),
            "{out}"
        );
        anyhow::Ok(())
    }
    .await;
    finish(fleet, result).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_scale_in_waits_in_the_hook_while_the_idle_agent_drains() -> R {
    let bed = Bed::start("scalein").await?;
    let group = "scalein-agents";
    bed.moto.create_group(group, 0, 3, 2).await?;
    bed.moto.put_termination_hook(group, HOOK, 30).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.lifecycle_hook = hook_config(30);
    bed.put_config(&cfg).await?;
    let fleet = fleet(&bed, group, "on-demand");
    let result = async {
        registered(&bed, 2).await?;
        let before = fleet.launched();
        let since = bed.moto.last_seq().await?;

        // SetDesiredCapacity 2 → 1: one instance waits in Terminating:Wait for its supervisor.
        let t0 = monotonic_ns();
        bed.moto.set_desired(group, 1).await?;
        let g = bed.moto.group(group).await?;
        let waiting: Vec<String> = g
            .instances
            .iter()
            .filter(|(_, s, _)| s == "Terminating:Wait")
            .map(|(i, _, _)| i.clone())
            .collect();
        assert_eq!(waiting.len(), 1, "{g:?}");
        let first = waiting[0].clone();
        let done = eventually(
            "the lifecycle action completed",
            Duration::from_secs(20),
            || async {
                let calls = bed.moto.calls(since).await.ok()?;
                calls_for(&calls, "CompleteLifecycleAction", &first)
                    .into_iter()
                    .find(|c| c.status == Some(200))
                    .cloned()
            },
        )
        .await?;
        assert_eq!(done.param("LifecycleActionResult"), Some("CONTINUE"));
        assert_eq!(done.param("LifecycleHookName"), Some(HOOK));
        figure(
            "scale_in_to_lifecycle_complete_ms",
            ms(done.t_ns.saturating_sub(t0)),
            "ms",
        );
        assert!(
            has_event(&fleet, &first, "interrupted").is_some(),
            "the agent was drained before the action completed"
        );
        eventually(
            "the instance left the group",
            Duration::from_secs(10),
            || async {
                let g = bed.moto.group(group).await.ok()?;
                g.state_of(&first).is_none().then_some(())
            },
        )
        .await?;

        // UpdateAutoScalingGroup MaxSize 0: the other one goes the same way.
        let second = before
            .iter()
            .find(|i| **i != first)
            .cloned()
            .context("second")?;
        let t1 = monotonic_ns();
        bed.moto.set_max_size(group, 0).await?;
        assert_eq!(
            bed.moto.group(group).await?.state_of(&second),
            Some("Terminating:Wait")
        );
        let done = eventually(
            "the second action completed",
            Duration::from_secs(20),
            || async {
                let calls = bed.moto.calls(since).await.ok()?;
                calls_for(&calls, "CompleteLifecycleAction", &second)
                    .into_iter()
                    .find(|c| c.status == Some(200))
                    .cloned()
            },
        )
        .await?;
        figure(
            "max_lowered_to_lifecycle_complete_ms",
            ms(done.t_ns.saturating_sub(t1)),
            "ms",
        );
        eventually("the group is empty", Duration::from_secs(10), || async {
            bed.moto
                .group(group)
                .await
                .ok()?
                .instances
                .is_empty()
                .then_some(())
        })
        .await?;
        // Auto Scaling did it all: no supervisor asked for a termination, nothing relaunched.
        let calls = bed.moto.calls(since).await?;
        assert!(
            terminate_calls(&calls).is_empty(),
            "{:?}",
            terminate_calls(&calls)
        );
        assert_eq!(fleet.launched().len(), 2, "no replacement");
        for id in [&first, &second] {
            let out = output_of(&fleet, id);
            assert!(
                out.contains("Auto Scaling is terminating this instance: draining the agent")
                    && out.contains("lifecycle action completed"),
                "{id}:\n{out}"
            );
        }
        anyhow::Ok(())
    }
    .await;
    finish(fleet, result).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_instance_finishes_its_job_while_heartbeats_hold_the_termination() -> R {
    let bed = Bed::start("hold").await?;
    let group = "hold-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    // A 4 s heartbeat timeout: without heartbeats, Auto Scaling would go on after 4 s.
    bed.moto.put_termination_hook(group, HOOK, 4).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.lifecycle_hook = hook_config(4);
    cfg.interruption_grace_secs = 2;
    bed.put_config(&cfg).await?;
    let fleet = fleet(&bed, group, "on-demand");
    let result = async {
        registered(&bed, 1).await?;
        let (job, id) = running_job(&bed, "sleep 14; echo done").await?;
        let since = bed.moto.last_seq().await?;
        // An operator ends the busy instance (with decrement, so nothing replaces it).
        let t0 = monotonic_ns();
        bed.moto.terminate_instance(&id, true).await?;
        let done = eventually("the job finished", Duration::from_secs(30), || async {
            bed.hub.job(&job).filter(|j| j.state == JobState::Finished)
        })
        .await?;
        assert_eq!(
            done.result.as_deref(),
            Some("passed"),
            "never a remote kill: {done:?}"
        );
        let job_done_ns = monotonic_ns();
        let complete = eventually(
            "the lifecycle action completed",
            Duration::from_secs(15),
            || async {
                let calls = bed.moto.calls(since).await.ok()?;
                calls_for(&calls, "CompleteLifecycleAction", &id)
                    .into_iter()
                    .find(|c| c.status == Some(200))
                    .cloned()
            },
        )
        .await?;
        let calls = bed.moto.calls(since).await?;
        let beats: Vec<&Call> = calls_for(&calls, "RecordLifecycleActionHeartbeat", &id);
        assert!(beats.len() >= 3, "{} heartbeats", beats.len());
        assert!(beats.iter().all(|c| c.status == Some(200)), "{beats:#?}");
        let held_ms = ms(complete.t_ns.saturating_sub(t0));
        figure("lifecycle_busy_heartbeats", beats.len() as f64, "calls");
        figure("lifecycle_busy_wait_ms", held_ms, "ms");
        // From the agent's own shutdown (JOB_FINISHED) to CompleteLifecycleAction.
        let shutdown_ns = has_event(&fleet, &id, "shutdown")
            .and_then(|e| e["mono_ns"].as_u64())
            .unwrap_or(job_done_ns);
        figure(
            "lifecycle_agent_exit_to_complete_ms",
            ms(complete.t_ns.saturating_sub(shutdown_ns)),
            "ms",
        );
        assert!(
            held_ms > 8000.0,
            "held past the 4 s heartbeat timeout: {held_ms} ms"
        );
        assert!(
            has_event(&fleet, &id, "interrupted").is_none(),
            "the busy agent got no SIGTERM: {:?}",
            events_of(&fleet, &id)
        );
        eventually("the instance is gone", Duration::from_secs(10), || async {
            let g = bed.moto.group(group).await.ok()?;
            (g.instances.is_empty() && g.desired == 0).then_some(())
        })
        .await?;
        let out = output_of(&fleet, &id);
        assert!(out.contains("letting the job finish"), "{out}");
        assert!(out.contains("lifecycle action completed"), "{out}");
        anyhow::Ok(())
    }
    .await;
    finish(fleet, result).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_termination_through_the_hook_completes_its_own_action_at_once() -> R {
    let bed = Bed::start("selfhook").await?;
    let group = "selfhook-agents";
    bed.moto.create_group(group, 0, 3, 2).await?;
    bed.moto.put_termination_hook(group, HOOK, 60).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.lifecycle_hook = hook_config(60);
    cfg.idle_timeout_secs = 3;
    bed.put_config(&cfg).await?;
    let fleet = fleet(&bed, group, "on-demand");
    let result = async {
        registered(&bed, 2).await?;
        let (job, busy) = running_job(&bed, "sleep 1").await?;
        // JOB_FINISHED: terminate without decrement → Terminating:Wait → complete at once.
        // IDLE: terminate with decrement → the same. Neither waits for the 60 s timeout.
        let mut waits = vec![];
        for (what, decrement) in [("job finished", "false"), ("idle", "true")] {
            let (id, term) = eventually(what, Duration::from_secs(30), || async {
                let calls = bed.moto.calls(0).await.ok()?;
                calls
                    .iter()
                    .find(|c| {
                        c.is("autoscaling", "TerminateInstanceInAutoScalingGroup")
                            && c.param("ShouldDecrementDesiredCapacity") == Some(decrement)
                            && c.error.is_none()
                    })
                    .map(|c| {
                        (
                            c.param("InstanceId").unwrap_or_default().to_string(),
                            c.clone(),
                        )
                    })
            })
            .await?;
            if decrement == "false" {
                assert_eq!(id, busy);
            }
            let complete = eventually("completed", Duration::from_secs(15), || async {
                let calls = bed.moto.calls(0).await.ok()?;
                calls_for(&calls, "CompleteLifecycleAction", &id)
                    .into_iter()
                    .find(|c| c.status == Some(200))
                    .cloned()
            })
            .await?;
            let wait = ms(complete.t_ns.saturating_sub(term.t_ns));
            figure(
                &format!("self_terminate_{decrement}_to_complete_ms"),
                wait,
                "ms",
            );
            assert!(wait < 10_000.0, "{what}: {wait} ms in Terminating:Wait");
            waits.push(wait);
        }
        assert_eq!(
            bed.hub.job(&job).and_then(|j| j.result),
            Some("passed".to_string())
        );
        let g = bed.moto.group(group).await?;
        assert_eq!(
            g.desired, 1,
            "one replacement for the job, one decrement for idle: {g:?}"
        );
        assert!(
            !bed.moto
                .calls(0)
                .await?
                .iter()
                .any(|c| c.is("autoscaling", "RecordLifecycleActionHeartbeat")),
            "no agent to wait for, no heartbeat"
        );
        anyhow::Ok(())
    }
    .await;
    finish(fleet, result).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_uptime_replaces_an_idle_instance_at_once_and_a_busy_one_after_its_job() -> R {
    let bed = Bed::start("uptime").await?;
    let group = "uptime-agents";
    bed.moto.create_group(group, 0, 4, 2).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.max_uptime_secs = 8;
    bed.put_config(&cfg).await?;
    let fleet = fleet(&bed, group, "on-demand");
    let result = async {
        registered(&bed, 2).await?;
        let first = fleet.launched();
        let (job, busy) = running_job(&bed, "sleep 9; echo done").await?;
        let idle = first
            .iter()
            .find(|i| **i != busy)
            .cloned()
            .context("idle")?;
        let started = fleet
            .with_instance(&idle, |i| i.started)
            .context("idle instance")?;
        let call = eventually(
            "the idle instance replaced",
            Duration::from_secs(20),
            || async {
                let calls = bed.moto.calls(0).await.ok()?;
                calls.into_iter().find(|c| {
                    c.is("autoscaling", "TerminateInstanceInAutoScalingGroup")
                        && c.param("InstanceId") == Some(idle.as_str())
                })
            },
        )
        .await?;
        let age = started.elapsed();
        assert_eq!(call.param("ShouldDecrementDesiredCapacity"), Some("false"));
        assert!(
            has_event(&fleet, &idle, "interrupted").is_some(),
            "drained first"
        );
        let done = eventually("the job finished", Duration::from_secs(20), || async {
            bed.hub.job(&job).filter(|j| j.state == JobState::Finished)
        })
        .await?;
        assert_eq!(done.result.as_deref(), Some("passed"), "{done:?}");
        eventually(
            "the busy instance replaced after its job",
            Duration::from_secs(20),
            || async {
                let calls = bed.moto.calls(0).await.ok()?;
                terminate_calls(&calls)
                    .into_iter()
                    .find(|(i, d, _)| *i == busy && d == "false")
            },
        )
        .await?;
        assert!(
            has_event(&fleet, &busy, "interrupted").is_none(),
            "the job was never interrupted"
        );
        let out = output_of(&fleet, &busy);
        assert!(
            out.contains("older than max_uptime_secs: replacing this instance after its job"),
            "{out}"
        );
        assert!(out.contains("max_uptime"), "{out}");
        println!("idle instance replaced at age {age:?} (limit 8 s)");
        assert!(
            age >= Duration::from_secs(7),
            "not before the limit: {age:?}"
        );
        assert_eq!(bed.moto.group(group).await?.desired, 2, "capacity kept");
        anyhow::Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// An agent that takes several jobs (`disconnect_after_job` off) would keep taking jobs
/// past the age limit: it is drained at once, its running job getting the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_uptime_drains_a_busy_multi_job_agent_at_once() -> R {
    let bed = Bed::start("uptime-multi").await?;
    let group = "uptime-multi-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.max_uptime_secs = 8;
    cfg.disconnect_after_job = false;
    bed.put_config(&cfg).await?;
    let fleet = fleet(&bed, group, "on-demand");
    let result = async {
        registered(&bed, 1).await?;
        let (_job, busy) = running_job(&bed, "sleep 120; echo done").await?;
        let started = fleet
            .with_instance(&busy, |i| i.started)
            .context("busy instance")?;
        eventually(
            "the busy multi-job instance replaced without waiting for its job",
            Duration::from_secs(40),
            || async {
                let calls = bed.moto.calls(0).await.ok()?;
                terminate_calls(&calls)
                    .into_iter()
                    .find(|(i, d, _)| *i == busy && d == "false")
            },
        )
        .await?;
        let age = started.elapsed();
        assert!(
            age < Duration::from_secs(60),
            "did not wait for the job: {age:?}"
        );
        assert!(
            has_event(&fleet, &busy, "interrupted").is_some(),
            "the job was interrupted (it had the grace)"
        );
        let out = output_of(&fleet, &busy);
        assert!(out.contains("disconnect_after_job off"), "{out}");
        anyhow::Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// `cfn/agent-fleet.yaml` puts the termination hook on the agents group and names it, with
/// its timeout and the age limit, in the runtime config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_adds_the_hook_and_tells_the_supervisor() -> R {
    let moto = Moto::start().await?;
    let stack = "hooked";
    let params = [
        ("TokenParameterName", "/t/token"),
        ("Endpoint", "127.0.0.1:1"),
        ("AsgMaxSize", "3"),
        ("MaxUptime", "86400"),
    ];
    moto.create_stack(stack, &params).await?;
    let agents = format!("{stack}-agents");
    assert_eq!(
        moto.termination_hooks(&agents).await?,
        vec![(HOOK.to_string(), 600, "CONTINUE".to_string())]
    );
    assert!(moto
        .termination_hooks(&format!("{stack}-scaler"))
        .await?
        .is_empty());
    let parameter = format!("/agent-fleet/{stack}/config");
    let json = moto.get_parameter(&parameter).await?.context("config")?;
    let s = Settings::parse(&parameter, &json)?;
    let hook = s.lifecycle_hook.context("lifecycle_hook")?;
    assert_eq!(
        (hook.name.as_str(), hook.heartbeat_timeout.as_secs()),
        (HOOK, 600)
    );
    assert_eq!(s.max_uptime, Some(Duration::from_secs(86400)));

    // Scale-in protection (on by default) keeps a lower desired capacity off the instance;
    // an operator's TerminateInstanceInAutoScalingGroup goes through the hook, which waits
    // for a supervisor (none here).
    moto.set_desired(&agents, 1).await?;
    let id = moto.group(&agents).await?.in_service()[0].clone();
    moto.set_desired(&agents, 0).await?;
    let g = moto.group(&agents).await?;
    if g.state_of(&id) != Some("InService") {
        bail!("a protected instance was scaled in: {g:?}");
    }
    moto.terminate_instance(&id, false).await?;
    let g = moto.group(&agents).await?;
    if g.state_of(&id) != Some("Terminating:Wait") {
        bail!("{g:?}");
    }
    Ok(())
}

/// Between agent runs (here: restarts backed off after a revoked token) there is no agent
/// to drain: a termination by Auto Scaling is completed at once, not left to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_termination_between_agent_runs_is_completed_at_once() -> R {
    let bed = Bed::start("between").await?;
    let group = "between-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    bed.moto.put_termination_hook(group, HOOK, 60).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.lifecycle_hook = hook_config(60);
    bed.put_config(&cfg).await?;
    bed.moto
        .put_parameter(&bed.token_parameter, "revoked-token-0000", true)
        .await?;
    let mut o = bed.fleet_options(
        &[group],
        &[],
        &[
            ("FAKE_AGENT_REGISTER_TRIES", "1"),
            ("FAKE_AGENT_REGISTER_INTERVAL_MS", "50"),
        ],
    );
    o.group_life_cycle.insert(group.into(), "on-demand".into());
    let fleet = Fleet::start(Arc::clone(&bed.moto), o);
    let result = async {
        let id = eventually("launched", Duration::from_secs(20), || async {
            fleet.launched().first().cloned()
        })
        .await?;
        eventually(
            "the agent failed to register twice",
            Duration::from_secs(20),
            || async {
                (events_of(&fleet, &id)
                    .iter()
                    .filter(|e| e["event"] == "register_failed")
                    .count()
                    >= 2)
                    .then_some(())
            },
        )
        .await?;
        let since = bed.moto.last_seq().await?;
        let t0 = monotonic_ns();
        bed.moto.set_desired(group, 0).await?;
        let done = eventually("completed", Duration::from_secs(15), || async {
            let calls = bed.moto.calls(since).await.ok()?;
            calls_for(&calls, "CompleteLifecycleAction", &id)
                .into_iter()
                .find(|c| c.status == Some(200))
                .cloned()
        })
        .await?;
        figure(
            "between_runs_scale_in_to_complete_ms",
            ms(done.t_ns.saturating_sub(t0)),
            "ms",
        );
        let calls = bed.moto.calls(since).await?;
        assert!(
            terminate_calls(&calls).is_empty(),
            "{:?}",
            terminate_calls(&calls)
        );
        eventually(
            "the supervisor stopped",
            Duration::from_secs(15),
            || async { fleet.with_instance(&id, |i| i.exit_status()).flatten() },
        )
        .await?;
        let out = output_of(&fleet, &id);
        assert!(
            out.contains("interruption=\"lifecycle\"") || out.contains("interruption=lifecycle"),
            "{out}"
        );
        anyhow::Ok(())
    }
    .await;
    finish(fleet, result).await
}
