//! The fake agent hanging in its shutdown hook.

use super::{figure, ms, R};
use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::{group_alive, Instance};
use std::time::Duration;

/// The agent hangs in its shutdown: (A) before its hook runs (`FAKE_AGENT_HOOK_SLEEP_SECS`:
/// the reason never reaches the supervisor through the hook), (B) in the hook, after the
/// script handed the reason over (`FAKE_AGENT_HOOK_HANG_SECS`). Both idle out (IDLE). The
/// supervisor bounds the agent's shutdown at 3 s here
/// (`AGENT_SUPERVISOR_AGENT_SHUTDOWN_TIMEOUT_SECS`; default 60 s).
///
/// Must hold: in both, the supervisor kills the agent's process group once the bound
/// has passed, acts on the reason the agent gave (A: by running the hook in its place)
/// and terminates the instance with decrement — within the bound plus a few seconds of
/// the agent's shutdown; nothing of the agent's group survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_agent_only_hanging_in_its_shutdown_hook_still_ends_the_instance() -> R {
    const D: &str = "hanging_hook";
    let bound = Duration::from_secs(3);
    let bed = Bed::start("hookhang").await?;
    let group = "hookhang-agents".to_string();
    bed.moto.create_group(&group, 0, 3, 2).await?;
    let ids = bed.moto.group(&group).await?.in_service();
    let cases: Vec<(&str, &str, String, String)> = [
        ("before", "FAKE_AGENT_HOOK_SLEEP_SECS"),
        ("in", "FAKE_AGENT_HOOK_HANG_SECS"),
    ]
    .into_iter()
    .zip(ids)
    .map(|((name, knob), id)| (name, knob, group.clone(), id))
    .collect();
    let mut cfg = bed.runtime_config(&group);
    cfg.idle_timeout_secs = 2;
    cfg.scaler.enabled = false;
    bed.put_config(&cfg).await?;
    let mut insts = vec![];
    for (_, knob, group, id) in &cases {
        let mut o = bed.instance(id, group);
        o.agent_env = vec![(knob.to_string(), "3600".into())];
        o.env = vec![(
            "AGENT_SUPERVISOR_AGENT_SHUTDOWN_TIMEOUT_SECS".into(),
            bound.as_secs().to_string(),
        )];
        insts.push(Instance::start(o, None).await?);
    }
    for ((name, _, group, id), inst) in cases.iter().zip(&insts) {
        let events = inst
            .wait_for_event(
                "the agent began its shutdown",
                Duration::from_secs(30),
                |e| e.iter().any(|e| e["event"] == "shutdown"),
            )
            .await?;
        let shutdown_mono = events
            .iter()
            .find(|e| e["event"] == "shutdown")
            .and_then(|e| e["mono_ns"].as_u64())
            .unwrap_or_default();
        let call = eventually(
            "the instance asked to terminate",
            bound + Duration::from_secs(15),
            || async {
                let calls = bed.moto.calls(0).await.ok()?;
                calls.into_iter().find(|c| {
                    c.is("autoscaling", "TerminateInstanceInAutoScalingGroup")
                        && c.param("InstanceId") == Some(id.as_str())
                })
            },
        )
        .await?;
        let took = Duration::from_nanos(call.t_ns.saturating_sub(shutdown_mono));
        figure(D, format!("hang {name} the hook: agent shutdown → TerminateInstanceInAutoScalingGroup {} (bound {})", ms(took), ms(bound)));
        assert_eq!(
            call.param("ShouldDecrementDesiredCapacity"),
            Some("true"),
            "IDLE"
        );
        assert!(took >= bound, "the agent got its bound: {took:?}");
        assert!(took <= bound + Duration::from_secs(4), "{took:?}");
        let out = inst.output();
        assert!(out.contains("after it began shutting down"), "{out}");
        if *name == "before" {
            assert!(out.contains("running the hook in its place"), "{out}");
        } else {
            let hook_ran = out.find("agent shutdown hook ran");
            let killed = out.find("after it began shutting down");
            assert!(hook_ran < killed, "the hook's reason came first: {out}");
        }
        eventually("the instance is gone", Duration::from_secs(10), || async {
            let g = bed.moto.group(group).await.ok()?;
            g.state_of(id).is_none().then_some(())
        })
        .await?;
        for g in inst.agent_groups() {
            assert!(!group_alive(g), "agent process group {g} survived");
        }
    }
    Ok(())
}
