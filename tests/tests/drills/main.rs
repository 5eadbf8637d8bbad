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
//!
//! One module per fault; the fault proxies they use are the bed's
//! ([`agent_fleet_tests::faults`]).

mod hanging_hook;
mod imds;
mod semaphore_down;
mod ssm_faults;
mod terminate_errors;
mod wall_clock;
mod work_dir;

use agent_fleet_tests::bed::Bed;
use agent_fleet_tests::fleet::{Instance, InstanceOptions};
use agent_fleet_tests::moto::Call;
use std::time::Duration;

type R = anyhow::Result<()>;

fn figure(drill: &str, text: impl std::fmt::Display) {
    println!("DRILL {drill} {text}");
}

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
