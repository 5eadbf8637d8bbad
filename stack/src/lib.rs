//! `agent-fleet`: the operator's side of agent-fleet. It turns the reference stack's
//! `SEMAPHORE_*` variables into the parameters of `cfn/agent-fleet.yaml` and deploys,
//! diffs, destroys and inspects the stack, and stores the registration token.

pub mod ami;
pub mod cfn;
pub mod config;
pub use agent_supervisor::aws::ec2;
pub mod schedule;
pub mod status;
pub mod template;
pub mod token;
pub mod vars;
pub mod warm_pool;

/// The template as written (deploys send [`template::body`]).
pub const TEMPLATE: &str = include_str!("../../cfn/agent-fleet.yaml");

/// CloudFormation's limit for a template passed in the request body.
pub const TEMPLATE_BODY_LIMIT: usize = 51_200;

/// The AWS config of the operator's shell: the SDK's usual chain (env, profile, SSO …).
pub async fn sdk_config() -> anyhow::Result<aws_config::SdkConfig> {
    let config = aws_config::defaults(aws_config::BehaviorVersion::v2026_01_12())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(std::time::Duration::from_secs(5))
                .operation_attempt_timeout(std::time::Duration::from_secs(30))
                .build(),
        )
        .load()
        .await;
    if config.region().is_none() {
        anyhow::bail!(
            "no AWS region: set AWS_REGION (e.g. export AWS_REGION=eu-central-1) or a region in your AWS profile"
        );
    }
    Ok(config)
}

/// The full chain of an error, for messages.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    aws_smithy_types::error::display::DisplayErrorContext(err).to_string()
}
