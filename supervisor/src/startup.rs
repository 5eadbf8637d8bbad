//! Start-up: what `run` and `check` both need before any agent starts — the daemon's own
//! options, instance identity from IMDS, the stack's runtime config and the registration
//! token from SSM — with every input problem named with its fix (exit code 2).

use crate::aws::imds::{instance_info, SdkImds};
use crate::aws::ssm::{Parameter, ParameterStore, SdkParameterStore, SsmError};
use crate::config::{Role, Settings, StackIdentity};
use crate::retry::RetryPolicy;
use std::path::PathBuf;
use std::time::Duration;

/// Knobs of the daemon itself (the AMI's systemd unit sets them), as opposed to the
/// runtime config the stack writes to SSM.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Overrides the role the user data gives (`AGENT_FLEET_ROLE`).
    pub role: Option<Role>,
    pub agent_binary: PathBuf,
    pub agent_user: String,
    pub work_dir: PathBuf,
    /// The cgroup v2 directory under which the agent gets its own cgroup (`None`: the
    /// supervisor's own, if the system has cgroup v2).
    pub agent_cgroup: Option<PathBuf>,
    pub agent_env: Vec<(String, String)>,
    pub pass_env: Vec<String>,
    pub poweroff_command: Vec<String>,
    pub terminate_timeout: Duration,
    pub restart_backoff: Duration,
    pub restart_backoff_cap: Duration,
    pub drain_margin: Duration,
    pub imds_attempts: u32,
    pub aws_retry_backoff: Duration,
    /// Close IMDS to the agent user before the first agent ([`crate::firewall`]).
    pub imds_firewall: bool,
    /// The `nft` binary (a path, or a name looked up in `PATH`).
    pub nft: PathBuf,
    /// The AMI's script that applies the job isolation level ([`crate::isolation`]).
    pub isolation_script: PathBuf,
    /// The `docker` CLI a pooled instance warms the Docker daemon and images with
    /// ([`crate::pool`]).
    pub docker: PathBuf,
    /// How long a pooled instance waits for the Docker daemon to answer (zero: not at all).
    pub warm_docker_wait: Duration,
    /// Where GitHub's host keys go ([`crate::known_hosts`]); `None`: the agent user's
    /// `~/.ssh/known_hosts`.
    pub known_hosts_file: Option<PathBuf>,
    /// The AMI's host keys, used while the parameter holds none.
    pub known_hosts_fallback: PathBuf,
    /// cloud-init's output file, tailed to CloudWatch Logs ([`crate::logs`]).
    pub cloud_init_log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad or missing input: config, token, user data, IMDS. Exit code 2.
    #[error("{0}")]
    Input(String),
    /// Something failed at run time. Exit code 1.
    #[error("{0}")]
    Runtime(String),
    /// A second stop signal cut the drain short. Exit code 130.
    #[error("aborted by a second stop signal; the agent's process group was killed")]
    Aborted,
}

impl DaemonError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Input(_) => 2,
            Self::Runtime(_) => 1,
            Self::Aborted => 130,
        }
    }
}

/// What was learned before the agent could start.
pub struct Prepared {
    pub instance_id: String,
    pub identity: StackIdentity,
    pub settings: Settings,
    pub sdk: aws_config::SdkConfig,
}

/// Reads IMDS, the user data and the runtime config. Shared with `check`.
pub async fn prepare(opts: &RunOptions) -> Result<Prepared, DaemonError> {
    let imds = SdkImds::new();
    let info = instance_info(&imds, opts.imds_attempts, Duration::from_millis(200))
        .await
        .map_err(|e| {
            DaemonError::Input(format!(
                "cannot read instance metadata after {} attempts: {e}; fix: on EC2 the launch template must enable IMDSv2 (HttpEndpoint enabled, hop limit ≥ 1); elsewhere set AWS_EC2_METADATA_SERVICE_ENDPOINT",
                opts.imds_attempts
            ))
        })?;
    let identity = StackIdentity::from_user_data(&info.user_data)
        .map_err(|e| DaemonError::Input(format!("instance {}: {e}", info.instance_id)))?;
    let sdk = crate::aws::sdk_config(&info.region).await;
    let ssm = SdkParameterStore::new(&sdk);
    let raw = get_parameter(&ssm, &identity.config_parameter, opts.aws_retry_backoff)
        .await
        .map_err(|e| match e {
            SsmError::NotFound { name } => DaemonError::Input(format!(
                "runtime config parameter {name} does not exist; fix: deploy the stack ({}) with agent-fleet deploy, or correct {} in the user data",
                identity.stack_name,
                crate::config::USER_DATA_CONFIG_KEY
            )),
            e => DaemonError::Input(format!("cannot read the runtime config: {e}")),
        })?;
    let settings = Settings::parse(&identity.config_parameter, &raw.value)
        .map_err(|e| DaemonError::Input(e.to_string()))?;
    warn_ignored_keys(&settings);
    Ok(Prepared {
        instance_id: info.instance_id,
        identity,
        settings,
        sdk,
    })
}

/// GetParameter, retried with backoff on throttling and 5xx (the fleet shares one SSM
/// quota; a thundering herd at scale-up must not fail the boot).
pub async fn get_parameter<P: ParameterStore>(
    ssm: &P,
    name: &str,
    first_backoff: Duration,
) -> Result<Parameter, SsmError> {
    let policy = RetryPolicy {
        attempts: 6,
        first_delay: first_backoff,
        max_delay: Duration::from_secs(10),
    };
    policy
        .run(
            || ssm.get(name),
            SsmError::is_transient,
            |attempt, e, _| tracing::warn!(parameter = name, attempt, error = %e, "SSM call failed; retrying"),
        )
        .await
        .0
}

pub async fn read_token<P: ParameterStore>(
    ssm: &P,
    settings: &Settings,
    backoff: Duration,
) -> Result<String, DaemonError> {
    let p = get_parameter(ssm, &settings.token_parameter, backoff)
        .await
        .map_err(|e| match e {
            SsmError::NotFound { name } => DaemonError::Input(format!(
                "registration token parameter {name} does not exist; fix: store the agent type's token with `agent-fleet token set` (a SecureString), or correct token_parameter in {}",
                settings.config_parameter
            )),
            e => DaemonError::Input(format!(
                "cannot read the registration token parameter {}: {e}",
                settings.token_parameter
            )),
        })?;
    if !p.secure {
        tracing::warn!(parameter = %settings.token_parameter, "the registration token parameter is not a SecureString; store it encrypted (agent-fleet token set)");
    }
    let token = p.value.trim().to_string();
    // Before anything could log it: no record that ships carries the token.
    crate::logs::redact(&token);
    if token.is_empty() {
        return Err(DaemonError::Input(format!(
            "registration token parameter {} is empty; fix: agent-fleet token set",
            settings.token_parameter
        )));
    }
    Ok(token)
}

/// Keys of the runtime config this supervisor does not know: a newer stack template than
/// the AMI, or a typo in a hand edit.
pub fn warn_ignored_keys(settings: &Settings) {
    if !settings.ignored_keys.is_empty() {
        tracing::warn!(
            parameter = %settings.config_parameter,
            keys = %settings.ignored_keys.join(", "),
            "runtime config keys this agent-supervisor does not know are ignored; fix: rebuild the AMI (agent-fleet ami build) if the stack template is newer, or correct the key"
        );
    }
}
