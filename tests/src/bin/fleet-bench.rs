//! `make bench`: the supervisor's benchmarks, against moto and the fakes on loopback.
//! Prints one `BENCH <name> <value> <unit>` line per figure.
//!
//! - `boot_to_spawn_ms_p50`: daemon spawned → agent process started (the fake agent's
//!   first act is to note CLOCK_MONOTONIC), ≥ 20 runs after moto's warm-up.
//! - `idle_exit_to_terminate_ms_p50`: the agent wrapper's last act before exiting
//!   after an IDLE shutdown → the
//!   TerminateInstanceInAutoScalingGroup request arriving at the emulator (same clock).
//! - `idle_rss_kib`: the daemon's RSS after 60 s idle with an agent running.

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::Instance;
use std::time::Duration;

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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let runs = arg_usize("--runs", 25);
    let rss_secs = arg_usize("--rss-secs", 60) as u64;
    let bed = Bed::start("bench").await?;

    // boot_to_spawn
    let group = "bench-boot";
    bed.moto.create_group(group, 0, 1, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let mut boot = Vec::new();
    for run in 0..runs + 1 {
        let mut o = bed.instance(&id, group);
        o.root = bed.root.join(format!("boot-{run}"));
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
    let p50 = percentile(&mut boot, 0.5);
    let p95 = percentile(&mut boot, 0.95);
    println!(
        "boot → agent spawned over {} runs: p50 {p50:.1} ms, p95 {p95:.1} ms, max {:.1} ms",
        boot.len(),
        boot.last().copied().unwrap_or(f64::NAN)
    );
    println!("BENCH boot_to_spawn_ms_p50 {p50:.1} ms");

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
    drop(inst);

    // idle_rss: an agent that never idles out, the daemon left alone.
    let group = "bench-rss";
    bed.moto.create_group(group, 0, 1, 1).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.idle_timeout_secs = 0;
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
    inst.kill_all();
    Ok(())
}
