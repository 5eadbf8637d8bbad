//! `make demo`: a whole agent fleet on this machine. Emulated AWS (moto), a fake
//! Semaphore, and one real `agent-supervisor` per instance: an agent group that starts
//! at 0 and a one-instance scaler-role group. The scaler-role instance wins the lease in
//! SSM, sees the wave of jobs, raises desired capacity; agents launch, run one job each,
//! and the group scales back in to 0 as they idle out. The timeline shows every part.

use agent_fleet_tests::bed::Bed;
use agent_fleet_tests::fleet::{real_agent, AgentKind, FleetEvent};
use agent_fleet_tests::hub::{HubEvent, JobSpec};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const GROUP: &str = "demo-agents";
const SCALER_GROUP: &str = "demo-scaler";
const JOBS: usize = 8;

fn short(id: &str) -> String {
    // "i-0123456789abcdef0__a1b2c3" -> "i-…cdef0"
    let inst = id.split("__").next().unwrap_or(id);
    match inst.len() {
        n if n > 8 => format!("i-…{}", &inst[n - 5..]),
        _ => inst.to_string(),
    }
}

/// The value of `key=` in a supervisor log line (quoted or bare).
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    if let Some(q) = rest.strip_prefix('"') {
        q.split('"').next().map(str::to_string)
    } else {
        rest.split_whitespace().next().map(str::to_string)
    }
}

const USAGE: &str = "usage: fleet-demo [--agent fake|real]\n  \
    --agent real  run the real Semaphore agent (built by `make real-agent`, or AGENT_FLEET_REAL_AGENT=PATH)";

/// The agent from the command line (`--agent fake|real`; default fake).
fn agent_from_args() -> anyhow::Result<AgentKind> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] | ["--agent", "fake"] => Ok(AgentKind::Fake),
        ["--agent", "real"] => match real_agent()? {
            Some(p) => Ok(AgentKind::Real(p)),
            None => anyhow::bail!(
                "no real agent: ../shared/real-agent is not beside this clone; set AGENT_FLEET_REAL_AGENT=PATH to a built Semaphore agent"
            ),
        },
        ["--help"] | ["-h"] => {
            println!("{USAGE}");
            std::process::exit(0)
        }
        _ => anyhow::bail!("unknown arguments {args:?}\n{USAGE}"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let agent = agent_from_args()?;
    println!(
        "agent-fleet demo: a {JOBS}-job wave, scaled up from zero and back ({} agent)",
        agent.label()
    );
    println!("(emulated AWS and Semaphore on 127.0.0.1; every instance runs the real agent-supervisor)\n");
    let t0 = Instant::now();
    print!("starting the AWS emulator (moto) and the fake Semaphore hub … ");
    let bed = Bed::start("demo").await?;
    bed.disarm();
    println!("ready in {:.1}s", t0.elapsed().as_secs_f64());
    bed.moto.create_group(GROUP, 0, 5, 0).await?;
    bed.moto.create_group(SCALER_GROUP, 1, 1, 1).await?;
    let mut cfg = bed.runtime_config(GROUP);
    cfg.idle_timeout_secs = 6;
    cfg.scaler.poll_interval_ms = 2000;
    // Quicker than the defaults (20 s / 12 s / 4 s) so the demo's first scale-up is soon.
    cfg.election.lease_ms = 6000;
    cfg.election.renew_deadline_ms = 4000;
    cfg.election.retry_ms = 1000;
    bed.put_config(&cfg).await?;
    println!(
        "agent group {GROUP}: min 0, max 5, desired 0; one job per instance; idle timeout {}s",
        cfg.idle_timeout_secs
    );
    println!(
        "scaler group {SCALER_GROUP}: 1 instance in the scaler-only role (polls Semaphore every {}s while it leads)\n",
        cfg.scaler.poll_interval_ms / 1000
    );

    let mut hub_events = bed.hub.subscribe();
    let mut opts = bed.fleet_options(&[SCALER_GROUP, GROUP], &[], &[]);
    opts.agent = agent;
    opts.group_args.insert(
        SCALER_GROUP.to_string(),
        vec!["--role".into(), "scaler".into()],
    );
    let fleet = agent_fleet_tests::fleet::Fleet::start(bed.moto.clone(), opts);
    let mut fleet_events = fleet.subscribe();
    let start = Instant::now();
    let at = move || format!("{:>6.1}s", start.elapsed().as_secs_f64());

    let mut job_no: BTreeMap<String, usize> = BTreeMap::new();
    let mut finished = 0usize;
    let mut passed = 0usize;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut in_place = 0usize;
    let mut registered = 0usize;
    let mut wave_sent = false;
    let mut running = 0usize;
    let mut max_running = 0usize;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut leader: Option<String> = None;
    let mut desired: BTreeMap<String, i32> = BTreeMap::new();
    let mut scale_ups = 0usize;
    let mut settle_since: Option<Instant> = None;

    loop {
        if !wave_sent && leader.is_some() {
            wave_sent = true;
            println!("{}  ── sending a wave of {JOBS} jobs ──", at());
            for i in 1..=JOBS {
                let secs = 1 + (i % 3);
                let id = bed.hub.enqueue_job(JobSpec {
                    commands: vec![format!("echo building part {i}; sleep {secs}")],
                    env: vec![],
                });
                job_no.insert(id, i);
            }
        }
        if wave_sent && finished == JOBS && desired.get(GROUP) == Some(&0) {
            let since = *settle_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        if Instant::now() > deadline {
            println!("{}  demo timed out; showing what happened so far", at());
            break;
        }
        tokio::select! {
            ev = hub_events.recv() => match ev {
                Ok(HubEvent::JobQueued { id }) => println!("{}  job {:>2} queued", at(), job_no.get(&id).copied().unwrap_or(0)),
                Ok(HubEvent::JobStarted { id, agent }) => {
                    running += 1;
                    max_running = max_running.max(running);
                    println!("{}  job {:>2} started on {}", at(), job_no.get(&id).copied().unwrap_or(0), short(&agent));
                }
                Ok(HubEvent::JobFinished { id, agent, result }) => {
                    running = running.saturating_sub(1);
                    finished += 1;
                    if result == "passed" { passed += 1; }
                    println!("{}  job {:>2} {result} on {}", at(), job_no.get(&id).copied().unwrap_or(0), short(&agent));
                }
                Ok(HubEvent::AgentRegistered { name }) => {
                    registered += 1;
                    println!("{}  agent registered on {}", at(), short(&name));
                }
                Ok(HubEvent::AgentShutdown { name, reason }) => println!("{}  agent on {} told to shut down: {reason}", at(), short(&name)),
                _ => {}
            },
            ev = fleet_events.recv() => match ev {
                Ok(FleetEvent::Launched { instance_id, group }) => println!("{}  instance {} launched in {group}", at(), short(&instance_id)),
                Ok(FleetEvent::Terminated { instance_id }) => println!("{}  instance {} terminated by Auto Scaling", at(), short(&instance_id)),
                Ok(FleetEvent::Desired { group, desired: d }) => {
                    desired.insert(group.clone(), d);
                    println!("{}  {group}: desired capacity = {d}", at());
                }
                Ok(FleetEvent::Log { instance_id, line }) => {
                    if line.contains(" leading term=") {
                        let term = field(&line, "term").unwrap_or_default();
                        leader = Some(instance_id.clone());
                        println!("{}  instance {} is the leader (term {term}, lease in SSM)", at(), short(&instance_id));
                    } else if line.contains("scaling decision") && !line.contains("action=none") && !line.contains("action=\"none\"") {
                        scale_ups += 1;
                        println!(
                            "{}  leader: {} jobs queued+running → target {}, desired was {} → {}",
                            at(),
                            field(&line, "jobs").unwrap_or_default(),
                            field(&line, "target").unwrap_or_default(),
                            field(&line, "desired").unwrap_or_default(),
                            field(&line, "action").unwrap_or_default(),
                        );
                    } else if line.contains("terminating this instance") {
                        let why = field(&line, "why").unwrap_or_default();
                        let dec = field(&line, "decrement").unwrap_or_default();
                        *reasons.entry(why.clone()).or_default() += 1;
                        println!("{}  instance {} asks Auto Scaling to end it: {why} (decrement desired: {dec})", at(), short(&instance_id));
                    } else if line.contains("restarting the agent in place") {
                        in_place += 1;
                        println!("{}  instance {} idle at min size: agent restarted in place, no churn", at(), short(&instance_id));
                    } else if line.contains(" ERROR ") || line.contains("launch failed") {
                        println!("{}  instance {}: {line}", at(), short(&instance_id));
                    }
                }
                _ => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }

    let g = bed.moto.group(GROUP).await?;
    println!("\n── summary ({:.0}s) ──", start.elapsed().as_secs_f64());
    println!("jobs: {finished}/{JOBS} finished, {passed} passed; at most {max_running} at once");
    println!(
        "instances launched: {}; agents registered: {registered}",
        fleet.launched().len()
    );
    for (why, n) in &reasons {
        let n = if why == "agent idle" {
            n.saturating_sub(in_place)
        } else {
            *n
        };
        if n > 0 {
            println!("instances that ended themselves: {n} × {why}");
        }
    }
    println!("idle agents restarted in place at min size: {in_place}");
    println!(
        "scaling decisions that acted: {scale_ups}; leader: {}",
        leader
            .as_deref()
            .map(short)
            .unwrap_or_else(|| "none".into())
    );
    println!(
        "group now: desired {}, in service {}",
        g.desired,
        g.in_service().len()
    );
    fleet.shutdown().await;
    if finished != JOBS || passed != JOBS {
        anyhow::bail!("{finished} of {JOBS} jobs finished, {passed} passed");
    }
    if g.desired != 0 {
        anyhow::bail!(
            "the agent group did not scale back in to 0 (desired {})",
            g.desired
        );
    }
    Ok(())
}
