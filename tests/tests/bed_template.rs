//! The test bed runs what `cfn/agent-fleet.yaml` makes: a stack created in moto (through
//! CloudFormation's Query API), its groups' launch template user data (`GET /_bed/user_data`)
//! with the role of each group, and instances launched on demand. The launcher over such
//! groups is exercised end to end through the CLI in `stack.rs`.

use agent_fleet_tests::moto::Moto;

type R = anyhow::Result<()>;

fn assert_names(user_data: &str, stack: &str, role: &str) {
    for line in [
        format!("AGENT_FLEET_STACK={stack}"),
        format!("AGENT_FLEET_CONFIG_PARAMETER=/agent-fleet/{stack}/config"),
        format!("AGENT_FLEET_ROLE={role}"),
    ] {
        assert!(
            user_data.lines().any(|l| l == line),
            "{line:?} missing from the user data:\n{user_data}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_groups_have_the_stacks_user_data_and_launch() -> R {
    let moto = Moto::start().await?;
    let stack = "tmpl";
    moto.create_stack(
        stack,
        &[
            ("TokenParameterName", "/t/token"),
            ("Endpoint", "127.0.0.1:1"),
            ("AsgMinSize", "0"),
            ("AsgMaxSize", "3"),
        ],
    )
    .await?;
    let agents = format!("{stack}-agents");
    let scaler = format!("{stack}-scaler");
    assert_names(&moto.group_user_data(&agents).await?, stack, "agent");
    assert_names(&moto.group_user_data(&scaler).await?, stack, "scaler");

    // Unknown group; a group launching from a launch configuration.
    assert!(moto.group_user_data("no-such-group").await.is_err());
    moto.create_group("lc-group", 0, 1, 0).await?;
    assert!(moto.group_user_data("lc-group").await.is_err());

    // The scaler group (min 1) launched its instance; the agents' starts at 0 and launches on
    // demand, although the image id is `resolve:ssm:/agent-fleet/ami/ubuntu-noble/x86_64` and
    // that parameter does not exist (moto validates neither).
    assert_eq!(moto.group(&scaler).await?.in_service().len(), 1);
    let g = moto.group(&agents).await?;
    assert_eq!((g.min, g.max, g.desired), (0, 3, 0), "{g:?}");
    moto.set_desired(&agents, 1).await?;
    let g = moto.group(&agents).await?;
    assert_eq!(g.in_service().len(), 1, "{g:?}");
    Ok(())
}
