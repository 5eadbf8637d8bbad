//! IMDS down or erroring at boot, through an [`ImdsFront`].

use super::{churn, figure, ms, R};
use agent_fleet_tests::bed::Bed;
use agent_fleet_tests::faults::{ImdsFront, ERROR_500, REFUSE};
use agent_fleet_tests::fleet::Instance;
use agent_fleet_tests::probe::starts;
use std::time::{Duration, Instant};

/// IMDS is unreachable for the first ~1.5 s of the boot (connections closed), well
/// within the retry budget of `--imds-attempts 6` (backoff from 200 ms: 6.2 s).
///
/// Must hold: the supervisor retries (a warning per failed attempt), then boots as usual
/// once IMDS answers — the agent starts and registers; nothing is terminated.
/// (`supervisor.rs` covers IMDS unreachable throughout: exit 2 after bounded retries.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imds_down_at_boot_then_back_within_the_budget_boot_proceeds() -> R {
    const D: &str = "imds_back";
    let bed = Bed::start("imdsback").await?;
    let group = "imdsback-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let front = ImdsFront::start(REFUSE).await?;
    let mut o = bed.instance(&id, group);
    o.imds_endpoint_override = Some(front.endpoint());
    o.args = vec!["--imds-attempts".into(), "6".into()];
    let inst = Instance::start(o, None).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let refused = front.connections();
    front.forward_to(&inst.imds.endpoint());
    let up = Instant::now();
    inst.wait_for_event("registered", Duration::from_secs(20), |e| {
        e.iter().any(|e| e["event"] == "registered")
    })
    .await?;
    let out = inst.output();
    let retries = out.matches("IMDS not answering yet").count();
    let started = inst
        .wait_for_line("agent started", Duration::from_secs(1))
        .await
        .is_ok();
    figure(D, format!("{refused} IMDS connections refused, {retries} retries logged; agent registered {} after IMDS came back", ms(up.elapsed())));
    assert!(retries >= 1, "it did retry: {out}");
    assert!(started, "{out}");
    assert!(inst.exit_status().is_none(), "still running: {out}");
    assert!(!out.contains("cannot read instance metadata"), "{out}");
    Ok(())
}

/// IMDS answers HTTP 500 to everything (the token PUT included) for the whole boot.
///
/// Must hold: bounded retries (`--imds-attempts 3`: two warnings), then one clear error
/// naming the fix, exit code 2, no agent started, nothing asked of Auto Scaling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imds_erroring_throughout_the_boot_exits_2_with_a_clear_error() -> R {
    const D: &str = "imds_500";
    let bed = Bed::start("imds500").await?;
    let group = "imds500-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let front = ImdsFront::start(ERROR_500).await?;
    let mut o = bed.instance(&id, group);
    o.imds_endpoint_override = Some(front.endpoint());
    o.args = vec!["--imds-attempts".into(), "3".into()];
    let t0 = Instant::now();
    let inst = Instance::start(o, None).await?;
    let status = inst.wait_exit(Duration::from_secs(30)).await?;
    let took = t0.elapsed();
    let out = inst.output();
    figure(
        D,
        format!(
            "exit {:?} after {} ({} requests answered 500)",
            status.code(),
            ms(took),
            front.connections()
        ),
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(
        out.contains("cannot read instance metadata after 3 attempts") && out.contains("fix:"),
        "{out}"
    );
    assert_eq!(out.matches("IMDS not answering yet").count(), 2, "{out}");
    assert!(took < Duration::from_secs(15), "bounded: {took:?}");
    assert_eq!(starts(&inst.agent_events()), 0);
    let calls = bed.moto.calls(0).await?;
    assert!(churn(&calls).is_empty(), "{:?}", churn(&calls));
    assert!(
        !calls.iter().any(|c| c.is("ssm", "GetParameter")
            && c.param("Name") == Some(bed.config_parameter.as_str())),
        "nothing read past IMDS"
    );
    Ok(())
}
