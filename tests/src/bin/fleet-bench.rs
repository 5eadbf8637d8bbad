//! `make bench`: the supervisor's benchmarks, against moto and the fakes on loopback.
//! Prints one `BENCH <name> <value> <unit>` line per figure.
//!
//! - `boot_to_spawn_ms_p50`: daemon spawned → agent process started (the fake agent's
//!   first act is to note CLOCK_MONOTONIC), ≥ 20 runs after moto's warm-up. As on an
//!   instance: the agent runs as another user (`nobody`), so the IMDS firewall is loaded
//!   (into this machine's netfilter, where it only rejects `nobody`'s packets to the IMDS
//!   addresses; the table is deleted afterwards) and the agent's cgroup made, both on the
//!   path.
//! - `idle_exit_to_terminate_ms_p50`: the agent wrapper's last act before exiting
//!   after an IDLE shutdown → the
//!   TerminateInstanceInAutoScalingGroup request arriving at the emulator (same clock).
//! - `idle_rss_kib`: the daemon's RSS after 60 s idle with an agent running.
//! - `scale_reaction_ms_p50`/`_p95`: a job enqueued at the hub → the leader's
//!   `SetDesiredCapacity` arriving at the emulator, ≥ 30 trials, default settings.
//! - `failover_ms_p50`/`_max`: SIGKILL of the leader → another supervisor's first leader
//!   action, ≥ 10 kills at the default timings (lease 20 s, renew deadline 12 s, retry 4 s).
//! - `ssm_calls_per_s_{10,100,1000}`: the election of that many candidates simulated on
//!   paused time against an in-memory store with SSM's semantics.
//!
//! - `real_agent_boot_to_registered_ms_p50` / `fake_agent_…`: supervisor spawned → the
//!   hub's record of the agent's registration, with the real Semaphore agent and with the
//!   fake, in the same run (≥ 10 runs each, loopback, hub sync 200 ms).
//! - `real_agent_clean_drain_ratio`: a spot notice mid-job, real agent, hub sync 5 s
//!   (the real server's pace), ≥ 10 runs: the share whose job reached the hub as
//!   `stopped` with the agent never killed by the supervisor. Target 1.0.
//!
//! - `leader_aws_calls_per_idle_min`: every AWS call (SSM, Auto Scaling, CloudWatch) one
//!   leader (scaler role, default timings) makes in `--calls-mins` (5) minutes with no
//!   jobs, per minute, after its first term's set-up; each kind of call is printed too.
//!
//! - `job_credentials_refresh_ms_p50`: a forced refresh of the job credentials endpoint
//!   (`agent_supervisor::jobcreds`, in this process) → the new credentials served to a
//!   client holding the token: STS `AssumeRole` against moto plus one GET, `--runs` rounds.
//!
//! - `warm_start_to_registered_ms_p50` / `cold_boot_to_registered_ms_p50` (and their ratio):
//!   supervisor spawned → the hub's record of the agent's registration, on an instance taken
//!   from the warm pool (its work dir warmed by an earlier supervisor that the pool then
//!   powered off; IMDS now `InService`) and on a cold one, alternating, in the same run
//!   (`--runs`, fake agent, loopback). The supervisor's part only: no EC2 here.
//! - `queued_to_started_ms_p50_{cold,warm}`: a wave of `--wave-jobs` (3) jobs queued and
//!   the group raised to as many (as the leader would) → each job started at the hub,
//!   without and with a warm pool (Stopped) of that size, the launcher playing EC2's
//!   state-transition delays at their published figures (`Ec2Delays::published`): a model
//!   of EC2, not a measurement of it.
//!
//! - `idle_rss_kib_shipping_on` / `_off`: the daemon's RSS after `--rss-secs` idle with an
//!   agent running, shipping logs to CloudWatch Logs and not, side by side in the same run
//!   (no leader work in either). `log_bytes_per_instance_hour`: what the shipping instance
//!   put to CloudWatch Logs once booted, idle, at the default log level, as CloudWatch
//!   counts it (messages' UTF-8 bytes + 26 per event), scaled to an hour;
//!   `log_boot_bytes_per_instance`: what its boot shipped; `…_agent_debug`: the same with
//!   `AGENT_SUPERVISOR_LOG=info,agent=debug` (every agent line ships). The real agent when
//!   built (else the fake at the real agent's log cadence), hub sync 4–6 s as the server's.
//!
//! `--only boot,idle,rss,scale,failover,ssm,real,calls,jobcreds,warm,logs` picks sections; `--runs`, `--rss-secs`,
//! `--kills`, `--trials`, `--drains` change the counts; `--rss-no-leader` measures RSS
//! without leader work. The `real` section needs the real agent (`make real-agent`, or
//! `AGENT_FLEET_REAL_AGENT=PATH`); without it, it says so and is skipped.

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::{real_agent, real_agent_skip_line, AgentKind, Fleet, Instance};
use agent_fleet_tests::hub::{HubOptions, JobSpec, JobState};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let idx = ((v.len() - 1) as f64 * p).round() as usize;
    v[idx]
}

fn arg_usize(name: &str, default: usize) -> usize {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const USAGE: &str = "usage: fleet-bench [--only boot,idle,rss,scale,failover,ssm,real,calls,jobcreds,warm,logs] [--runs N] [--rss-secs N] [--kills N] [--trials N] [--drains N] [--calls-mins N] [--wave-jobs N] [--rss-no-leader]";

/// Refuses what it does not know (a mistyped flag must not start a 15-minute run).
fn check_args() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--only" | "--runs" | "--rss-secs" | "--kills" | "--trials" | "--drains"
            | "--calls-mins" | "--wave-jobs" => {
                if args.get(i + 1).is_none() {
                    return Err(format!("{} needs a value", args[i]));
                }
                i += 2;
            }
            "--rss-no-leader" => i += 1,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    if let Err(e) = check_args() {
        eprintln!("fleet-bench: {e}\n{USAGE}");
        std::process::exit(2);
    }
    let only: Vec<String> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    if want("ssm") {
        ssm_simulation()?;
    }
    let runs = arg_usize("--runs", 25);
    let rss_secs = arg_usize("--rss-secs", 60) as u64;
    let bed = Bed::start("bench").await?;
    bed.disarm();

    if want("boot") {
        boot_to_spawn(&bed, runs).await?;
    }
    if want("idle") {
        idle_exit(&bed, runs).await?;
    }
    if want("rss") {
        idle_rss(&bed, rss_secs).await?;
    }
    if want("scale") {
        scale_reaction(&bed, arg_usize("--trials", 30)).await?;
    }
    if want("failover") {
        failover(&bed, arg_usize("--kills", 10)).await?;
    }
    if want("jobcreds") {
        job_credentials_refresh(&bed, runs).await?;
    }
    if want("calls") {
        leader_calls(arg_usize("--calls-mins", 5).max(1) as u64).await?;
    }
    if want("warm") {
        warm_and_cold_starts(&bed, runs).await?;
        let jobs = arg_usize("--wave-jobs", 3).max(1);
        let cold = wave(&bed, false, jobs).await?;
        let warm = wave(&bed, true, jobs).await?;
        println!(
            "a wave of {jobs} jobs, queued → started, with EC2's published delays (a model, Ec2Delays::published: launch 17.8 s, start from stopped 16.4 s, boot 3.2 s): cold p50 {cold:.0} ms, warm p50 {warm:.0} ms, warm/cold {:.2}",
            warm / cold
        );
        println!("BENCH queued_to_started_ms_p50_cold {cold:.0} ms");
        println!("BENCH queued_to_started_ms_p50_warm {warm:.0} ms");
    }
    if want("logs") {
        log_shipping(rss_secs).await?;
    }
    if want("real") {
        match real_agent()? {
            Some(path) => {
                let real = AgentKind::Real(path);
                let runs = runs.clamp(10, 25);
                boot_to_registered(&bed, &AgentKind::Fake, runs).await?;
                boot_to_registered(&bed, &real, runs).await?;
                clean_drains(&real, arg_usize("--drains", 10)).await?;
            }
            None => println!("{}", real_agent_skip_line("fleet-bench real")),
        }
    }
    Ok(())
}

/// Supervisor spawned → the hub recorded the agent's registration, `runs` times.
async fn boot_to_registered(bed: &Bed, agent: &AgentKind, runs: usize) -> anyhow::Result<()> {
    let group = format!("bench-reg-{}", agent.label());
    bed.moto.create_group(&group, 0, 1, 1).await?;
    let param = format!("/agent-fleet/bench/reg-{}", agent.label());
    bed.moto
        .put_parameter(
            &param,
            &serde_json::to_string(&bed.runtime_config(&group))?,
            false,
        )
        .await?;
    let id = bed.moto.group(&group).await?.in_service()[0].clone();
    let mut took = Vec::new();
    for run in 0..runs + 1 {
        let mut o = bed.instance(&id, &group);
        o.user_data = Some(agent_fleet_tests::fleet::user_data("bench", &param));
        o.root = bed.root.join(format!("reg-{}-{run}", agent.label()));
        o.agent = agent.clone();
        let ms = start_to_registered(bed, o).await?;
        if run > 0 {
            took.push(ms);
        }
    }
    let p50 = percentile(&mut took, 0.5);
    let p95 = percentile(&mut took, 0.95);
    println!(
        "supervisor start → registered ({} agent) over {} runs: p50 {p50:.1} ms, p95 {p95:.1} ms",
        agent.label(),
        took.len()
    );
    println!(
        "BENCH {}_agent_boot_to_registered_ms_p50 {p50:.1} ms",
        agent.label()
    );
    Ok(())
}

/// The launch hook a pooled group's runtime config names.
fn warm_config(bed: &Bed, group: &str, pooled: bool) -> agent_supervisor::config::RuntimeConfig {
    agent_supervisor::config::RuntimeConfig {
        launch_hook: pooled.then(|| agent_supervisor::config::LifecycleHookConfig {
            name: "agent-fleet-warm".into(),
            heartbeat_timeout_secs: 120,
        }),
        // The bench raises the group itself, as the leader would.
        agents_lead: false,
        ..bed.runtime_config(group)
    }
}

/// The bed's machine has `docker` but no daemon: warming does not wait for one.
const WARM_ARGS: [&str; 2] = ["--warm-docker-wait-secs", "0"];

/// One supervisor on `root`/`id` until its agent registered (ms since its spawn); it is
/// killed afterwards.
async fn start_to_registered(
    bed: &Bed,
    o: agent_fleet_tests::fleet::InstanceOptions,
) -> anyhow::Result<f64> {
    let id = o.instance_id.clone();
    let before = bed.hub.agents().len();
    let inst = Instance::start(o, None).await?;
    let registered_at = eventually("registered", Duration::from_secs(30), || async {
        bed.hub
            .agents()
            .get(before..)
            .and_then(|new| new.iter().find(|a| a.name.starts_with(&id)))
            .map(|a| a.registered_at)
    })
    .await?;
    inst.kill_all();
    let _ = inst.wait_exit(Duration::from_secs(5)).await;
    Ok(registered_at
        .saturating_duration_since(inst.started)
        .as_secs_f64()
        * 1e3)
}

/// Warm start vs cold boot to registered, alternating, `runs` each (after one of each
/// unmeasured).
async fn warm_and_cold_starts(bed: &Bed, runs: usize) -> anyhow::Result<()> {
    let group = "bench-warm-start";
    bed.moto.create_group(group, 0, 1, 1).await?;
    let param = "/agent-fleet/bench/warm-start";
    bed.moto
        .put_parameter(
            param,
            &serde_json::to_string(&warm_config(bed, group, true))?,
            false,
        )
        .await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let options = |root: std::path::PathBuf| {
        let mut o = bed.instance(&id, group);
        o.user_data = Some(agent_fleet_tests::fleet::user_data("bench", param));
        o.root = root;
        o.args = WARM_ARGS.iter().map(|a| a.to_string()).collect();
        o
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for run in 0..runs + 1 {
        let c = start_to_registered(bed, options(bed.root.join(format!("cold-{run}")))).await?;
        // In the pool: warmed, then powered off (SIGKILL, the disk kept).
        let root = bed.root.join(format!("warm-{run}"));
        let mut pooled = options(root.clone());
        pooled.target_lifecycle_state = Some("Warmed:Stopped".into());
        let inst = Instance::start(pooled, None).await?;
        eventually("warmed", Duration::from_secs(30), || async {
            inst.output().contains("warmed").then_some(())
        })
        .await?;
        inst.kill_all();
        let _ = inst.wait_exit(Duration::from_secs(5)).await;
        let w = start_to_registered(bed, options(root)).await?;
        if run > 0 {
            cold.push(c);
            warm.push(w);
        }
    }
    let cold = percentile(&mut cold, 0.5);
    let warm = percentile(&mut warm, 0.5);
    println!(
        "supervisor start → registered over {runs} runs each: warm (taken from the pool) p50 {warm:.1} ms, cold p50 {cold:.1} ms, warm/cold {:.2}",
        warm / cold
    );
    println!("BENCH warm_start_to_registered_ms_p50 {warm:.1} ms");
    println!("BENCH cold_boot_to_registered_ms_p50 {cold:.1} ms");
    println!("BENCH warm_to_cold_registered_ratio {:.2}", warm / cold);
    Ok(())
}

/// A wave of `jobs` jobs with the launcher playing EC2's published delays, with or without
/// a warm pool of that size: the p50 of queued → started, in ms.
async fn wave(bed: &Bed, pooled: bool, jobs: usize) -> anyhow::Result<f64> {
    let kind = if pooled { "warm" } else { "cold" };
    let group = format!("bench-wave-{kind}");
    let size = i32::try_from(jobs)?;
    bed.moto.create_group(&group, 0, size, 0).await?;
    let param = format!("/agent-fleet/bench/wave-{kind}");
    bed.moto
        .put_parameter(
            &param,
            &serde_json::to_string(&warm_config(bed, &group, pooled))?,
            false,
        )
        .await?;
    if pooled {
        bed.moto
            .put_launch_hook(&group, "agent-fleet-warm", 120, "CONTINUE")
            .await?;
        bed.moto
            .put_warm_pool(&group, size, "Stopped", Some(size))
            .await?;
    }
    let mut opts = bed.fleet_options(&[&group], &WARM_ARGS, &[]);
    opts.user_data = agent_fleet_tests::fleet::user_data("bench", &param);
    opts.root = bed.root.join(format!("wave-{kind}"));
    opts.ec2 = agent_fleet_tests::fleet::Ec2Delays::published();
    let fleet = Fleet::start(bed.moto.clone(), opts);
    let result = async {
        if pooled {
            eventually(
                "the pool warmed and stopped",
                Duration::from_secs(180),
                || async {
                    let ids = bed
                        .moto
                        .warm_pool(&group)
                        .await
                        .ok()?
                        .in_state("Warmed:Stopped");
                    (ids.len() >= jobs
                        && ids.iter().all(|i| {
                            fleet.pool_phase(i)
                                == Some(agent_fleet_tests::fleet::PoolPhase::Stopped)
                        }))
                    .then_some(())
                },
            )
            .await?;
        }
        let ids: Vec<String> = (0..jobs)
            .map(|n| {
                bed.hub.enqueue_job(JobSpec {
                    commands: vec![format!("echo wave-{kind}-{n}")],
                    env: vec![],
                })
            })
            .collect();
        bed.moto.set_desired(&group, size).await?;
        let mut took = eventually("every job started", Duration::from_secs(180), || async {
            ids.iter()
                .map(|j| {
                    let j = bed.hub.job(j)?;
                    Some(
                        j.started_at?
                            .saturating_duration_since(j.queued_at)
                            .as_secs_f64()
                            * 1e3,
                    )
                })
                .collect::<Option<Vec<f64>>>()
        })
        .await?;
        Ok::<_, anyhow::Error>(percentile(&mut took, 0.5))
    }
    .await;
    fleet.shutdown().await;
    result
}

/// Spot notices mid-job with the hub syncing every 5 s: how many drains ended with the
/// job's `stopped` result at the hub and the agent never killed.
async fn clean_drains(agent: &AgentKind, runs: usize) -> anyhow::Result<()> {
    let mut clean = 0usize;
    let mut took = Vec::new();
    for run in 0..runs {
        let bed = Bed::start_with(
            &format!("drain{run}"),
            HubOptions {
                next_sync_after_ms: 5000,
                ..HubOptions::default()
            },
        )
        .await?;
        bed.disarm();
        let group = format!("drain{run}-agents");
        bed.moto.create_group(&group, 0, 1, 1).await?;
        let mut cfg = bed.runtime_config(&group);
        cfg.interruption_grace_secs = 2;
        bed.put_config(&cfg).await?;
        let mut o = bed.fleet_options(&[&group], &[], &[]);
        o.agent = agent.clone();
        o.group_life_cycle.insert(group.clone(), "spot".into());
        let fleet = Fleet::start(Arc::clone(&bed.moto), o);
        let job = bed.hub.enqueue_job(JobSpec {
            commands: vec!["echo job-is-running; sleep 600".into()],
            env: vec![],
        });
        eventually("the job runs", Duration::from_secs(60), || async {
            bed.hub
                .job_output(&job)
                .iter()
                .any(|l| l.contains("job-is-running"))
                .then_some(())
        })
        .await?;
        let id = fleet.launched().first().cloned().unwrap_or_default();
        let t0 = Instant::now();
        fleet.with_instance(&id, |i| i.imds.set_spot_interruption("terminate", 120));
        let output = || fleet.with_instance(&id, |i| i.output()).unwrap_or_default();
        let ended = eventually("the drain ended", Duration::from_secs(60), || async {
            output().contains("terminating this instance").then_some(())
        })
        .await;
        let stopped = bed.hub.job(&job).is_some_and(|j| {
            j.state == JobState::Finished && j.result.as_deref() == Some("stopped")
        });
        let killed = output().contains("killing its process group");
        let ok = ended.is_ok() && stopped && !killed;
        clean += usize::from(ok);
        took.push(t0.elapsed().as_secs_f64() * 1e3);
        println!(
            "drain {}: {} ({:.1} s from the notice; job stopped at the hub: {stopped}; agent killed: {killed})",
            run + 1,
            if ok { "clean" } else { "NOT clean" },
            t0.elapsed().as_secs_f64()
        );
        fleet.shutdown().await;
    }
    let ratio = clean as f64 / runs.max(1) as f64;
    let p50 = percentile(&mut took, 0.5);
    println!("spot notice → instance ending, p50 {p50:.0} ms over {runs} drains");
    println!(
        "BENCH {}_agent_clean_drain_ratio {ratio:.2} ratio",
        agent.label()
    );
    Ok(())
}

async fn boot_to_spawn(bed: &Bed, runs: usize) -> anyhow::Result<()> {
    let group = "bench-boot";
    bed.moto.create_group(group, 0, 1, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let mut boot = Vec::new();
    for run in 0..runs + 1 {
        let mut o = bed.instance(&id, group);
        o.root = bed.root.join(format!("boot-{run}"));
        o.agent_user = Some("nobody".into());
        o.imds_firewall = true;
        let inst = Instance::start(o, None).await?;
        let ev = inst
            .wait_for_event("agent start", Duration::from_secs(20), |e| {
                e.iter().any(|x| x["event"] == "start")
            })
            .await?;
        let agent_ns = ev
            .iter()
            .find(|x| x["event"] == "start")
            .and_then(|x| x["mono_ns"].as_u64())
            .unwrap_or(0);
        let ms = agent_ns.saturating_sub(inst.spawned_mono_ns) as f64 / 1e6;
        if run > 0 {
            boot.push(ms); // run 0 warms the page cache and the emulator's paths
        }
        inst.kill_all();
        let _ = inst.wait_exit(Duration::from_secs(5)).await;
    }
    let firewall_loaded = std::process::Command::new("nft")
        .args(["delete", "table", "inet", "agent_fleet"])
        .status()
        .is_ok_and(|s| s.success());
    println!(
        "boot path: agent as nobody, IMDS firewall {}, agent cgroup {}",
        if firewall_loaded {
            "loaded (table deleted now)"
        } else {
            "NOT loaded"
        },
        if agent_fleet_tests::fleet::cgroup_root().is_some() {
            "made"
        } else {
            "unavailable"
        }
    );
    let p50 = percentile(&mut boot, 0.5);
    let p95 = percentile(&mut boot, 0.95);
    println!(
        "boot → agent spawned over {} runs: p50 {p50:.1} ms, p95 {p95:.1} ms, max {:.1} ms",
        boot.len(),
        boot.last().copied().unwrap_or(f64::NAN)
    );
    println!("BENCH boot_to_spawn_ms_p50 {p50:.1} ms");
    Ok(())
}

async fn idle_exit(bed: &Bed, runs: usize) -> anyhow::Result<()> {
    // idle_exit_to_terminate: min 1 = desired 1, so each idle exit is refused at min
    // size and the agent restarts in place: one trial per idle cycle.
    let group = "bench-idle";
    bed.moto.create_group(group, 1, 2, 1).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.idle_timeout_secs = 1;
    let idle_param = "/agent-fleet/bench/idle-config";
    bed.moto
        .put_parameter(idle_param, &serde_json::to_string(&cfg)?, false)
        .await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let mut o = bed.instance(&id, group);
    o.user_data = Some(agent_fleet_tests::fleet::user_data("bench", idle_param));
    o.root = bed.root.join("idle");
    let inst = Instance::start(o, None).await?;
    let cycles = runs;
    let exits = inst
        .wait_for_event(
            "idle cycles",
            Duration::from_secs(30 + 3 * cycles as u64),
            |e| e.iter().filter(|x| x["event"] == "exit").count() >= cycles,
        )
        .await?;
    let calls = bed.moto.calls(0).await?;
    let terms: Vec<u64> = calls
        .iter()
        .filter(|c| {
            c.is("autoscaling", "TerminateInstanceInAutoScalingGroup")
                && c.param("InstanceId") == Some(id.as_str())
        })
        .map(|c| c.t_ns)
        .collect();
    let mut idle: Vec<f64> = exits
        .iter()
        .filter(|x| x["event"] == "exit")
        .filter_map(|x| x["mono_ns"].as_u64())
        .filter_map(|exit_ns| {
            terms
                .iter()
                .find(|t| **t >= exit_ns)
                .map(|t| (t - exit_ns) as f64 / 1e6)
        })
        .collect();
    let n = idle.len();
    let p50 = percentile(&mut idle, 0.5);
    let p95 = percentile(&mut idle, 0.95);
    println!(
        "agent exit (IDLE) → terminate request over {n} cycles: p50 {p50:.1} ms, p95 {p95:.1} ms"
    );
    println!("BENCH idle_exit_to_terminate_ms_p50 {p50:.1} ms");
    inst.kill_all();
    Ok(())
}

async fn idle_rss(bed: &Bed, rss_secs: u64) -> anyhow::Result<()> {
    // idle_rss: an agent that never idles out, the daemon left alone.
    let group = "bench-rss";
    bed.moto.create_group(group, 0, 1, 1).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.idle_timeout_secs = 0;
    // `--rss-no-leader`: dynamic scaling off, so no election or scaler runs (to see
    // what leader work costs in memory).
    cfg.scaler.enabled = !std::env::args().any(|a| a == "--rss-no-leader");
    let rss_param = "/agent-fleet/bench/rss-config";
    bed.moto
        .put_parameter(rss_param, &serde_json::to_string(&cfg)?, false)
        .await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let mut o = bed.instance(&id, group);
    o.user_data = Some(agent_fleet_tests::fleet::user_data("bench", rss_param));
    o.root = bed.root.join("rss");
    let inst = Instance::start(o, None).await?;
    eventually("agent registered", Duration::from_secs(20), || async {
        (!bed.hub.live_agents().is_empty()).then_some(())
    })
    .await?;
    println!("waiting {rss_secs}s with the agent idle …");
    tokio::time::sleep(Duration::from_secs(rss_secs)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", inst.pid))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    println!(
        "daemon RSS after {rss_secs}s idle: {rss} KiB ({:.1} MiB)",
        rss as f64 / 1024.0
    );
    println!("BENCH idle_rss_kib {rss} KiB");
    // Where it goes: anonymous memory (heap, stacks) versus file-backed pages (the
    // binary's text and data, shared libraries).
    if let Ok(rollup) = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", inst.pid)) {
        let field = |name: &str| {
            rollup
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("?")
                .to_string()
        };
        println!(
            "  smaps_rollup: Rss {} KiB = Anonymous {} KiB + file-backed (Pss_File {} KiB, Shared_Clean {} KiB, Private_Clean {} KiB)",
            field("Rss:"),
            field("Anonymous:"),
            field("Pss_File:"),
            field("Shared_Clean:"),
            field("Private_Clean:")
        );
    }
    if let Ok(maps) = std::fs::read_to_string(format!("/proc/{}/smaps", inst.pid)) {
        // RSS per mapping name (the binary, libc, [heap], anonymous), largest first.
        let mut by_name = std::collections::BTreeMap::<String, u64>::new();
        let mut current = String::new();
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            match f.next() {
                Some(k)
                    if k.contains('-')
                        && k.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) =>
                {
                    current = f.nth(4).unwrap_or("[anon]").to_string();
                }
                Some("Rss:") => {
                    *by_name.entry(current.clone()).or_default() +=
                        f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                }
                _ => {}
            }
        }
        let mut rows: Vec<_> = by_name.into_iter().filter(|(_, kib)| *kib >= 100).collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        for (name, kib) in rows {
            println!("  {kib:>6} KiB  {name}");
        }
    }
    inst.kill_all();
    Ok(())
}

/// A process's resident set, KiB.
fn rss_kib(pid: i32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0))
}

/// RSS with and without log shipping, side by side, and the bytes shipped per hour.
async fn log_shipping(rss_secs: u64) -> anyhow::Result<()> {
    let bed = Bed::start_with("benchlogs", HubOptions::real_sync()).await?;
    bed.disarm();
    let log_group = "/agent-fleet/benchlogs";
    bed.moto.create_log_group(log_group, 30).await?;
    let agent = match real_agent()? {
        Some(p) => AgentKind::Real(p),
        None => {
            println!(
                "{}",
                real_agent_skip_line("fleet-bench logs (using the fake agent)")
            );
            AgentKind::Fake
        }
    };
    // (name, ships, AGENT_SUPERVISOR_LOG)
    let kinds = [
        ("on", true, None),
        ("off", false, None),
        ("debug", true, Some("info,agent=debug")),
    ];
    let mut instances = vec![];
    for (name, ships, filter) in kinds {
        let group = format!("bench-logs-{name}");
        bed.moto.create_group(&group, 0, 1, 1).await?;
        let mut cfg = bed.runtime_config(&group);
        cfg.idle_timeout_secs = 0;
        cfg.scaler.enabled = false;
        cfg.log_group = ships.then(|| log_group.to_string());
        let param = format!("/agent-fleet/benchlogs/config-{name}");
        bed.moto
            .put_parameter(&param, &serde_json::to_string(&cfg)?, false)
            .await?;
        let id = bed.moto.group(&group).await?.in_service()[0].clone();
        let mut o = bed.instance(&id, &group);
        o.user_data = Some(agent_fleet_tests::fleet::user_data("benchlogs", &param));
        o.root = bed.root.join(name);
        o.agent = agent.clone();
        o.agent_env = vec![("FAKE_AGENT_LOG_CADENCE".into(), "real".into())];
        o.env = filter
            .map(|f| vec![("AGENT_SUPERVISOR_LOG".to_string(), f.to_string())])
            .unwrap_or_default();
        instances.push((name, id, Instance::start(o, None).await?));
    }
    eventually(
        "three agents registered",
        Duration::from_secs(60),
        || async { (bed.hub.live_agents().len() >= 3).then_some(()) },
    )
    .await?;
    let wall_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    // The boot's records go out within a shipping interval (5 s); the window starts after.
    let from = wall_ms() + 10_000;
    println!("waiting {rss_secs}s with the agents idle …");
    tokio::time::sleep(Duration::from_secs(rss_secs.max(30))).await;
    let mut rss = std::collections::BTreeMap::new();
    for (name, _, inst) in &instances {
        rss.insert(*name, rss_kib(inst.pid)?);
    }
    // Events logged until 6 s ago have surely been put (one interval and some).
    let to = wall_ms() - 6_000;
    let bodies = bed.moto.bodies(0).await?;
    for (name, id, _) in &instances {
        let (mut boot, mut window, mut window_events) = (0usize, 0usize, 0usize);
        for b in &bodies {
            let doc: serde_json::Value = serde_json::from_str(&b.body).unwrap_or_default();
            if doc["logStreamName"] != id.as_str() {
                continue;
            }
            for e in doc["logEvents"].as_array().into_iter().flatten() {
                let t = e["timestamp"].as_i64().unwrap_or_default();
                let bytes = e["message"].as_str().map_or(0, str::len) + 26;
                if t < from {
                    boot += bytes;
                } else if t <= to {
                    window += bytes;
                    window_events += 1;
                }
            }
        }
        let secs = ((to - from) as f64 / 1000.0).max(1.0);
        let per_hour = window as f64 * 3600.0 / secs;
        let events_per_hour = window_events as f64 * 3600.0 / secs;
        match *name {
            "on" => {
                println!("shipping at the default level (INFO): boot {boot} B; then {window} B in {window_events} events over {secs:.0} s idle ({events_per_hour:.0} events/h)");
                println!("BENCH log_boot_bytes_per_instance {boot} bytes");
                println!("BENCH log_bytes_per_instance_hour {per_hour:.0} bytes");
            }
            "debug" => {
                println!("shipping every agent line (info,agent=debug): boot {boot} B; then {window} B in {window_events} events over {secs:.0} s idle ({events_per_hour:.0} events/h)");
                println!("BENCH log_bytes_per_instance_hour_agent_debug {per_hour:.0} bytes");
            }
            _ => {}
        }
    }
    println!("BENCH idle_rss_kib_shipping_on {} KiB", rss["on"]);
    println!("BENCH idle_rss_kib_shipping_off {} KiB", rss["off"]);
    println!(
        "  (and with every agent line shipping: {} KiB; agent {})",
        rss["debug"],
        agent.label()
    );
    for (_, _, inst) in &instances {
        inst.kill_all();
    }
    Ok(())
}

fn num(line: &str, key: &str) -> Option<u64> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..]
        .trim_start_matches('"')
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn scaler_instance(
    bed: &Bed,
    group: &str,
    id: &str,
    root: &str,
) -> agent_fleet_tests::fleet::InstanceOptions {
    let mut o = bed.instance(id, group);
    o.args = vec!["--role".into(), "scaler".into()];
    o.root = bed.root.join(root);
    o
}

async fn scale_reaction(bed: &Bed, trials: usize) -> anyhow::Result<()> {
    let group = "bench-scale";
    bed.moto
        .create_group(group, 0, (trials + 5) as i32, 0)
        .await?;
    bed.put_config(&bed.runtime_config(group)).await?; // default poll 5 s, default election
    let inst = Instance::start(
        scaler_instance(bed, group, "i-0000000000bench01", "scale"),
        None,
    )
    .await?;
    inst.wait_for_line(" leading term=", Duration::from_secs(60))
        .await?;
    println!("scale reaction: leader up; {trials} trials of one job each (poll interval 5 s)");
    let mut ms = Vec::new();
    for trial in 1..=trials {
        // Uniform over the poll period, so arrivals are not in step with the polls.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..5000))).await;
        let t = agent_fleet_tests::moto::monotonic_ns();
        bed.hub.enqueue_job(agent_fleet_tests::hub::JobSpec {
            commands: vec!["true".into()],
            env: vec![],
        });
        let seen = eventually("SetDesiredCapacity", Duration::from_secs(20), || async {
            let calls = bed.moto.calls(0).await.ok()?;
            calls.into_iter().find(|c| {
                c.is("autoscaling", "SetDesiredCapacity")
                    && c.param("AutoScalingGroupName") == Some(group)
                    && c.param("DesiredCapacity") == Some(trial.to_string().as_str())
            })
        })
        .await?;
        ms.push(seen.t_ns.saturating_sub(t) as f64 / 1e6);
    }
    let p50 = percentile(&mut ms, 0.5);
    let p95 = percentile(&mut ms, 0.95);
    println!("job enqueued → SetDesiredCapacity over {trials} trials: p50 {p50:.0} ms, p95 {p95:.0} ms (target p95 ≤ poll + 1 s = 6000 ms)");
    println!("BENCH scale_reaction_ms_p50 {p50:.0} ms");
    println!("BENCH scale_reaction_ms_p95 {p95:.0} ms");
    inst.kill_all();
    Ok(())
}

async fn failover(bed: &Bed, kills: usize) -> anyhow::Result<()> {
    let group = "bench-failover";
    bed.moto.create_group(group, 0, 5, 0).await?;
    let param = "/agent-fleet/bench/failover-config";
    bed.moto
        .put_parameter(
            param,
            &serde_json::to_string(&bed.runtime_config(group))?,
            false,
        )
        .await?;
    let mut spawned = 0usize;
    let mut start = |bed: &Bed| {
        spawned += 1;
        let mut o = scaler_instance(
            bed,
            group,
            &format!("i-00000000fail{spawned:04}"),
            &format!("failover-{spawned}"),
        );
        o.user_data = Some(agent_fleet_tests::fleet::user_data("bench", param));
        o
    };
    let mut cands = Vec::new();
    for _ in 0..3 {
        cands.push(Instance::start(start(bed), None).await?);
    }
    let actions = |i: &Instance| {
        i.output()
            .lines()
            .filter(|l| l.contains("leader action"))
            .count()
    };
    let leading = |i: &Instance| {
        i.output()
            .lines()
            .rfind(|l| {
                l.contains(" leading term=")
                    || l.contains("stepped down")
                    || l.contains(" following term=")
            })
            .is_some_and(|l| l.contains(" leading term="))
    };
    let mut ms = Vec::new();
    for k in 1..=kills {
        let leader = eventually("a leader acting", Duration::from_secs(120), || async {
            cands.iter().position(|c| leading(c) && actions(c) > 0)
        })
        .await?;
        let term = cands[leader]
            .output()
            .lines()
            .rfind(|l| l.contains(" leading term="))
            .and_then(|l| num(l, "term"))
            .unwrap_or(0);
        let before: Vec<usize> = cands.iter().map(actions).collect();
        cands[leader].kill_all();
        let killed = std::time::Instant::now();
        let next = eventually("a new leader acting", Duration::from_secs(120), || async {
            (0..cands.len()).find(|&i| i != leader && actions(&cands[i]) > before[i])
        })
        .await?;
        let took = killed.elapsed();
        ms.push(took.as_secs_f64() * 1000.0);
        println!(
            "kill {k}: term {term} → a new leader acted after {:.1} s",
            took.as_secs_f64()
        );
        let _ = next;
        let dead = cands.remove(leader);
        drop(dead);
        cands.push(Instance::start(start(bed), None).await?);
    }
    let max = ms.iter().copied().fold(0.0, f64::max);
    let p50 = percentile(&mut ms, 0.5);
    println!(
        "failover over {kills} SIGKILLs: p50 {:.1} s, max {:.1} s (target max ≤ 40 s)",
        p50 / 1000.0,
        max / 1000.0
    );
    println!("BENCH failover_ms_p50 {p50:.0} ms");
    println!("BENCH failover_ms_max {max:.0} ms");
    for c in &cands {
        c.kill_all();
    }
    Ok(())
}

/// The election of 10, 100 and 1000 candidates on paused time (in-memory SSM).
fn ssm_simulation() -> anyhow::Result<()> {
    let cfg = agent_supervisor::config::ElectionSettings {
        lease: Duration::from_secs(20),
        renew_deadline: Duration::from_secs(12),
        retry: Duration::from_secs(4),
        prefix: "/agent-fleet/sim/leader".into(),
    };
    println!(
        "election simulation (paused time, in-memory store with SSM semantics, default timings):"
    );
    println!(
        "{:>10} {:>14} {:>12}",
        "candidates", "SSM calls/s", "failover"
    );
    for n in [10usize, 100, 1000] {
        let cfg = cfg.clone();
        let report = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .map(|rt| {
                    rt.block_on(agent_supervisor::election::simulate(
                        n,
                        Duration::from_secs(600),
                        cfg,
                    ))
                })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("simulation thread panicked"))??;
        println!(
            "{:>10} {:>14.3} {:>10.1} s",
            n,
            report.ssm_calls_per_sec,
            report.failover.as_secs_f64()
        );
        println!(
            "BENCH ssm_calls_per_s_{n} {:.3} calls/s",
            report.ssm_calls_per_sec
        );
    }
    Ok(())
}

/// A forced refresh of the job credentials endpoint → the new credentials served, `rounds`
/// times after one warm-up round: the endpoint runs in this process, on loopback, and
/// assumes a role made in the bed's moto.
async fn job_credentials_refresh(bed: &Bed, rounds: usize) -> anyhow::Result<()> {
    use agent_supervisor::aws::sts::QuerySts;
    use agent_supervisor::jobcreds::{bind_loopback, JobCredentials, JobRole};
    let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:root"},"Action":"sts:AssumeRole"}]}"#;
    bed.moto
        .query(
            "iam",
            "CreateRole",
            &[
                ("RoleName", "bench-job"),
                ("AssumeRolePolicyDocument", trust),
            ],
        )
        .await?;
    let sts = QuerySts::new(&bed.moto.sdk_config().await)?;
    let role = JobRole::new(sts, "arn:aws:iam::123456789012:role/bench-job", "i-0bench");
    let endpoint = JobCredentials::start(bind_loopback().await?, role)?;
    let env = endpoint.issue().map_err(anyhow::Error::msg)?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let served = || async {
        let answer = http
            .get(endpoint.uri())
            .header("Authorization", env.token.as_str())
            .send()
            .await
            .ok()?;
        let body: serde_json::Value = answer.json().await.ok()?;
        body["AccessKeyId"].as_str().map(str::to_string)
    };
    let mut key = eventually(
        "the first credentials served",
        Duration::from_secs(20),
        served,
    )
    .await?;
    let mut ms = Vec::new();
    for round in 0..rounds + 1 {
        let t0 = Instant::now();
        endpoint.refresh_now().await.map_err(anyhow::Error::msg)?;
        let new = eventually(
            "the new credentials served",
            Duration::from_secs(20),
            || async { served().await.filter(|k| *k != key) },
        )
        .await?;
        if round > 0 {
            ms.push(t0.elapsed().as_secs_f64() * 1e3); // round 0 warms moto's STS paths
        }
        key = new;
    }
    let p50 = percentile(&mut ms, 0.5);
    println!(
        "job credentials: forced AssumeRole → served over {} rounds: p50 {p50:.1} ms, max {:.1} ms",
        ms.len(),
        ms.last().copied().unwrap_or(f64::NAN)
    );
    println!("BENCH job_credentials_refresh_ms_p50 {p50:.1} ms");
    Ok(())
}

/// The AWS calls of one idle leader, per minute, by kind.
async fn leader_calls(mins: u64) -> anyhow::Result<()> {
    let bed = Bed::start("calls").await?;
    bed.disarm();
    let group = "calls-agents";
    bed.moto.create_group(group, 0, 5, 0).await?;
    bed.put_config(&bed.runtime_config(group)).await?; // default poll 5 s, default election
    let inst = Instance::start(
        scaler_instance(&bed, group, "i-0000000000calls01", "calls"),
        None,
    )
    .await?;
    inst.wait_for_line(" leading term=", Duration::from_secs(60))
        .await?;
    // Past the term's set-up (AZRebalance suspended, first metrics).
    tokio::time::sleep(Duration::from_secs(15)).await;
    let since = bed.moto.last_seq().await?;
    println!("leader AWS calls: counting {mins} min with no jobs …");
    tokio::time::sleep(Duration::from_secs(60 * mins)).await;
    let calls = bed.moto.calls(since).await?;
    let mut kinds = std::collections::BTreeMap::<(String, String), usize>::new();
    for c in &calls {
        *kinds
            .entry((c.service.clone(), c.action.clone()))
            .or_default() += 1;
    }
    for ((service, action), n) in &kinds {
        println!(
            "  {service:<12} {action:<34} {:>6.1} / min",
            *n as f64 / mins as f64
        );
    }
    let per_min = calls.len() as f64 / mins as f64;
    println!("BENCH leader_aws_calls_per_idle_min {per_min:.1} calls");
    inst.kill_all();
    Ok(())
}
