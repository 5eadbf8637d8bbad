//! The test bed's warm pools: the emulator moves instances through a warm pool's lifecycle
//! as Auto Scaling does (moto 5.2.5 stores PutWarmPool and nothing more), and the launcher
//! maps pool states to processes. The supervisor's own part (warming up, completing the
//! launch action) is stood in for here by completing lifecycle actions through the API, so
//! these tests check the bed alone.

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::{Fleet, FleetEvent, PoolPhase};
use agent_fleet_tests::moto::{GroupState, Moto, WarmPool};
use std::time::Duration;

const HOOK: &str = "agent-fleet-warm";

fn ids(pool: &WarmPool) -> Vec<String> {
    pool.instances
        .iter()
        .map(|i| i.instance_id.clone())
        .collect()
}

const WITHIN: Duration = Duration::from_secs(30);

/// Auto Scaling's side: the pool is kept at its size, pool instances wait in
/// `Warmed:Pending:Wait` until their launch action completes (or its heartbeat timeout takes
/// the default result), then stop; scale-out takes warmed instances first, launches cold ones
/// for the rest and refills the pool; scale-in terminates; pool instances never show in the
/// group or count in its desired capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_runs_a_warm_pool_like_auto_scaling() -> anyhow::Result<()> {
    let moto = Moto::start().await?;
    moto.warm_up().await;
    moto.create_group("pooled", 0, 6, 0).await?;
    moto.put_launch_hook("pooled", HOOK, 2, "CONTINUE").await?;
    moto.put_warm_pool("pooled", 2, "Stopped", Some(3)).await?;

    // Filled to max(MinSize 2, MaxGroupPreparedCapacity 3 - desired 0) = 3, all held.
    let pool = moto.warm_pool("pooled").await?;
    assert_eq!((pool.target, pool.instances.len()), (3, 3), "{pool:?}");
    assert_eq!(pool.in_state("Warmed:Pending:Wait").len(), 3, "{pool:?}");
    let group = moto.group("pooled").await?;
    assert!(
        group.instances.is_empty(),
        "pool instances are not the group's: {group:?}"
    );
    assert_eq!(group.desired, 0);
    // DescribeWarmPool (the AWS API) says the same.
    let asg = moto.autoscaling().await;
    let described = asg
        .describe_warm_pool()
        .auto_scaling_group_name("pooled")
        .send()
        .await?;
    assert_eq!(described.instances().len(), 3);
    assert_eq!(
        described
            .warm_pool_configuration()
            .and_then(|c| c.pool_state())
            .map(|s| s.as_str()),
        Some("Stopped")
    );

    // The launch action completes: Warmed:Pending:Proceed, then Warmed:Stopped (EC2: stopped).
    let first = ids(&pool)[0].clone();
    moto.complete_lifecycle_action("pooled", HOOK, &first, "CONTINUE")
        .await?;
    let pool = moto.warm_pool("pooled").await?;
    assert_eq!(pool.state_of(&first), Some("Warmed:Stopped"), "{pool:?}");
    let stopped = pool.instances.iter().find(|i| i.instance_id == first);
    assert_eq!(stopped.map(|i| i.ec2_state.as_str()), Some("stopped"));
    assert_eq!(pool.in_state("Warmed:Pending:Wait").len(), 2, "{pool:?}");
    // ABANDON on a launch terminates it; the pool refills.
    let abandoned = ids(&pool)[1].clone();
    moto.complete_lifecycle_action("pooled", HOOK, &abandoned, "ABANDON")
        .await?;
    let pool = moto.warm_pool("pooled").await?;
    assert_eq!(pool.state_of(&abandoned), None, "{pool:?}");
    assert_eq!(pool.instances.len(), 3, "refilled: {pool:?}");
    // The heartbeat timeout (2 s) takes the default result, CONTINUE, for the others.
    let pool = eventually("every pool instance stopped", WITHIN, || async {
        let p = moto.warm_pool("pooled").await.ok()?;
        (p.in_state("Warmed:Stopped").len() == 3).then_some(p)
    })
    .await?;
    let warmed = ids(&pool);

    // Scale-out to 2: two warmed instances leave the pool (Pending:Wait for the hook again),
    // nothing cold; the pool refills to max(2, 3 - 2) = 2 with new instances.
    moto.set_desired("pooled", 2).await?;
    let group = moto.group("pooled").await?;
    let joined: Vec<String> = group.instances.iter().map(|(i, _, _)| i.clone()).collect();
    assert_eq!(joined.len(), 2, "{group:?}");
    assert!(
        joined.iter().all(|i| warmed.contains(i)),
        "from the pool: {group:?}"
    );
    assert!(
        group.instances.iter().all(|(_, s, _)| s == "Pending:Wait"),
        "{group:?}"
    );
    let pool = moto.warm_pool("pooled").await?;
    assert_eq!(pool.instances.len(), 2, "{pool:?}");
    assert_eq!(pool.in_state("Warmed:Pending:Wait").len(), 1, "{pool:?}");
    for id in &joined {
        moto.complete_lifecycle_action("pooled", HOOK, id, "CONTINUE")
            .await?;
    }
    let group = moto.group("pooled").await?;
    assert_eq!(group.in_service().len(), 2, "{group:?}");
    assert_eq!(group.desired, 2, "desired counts in-service instances only");

    // Scale-out to 5 while one pool instance is still warming: the warmed one is taken, two
    // launch cold (straight into Pending:Wait), the pool stays at MinSize 2.
    let pool = moto.warm_pool("pooled").await?;
    let ready = pool.in_state("Warmed:Stopped");
    let warming = pool.in_state("Warmed:Pending:Wait");
    moto.set_desired("pooled", 5).await?;
    let group = moto.group("pooled").await?;
    assert_eq!(group.instances.len(), 5, "{group:?}");
    assert!(
        ready.iter().all(|i| group.state_of(i).is_some()),
        "{group:?}"
    );
    assert!(
        warming.iter().all(|i| group.state_of(i).is_none()),
        "{group:?}"
    );
    let pool = moto.warm_pool("pooled").await?;
    assert_eq!(pool.instances.len(), 2, "{pool:?}");

    // Scale-in to 0: the group's instances are terminated, none returns to the pool.
    let before: Vec<String> = group.instances.iter().map(|(i, _, _)| i.clone()).collect();
    moto.set_desired("pooled", 0).await?;
    let group = moto.group("pooled").await?;
    assert!(group.instances.is_empty(), "{group:?}");
    let pool = moto.warm_pool("pooled").await?;
    assert!(
        pool.instances
            .iter()
            .all(|i| !before.contains(&i.instance_id)),
        "a used instance went back to the pool: {pool:?}"
    );
    assert_eq!(pool.instances.len(), 3, "max(2, 3 - 0): {pool:?}");

    // The call log names the warm pool calls.
    let calls = moto.calls(0).await?;
    assert!(calls
        .iter()
        .any(|c| c.is("autoscaling", "PutWarmPool") && c.param("MinSize") == Some("2")));

    // DeleteWarmPool terminates the pool's instances.
    asg.delete_warm_pool()
        .auto_scaling_group_name("pooled")
        .send()
        .await?;
    let pool = moto.warm_pool("pooled").await?;
    assert!(!pool.configured && pool.instances.is_empty(), "{pool:?}");
    Ok(())
}

/// A group without a warm pool or launch hook behaves as before: instances InService at
/// once, no pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_without_a_pool_is_unchanged() -> anyhow::Result<()> {
    let moto = Moto::start().await?;
    moto.create_group("plain", 0, 4, 2).await?;
    let g: GroupState = moto.group("plain").await?;
    assert_eq!(g.in_service().len(), 2, "{g:?}");
    let pool = moto.warm_pool("plain").await?;
    assert!(!pool.configured && pool.instances.is_empty(), "{pool:?}");
    assert_eq!(pool.target, 0);
    moto.set_desired("plain", 3).await?;
    assert_eq!(moto.group("plain").await?.in_service().len(), 3);
    Ok(())
}

/// With the launch hook alone (no pool), a launch waits in `Pending:Wait` and is not doubled
/// while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_hook_holds_cold_launches() -> anyhow::Result<()> {
    let moto = Moto::start().await?;
    moto.create_group("held", 0, 4, 0).await?;
    moto.put_launch_hook("held", HOOK, 60, "CONTINUE").await?;
    moto.set_desired("held", 2).await?;
    let g = moto.group("held").await?;
    assert_eq!(g.instances.len(), 2, "{g:?}");
    assert!(
        g.instances.iter().all(|(_, s, _)| s == "Pending:Wait"),
        "{g:?}"
    );
    moto.set_desired("held", 2).await?;
    assert_eq!(moto.group("held").await?.instances.len(), 2);
    let id = g.instances[0].0.clone();
    moto.complete_lifecycle_action("held", HOOK, &id, "CONTINUE")
        .await?;
    assert_eq!(moto.group("held").await?.state_of(&id), Some("InService"));
    Ok(())
}

/// `State` field of /proc/<pid>/stat (`T`: stopped by a signal).
fn proc_state(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().next().map(str::to_string)
}

/// The launcher, pool state Stopped: a pool instance runs while it warms (IMDS
/// `Warmed:Stopped`), is powered off when Auto Scaling stops it (no process left, its
/// directory kept), and gets a new supervisor on the same directory with IMDS `InService`
/// when it leaves the pool; scale-in then terminates it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launcher_powers_pool_instances_off_and_on() -> anyhow::Result<()> {
    let (bed, fleet, id, pid) = warming("wpstop", "Stopped").await?;
    let mut events = fleet.subscribe();
    let dir = fleet
        .with_instance(&id, |i| i.dir.clone())
        .ok_or_else(|| anyhow::anyhow!("no instance {id}"))?;

    // The launch action completes (the supervisor's part, stood in for): stopped.
    let _ = bed
        .moto
        .complete_lifecycle_action("agents", HOOK, &id, "CONTINUE")
        .await;
    eventually("the instance powered off", WITHIN, || async {
        (fleet.pool_phase(&id) == Some(PoolPhase::Stopped)).then_some(())
    })
    .await?;
    assert!(
        proc_state(pid).is_none() || proc_state(pid).as_deref() == Some("Z"),
        "supervisor {pid} still alive"
    );
    assert!(
        fleet
            .with_instance(&id, |i| i.processes())
            .unwrap_or_default()
            .len()
            <= 1,
        "processes left"
    );
    assert!(dir.is_dir(), "its disk is kept");
    let mut saw_stopped = false;
    while let Ok(ev) = events.try_recv() {
        saw_stopped |= matches!(ev, FleetEvent::Stopped { instance_id } if instance_id == id);
    }
    assert!(saw_stopped, "no Stopped event");

    // Scale-out: it leaves the pool, a new supervisor on the same directory, IMDS InService.
    bed.moto.set_desired("agents", 1).await?;
    let new_pid = eventually("a new supervisor", WITHIN, || async {
        let p = fleet.with_instance(&id, |i| (i.pid, i.exit_status().is_none()))?;
        (p.0 != pid && p.1).then_some(p.0)
    })
    .await?;
    assert_ne!(new_pid, pid);
    assert_eq!(
        fleet.with_instance(&id, |i| i.dir.clone()),
        Some(dir.clone())
    );
    assert_eq!(
        target_state(&fleet, &id).await?.as_deref(),
        Some("InService")
    );
    let _ = bed
        .moto
        .complete_lifecycle_action("agents", HOOK, &id, "CONTINUE")
        .await;
    eventually("in service", WITHIN, || async {
        (bed.moto.group("agents").await.ok()?.state_of(&id) == Some("InService")).then_some(())
    })
    .await?;
    // The pool refilled with another instance.
    let pool = bed.moto.warm_pool("agents").await?;
    assert_eq!(pool.instances.len(), 1, "{pool:?}");
    assert_ne!(pool.instances[0].instance_id, id);

    // Scale-in: terminated, never back in the pool.
    bed.moto.set_desired("agents", 0).await?;
    eventually("terminated", WITHIN, || async {
        fleet.terminated().contains(&id).then_some(())
    })
    .await?;
    let pool = bed.moto.warm_pool("agents").await?;
    assert!(pool.state_of(&id).is_none(), "{pool:?}");
    fleet.shutdown().await;
    Ok(())
}

/// The launcher, pool state Hibernated: a warmed instance's processes are stopped (memory
/// kept) and continue, same process, when it leaves the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launcher_hibernates_and_resumes_pool_instances() -> anyhow::Result<()> {
    let (bed, fleet, id, pid) = warming("wphib", "Hibernated").await?;
    let _ = bed
        .moto
        .complete_lifecycle_action("agents", HOOK, &id, "CONTINUE")
        .await;
    eventually("hibernated", WITHIN, || async {
        (fleet.pool_phase(&id) == Some(PoolPhase::Hibernated)).then_some(())
    })
    .await?;
    assert_eq!(
        proc_state(pid).as_deref(),
        Some("T"),
        "supervisor not stopped"
    );

    bed.moto.set_desired("agents", 1).await?;
    eventually("resumed", WITHIN, || async {
        (fleet.pool_phase(&id) == Some(PoolPhase::Running)).then_some(())
    })
    .await?;
    assert_eq!(
        fleet.with_instance(&id, |i| i.pid),
        Some(pid),
        "the same process"
    );
    let state = proc_state(pid);
    assert!(
        state.is_some() && state.as_deref() != Some("T"),
        "supervisor {pid}: {state:?}"
    );
    assert_eq!(
        target_state(&fleet, &id).await?.as_deref(),
        Some("InService")
    );
    fleet.shutdown().await;
    Ok(())
}

/// A bed whose group `agents` has a launch hook and a warm pool of one in `pool_state`, its
/// launcher, and the pool's first instance (id, supervisor pid) once its supervisor runs,
/// IMDS saying `Warmed:<pool_state>`.
async fn warming(stack: &str, pool_state: &str) -> anyhow::Result<(Bed, Fleet, String, i32)> {
    let bed = Bed::start(stack).await?;
    bed.put_config(&bed.runtime_config("agents")).await?;
    bed.moto.create_group("agents", 0, 3, 0).await?;
    bed.moto
        .put_launch_hook("agents", HOOK, 120, "CONTINUE")
        .await?;
    bed.moto
        .put_warm_pool("agents", 1, pool_state, Some(1))
        .await?;
    let fleet = bed.fleet(&["agents"], &[], &[]);
    let id = eventually("a pool instance", WITHIN, || async {
        let pool = bed.moto.warm_pool("agents").await.ok()?;
        pool.instances.first().map(|i| i.instance_id.clone())
    })
    .await?;
    let pid = eventually("its supervisor started", WITHIN, || async {
        fleet.with_instance(&id, |i| i.pid)
    })
    .await?;
    assert_eq!(fleet.pool_phase(&id), Some(PoolPhase::Running));
    let expected = format!("Warmed:{pool_state}");
    assert_eq!(
        target_state(&fleet, &id).await?.as_deref(),
        Some(expected.as_str())
    );
    Ok((bed, fleet, id, pid))
}

/// What instance `id`'s fake IMDS says at `autoscaling/target-lifecycle-state`.
async fn target_state(fleet: &Fleet, id: &str) -> anyhow::Result<Option<String>> {
    let Some(endpoint) = fleet.with_instance(id, |i| i.imds.endpoint()) else {
        return Ok(None);
    };
    let client = aws_config::imds::Client::builder()
        .endpoint(endpoint)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .build();
    let v = client
        .get("/latest/meta-data/autoscaling/target-lifecycle-state")
        .await?;
    Ok(Some(v.as_ref().to_string()))
}

/// A pool instance keeps the launch template version it was launched from (what a stale
/// pooled instance compares with the group's), and AWS::AutoScaling::WarmPool in a
/// CloudFormation stack makes the pool, held by the group's launch hook from
/// LifecycleHookSpecificationList, and goes with the stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_instances_keep_their_version_and_cloudformation_makes_pools() -> anyhow::Result<()> {
    let moto = Moto::start().await?;
    moto.warm_up().await;
    let user_data = "QUdFTlRfRkxFRVRfU1RBQ0s9eA=="; // AGENT_FLEET_STACK=x
    moto.query(
        "ec2",
        "CreateLaunchTemplate",
        &[
            ("LaunchTemplateName", "agents-lt"),
            (
                "LaunchTemplateData.ImageId",
                agent_fleet_tests::moto::IMAGE_ID,
            ),
            ("LaunchTemplateData.InstanceType", "t3.micro"),
            ("LaunchTemplateData.UserData", user_data),
        ],
    )
    .await?;
    let asg = moto.autoscaling().await;
    asg.create_auto_scaling_group()
        .auto_scaling_group_name("versioned")
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_name("agents-lt")
                .version("$Latest")
                .build(),
        )
        .min_size(0)
        .max_size(4)
        .desired_capacity(0)
        .availability_zones(agent_fleet_tests::moto::AZ)
        .send()
        .await?;
    moto.put_warm_pool("versioned", 1, "Stopped", Some(1))
        .await?;
    let pooled = moto.warm_pool("versioned").await?;
    assert_eq!(pooled.instances.len(), 1, "{pooled:?}");
    assert_eq!(pooled.instances[0].launch_template_version, Some(1));
    moto.query(
        "ec2",
        "CreateLaunchTemplateVersion",
        &[
            ("LaunchTemplateName", "agents-lt"),
            ("SourceVersion", "1"),
            ("LaunchTemplateData.InstanceType", "t3.small"),
        ],
    )
    .await?;
    moto.set_desired("versioned", 2).await?;
    let out = asg.describe_auto_scaling_instances().send().await?;
    let versions: Vec<(String, Option<String>)> = out
        .auto_scaling_instances()
        .iter()
        .filter(|i| i.auto_scaling_group_name() == Some("versioned"))
        .map(|i| {
            (
                i.instance_id().unwrap_or_default().to_string(),
                i.launch_template()
                    .and_then(|t| t.version())
                    .map(str::to_string),
            )
        })
        .collect();
    let from_pool = &pooled.instances[0].instance_id;
    assert!(
        versions.contains(&(from_pool.clone(), Some("1".into()))),
        "the pooled instance was launched from version 1: {versions:?}"
    );
    assert_eq!(
        versions
            .iter()
            .filter(|(_, v)| v.as_deref() == Some("2"))
            .count(),
        2,
        "a cold launch and the refilled pool's instance come from version 2: {versions:?}"
    );

    let template = serde_json::json!({"Resources": {
        "Lc": {"Type": "AWS::AutoScaling::LaunchConfiguration",
               "Properties": {"ImageId": agent_fleet_tests::moto::IMAGE_ID, "InstanceType": "t3.micro"}},
        "Agents": {"Type": "AWS::AutoScaling::AutoScalingGroup", "Properties": {
            "AutoScalingGroupName": "stacked", "LaunchConfigurationName": {"Ref": "Lc"},
            "MinSize": "0", "MaxSize": "4", "DesiredCapacity": "1",
            "AvailabilityZones": [agent_fleet_tests::moto::AZ],
            "LifecycleHookSpecificationList": [{
                "LifecycleHookName": HOOK,
                "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
                "HeartbeatTimeout": 600, "DefaultResult": "CONTINUE"}]}},
        "Pool": {"Type": "AWS::AutoScaling::WarmPool", "Properties": {
            "AutoScalingGroupName": {"Ref": "Agents"}, "MinSize": 2,
            "MaxGroupPreparedCapacity": 2, "PoolState": "Hibernated",
            "InstanceReusePolicy": {"ReuseOnScaleIn": false}}}}})
    .to_string();
    moto.query(
        "cloudformation",
        "CreateStack",
        &[("StackName", "pooled-stack"), ("TemplateBody", &template)],
    )
    .await?;
    let group = moto.group("stacked").await?;
    assert_eq!(
        group
            .instances
            .iter()
            .map(|(_, s, _)| s.as_str())
            .collect::<Vec<_>>(),
        ["Pending:Wait"],
        "the hook holds the group's first launch: {group:?}"
    );
    let pool = moto.warm_pool("stacked").await?;
    assert_eq!(pool.pool_state.as_deref(), Some("Hibernated"));
    assert_eq!(pool.in_state("Warmed:Pending:Wait").len(), 2, "{pool:?}");
    moto.query(
        "cloudformation",
        "DeleteStack",
        &[("StackName", "pooled-stack")],
    )
    .await?;
    let out = asg.describe_auto_scaling_instances().send().await?;
    assert!(
        out.auto_scaling_instances()
            .iter()
            .all(|i| i.auto_scaling_group_name() != Some("stacked")),
        "the stack's pool went with it"
    );
    Ok(())
}
