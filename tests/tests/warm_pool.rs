//! Warm pools end to end: real supervisors in pooled instances of the emulated group (the
//! bed's warm pool, see `warm_pool_bed.rs`), the fake agent (the wave also with the real
//! Semaphore agent), the fake hub.
//!
//! - a wave: the pool fills and warms (no token, no agent), jobs are queued, the pooled
//!   instances are taken into service and start warm, their agents register, the jobs
//!   pass, the instances end after their job without decrement and never return to the
//!   pool, and the pool refills;
//! - a stop in the pool ends nothing and starts no agent;
//! - a pooled instance from an older launch template version replaces itself;
//! - a hibernated instance resumes with its warmed state (the same supervisor process).

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::{real_agent, real_agent_skip_line, AgentKind, Fleet, PoolPhase};
use agent_fleet_tests::hub::JobSpec;
use agent_fleet_tests::probe::{field, terminate_calls};
use agent_supervisor::config::{LifecycleHookConfig, RuntimeConfig};
use std::time::Duration;

type R = anyhow::Result<()>;

const HOOK: &str = "agent-fleet-warm";
const WITHIN: Duration = Duration::from_secs(60);
/// The bed's machine has `docker` but no daemon: the warm-up does not wait for one.
const ARGS: &[&str] = &["--warm-docker-wait-secs", "0"];

fn pooled_config(bed: &Bed, group: &str) -> RuntimeConfig {
    RuntimeConfig {
        launch_hook: Some(LifecycleHookConfig {
            name: HOOK.into(),
            heartbeat_timeout_secs: 120,
        }),
        warm_images: vec!["ruby:3.3".into()],
        // The test raises desired capacity itself (as the leader would).
        agents_lead: false,
        ..bed.runtime_config(group)
    }
}

/// Gives `group` (already made) a launch hook and a warm pool of `size` in `state`, then
/// starts the launcher over it (the fake agent).
async fn pool(bed: &Bed, group: &str, size: i32, state: &str) -> anyhow::Result<Fleet> {
    pool_with(bed, group, size, state, &AgentKind::Fake).await
}

async fn pool_with(
    bed: &Bed,
    group: &str,
    size: i32,
    state: &str,
    agent: &AgentKind,
) -> anyhow::Result<Fleet> {
    bed.moto
        .put_launch_hook(group, HOOK, 120, "CONTINUE")
        .await?;
    bed.moto
        .put_warm_pool(group, size, state, Some(size))
        .await?;
    let mut o = bed.fleet_options(&[group], ARGS, &[]);
    o.agent = agent.clone();
    Ok(Fleet::start(bed.moto.clone(), o))
}

/// Everything every supervisor process of instance `id` printed (its `supervisor.log`).
fn log_of(fleet: &Fleet, id: &str) -> String {
    fleet
        .with_instance(id, |i| {
            std::fs::read_to_string(i.dir.join("supervisor.log")).unwrap_or_default()
        })
        .unwrap_or_default()
}

fn lines<'a>(log: &'a str, message: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(message)).collect()
}

/// Waits until the pool holds `n` warmed (stopped or hibernated) instances; their ids.
async fn warmed(bed: &Bed, group: &str, state: &str, n: usize) -> anyhow::Result<Vec<String>> {
    eventually(&format!("{n} instance(s) {state}"), WITHIN, || async {
        let ids = bed.moto.warm_pool(group).await.ok()?.in_state(state);
        (ids.len() >= n).then_some(ids)
    })
    .await
}

async fn finish(fleet: Fleet, result: R) -> R {
    if result.is_err() {
        eprintln!("--- fleet output ---\n{}", fleet.all_output());
    }
    fleet.shutdown().await;
    result
}

mod a_warm_pool_wave_end_to_end {
    use super::*;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fake() -> R {
        super::a_warm_pool_wave_end_to_end(AgentKind::Fake).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real() -> R {
        match real_agent()? {
            Some(path) => super::a_warm_pool_wave_end_to_end(AgentKind::Real(path)).await,
            None => {
                println!(
                    "{}",
                    real_agent_skip_line("a_warm_pool_wave_end_to_end::real")
                );
                Ok(())
            }
        }
    }
}

/// The wave: two warmed instances serve two jobs, each job's instance ends without
/// decrement and never returns to the pool, and the pool refills.
async fn a_warm_pool_wave_end_to_end(agent: AgentKind) -> R {
    let bed = Bed::start(&format!("wpwave-{}", agent.label())).await?;
    let group = &format!("{}-agents", bed.stack);
    bed.put_config(&pooled_config(&bed, group)).await?;
    bed.moto.create_group(group, 0, 4, 0).await?;
    let fleet = pool_with(&bed, group, 2, "Stopped", &agent).await?;
    let result = async {
        // Filled and warmed: each supervisor completed the launch action, then the pool
        // powered its instance off. No token read, no agent.
        let pool = warmed(&bed, group, "Warmed:Stopped", 2).await?;
        for id in &pool {
            // The supervisor writes its line once the bed has answered the completion,
            // so a moment after the bed shows the instance warmed.
            let log = eventually("the warmed line", WITHIN, || async {
                let log = log_of(&fleet, id);
                (!lines(&log, "warmed: launch lifecycle action completed").is_empty())
                    .then_some(log)
            })
            .await?;
            assert_eq!(
                lines(&log, "warmed: launch lifecycle action completed").len(),
                1,
                "{log}"
            );
            assert!(lines(&log, "supervisor ready").is_empty(), "{log}");
        }
        eventually("the pool's instances powered off", WITHIN, || async {
            pool.iter()
                .all(|id| fleet.pool_phase(id) == Some(PoolPhase::Stopped))
                .then_some(())
        })
        .await?;
        assert!(bed.hub.agents().is_empty(), "an agent started in the pool");

        // Jobs queued; the group is raised as the leader would raise it.
        let jobs: Vec<String> = (0..2)
            .map(|n| {
                bed.hub.enqueue_job(JobSpec {
                    commands: vec![format!("echo warm-job-{n}")],
                    env: vec![],
                })
            })
            .collect();
        bed.moto.set_desired(group, 2).await?;
        bed.jobs_passed(&jobs, WITHIN).await?;
        // Both jobs ran on the pooled instances, started warm.
        for job in &jobs {
            let agent = bed.hub.job(job).and_then(|j| j.agent).unwrap_or_default();
            let id = agent.split("__").next().unwrap_or_default().to_string();
            assert!(
                pool.contains(&id),
                "job {job} ran on {id}, not a pooled one"
            );
        }
        for id in &pool {
            let log = log_of(&fleet, id);
            let timing = lines(&log, "boot timing");
            assert!(
                !timing.is_empty()
                    && timing
                        .iter()
                        .all(|l| field(l, "start").as_deref() == Some("warm")),
                "{log}"
            );
        }
        // Each ends after its job without decrement, and never returns to the pool.
        eventually("both asked to be terminated", WITHIN, || async {
            let calls = bed.moto.calls(0).await.ok()?;
            let t = terminate_calls(&calls);
            pool.iter()
                .all(|id| t.iter().any(|(i, d, _)| i == id && d == "false"))
                .then_some(())
        })
        .await?;
        let refilled = eventually("the pool refilled", WITHIN, || async {
            let p = bed.moto.warm_pool(group).await.ok()?;
            let ids = p.in_state("Warmed:Stopped");
            (ids.len() >= 2 && ids.iter().all(|i| !pool.contains(i))).then_some(ids)
        })
        .await?;
        assert!(refilled.iter().all(|i| !pool.contains(i)));
        assert_eq!(bed.moto.group(group).await?.desired, 2, "capacity kept");
        Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// The pool stops an instance (a power-off, no shutdown sequence): nothing was ended and
/// no agent ever started on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_in_the_pool_never_terminates_the_instance_or_starts_an_agent() -> R {
    let bed = Bed::start("wpstop").await?;
    let group = "wpstop-agents";
    bed.put_config(&pooled_config(&bed, group)).await?;
    bed.moto.create_group(group, 0, 2, 0).await?;
    let fleet = pool(&bed, group, 1, "Stopped").await?;
    let result = async {
        let id = warmed(&bed, group, "Warmed:Stopped", 1).await?.remove(0);
        eventually("powered off", WITHIN, || async {
            (fleet.pool_phase(&id) == Some(PoolPhase::Stopped)).then_some(())
        })
        .await?;
        // A while stopped: still in the pool, nothing asked of Auto Scaling.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pool = bed.moto.warm_pool(group).await?;
        assert_eq!(pool.state_of(&id), Some("Warmed:Stopped"), "{pool:?}");
        let calls = bed.moto.calls(0).await?;
        assert!(terminate_calls(&calls).is_empty(), "a terminate call");
        assert!(
            !calls
                .iter()
                .any(|c| c.is("autoscaling", "SetInstanceHealth")),
            "marked unhealthy"
        );
        assert!(
            !calls.iter().any(|c| c.is("ssm", "GetParameter")
                && c.param("Name") == Some(bed.token_parameter.as_str())),
            "the token was read in the pool"
        );
        assert!(bed.hub.agents().is_empty(), "an agent registered");
        let log = log_of(&fleet, &id);
        assert!(lines(&log, "agent process").is_empty(), "{log}");
        assert!(!std::path::Path::new(
            &fleet
                .with_instance(&id, |i| i.dir.join("powered-off"))
                .unwrap_or_default()
        )
        .exists());
        Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// A group on a launch template: the pooled instance was launched from version 1, the
/// group now launches version 2; taken into service, it ends without decrement instead
/// of serving, and a fresh instance runs the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pooled_instance_replaces_itself() -> R {
    let bed = Bed::start("wpstale").await?;
    let group = "wpstale-agents";
    bed.put_config(&pooled_config(&bed, group)).await?;
    let lt = format!("{group}-lt");
    let data = |t: &str| {
        [
            ("LaunchTemplateName", lt.clone()),
            (
                "LaunchTemplateData.ImageId",
                agent_fleet_tests::moto::IMAGE_ID.to_string(),
            ),
            ("LaunchTemplateData.InstanceType", t.to_string()),
        ]
    };
    let v1 = data("t3.micro");
    let params: Vec<(&str, &str)> = v1.iter().map(|(k, v)| (*k, v.as_str())).collect();
    bed.moto
        .query("ec2", "CreateLaunchTemplate", &params)
        .await?;
    let asg = bed.moto.autoscaling().await;
    asg.create_auto_scaling_group()
        .auto_scaling_group_name(group)
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_name(&lt)
                .version("1")
                .build(),
        )
        .min_size(0)
        .max_size(2)
        .desired_capacity(0)
        .availability_zones(agent_fleet_tests::moto::AZ)
        .send()
        .await?;
    let fleet = pool(&bed, group, 1, "Stopped").await?;
    let result = async {
        let stale = warmed(&bed, group, "Warmed:Stopped", 1).await?.remove(0);
        eventually("powered off", WITHIN, || async {
            (fleet.pool_phase(&stale) == Some(PoolPhase::Stopped)).then_some(())
        })
        .await?;
        // A new AMI: the group now launches version 2.
        let v2 = data("t3.small");
        let params: Vec<(&str, &str)> = v2.iter().map(|(k, v)| (*k, v.as_str())).collect();
        bed.moto
            .query("ec2", "CreateLaunchTemplateVersion", &params)
            .await?;
        asg.update_auto_scaling_group()
            .auto_scaling_group_name(group)
            .launch_template(
                aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                    .launch_template_name(&lt)
                    .version("2")
                    .build(),
            )
            .send()
            .await?;
        let job = bed.hub.enqueue_job(JobSpec {
            commands: vec!["echo fresh".into()],
            env: vec![],
        });
        bed.moto.set_desired(group, 1).await?;
        eventually(
            "the stale instance asked to be terminated",
            WITHIN,
            || async {
                let calls = bed.moto.calls(0).await.ok()?;
                terminate_calls(&calls)
                    .into_iter()
                    .find(|(i, _, _)| *i == stale)
                    .map(|(_, d, _)| d)
            },
        )
        .await
        .map(|d| assert_eq!(d, "false", "decrement"))?;
        let log = log_of(&fleet, &stale);
        let line = lines(&log, "no longer what the group launches");
        assert_eq!(line.len(), 1, "{log}");
        assert!(
            line[0].contains(&format!(
                "why=launched from launch template {lt} version 1, the group now launches {lt} version 2"
            )),
            "{}",
            line[0]
        );
        assert!(
            lines(&log, "supervisor ready").is_empty(),
            "it served: {log}"
        );
        bed.jobs_passed(std::slice::from_ref(&job), WITHIN).await?;
        let ran_on = bed.hub.job(&job).and_then(|j| j.agent).unwrap_or_default();
        assert!(
            !ran_on.starts_with(&stale),
            "the job ran on the stale instance"
        );
        Ok(())
    }
    .await;
    finish(fleet, result).await
}

/// A hibernated pool: the warmed supervisor is frozen with its memory and continues where
/// it was when the instance is taken into service — one process, warmed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernation_resumes_with_the_warmed_state() -> R {
    let bed = Bed::start("wphib").await?;
    let group = "wphib-agents";
    bed.put_config(&pooled_config(&bed, group)).await?;
    bed.moto.create_group(group, 0, 2, 0).await?;
    let fleet = pool(&bed, group, 1, "Hibernated").await?;
    let result = async {
        let id = warmed(&bed, group, "Warmed:Hibernated", 1).await?.remove(0);
        eventually("hibernated", WITHIN, || async {
            (fleet.pool_phase(&id) == Some(PoolPhase::Hibernated)).then_some(())
        })
        .await?;
        let pid = fleet.with_instance(&id, |i| i.pid).unwrap_or_default();
        let job = bed.hub.enqueue_job(JobSpec {
            commands: vec!["echo resumed".into()],
            env: vec![],
        });
        bed.moto.set_desired(group, 1).await?;
        bed.jobs_passed(std::slice::from_ref(&job), WITHIN).await?;
        assert_eq!(
            fleet.with_instance(&id, |i| i.pid),
            Some(pid),
            "the same supervisor process"
        );
        let log = log_of(&fleet, &id);
        assert_eq!(lines(&log, "warming up (no token").len(), 1, "{log}");
        assert_eq!(
            lines(&log, "taken from the warm pool into service").len(),
            1,
            "{log}"
        );
        let timing = lines(&log, "boot timing");
        assert!(
            timing
                .first()
                .is_some_and(|l| field(l, "start").as_deref() == Some("warm")),
            "{log}"
        );
        Ok(())
    }
    .await;
    finish(fleet, result).await
}
