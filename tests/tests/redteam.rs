//! The hostile-jobs suite (`make redteam`, also part of `make test`): what a job that tries
//! to take the fleet from its VM gets. Each test names the attack and the level (`vm`: the
//! job is root on its VM; `strict`: it is the agent user) and asserts what stopped it.
//! The README's "Hostile jobs" table lists every attack with the test that covers it.

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::Instance;
use agent_fleet_tests::hub::{JobSpec, JobState};
use agent_fleet_tests::probe::leading_term;

use nix::sys::signal::Signal;
use std::time::Duration;

type R = anyhow::Result<()>;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// `vm`, job as root: it kills its supervisor (and with it every way the instance had of
/// ending itself) to keep the VM for the next job or for itself. The leader runs on the
/// scaler instance, not on any agent (`agents_lead: false`), and ends the instance once it
/// is in service past the lifetime cap — without decrement, so a clean VM replaces it.
/// (The scaler instance starts after the attack: launch times never change, so the leader
/// describes each instance once, and the emulator's clock is moved for this one only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_a_job_that_kills_its_supervisor_loses_the_vm_to_the_leaders_lifetime_cap() -> R {
    let bed = Bed::start("rtcap").await?;
    let group = "rtcap-agents";
    bed.moto.create_group(group, 0, 3, 1).await?;
    let mut cfg = bed.fast_runtime_config(group);
    cfg.agents_lead = false;
    bed.put_config(&cfg).await?;
    let fleet = bed.fleet(&[group], &[], &[]);
    let job = bed.hub.enqueue_job(JobSpec {
        commands: vec!["sleep 600".into()],
        env: vec![],
    });
    eventually("the job runs", Duration::from_secs(30), || async {
        (bed.hub.job(&job)?.state == JobState::Running).then_some(())
    })
    .await?;
    let victim = fleet
        .launched()
        .first()
        .cloned()
        .expect("an agent instance");
    // The attack: the supervisor is gone; the agent and its job run on.
    fleet.with_instance(&victim, |i| i.signal(Signal::SIGKILL));
    let agent_output = fleet
        .with_instance(&victim, |i| i.output())
        .unwrap_or_default();
    assert!(
        agent_output.contains("agents do not lead") && leading_term(&agent_output).is_none(),
        "an agent instance neither stands for leader nor leads:\n{agent_output}"
    );
    // A day and more later (the emulator's clock for this instance only). The leader
    // starts now, as a new leader would after a failover: it learns launch times once.
    bed.moto
        .set_launched_ago(&victim, DAY + Duration::from_secs(3 * 3600))
        .await?;
    let mut scaler_opts = bed.instance("i-0scaler000000001", "rtcap-scaler");
    scaler_opts.args = vec!["--role".into(), "scaler".into()];
    let scaler = Instance::start(scaler_opts, None).await?;

    let ended = eventually(
        "the leader ends the over-age instance",
        Duration::from_secs(30),
        || async {
            let calls = bed.moto.calls(0).await.ok()?;
            calls.into_iter().find(|c| {
                c.is("autoscaling", "TerminateInstanceInAutoScalingGroup")
                    && c.param("InstanceId") == Some(victim.as_str())
            })
        },
    )
    .await
    .inspect_err(|_| eprintln!("scaler instance:\n{}", scaler.output()))?;
    assert_eq!(
        ended.param("ShouldDecrementDesiredCapacity"),
        Some("false"),
        "a replacement, not a smaller fleet"
    );
    assert!(
        scaler.output().contains("end_over_lifetime_cap"),
        "the scaler instance's leader did it:\n{}",
        scaler.output()
    );
    eventually(
        "a clean VM replaces it",
        Duration::from_secs(30),
        || async {
            let g = bed.moto.group(group).await.ok()?;
            (g.desired == 1 && fleet.launched().len() >= 2).then_some(())
        },
    )
    .await?;
    fleet.shutdown().await;
    Ok(())
}
