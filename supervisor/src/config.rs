//! What the supervisor is told: its stack identity (from the instance's user data)
//! and the runtime config (one SSM parameter the CloudFormation template writes).
//!
//! [`RuntimeConfig`] is the one serde type for that parameter: the template writes it,
//! this crate parses it, and a test deploys the template and parses what it wrote.
//! Types and values are checked strictly. Keys this version does not know are dropped
//! before parsing and named in [`Settings::ignored_keys`] (the daemon and `check` warn):
//! a newer stack template may add keys that an instance booted from an older AMI does not
//! know, and refusing them would stop every such instance. [`Settings`] is the validated
//! form the rest of the daemon uses.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The user-data keys that name the stack to the supervisor.
pub const USER_DATA_STACK_KEY: &str = "AGENT_FLEET_STACK";
pub const USER_DATA_CONFIG_KEY: &str = "AGENT_FLEET_CONFIG_PARAMETER";
pub const USER_DATA_ROLE_KEY: &str = "AGENT_FLEET_ROLE";

/// What this instance is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Runs an agent, and stands for leader.
    #[default]
    Agent,
    /// No agent: only the election (as a preferred candidate) and the scaler. The
    /// one-instance group that lets the fleet scale up from zero runs this.
    Scaler,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Scaler => "scaler",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "agent" => Ok(Self::Agent),
            "scaler" => Ok(Self::Scaler),
            other => Err(format!("role {other:?} is not agent or scaler")),
        }
    }
}

/// Which stack this instance belongs to, read from its user data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackIdentity {
    pub stack_name: String,
    /// Name of the SSM parameter holding the [`RuntimeConfig`] JSON.
    pub config_parameter: String,
    /// The role the launch template gives this instance, if any.
    pub role: Option<Role>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserDataError {
    #[error("user data has no {USER_DATA_STACK_KEY}= line; fix: launch the instance from the agent-fleet launch template (it writes the user data)")]
    MissingStack,
    #[error("user data line {line}: {USER_DATA_STACK_KEY} {value:?} is not a valid stack name (1-128 of A-Z a-z 0-9 -)")]
    BadStack { line: usize, value: String },
    #[error("user data line {line}: {USER_DATA_ROLE_KEY}: {detail}")]
    BadRole { line: usize, detail: String },
}

impl StackIdentity {
    /// The default config parameter for a stack, when the user data names none.
    pub fn default_config_parameter(stack_name: &str) -> String {
        format!("/agent-fleet/{stack_name}/config")
    }

    /// Parses user data: `KEY=VALUE` lines, `#` comments and blank lines ignored,
    /// values optionally quoted. Unknown keys are ignored (the user data may also carry
    /// a shell script or cloud-init material meant for others).
    pub fn from_user_data(text: &str) -> Result<Self, UserDataError> {
        let mut stack = None;
        let mut config = None;
        let mut role = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = unquote(value.trim());
            match key.trim() {
                USER_DATA_STACK_KEY => {
                    if !valid_stack_name(value) {
                        return Err(UserDataError::BadStack {
                            line: i + 1,
                            value: value.to_string(),
                        });
                    }
                    stack = Some(value.to_string());
                }
                USER_DATA_CONFIG_KEY if !value.is_empty() => config = Some(value.to_string()),
                USER_DATA_ROLE_KEY => {
                    role = Some(value.parse().map_err(|detail| UserDataError::BadRole {
                        line: i + 1,
                        detail,
                    })?)
                }
                _ => {}
            }
        }
        let stack_name = stack.ok_or(UserDataError::MissingStack)?;
        let config_parameter =
            config.unwrap_or_else(|| Self::default_config_parameter(&stack_name));
        Ok(Self {
            stack_name,
            config_parameter,
            role,
        })
    }
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// CloudFormation's stack-name rule: a letter, then letters, digits and dashes, ≤ 128.
pub fn valid_stack_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The runtime config parameter, as JSON. Field names are the JSON keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Semaphore endpoint host\[:port\], no scheme (`myorg.semaphoreci.com`).
    pub endpoint: String,
    /// SSM SecureString parameter holding the agent-type registration token.
    pub token_parameter: String,
    /// Name of the agents' Auto Scaling group.
    pub agent_group: String,
    /// One job per instance (`disconnect-after-job`).
    #[serde(default = "default_true")]
    pub disconnect_after_job: bool,
    /// Seconds idle before the agent disconnects; 0 = never (no scale-in).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Seconds a running job may go on after the instance is asked to stop.
    #[serde(default = "default_grace")]
    pub interruption_grace_secs: u64,
    /// S3 bucket for the job cache, exported to jobs.
    #[serde(default)]
    pub cache_bucket: Option<String>,
    /// Talk plain HTTP to the endpoint. Only for a local hub; never in production.
    #[serde(default)]
    pub no_https: bool,
    /// Demand-driven scale-up (`SEMAPHORE_AGENT_USE_DYNAMIC_SCALING`).
    #[serde(default)]
    pub scaler: ScalerConfig,
    /// Leader-election timings and where the lease lives.
    #[serde(default)]
    pub election: ElectionConfig,
    /// The agents group's termination lifecycle hook, if it has one: the supervisor
    /// holds its instance in `Terminating:Wait` while the agent drains, then completes it.
    #[serde(default)]
    pub lifecycle_hook: Option<LifecycleHookConfig>,
    /// Seconds after launch at which an instance replaces itself (an idle one at once, a
    /// busy one after its job); 0 = never (`SEMAPHORE_AGENT_MAX_UPTIME`).
    #[serde(default)]
    pub max_uptime_secs: u64,
    /// Agent instances stand for leader. The template sets it false whenever it runs the
    /// one-instance scaler group, so that a job (root on its VM) holds no leader powers.
    #[serde(default = "default_true")]
    pub agents_lead: bool,
    /// `vm` (sudo and Docker for jobs; the VM is the boundary) or `strict` (no sudo,
    /// rootless Docker) — `SEMAPHORE_AGENT_JOB_ISOLATION`.
    #[serde(default)]
    pub job_isolation: JobIsolation,
    /// The role whose short-lived credentials jobs get (cache bucket, managed policies).
    #[serde(default)]
    pub job_role_arn: Option<String>,
    /// Name agents with a pre-signed STS `GetCallerIdentity` URL the server can verify
    /// (`SEMAPHORE_AGENT_USE_PRE_SIGNED_URL`).
    #[serde(default)]
    pub use_pre_signed_url: bool,
    /// The agents group's launch lifecycle hook (`agent-fleet-warm`), present only with a
    /// warm pool: a pooled instance completes it once warmed, and again on its way into
    /// service (see [`crate::pool`]).
    #[serde(default)]
    pub launch_hook: Option<LifecycleHookConfig>,
    /// Docker images a pooled instance pulls while warming (`SEMAPHORE_AGENT_WARM_IMAGES`).
    #[serde(default)]
    pub warm_images: Vec<String>,
    /// The SSM parameter the launch template's `resolve:ssm:` image names
    /// (`/agent-fleet/ami/<os>/<arch>`); absent when the stack names an AMI id. A pooled
    /// instance whose AMI is not the parameter's replaces itself.
    #[serde(default)]
    pub image_parameter: Option<String>,
    /// The SSM parameter (String) holding GitHub's SSH host keys as known_hosts lines: the
    /// leader refreshes it from `github_meta_url`, instances copy it into the agent user's
    /// `known_hosts` before the agent starts (see [`crate::known_hosts`]). Absent: neither.
    #[serde(default)]
    pub known_hosts_parameter: Option<String>,
    /// GitHub's meta API, whose `ssh_keys` the leader reads (default
    /// [`DEFAULT_GITHUB_META_URL`]): HTTPS, or plain HTTP to this machine only.
    #[serde(default)]
    pub github_meta_url: Option<String>,
    /// Seconds between the leader's refreshes of the host keys (default a day).
    #[serde(default = "default_known_hosts_refresh")]
    pub known_hosts_refresh_secs: u64,
    /// The stack's CloudWatch Logs group (`/agent-fleet/<stack>`), where each instance
    /// ships its records to a stream named by its id; absent = no shipping
    /// (`SEMAPHORE_AGENT_SHIP_LOGS=false`). See [`crate::logs`].
    #[serde(default)]
    pub log_group: Option<String>,
}

/// Where GitHub publishes its SSH host keys (`ssh_keys`).
pub const DEFAULT_GITHUB_META_URL: &str = "https://api.github.com/meta";
/// The host keys are refreshed at most this often by default: GitHub rotates them rarely
/// and announces it, and its meta API allows 60 unauthenticated calls an hour per address.
pub const DEFAULT_KNOWN_HOSTS_REFRESH_SECS: u64 = 24 * 3600;

fn default_known_hosts_refresh() -> u64 {
    DEFAULT_KNOWN_HOSTS_REFRESH_SECS
}

/// How much a job may do on its VM (`SEMAPHORE_AGENT_JOB_ISOLATION`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobIsolation {
    /// The reference's passwordless sudo and the Docker group: the job is root on its VM,
    /// and the VM is the boundary.
    #[default]
    Vm,
    /// No sudo, no Docker group; rootless Docker as the agent user.
    Strict,
}

impl JobIsolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vm => "vm",
            Self::Strict => "strict",
        }
    }
}

/// A lifecycle hook the template puts on the agents group (the termination hook, or with
/// a warm pool the launch hook).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleHookConfig {
    /// `LifecycleHookName` (1-255 of `A-Za-z0-9-_/`).
    pub name: String,
    /// The hook's `HeartbeatTimeout`: heartbeats go out at a third of it.
    pub heartbeat_timeout_secs: u64,
}

/// The scaler's knobs. They apply live (re-read on SIGHUP and periodically).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScalerConfig {
    pub enabled: bool,
    /// How often the leader polls Semaphore's `/metrics`.
    pub poll_interval_ms: u64,
    /// `none`, `number` or `percentage` (`SEMAPHORE_AGENT_OVERPROVISION_STRATEGY`).
    pub overprovision_strategy: String,
    /// `SEMAPHORE_AGENT_OVERPROVISION_FACTOR`: an integer ≥ 1 unless the strategy is `none`.
    pub overprovision_factor: u32,
    /// The leader ends (without decrement) any agent instance in service longer than this,
    /// so that a job that kills its supervisor cannot keep its VM; 0 = never
    /// (`SEMAPHORE_AGENT_LIFETIME_CAP`).
    pub agent_lifetime_cap_secs: u64,
}

/// The default hard lifetime cap: 26 hours, above the longest job Semaphore allows (24 h).
pub const DEFAULT_LIFETIME_CAP_SECS: u64 = 26 * 3600;

impl Default for ScalerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval_ms: 5000,
            overprovision_strategy: "none".into(),
            overprovision_factor: 0,
            agent_lifetime_cap_secs: DEFAULT_LIFETIME_CAP_SECS,
        }
    }
}

/// The longest `election.lease_ms`, `renew_deadline_ms` or `retry_ms` may be: 5 minutes.
///
/// Failover after a crash takes about lease + renew_deadline + retry, so at the cap the
/// fleet goes up to 15 minutes without a leader (no scale-up) — anything longer is a typo,
/// not tuning (the defaults are 20 s / 12 s / 4 s). The same bound caps the lease that a
/// record read from SSM may make a candidate wait ([`Record::lease`]), and keeps every
/// `Instant + timing` the election computes far from overflow.
///
/// [`Record::lease`]: crate::election::Record::lease
pub const MAX_ELECTION_TIMING_MS: u64 = 300_000;

/// [`MAX_ELECTION_TIMING_MS`] as a `Duration`.
pub const MAX_ELECTION_TIMING: Duration = Duration::from_millis(MAX_ELECTION_TIMING_MS);

/// Lease timings (client-go's semantics). Validated: `lease > renew_deadline > 1.2 × retry`,
/// each at most [`MAX_ELECTION_TIMING_MS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElectionConfig {
    pub lease_ms: u64,
    pub renew_deadline_ms: u64,
    pub retry_ms: u64,
    /// SSM path under which terms live (`<prefix>/<term>`). Default: the config
    /// parameter's parent + `/leader`.
    pub prefix: Option<String>,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        Self {
            lease_ms: 20_000,
            renew_deadline_ms: 12_000,
            retry_ms: 4_000,
            prefix: None,
        }
    }
}

/// How many extra agents to keep ready beyond the jobs waiting and running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overprovision {
    None,
    /// `jobs + n`
    Number(u32),
    /// `jobs + ceil(jobs × p / 100)`
    Percentage(u32),
}

/// Validated scaler knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalerSettings {
    pub enabled: bool,
    pub poll_interval: Duration,
    pub overprovision: Overprovision,
    /// `None`: the leader ends no agent for its age.
    pub agent_lifetime_cap: Option<Duration>,
}

/// Validated lifecycle hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleHook {
    pub name: String,
    pub heartbeat_timeout: Duration,
}

/// Validated election timings: each at most [`MAX_ELECTION_TIMING`]. The elector clamps
/// longer ones (a hand-built value) to that cap rather than overflow an `Instant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionSettings {
    pub lease: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
    /// No trailing slash; terms are `<prefix>/<term, zero-padded>`.
    pub prefix: String,
}

fn default_true() -> bool {
    true
}
fn default_idle_timeout() -> u64 {
    300
}
fn default_grace() -> u64 {
    60
}

/// Why a runtime config was refused. Every message names the parameter and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("runtime config parameter {parameter}: {detail}; fix: redeploy the stack (agent-fleet deploy) or correct the parameter's JSON")]
    Parse { parameter: String, detail: String },
    #[error("runtime config parameter {parameter}: key `{key}` {problem}")]
    Invalid {
        parameter: String,
        key: &'static str,
        problem: String,
    },
}

/// The validated runtime config. Built only through [`Settings::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub config_parameter: String,
    pub endpoint: String,
    pub token_parameter: String,
    pub agent_group: String,
    pub disconnect_after_job: bool,
    pub idle_timeout: Duration,
    pub interruption_grace: Duration,
    pub cache_bucket: Option<String>,
    pub no_https: bool,
    pub scaler: ScalerSettings,
    pub election: ElectionSettings,
    pub lifecycle_hook: Option<LifecycleHook>,
    /// `None`: no age limit.
    pub max_uptime: Option<Duration>,
    pub agents_lead: bool,
    pub job_isolation: JobIsolation,
    pub job_role_arn: Option<String>,
    pub use_pre_signed_url: bool,
    /// The launch lifecycle hook (warm pool only).
    pub launch_hook: Option<LifecycleHook>,
    /// Images pulled while warming in the pool, each a plain reference (never an option).
    pub warm_images: Vec<String>,
    pub image_parameter: Option<String>,
    /// GitHub's SSH host keys: where they are kept, where they come from, how often.
    pub known_hosts: KnownHostsSettings,
    /// Where this instance's logs go (`None`: nowhere but the journal). Read at start.
    pub log_group: Option<String>,
    /// Keys of the parameter this version does not know (`scaler.foo`), ignored.
    pub ignored_keys: Vec<String>,
}

/// The keys this version knows, per object of the runtime config ("" = the top level).
const KNOWN_KEYS: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "endpoint",
            "token_parameter",
            "agent_group",
            "disconnect_after_job",
            "idle_timeout_secs",
            "interruption_grace_secs",
            "cache_bucket",
            "no_https",
            "scaler",
            "election",
            "lifecycle_hook",
            "max_uptime_secs",
            "agents_lead",
            "job_isolation",
            "job_role_arn",
            "use_pre_signed_url",
            "launch_hook",
            "warm_images",
            "image_parameter",
            "known_hosts_parameter",
            "github_meta_url",
            "known_hosts_refresh_secs",
            "log_group",
        ],
    ),
    (
        "scaler",
        &[
            "enabled",
            "poll_interval_ms",
            "overprovision_strategy",
            "overprovision_factor",
            "agent_lifetime_cap_secs",
        ],
    ),
    (
        "election",
        &["lease_ms", "renew_deadline_ms", "retry_ms", "prefix"],
    ),
    ("lifecycle_hook", &["name", "heartbeat_timeout_secs"]),
    ("launch_hook", &["name", "heartbeat_timeout_secs"]),
];

/// Drops the keys [`KNOWN_KEYS`] does not list; returns their paths.
fn drop_unknown_keys(doc: &mut serde_json::Value) -> Vec<String> {
    let mut dropped = vec![];
    for (object, known) in KNOWN_KEYS {
        let target = if object.is_empty() {
            Some(&mut *doc)
        } else {
            doc.get_mut(*object)
        };
        let Some(map) = target.and_then(|v| v.as_object_mut()) else {
            continue;
        };
        let unknown: Vec<String> = map
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .cloned()
            .collect();
        for k in unknown {
            map.remove(&k);
            dropped.push(if object.is_empty() {
                k
            } else {
                format!("{object}.{k}")
            });
        }
    }
    dropped
}

impl Settings {
    pub fn parse(parameter: &str, json: &str) -> Result<Self, ConfigError> {
        let mut doc: serde_json::Value =
            serde_json::from_str(json).map_err(|e| ConfigError::Parse {
                parameter: parameter.to_string(),
                detail: e.to_string(),
            })?;
        let ignored_keys = drop_unknown_keys(&mut doc);
        let raw: RuntimeConfig = serde_path_to_error::deserialize(doc).map_err(|e| {
            let path = e.path().to_string();
            let detail = if path == "." || path.is_empty() {
                e.inner().to_string()
            } else {
                format!("key `{path}`: {}", e.inner())
            };
            ConfigError::Parse {
                parameter: parameter.to_string(),
                detail,
            }
        })?;
        let mut settings = Self::validate(parameter, raw)?;
        settings.ignored_keys = ignored_keys;
        Ok(settings)
    }

    pub fn validate(parameter: &str, raw: RuntimeConfig) -> Result<Self, ConfigError> {
        let invalid = |key: &'static str, problem: &str| ConfigError::Invalid {
            parameter: parameter.to_string(),
            key,
            problem: problem.to_string(),
        };
        let endpoint = raw.endpoint.trim();
        if endpoint.is_empty() {
            return Err(invalid(
                "endpoint",
                "is empty; set it to your Semaphore host, e.g. myorg.semaphoreci.com",
            ));
        }
        let host = check_endpoint(endpoint).map_err(|why| {
            invalid(
                "endpoint",
                &format!(
                    "{endpoint:?} {why}; set it to host[:port] only, e.g. myorg.semaphoreci.com"
                ),
            )
        })?;
        if raw.no_https && !host.is_loopback() {
            return Err(invalid(
                "no_https",
                &format!(
                    "is true but endpoint {endpoint:?} is not on this machine (127.0.0.0/8, [::1] or localhost): the registration token would cross the network in plain text; set no_https to false"
                ),
            ));
        }
        if !valid_parameter_name(&raw.token_parameter) {
            return Err(invalid(
                "token_parameter",
                "is not a valid SSM parameter name",
            ));
        }
        if raw.agent_group.trim().is_empty() {
            return Err(invalid(
                "agent_group",
                "is empty; it must name the agents' Auto Scaling group",
            ));
        }
        if raw.idle_timeout_secs > 7 * 24 * 3600 {
            return Err(invalid(
                "idle_timeout_secs",
                "is over a week; use 0 to never disconnect",
            ));
        }
        if raw.interruption_grace_secs > 3600 {
            return Err(invalid("interruption_grace_secs", "is over an hour"));
        }
        let cache_bucket = match raw.cache_bucket {
            Some(b) if b.trim().is_empty() => None,
            Some(b) if !valid_bucket_name(&b) => {
                return Err(invalid("cache_bucket", "is not a valid S3 bucket name"))
            }
            other => other,
        };
        let lifecycle_hook = validate_hook(
            raw.lifecycle_hook,
            (
                "lifecycle_hook.name",
                "lifecycle_hook.heartbeat_timeout_secs",
            ),
        )
        .map_err(|(key, p)| invalid(key, p))?;
        let launch_hook = validate_hook(
            raw.launch_hook,
            ("launch_hook.name", "launch_hook.heartbeat_timeout_secs"),
        )
        .map_err(|(key, p)| invalid(key, p))?;
        if raw.warm_images.len() > MAX_WARM_IMAGES {
            return Err(invalid(
                "warm_images",
                &format!("names more than {MAX_WARM_IMAGES} images; keep the ones most jobs use"),
            ));
        }
        if let Some(bad) = raw.warm_images.iter().find(|i| !valid_image_reference(i)) {
            return Err(invalid(
                "warm_images",
                &format!("has {bad:?}, not an image reference (e.g. ruby:3.3 or registry.example/team/app@sha256:…); fix SEMAPHORE_AGENT_WARM_IMAGES"),
            ));
        }
        let image_parameter = match raw.image_parameter {
            Some(p) if p.trim().is_empty() => None,
            Some(p) if !valid_parameter_name(&p) => {
                return Err(invalid(
                    "image_parameter",
                    "is not a valid SSM parameter name",
                ))
            }
            other => other,
        };
        if raw.max_uptime_secs > 999_999_999 {
            return Err(invalid(
                "max_uptime_secs",
                "is over 999999999 seconds; use 0 for no limit",
            ));
        }
        let scaler = validate_scaler(&raw.scaler).map_err(|(key, p)| invalid(key, &p))?;
        let job_role_arn = match raw.job_role_arn {
            Some(a) if a.trim().is_empty() => None,
            Some(a) if !(a.starts_with("arn:") && a.contains(":role/")) => {
                return Err(invalid(
                    "job_role_arn",
                    &format!("is {a:?}, not an IAM role ARN (arn:aws:iam::<account>:role/…); redeploy the stack"),
                ))
            }
            other => other,
        };
        let election =
            validate_election(&raw.election, parameter).map_err(|(key, p)| invalid(key, &p))?;
        let known_hosts = validate_known_hosts(
            raw.known_hosts_parameter,
            raw.github_meta_url,
            raw.known_hosts_refresh_secs,
        )
        .map_err(|(key, p)| invalid(key, &p))?;
        let log_group = match raw.log_group {
            Some(g) if g.trim().is_empty() => None,
            Some(g) if !valid_log_group_name(&g) => {
                return Err(invalid(
                    "log_group",
                    &format!("is {g:?}, not a CloudWatch Logs group name (1-512 of A-Z a-z 0-9 _ - / . #); redeploy the stack"),
                ))
            }
            other => other,
        };
        Ok(Self {
            known_hosts,
            ignored_keys: vec![],
            scaler,
            election,
            config_parameter: parameter.to_string(),
            endpoint: endpoint.to_string(),
            token_parameter: raw.token_parameter,
            agent_group: raw.agent_group,
            disconnect_after_job: raw.disconnect_after_job,
            idle_timeout: Duration::from_secs(raw.idle_timeout_secs),
            interruption_grace: Duration::from_secs(raw.interruption_grace_secs),
            cache_bucket,
            no_https: raw.no_https,
            lifecycle_hook,
            max_uptime: (raw.max_uptime_secs > 0).then(|| Duration::from_secs(raw.max_uptime_secs)),
            agents_lead: raw.agents_lead,
            job_isolation: raw.job_isolation,
            job_role_arn,
            use_pre_signed_url: raw.use_pre_signed_url,
            launch_hook,
            warm_images: raw.warm_images,
            image_parameter,
            log_group,
        })
    }
}

/// GitHub's SSH host keys, validated (see [`RuntimeConfig::known_hosts_parameter`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownHostsSettings {
    /// `None`: no parameter; instances fall back to the AMI's file, the leader fetches nothing.
    pub parameter: Option<String>,
    pub meta_url: String,
    pub refresh: Duration,
}

impl Default for KnownHostsSettings {
    fn default() -> Self {
        Self {
            parameter: None,
            meta_url: DEFAULT_GITHUB_META_URL.into(),
            refresh: Duration::from_secs(DEFAULT_KNOWN_HOSTS_REFRESH_SECS),
        }
    }
}

fn validate_known_hosts(
    parameter: Option<String>,
    url: Option<String>,
    refresh_secs: u64,
) -> Result<KnownHostsSettings, (&'static str, String)> {
    let parameter = match parameter {
        Some(p) if p.trim().is_empty() => None,
        Some(p) if !valid_parameter_name(&p) => {
            return Err((
                "known_hosts_parameter",
                "is not a valid SSM parameter name".into(),
            ))
        }
        other => other,
    };
    let meta_url = match url {
        Some(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ => DEFAULT_GITHUB_META_URL.to_string(),
    };
    check_meta_url(&meta_url).map_err(|why| {
        (
            "github_meta_url",
            format!("{meta_url:?} {why}; leave it out for {DEFAULT_GITHUB_META_URL}"),
        )
    })?;
    if !(1..=7 * 24 * 3600).contains(&refresh_secs) {
        return Err((
            "known_hosts_refresh_secs",
            "must be between 1 and 604800 (a week); leave it out for a day".into(),
        ));
    }
    Ok(KnownHostsSettings {
        parameter,
        meta_url,
        refresh: Duration::from_secs(refresh_secs),
    })
}

/// The meta URL rule, as `no_https` for the endpoint: HTTPS, or plain HTTP only to this
/// machine (127.0.0.0/8, \[::1\], localhost) — host keys read in plain text over the
/// network could be anyone's. No user info (`user@`).
pub fn check_meta_url(s: &str) -> Result<(), &'static str> {
    let url = reqwest::Url::parse(s).map_err(|_| "is not a URL")?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("has user info (`user@`)");
    }
    let host = url.host_str().ok_or("has no host")?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err("is plain HTTP to another machine: host keys read in plain text could be an attacker's; use https"),
        _ => Err("is not an https URL"),
    }
}

/// CloudWatch Logs' group name rule: 1-512 of `A-Za-z0-9_-/.#`.
pub fn valid_log_group_name(s: &str) -> bool {
    (1..=512).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/' | '.' | '#'))
}

/// The most images a pooled instance pulls while warming.
pub const MAX_WARM_IMAGES: usize = 20;

/// A lifecycle hook's name and heartbeat timeout; `keys` name the two in errors.
fn validate_hook(
    hook: Option<LifecycleHookConfig>,
    (name_key, timeout_key): (&'static str, &'static str),
) -> Result<Option<LifecycleHook>, (&'static str, &'static str)> {
    let Some(h) = hook else { return Ok(None) };
    let name_ok = (1..=255).contains(&h.name.len())
        && h.name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/'));
    if !name_ok {
        return Err((
            name_key,
            "is not a lifecycle hook name (1-255 of A-Z a-z 0-9 - _ /)",
        ));
    }
    if !(1..=7200).contains(&h.heartbeat_timeout_secs) {
        return Err((
            timeout_key,
            "must be between 1 and 7200 (Auto Scaling allows 30-7200)",
        ));
    }
    Ok(Some(LifecycleHook {
        name: h.name,
        heartbeat_timeout: Duration::from_secs(h.heartbeat_timeout_secs),
    }))
}

/// A Docker image reference as `docker pull` takes it: `[registry[:port]/]path[:tag][@digest]`
/// of `A-Za-z0-9._-/:@`, at most 255 characters, starting with a letter or digit (so it
/// can never be read as an option).
pub fn valid_image_reference(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'))
}

fn validate_scaler(c: &ScalerConfig) -> Result<ScalerSettings, (&'static str, String)> {
    if !(1000..=300_000).contains(&c.poll_interval_ms) {
        return Err((
            "scaler.poll_interval_ms",
            "must be between 1000 and 300000".into(),
        ));
    }
    let overprovision = match (c.overprovision_strategy.as_str(), c.overprovision_factor) {
        ("none", _) => Overprovision::None,
        ("number" | "percentage", 0) => {
            return Err((
                "scaler.overprovision_factor",
                "must be an integer ≥ 1 when the strategy is number or percentage".into(),
            ))
        }
        ("number", n) => Overprovision::Number(n),
        ("percentage", n) => Overprovision::Percentage(n),
        (other, _) => {
            return Err((
                "scaler.overprovision_strategy",
                format!("is {other:?}; use none, number or percentage"),
            ))
        }
    };
    let cap = c.agent_lifetime_cap_secs;
    if cap != 0 && !(3600..=999_999_999).contains(&cap) {
        return Err((
            "scaler.agent_lifetime_cap_secs",
            "must be 0 (no cap) or between 3600 and 999999999 seconds".into(),
        ));
    }
    Ok(ScalerSettings {
        enabled: c.enabled,
        poll_interval: Duration::from_millis(c.poll_interval_ms),
        overprovision,
        agent_lifetime_cap: (cap > 0).then(|| Duration::from_secs(cap)),
    })
}

fn validate_election(
    c: &ElectionConfig,
    config_parameter: &str,
) -> Result<ElectionSettings, (&'static str, String)> {
    let (lease, deadline, retry) = (c.lease_ms, c.renew_deadline_ms, c.retry_ms);
    for (key, ms) in [
        ("election.lease_ms", lease),
        ("election.renew_deadline_ms", deadline),
        ("election.retry_ms", retry),
    ] {
        if ms > MAX_ELECTION_TIMING_MS {
            return Err((
                key,
                format!(
                    "({ms}) is over {MAX_ELECTION_TIMING_MS} (5 minutes): failover takes about lease + renew_deadline + retry; lower it (defaults 20000 / 12000 / 4000)"
                ),
            ));
        }
    }
    if retry < 100 {
        return Err(("election.retry_ms", "must be at least 100".into()));
    }
    // Each is at most MAX_ELECTION_TIMING_MS: neither product can overflow.
    if deadline * 10 <= retry * 12 {
        return Err((
            "election.renew_deadline_ms",
            format!("({deadline}) must be more than 1.2 × retry_ms ({retry})"),
        ));
    }
    if lease <= deadline {
        return Err((
            "election.lease_ms",
            format!("({lease}) must be more than renew_deadline_ms ({deadline})"),
        ));
    }
    let prefix = match &c.prefix {
        Some(p) => p.trim_end_matches('/').to_string(),
        None => {
            let parent = config_parameter
                .rsplit_once('/')
                .map(|(p, _)| p)
                .unwrap_or_default();
            format!("{parent}/leader")
        }
    };
    if !valid_parameter_name(&format!("{prefix}/0000000001")) {
        return Err((
            "election.prefix",
            "is not a valid SSM parameter path".into(),
        ));
    }
    Ok(ElectionSettings {
        lease: Duration::from_millis(lease),
        renew_deadline: Duration::from_millis(deadline),
        retry: Duration::from_millis(retry),
        prefix,
    })
}

/// SSM's rule: 1-2048 of `a-zA-Z0-9_.-/`, and at most 15 levels.
pub fn valid_parameter_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 2048
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
        && s.matches('/').count() <= 15
}

/// The host part of a valid endpoint (see [`check_endpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointHost<'a> {
    /// A DNS name (`myorg.semaphoreci.com`, `localhost`), or an IPv4 address.
    Name(&'a str),
    /// A bracketed IPv6 address (`[::1]`).
    V6(std::net::Ipv6Addr),
}

impl EndpointHost<'_> {
    /// `localhost`, 127.0.0.0/8 or ::1: traffic that never leaves the machine, the only
    /// place plain HTTP (`no_https`) may go.
    pub fn is_loopback(self) -> bool {
        match self {
            Self::Name(n) => {
                n.eq_ignore_ascii_case("localhost")
                    || n.parse::<std::net::Ipv4Addr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            Self::V6(ip) => ip.is_loopback(),
        }
    }
}

/// The Semaphore endpoint rule, shared by the supervisor and the stack CLI: `host[:port]`
/// and nothing else. The supervisor builds `https://<endpoint>/…` URLs and sends the
/// registration token there, so anything a URL parser would read as more than a host —
/// a scheme, `user@` (`org.semaphoreci.com@evil.example` is a request to evil.example),
/// a path, `?query` or `#fragment` — is refused, as is a port outside 1-65535.
///
/// The host is a DNS name (labels of 1-63 of `A-Za-z0-9-`, not starting or ending with
/// `-`, at most 253 characters; an IPv4 address is one) or a bracketed IPv6 address. The
/// error says what is wrong, for a message that goes on "set it to host\[:port\] only".
pub fn check_endpoint(s: &str) -> Result<EndpointHost<'_>, &'static str> {
    if s.contains("://") {
        return Err("has a scheme");
    }
    if s.contains('@') {
        return Err("has user info (`user@`), which makes the part after `@` the host");
    }
    if s.contains('/') {
        return Err("has a path");
    }
    if s.contains('?') {
        return Err("has a query");
    }
    if s.contains('#') {
        return Err("has a fragment");
    }
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let Some((v6, after)) = rest.split_once(']') else {
                return Err("has an unclosed `[`");
            };
            let Ok(ip) = v6.parse::<std::net::Ipv6Addr>() else {
                return Err("has an invalid IPv6 address in brackets");
            };
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or("has text after the IPv6 address")?,
                ),
            };
            (EndpointHost::V6(ip), port)
        }
        None => {
            let (host, port) = match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            };
            if !valid_dns_name(host) {
                return Err("is not a host name (labels of letters, digits and inner dashes, separated by dots; an IPv6 address goes in brackets)");
            }
            (EndpointHost::Name(host), port)
        }
    };
    if let Some(p) = port {
        let digits = !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits || p.parse::<u16>().map_or(true, |n| n == 0) {
            return Err("has a port outside 1-65535");
        }
    }
    Ok(host)
}

/// Whether `s` passes [`check_endpoint`].
pub fn valid_endpoint(s: &str) -> bool {
    check_endpoint(s).is_ok()
}

/// RFC 1123 host name: 1-253 characters; labels of 1-63 of `A-Za-z0-9-`, no leading or
/// trailing dash.
fn valid_dns_name(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn valid_bucket_name(s: &str) -> bool {
    (3..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"endpoint":"org.semaphoreci.com","token_parameter":"/s/token","agent_group":"s-agents"}"#;

    #[test]
    fn user_data_names_stack_and_default_parameter() {
        let id =
            StackIdentity::from_user_data("# hi\nAGENT_FLEET_STACK=ci-fleet\n").expect("parses");
        assert_eq!(id.stack_name, "ci-fleet");
        assert_eq!(id.config_parameter, "/agent-fleet/ci-fleet/config");
        let id = StackIdentity::from_user_data(
            "export AGENT_FLEET_STACK='a'\nAGENT_FLEET_CONFIG_PARAMETER=\"/x/y\"\n",
        )
        .expect("parses");
        assert_eq!(id.config_parameter, "/x/y");
        assert_eq!(id.role, None);
        let id = StackIdentity::from_user_data("AGENT_FLEET_STACK=a\nAGENT_FLEET_ROLE=scaler\n")
            .expect("parses");
        assert_eq!(id.role, Some(Role::Scaler));
        assert!(
            StackIdentity::from_user_data("AGENT_FLEET_STACK=a\nAGENT_FLEET_ROLE=boss\n").is_err()
        );
    }

    #[test]
    fn user_data_errors_say_what_is_wrong() {
        assert_eq!(
            StackIdentity::from_user_data("#!/bin/bash\necho hi\n"),
            Err(UserDataError::MissingStack)
        );
        let e = StackIdentity::from_user_data("AGENT_FLEET_STACK=1bad_name").expect_err("bad");
        assert!(e.to_string().contains("AGENT_FLEET_STACK"), "{e}");
    }

    #[test]
    fn defaults_match_the_reference_stack() {
        let s = Settings::parse("/p", GOOD).expect("valid");
        assert!(s.disconnect_after_job);
        assert_eq!(s.idle_timeout, Duration::from_secs(300));
        assert_eq!(s.cache_bucket, None);
        assert!(!s.no_https);
        assert_eq!(s.lifecycle_hook, None);
        assert_eq!(s.max_uptime, None);
    }

    #[test]
    fn lifecycle_hook_and_max_uptime() {
        let json = GOOD.replace(
            '}',
            r#","lifecycle_hook":{"name":"agent-fleet-drain","heartbeat_timeout_secs":600},"max_uptime_secs":86400}"#,
        );
        let s = Settings::parse("/p", &json).expect("valid");
        assert_eq!(
            s.lifecycle_hook,
            Some(LifecycleHook {
                name: "agent-fleet-drain".into(),
                heartbeat_timeout: Duration::from_secs(600)
            })
        );
        assert_eq!(s.max_uptime, Some(Duration::from_secs(86400)));
        let json = GOOD.replace('}', r#","max_uptime_secs":0,"lifecycle_hook":null}"#);
        let s = Settings::parse("/p", &json).expect("valid");
        assert_eq!((s.lifecycle_hook, s.max_uptime), (None, None));
        for (patch, key) in [
            (
                r#""lifecycle_hook":{"name":"has space","heartbeat_timeout_secs":60}"#,
                "lifecycle_hook.name",
            ),
            (
                r#""lifecycle_hook":{"name":"h","heartbeat_timeout_secs":0}"#,
                "lifecycle_hook.heartbeat_timeout_secs",
            ),
            (r#""max_uptime_secs":1000000000"#, "max_uptime_secs"),
        ] {
            let json = GOOD.replace('}', &format!(",{patch}}}"));
            let m = Settings::parse("/p", &json).expect_err(patch).to_string();
            assert!(m.contains(&format!("`{key}`")), "{patch}: {m}");
        }
        let json = GOOD.replace('}', r#","lifecycle_hook":{"name":"h"}}"#);
        let m = Settings::parse("/p", &json)
            .expect_err("missing")
            .to_string();
        assert!(m.contains("heartbeat_timeout_secs"), "{m}");
    }

    #[test]
    fn scaler_and_election_defaults_and_rules() {
        let s = Settings::parse("/agent-fleet/x/config", GOOD).expect("valid");
        assert_eq!(s.scaler.poll_interval, Duration::from_secs(5));
        assert_eq!(s.scaler.overprovision, Overprovision::None);
        assert_eq!(s.election.prefix, "/agent-fleet/x/leader");
        assert_eq!(s.election.lease, Duration::from_secs(20));
        for (patch, key) in [
            (r#""election":{"lease_ms":10000}"#, "election.lease_ms"),
            (
                r#""election":{"retry_ms":11000}"#,
                "election.renew_deadline_ms",
            ),
            (
                r#""scaler":{"overprovision_strategy":"number"}"#,
                "scaler.overprovision_factor",
            ),
            (
                r#""scaler":{"overprovision_strategy":"lots","overprovision_factor":2}"#,
                "scaler.overprovision_strategy",
            ),
            (
                r#""scaler":{"poll_interval_ms":10}"#,
                "scaler.poll_interval_ms",
            ),
        ] {
            let json = GOOD.replace('}', &format!(",{patch}}}"));
            let m = Settings::parse("/p", &json).expect_err(patch).to_string();
            assert!(m.contains(&format!("`{key}`")), "{patch}: {m}");
        }
        let json = GOOD.replace(
            '}',
            r#","scaler":{"overprovision_strategy":"percentage","overprovision_factor":50}}"#,
        );
        assert_eq!(
            Settings::parse("/p", &json)
                .expect("ok")
                .scaler
                .overprovision,
            Overprovision::Percentage(50)
        );
    }

    #[test]
    fn missing_field_is_named() {
        let e =
            Settings::parse("/p", r#"{"endpoint":"e","agent_group":"g"}"#).expect_err("missing");
        let m = e.to_string();
        assert!(m.contains("/p") && m.contains("token_parameter"), "{m}");
    }

    #[test]
    fn wrong_type_is_named() {
        let json = GOOD.replace('}', r#","idle_timeout_secs":"300"}"#);
        let m = Settings::parse("/p", &json).expect_err("type").to_string();
        assert!(m.contains("key `idle_timeout_secs`: invalid type"), "{m}");
    }

    #[test]
    fn unknown_keys_are_ignored_and_named() {
        let json = GOOD.replace(
            '}',
            r#","idle_timout_secs":5,"scaler":{"enabled":true,"future_knob":1}}"#,
        );
        let s = Settings::parse("/p", &json).expect("unknown keys are not fatal");
        assert_eq!(
            s.ignored_keys,
            vec!["idle_timout_secs", "scaler.future_knob"]
        );
        assert_eq!(
            s.idle_timeout,
            Duration::from_secs(300),
            "the default stays"
        );
        assert!(Settings::parse("/p", GOOD)
            .expect("valid")
            .ignored_keys
            .is_empty());
    }

    /// Every field of the serde types is in KNOWN_KEYS (else a real key would be dropped).
    #[test]
    fn known_keys_cover_every_field() {
        let full = RuntimeConfig {
            endpoint: "e".into(),
            token_parameter: "/t".into(),
            agent_group: "g".into(),
            disconnect_after_job: true,
            idle_timeout_secs: 1,
            interruption_grace_secs: 1,
            cache_bucket: Some("bucket".into()),
            no_https: false,
            scaler: ScalerConfig::default(),
            election: ElectionConfig {
                prefix: Some("/p/leader".into()),
                ..ElectionConfig::default()
            },
            lifecycle_hook: Some(LifecycleHookConfig {
                name: "h".into(),
                heartbeat_timeout_secs: 60,
            }),
            max_uptime_secs: 0,
            agents_lead: false,
            job_isolation: JobIsolation::Strict,
            job_role_arn: Some("arn:aws:iam::123456789012:role/agent-fleet/s/job".into()),
            use_pre_signed_url: true,
            launch_hook: Some(LifecycleHookConfig {
                name: "agent-fleet-warm".into(),
                heartbeat_timeout_secs: 600,
            }),
            warm_images: vec!["ruby:3.3".into()],
            image_parameter: Some("/agent-fleet/ami/ubuntu-noble/x86_64".into()),
            known_hosts_parameter: Some("/agent-fleet/s/known-hosts".into()),
            github_meta_url: Some("https://github.example/api/v3/meta".into()),
            known_hosts_refresh_secs: 3600,
            log_group: Some("/agent-fleet/s".into()),
        };
        let mut doc = serde_json::to_value(&full).expect("serialize");
        assert_eq!(drop_unknown_keys(&mut doc), Vec::<String>::new());
    }

    #[test]
    fn the_isolation_level_leadership_job_role_and_cap_are_read_with_safe_defaults() {
        let d = Settings::parse("/p", GOOD).expect("valid");
        assert!(
            d.agents_lead,
            "an older template's fleet keeps leading itself"
        );
        assert_eq!(d.job_isolation, JobIsolation::Vm);
        assert_eq!(d.job_role_arn, None);
        assert!(!d.use_pre_signed_url);
        assert_eq!(
            d.scaler.agent_lifetime_cap,
            Some(Duration::from_secs(DEFAULT_LIFETIME_CAP_SECS))
        );
        let s = with(r#""agents_lead":false,"job_isolation":"strict","use_pre_signed_url":true,"job_role_arn":"arn:aws:iam::1:role/agent-fleet/s/job""#)
            .expect("valid");
        assert!(!s.agents_lead);
        assert_eq!(s.job_isolation, JobIsolation::Strict);
        assert!(s.use_pre_signed_url);
        assert_eq!(
            s.job_role_arn.as_deref(),
            Some("arn:aws:iam::1:role/agent-fleet/s/job")
        );
        let off = with(r#""scaler":{"agent_lifetime_cap_secs":0}"#).expect("valid");
        assert_eq!(off.scaler.agent_lifetime_cap, None);
        let e = with(r#""job_isolation":"none""#).expect_err("refused");
        assert!(e.contains("job_isolation") && e.contains("vm"), "{e}");
        let e = with(r#""scaler":{"agent_lifetime_cap_secs":60}"#).expect_err("refused");
        assert!(
            e.contains("scaler.agent_lifetime_cap_secs") && e.contains("3600"),
            "{e}"
        );
        let e = with(r#""job_role_arn":"my-role""#).expect_err("refused");
        assert!(e.contains("job_role_arn"), "{e}");
    }

    #[test]
    fn the_known_hosts_keys_default_to_githubs_api_daily_and_refuse_plain_http_off_the_machine() {
        let d = Settings::parse("/p", GOOD).expect("valid");
        assert_eq!(d.known_hosts, KnownHostsSettings::default());
        assert_eq!(d.known_hosts.meta_url, "https://api.github.com/meta");
        assert_eq!(d.known_hosts.refresh, Duration::from_secs(86_400));
        assert_eq!(d.known_hosts.parameter, None);
        let s = with(r#""known_hosts_parameter":"/agent-fleet/s/known-hosts","github_meta_url":"http://127.0.0.1:9/meta","known_hosts_refresh_secs":2"#)
            .expect("valid");
        assert_eq!(
            s.known_hosts.parameter.as_deref(),
            Some("/agent-fleet/s/known-hosts")
        );
        assert_eq!(s.known_hosts.meta_url, "http://127.0.0.1:9/meta");
        assert_eq!(s.known_hosts.refresh, Duration::from_secs(2));
        for ok in [
            "https://github.example/api/v3/meta",
            "http://localhost:8080/meta",
            "http://[::1]:8080/meta",
        ] {
            with(&format!(r#""github_meta_url":"{ok}""#)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, key, why) in [
            (
                r#""github_meta_url":"http://api.github.com/meta""#,
                "github_meta_url",
                "use https",
            ),
            (
                r#""github_meta_url":"https://me@evil.example/meta""#,
                "github_meta_url",
                "user info",
            ),
            (
                r#""github_meta_url":"ftp://x/meta""#,
                "github_meta_url",
                "not an https URL",
            ),
            (
                r#""github_meta_url":"api.github.com""#,
                "github_meta_url",
                "not a URL",
            ),
            (
                r#""known_hosts_parameter":"has space""#,
                "known_hosts_parameter",
                "SSM parameter name",
            ),
            (
                r#""known_hosts_refresh_secs":0"#,
                "known_hosts_refresh_secs",
                "a week",
            ),
        ] {
            let e = with(bad).expect_err(bad);
            assert!(e.contains(key) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_log_group_is_read_and_checked() {
        assert_eq!(Settings::parse("/p", GOOD).expect("valid").log_group, None);
        let s = with(r#""log_group":"/agent-fleet/my-fleet""#).expect("valid");
        assert_eq!(s.log_group.as_deref(), Some("/agent-fleet/my-fleet"));
        assert_eq!(with(r#""log_group":"""#).expect("valid").log_group, None);
        let e = with(r#""log_group":"has space""#).expect_err("refused");
        assert!(e.contains("log_group"), "{e}");
    }

    #[test]
    fn the_warm_pool_keys_are_read_and_checked() {
        let d = Settings::parse("/p", GOOD).expect("valid");
        assert_eq!(
            (d.launch_hook, d.warm_images.len(), d.image_parameter),
            (None, 0, None),
            "no warm pool by default"
        );
        let s = with(
            r#""launch_hook":{"name":"agent-fleet-warm","heartbeat_timeout_secs":600},"warm_images":["ruby:3.3","registry.example:5000/team/app@sha256:0a1b"],"image_parameter":"/agent-fleet/ami/ubuntu-noble/x86_64""#,
        )
        .expect("valid");
        assert_eq!(
            s.launch_hook,
            Some(LifecycleHook {
                name: "agent-fleet-warm".into(),
                heartbeat_timeout: Duration::from_secs(600)
            })
        );
        assert_eq!(
            s.warm_images,
            ["ruby:3.3", "registry.example:5000/team/app@sha256:0a1b"]
        );
        assert_eq!(
            s.image_parameter.as_deref(),
            Some("/agent-fleet/ami/ubuntu-noble/x86_64")
        );
        let null = with(r#""launch_hook":null,"image_parameter":"""#).expect("valid");
        assert_eq!((null.launch_hook, null.image_parameter), (None, None));
        for (patch, key) in [
            (
                r#""launch_hook":{"name":"a b","heartbeat_timeout_secs":600}"#,
                "launch_hook.name",
            ),
            (
                r#""launch_hook":{"name":"w","heartbeat_timeout_secs":7201}"#,
                "launch_hook.heartbeat_timeout_secs",
            ),
            (r#""warm_images":["--config=/etc/x"]"#, "warm_images"),
            (r#""warm_images":["ruby 3"]"#, "warm_images"),
            (r#""warm_images":[""]"#, "warm_images"),
            (r#""image_parameter":"has space""#, "image_parameter"),
        ] {
            let m = with(patch).expect_err(patch);
            assert!(m.contains(&format!("`{key}`")), "{patch}: {m}");
        }
        let many = format!(
            r#""warm_images":[{}]"#,
            vec![r#""a:1""#; MAX_WARM_IMAGES + 1].join(",")
        );
        assert!(with(&many)
            .expect_err("too many")
            .contains("`warm_images` names more than 20"));
        let m = with(r#""warm_images":["--x"]"#).expect_err("option");
        assert!(m.contains("SEMAPHORE_AGENT_WARM_IMAGES"), "{m}");
    }

    fn with(patch: &str) -> Result<Settings, String> {
        let json = GOOD.replace('}', &format!(",{patch}}}"));
        Settings::parse("/p", &json).map_err(|e| e.to_string())
    }

    fn with_endpoint(endpoint: &str, no_https: bool) -> Result<Settings, String> {
        let json = serde_json::json!({
            "endpoint": endpoint, "token_parameter": "/s/token", "agent_group": "g",
            "no_https": no_https,
        });
        Settings::parse("/p", &json.to_string()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_endpoint_is_a_host_and_port_only() {
        for ok in [
            "org.semaphoreci.com",
            "org.semaphoreci.com:443",
            "ORG.SemaphoreCI.com",
            "a",
            "127.0.0.1:8080",
            "[::1]:8080",
            "[2001:db8::1]",
            "localhost",
            "x-1.example:65535",
        ] {
            let s = with_endpoint(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(s.endpoint, ok);
        }
        for (bad, why) in [
            ("org.semaphoreci.com@evil.example", "user info"),
            ("user:pw@org.semaphoreci.com", "user info"),
            ("@evil.example", "user info"),
            ("https://org.semaphoreci.com", "scheme"),
            ("org.semaphoreci.com/api", "path"),
            ("org.semaphoreci.com?x=evil.example", "query"),
            ("org.semaphoreci.com#evil", "fragment"),
            ("org.semaphoreci.com:0", "port"),
            ("org.semaphoreci.com:65536", "port"),
            ("org.semaphoreci.com:", "port"),
            ("org.semaphoreci.com:443:1", "port"),
            ("org.semaphoreci.com:+80", "port"),
            ("org.semaphoreci.com:99999999999999999999", "port"),
            ("org semaphoreci.com", "host name"),
            ("org.semaphoreci.com\u{0}", "host name"),
            ("-org.semaphoreci.com", "host name"),
            ("org..semaphoreci.com", "host name"),
            ("org.semaphoreci.com.", "host name"),
            ("ex\u{e4}mple.com", "host name"),
            ("::1", "host name"),
            ("[::1", "unclosed"),
            ("[::1]x", "after the IPv6"),
            ("[evil.example]", "IPv6"),
        ] {
            let m = with_endpoint(bad, false).expect_err(bad);
            assert!(
                m.contains("key `endpoint`") && m.contains(why) && m.contains("host[:port] only"),
                "{bad}: {m}"
            );
        }
        let long = format!("{}.com", "a.".repeat(130));
        assert!(with_endpoint(&long, false).is_err());
        let label = format!("{}.com", "a".repeat(64));
        assert!(with_endpoint(&label, false).is_err());
    }

    #[test]
    fn no_https_only_to_loopback() {
        for ok in [
            "127.0.0.1:3000",
            "127.8.9.10",
            "[::1]:1",
            "localhost:80",
            "LOCALHOST",
        ] {
            let s = with_endpoint(ok, true).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(s.no_https);
        }
        for bad in [
            "org.semaphoreci.com",
            "10.0.0.1:80",
            "128.0.0.1",
            "0.0.0.0",
            "[::2]",
            "[::ffff:127.0.0.1]",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
        ] {
            let m = with_endpoint(bad, true).expect_err(bad);
            assert!(
                m.contains("key `no_https`") && m.contains("set no_https to false"),
                "{bad}: {m}"
            );
            assert!(with_endpoint(bad, false).is_ok(), "{bad} with https");
        }
    }

    #[test]
    fn election_timings_are_capped_without_overflow() {
        let at_cap = format!(
            r#""election":{{"lease_ms":{MAX_ELECTION_TIMING_MS},"renew_deadline_ms":{},"retry_ms":{}}}"#,
            MAX_ELECTION_TIMING_MS - 1,
            (MAX_ELECTION_TIMING_MS - 1) * 10 / 12 - 1,
        );
        let s = with(&at_cap).expect("at the cap");
        assert_eq!(s.election.lease, MAX_ELECTION_TIMING);
        for (key, value) in [
            ("lease_ms", MAX_ELECTION_TIMING_MS + 1),
            ("lease_ms", u64::MAX),
            ("renew_deadline_ms", MAX_ELECTION_TIMING_MS + 1),
            ("renew_deadline_ms", u64::MAX),
            ("retry_ms", MAX_ELECTION_TIMING_MS + 1),
            ("retry_ms", u64::MAX),
            ("retry_ms", u64::MAX / 10 + 1),
        ] {
            let m = with(&format!(r#""election":{{"{key}":{value}}}"#)).expect_err(key);
            assert!(
                m.contains(&format!("`election.{key}` ({value}) is over 300000"))
                    && m.contains("lower it"),
                "{key}={value}: {m}"
            );
        }
        // Every combination of edge values: an answer, never a panic.
        let edges = [
            0,
            1,
            99,
            100,
            4_000,
            299_999,
            300_000,
            300_001,
            u64::MAX / 12,
            u64::MAX,
        ];
        for lease in edges {
            for deadline in edges {
                for retry in edges {
                    let patch = format!(
                        r#""election":{{"lease_ms":{lease},"renew_deadline_ms":{deadline},"retry_ms":{retry}}}"#
                    );
                    if let Ok(s) = with(&patch) {
                        let e = s.election;
                        assert!(e.lease <= MAX_ELECTION_TIMING && e.lease > e.renew_deadline);
                        assert!(e.renew_deadline > e.retry.mul_f64(1.2));
                    }
                }
            }
        }
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        for (patch, key) in [
            (r#""endpoint":"https://org.semaphoreci.com""#, "endpoint"),
            (r#""endpoint":" ""#, "endpoint"),
            (r#""token_parameter":"has space""#, "token_parameter"),
            (r#""agent_group":"""#, "agent_group"),
        ] {
            let field = patch.split(':').next().unwrap_or_default();
            let json = GOOD
                .split(',')
                .map(|kv| {
                    if kv.trim_start_matches('{').starts_with(field) {
                        patch.to_string()
                    } else {
                        kv.trim_start_matches('{').trim_end_matches('}').to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(",");
            let json = format!("{{{json}}}");
            let m = Settings::parse("/p", &json).expect_err(patch).to_string();
            assert!(m.contains(&format!("`{key}`")), "{patch}: {m}");
        }
        let json = GOOD.replace('}', r#","cache_bucket":"Bad_Bucket"}"#);
        assert!(Settings::parse("/p", &json)
            .expect_err("bucket")
            .to_string()
            .contains("cache_bucket"));
    }
}
