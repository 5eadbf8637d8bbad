//! The AWS emulator of the test bed: moto's standalone server, launched through
//! `tests/bed/moto_server.py` (which adds the Auto Scaling strictness moto lacks, a call log
//! and fault injection; see the docstring there for the `/_bed/` control API).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use agent_fleet_tests::moto::Moto;
//! let moto = Moto::start().await?;          // ~2 s; needs `make venv`
//! moto.warm_up().await;                     // absorb moto's first-call cost
//! moto.create_group("fleet", 1, 4, 2).await?;
//! let child_env = moto.env();               // AWS_ENDPOINT_URL=http://127.0.0.1:PORT, ...
//! # Ok(()) }
//! ```
//!
//! The child process is in its own process group and is killed (SIGKILL to the group) when
//! [`Moto`] is dropped; it also exits by itself when the test process dies (it watches the
//! stdin pipe we hold).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ssm::config::Credentials;
use serde::Deserialize;

/// Region every emulated resource lives in.
pub const REGION: &str = "us-east-1";
/// Availability zone of the groups [`Moto::create_group`] makes.
pub const AZ: &str = "us-east-1a";
/// An image id from moto's default AMI list (Ubuntu 16.04, x86_64); moto does not validate
/// image ids unless told to.
pub const IMAGE_ID: &str = "ami-785db401";
/// moto's default account id.
pub const ACCOUNT_ID: &str = "123456789012";

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STDERR_TAIL_LINES: usize = 200;

/// One AWS request as the emulator logged it (`GET /_bed/calls`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Call {
    /// Increases by one per request, never reset (not even by [`Moto::clear_calls`]).
    pub seq: u64,
    /// Arrival, CLOCK_MONOTONIC nanoseconds (compare with [`monotonic_ns`] in any process).
    pub t_ns: u64,
    /// When the response was produced; `None` while the request is in flight.
    pub end_ns: Option<u64>,
    /// SigV4 signing name: `ssm`, `autoscaling`, `ec2`, `s3`, `monitoring`, `cloudformation`…
    pub service: String,
    /// Operation name, e.g. `PutParameter`, `TerminateInstanceInAutoScalingGroup`.
    pub action: String,
    /// Whitelisted request params (see `LOGGED_PARAMS` in moto_server.py), as strings
    /// (`"true"`, `"3"`) or lists of strings. Parameter values are never logged.
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// HTTP status of the answer (`None` while in flight or after a `reset` fault).
    pub status: Option<u16>,
    /// AWS error code of the answer, e.g. `ValidationError`, `ParameterAlreadyExists`.
    pub error: Option<String>,
    /// `Some("error" | "reset" | "delay")` when an injected fault shaped this answer.
    pub fault: Option<String>,
}

impl Call {
    /// A logged param as a string, e.g. `call.param("ShouldDecrementDesiredCapacity") == Some("false")`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).and_then(serde_json::Value::as_str)
    }

    /// `service` and `action` at once: `call.is("ssm", "PutParameter")`.
    pub fn is(&self, service: &str, action: &str) -> bool {
        self.service == service && self.action == action
    }
}

/// One CloudWatch Logs event as `GetLogEvents` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub timestamp: i64,
    pub message: String,
}

impl LogRecord {
    /// The message as the JSON object the supervisor ships (`Null` if it is not one).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.message).unwrap_or_default()
    }
}

/// A request body the bed kept (`GET /_bed/bodies`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Body {
    pub seq: u64,
    pub action: String,
    pub body: String,
}

impl Body {
    /// What CloudWatch Logs bills and limits for a `PutLogEvents` body: its messages'
    /// UTF-8 bytes plus 26 per event; and the number of events.
    pub fn log_bytes_and_events(&self) -> (usize, usize) {
        let doc: serde_json::Value = serde_json::from_str(&self.body).unwrap_or_default();
        let events = doc["logEvents"].as_array().cloned().unwrap_or_default();
        let bytes = events
            .iter()
            .map(|e| e["message"].as_str().map_or(0, str::len) + 26)
            .sum();
        (bytes, events.len())
    }
}

/// An Auto Scaling group as `DescribeAutoScalingGroups` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub name: String,
    pub min: i32,
    pub max: i32,
    pub desired: i32,
    /// `(instance_id, lifecycle_state, health_status)`, e.g.
    /// `("i-0abc…", "InService", "Healthy")` or `(…, "Terminating:Wait", …)`.
    pub instances: Vec<(String, String, String)>,
}

impl GroupState {
    /// Ids of the instances whose lifecycle state is `InService`.
    pub fn in_service(&self) -> Vec<String> {
        self.instances
            .iter()
            .filter(|(_, state, _)| state == "InService")
            .map(|(id, _, _)| id.clone())
            .collect()
    }

    /// Lifecycle state of one instance, if the group has it.
    pub fn state_of(&self, instance_id: &str) -> Option<&str> {
        self.instances
            .iter()
            .find(|(id, _, _)| id == instance_id)
            .map(|(_, state, _)| state.as_str())
    }
}

/// A group's warm pool (`GET /_bed/warm_pool`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct WarmPool {
    pub group: String,
    /// Whether the group has a warm pool (PutWarmPool, AWS::AutoScaling::WarmPool).
    pub configured: bool,
    /// `Stopped`, `Hibernated` or `Running`.
    pub pool_state: Option<String>,
    pub min_size: Option<i32>,
    pub max_group_prepared_capacity: Option<i32>,
    /// The size Auto Scaling keeps the pool at now:
    /// max(MinSize, (MaxGroupPreparedCapacity or MaxSize) − desired capacity).
    pub target: i32,
    pub desired: i32,
    pub instances: Vec<PoolInstance>,
}

/// One instance of a warm pool.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct PoolInstance {
    pub instance_id: String,
    /// `Warmed:Pending`, `Warmed:Pending:Wait`, `Warmed:Pending:Proceed`, `Warmed:Stopped`,
    /// `Warmed:Hibernated` or `Warmed:Running`.
    pub lifecycle_state: String,
    /// EC2's state: `stopped` for `Warmed:Stopped` and `Warmed:Hibernated`, else `running`.
    pub ec2_state: String,
    /// The launch template version it was launched from (`None`: a launch configuration).
    pub launch_template_version: Option<i64>,
}

impl WarmPool {
    /// Ids of the pool's instances in `lifecycle_state`.
    pub fn in_state(&self, lifecycle_state: &str) -> Vec<String> {
        self.instances
            .iter()
            .filter(|i| i.lifecycle_state == lifecycle_state)
            .map(|i| i.instance_id.clone())
            .collect()
    }

    /// Lifecycle state of one instance, if the pool has it.
    pub fn state_of(&self, instance_id: &str) -> Option<&str> {
        self.instances
            .iter()
            .find(|i| i.instance_id == instance_id)
            .map(|i| i.lifecycle_state.as_str())
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of [`Call::t_ns`].
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec() as u64),
        Err(_) => 0,
    }
}

/// The repository root (`tests/..`).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// A running moto server on 127.0.0.1 (see the module docs).
pub struct Moto {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
    http: reqwest::Client,
    log: Arc<Mutex<VecDeque<String>>>,
    started_in: Duration,
}

impl std::fmt::Debug for Moto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moto")
            .field("pid", &self.child.id())
            .field("endpoint", &self.endpoint())
            .finish()
    }
}

impl Moto {
    /// Start the emulator and wait until it listens (about 2 s; 30 s timeout).
    pub async fn start() -> anyhow::Result<Moto> {
        let root = repo_root();
        let python = root.join(".venv/bin/python");
        let script = root.join("tests/bed/moto_server.py");
        if !python.exists() {
            bail!(
                "{} not found: the test bed's Python venv is missing; run `make venv` in {} \
                 (python3 -m venv .venv && .venv/bin/pip install -r tests/bed/requirements.txt)",
                python.display(),
                root.display()
            );
        }
        let t0 = Instant::now();
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .arg("--exit-on-stdin-eof")
            .current_dir(&root)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {} {}", python.display(), script.display()))?;

        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (stdin, stdout, stderr) =
            match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
                (Some(i), Some(o), Some(e)) => (i, o, e),
                _ => {
                    kill_group(&mut child);
                    bail!("moto child has no stdio pipes");
                }
            };
        // Plain threads, not tasks: the pipes must keep draining even if this runtime ends
        // while the server is shared with others.
        spawn_reader("moto-stderr", stderr, Arc::clone(&log), None);
        let (tx, rx) = tokio::sync::oneshot::channel();
        spawn_reader("moto-stdout", stdout, Arc::clone(&log), Some(tx));

        let port = match tokio::time::timeout(START_TIMEOUT, rx).await {
            Ok(Ok(port)) => port,
            outcome => {
                let why = match outcome {
                    Ok(_) => "exited before printing LISTENING".to_string(),
                    Err(_) => format!("printed no LISTENING line within {START_TIMEOUT:?}"),
                };
                kill_group(&mut child);
                // Let the stderr thread catch the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                bail!(
                    "moto ({}) {why}; its output:\n{}",
                    script.display(),
                    tail(&log)
                );
            }
        };
        agent_supervisor::tls::install_crypto_provider();
        let http = match reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
        {
            Ok(http) => http,
            Err(e) => {
                kill_group(&mut child);
                return Err(e).context("building the control-API HTTP client");
            }
        };
        Ok(Moto {
            child,
            _stdin: stdin,
            port,
            http,
            log,
            started_in: t0.elapsed(),
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How long [`Moto::start`] took until the server listened.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The last lines moto wrote on stdout/stderr (tracebacks land here).
    pub fn output_tail(&self) -> String {
        tail(&self.log)
    }

    /// Environment for a child process whose AWS SDK must talk to this emulator.
    ///
    /// Does not disable IMDS (the supervisor needs its fake IMDS; point it there with
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT`). Shared config/credentials files are set to
    /// `/dev/null` so a developer's `~/.aws` cannot leak in; a launcher that wants full
    /// isolation should also `env_remove("AWS_PROFILE")` / `AWS_SESSION_TOKEN`.
    pub fn env(&self) -> Vec<(String, String)> {
        let endpoint = self.endpoint();
        [
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", REGION),
            ("AWS_DEFAULT_REGION", REGION),
            // SDK retries off: tests see every failure, and the supervisor's own retry
            // logic is what gets exercised.
            ("AWS_MAX_ATTEMPTS", "1"),
            ("AWS_RETRY_MODE", "standard"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
            // Never route 127.0.0.1 through a proxy from the environment.
            ("NO_PROXY", "127.0.0.1,localhost"),
            ("no_proxy", "127.0.0.1,localhost"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// SDK config aimed at this emulator: us-east-1, static dummy credentials, retries off.
    pub async fn sdk_config(&self) -> SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "moto"))
            .endpoint_url(self.endpoint())
            .retry_config(RetryConfig::disabled())
            .load()
            .await
    }

    pub async fn autoscaling(&self) -> aws_sdk_autoscaling::Client {
        aws_sdk_autoscaling::Client::new(&self.sdk_config().await)
    }

    pub async fn ssm(&self) -> aws_sdk_ssm::Client {
        aws_sdk_ssm::Client::new(&self.sdk_config().await)
    }

    /// One call each to SSM and Auto Scaling (which also instantiates moto's EC2 backend), so
    /// later timings exclude moto's first-call cost. These calls show in the call log.
    pub async fn warm_up(&self) {
        let config = self.sdk_config().await;
        // A missing parameter: ParameterNotFound is the expected answer.
        let _ = aws_sdk_ssm::Client::new(&config)
            .get_parameter()
            .name("/agent-fleet-test-bed/warm-up")
            .send()
            .await;
        let _ = aws_sdk_autoscaling::Client::new(&config)
            .describe_auto_scaling_groups()
            .send()
            .await;
    }

    /// Calls with `seq > since`, oldest first (`since = 0`: all since the last clear).
    pub async fn calls(&self, since: u64) -> anyhow::Result<Vec<Call>> {
        #[derive(Deserialize)]
        struct Page {
            calls: Vec<Call>,
        }
        let page: Page = self
            .control(
                reqwest::Method::GET,
                &format!("/_bed/calls?since={since}"),
                None,
            )
            .await?;
        Ok(page.calls)
    }

    /// Highest sequence number handed out so far: a baseline for [`Moto::calls`].
    pub async fn last_seq(&self) -> anyhow::Result<u64> {
        #[derive(Deserialize)]
        struct Page {
            last_seq: u64,
        }
        // since=u64::MAX: an empty page, just the counter.
        let page: Page = self
            .control(
                reqwest::Method::GET,
                &format!("/_bed/calls?since={}", u64::MAX),
                None,
            )
            .await?;
        Ok(page.last_seq)
    }

    /// Empty the call log (sequence numbers keep increasing). Panics if the emulator is gone.
    pub async fn clear_calls(&self) {
        let res: anyhow::Result<serde_json::Value> = self
            .control(reqwest::Method::POST, "/_bed/calls/clear", None)
            .await;
        if let Err(e) = res {
            panic!("moto: clearing the call log failed: {e:#}");
        }
    }

    /// Inject a fault, e.g.
    /// `json!({"service": "ssm", "action": "PutParameter", "error": "ThrottlingException", "count": 5})`,
    /// `json!({"service": "ssm", "outage_ms": 3000})` (503 ServiceUnavailable meanwhile),
    /// `json!({"service": "ssm", "action": "PutParameter", "delay_ms": 2000, "count": 1})`,
    /// `json!({"service": "autoscaling", "mode": "reset", "count": 1})` (connection closed).
    /// Keys: service, action, error, status (default 400), message, count, outage_ms, delay_ms,
    /// mode (error|reset|delay). Unknown keys are rejected.
    pub async fn inject_fault(&self, fault: serde_json::Value) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .control(reqwest::Method::POST, "/_bed/faults", Some(fault))
            .await?;
        Ok(())
    }

    /// Arms one CloudFormation failure: the next change set execution whose template has
    /// `resource` reports it failed with `reason` and rolls the stack back (`/_bed/cfn_failure`).
    pub async fn fail_cloudformation_resource(
        &self,
        resource: &str,
        reason: &str,
    ) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .control(
                reqwest::Method::POST,
                "/_bed/cfn_failure",
                Some(serde_json::json!({"resource": resource, "reason": reason})),
            )
            .await?;
        Ok(())
    }

    /// Ages an instance: `DescribeInstances` then shows it launched `ago` before now
    /// (`/_bed/launch_time`).
    pub async fn set_launched_ago(&self, instance_id: &str, ago: Duration) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .control(
                reqwest::Method::POST,
                "/_bed/launch_time",
                Some(serde_json::json!({"instance_id": instance_id, "ago_secs": ago.as_secs()})),
            )
            .await?;
        Ok(())
    }

    /// Remove every fault. Panics if the emulator is gone.
    pub async fn clear_faults(&self) {
        let res: anyhow::Result<serde_json::Value> = self
            .control(reqwest::Method::DELETE, "/_bed/faults", None)
            .await;
        if let Err(e) = res {
            panic!("moto: clearing faults failed: {e:#}");
        }
    }

    /// Create or overwrite a parameter (`SecureString` when `secure`, else `String`).
    pub async fn put_parameter(&self, name: &str, value: &str, secure: bool) -> anyhow::Result<()> {
        let kind = if secure {
            aws_sdk_ssm::types::ParameterType::SecureString
        } else {
            aws_sdk_ssm::types::ParameterType::String
        };
        self.ssm()
            .await
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(kind)
            .overwrite(true)
            .send()
            .await
            .with_context(|| format!("PutParameter {name}"))?;
        Ok(())
    }

    /// A parameter's value (decrypted), `None` if it does not exist.
    pub async fn get_parameter(&self, name: &str) -> anyhow::Result<Option<String>> {
        use aws_sdk_ssm::error::ProvideErrorMetadata;
        match self
            .ssm()
            .await
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await
        {
            Ok(out) => Ok(out.parameter.and_then(|p| p.value)),
            Err(e) if e.code() == Some("ParameterNotFound") => Ok(None),
            Err(e) => Err(e).with_context(|| format!("GetParameter {name}")),
        }
    }

    /// Create a group (through launch configuration `<name>-lc`, image [`IMAGE_ID`],
    /// t3.micro, AZ [`AZ`]); moto launches `desired` InService instances at once.
    pub async fn create_group(
        &self,
        name: &str,
        min: i32,
        max: i32,
        desired: i32,
    ) -> anyhow::Result<()> {
        let asg = self.autoscaling().await;
        let lc = format!("{name}-lc");
        asg.create_launch_configuration()
            .launch_configuration_name(&lc)
            .image_id(IMAGE_ID)
            .instance_type("t3.micro")
            .send()
            .await
            .with_context(|| format!("CreateLaunchConfiguration {lc}"))?;
        asg.create_auto_scaling_group()
            .auto_scaling_group_name(name)
            .launch_configuration_name(&lc)
            .min_size(min)
            .max_size(max)
            .desired_capacity(desired)
            .availability_zones(AZ)
            .send()
            .await
            .with_context(|| format!("CreateAutoScalingGroup {name}"))?;
        Ok(())
    }

    /// `PutLifecycleHook` for `autoscaling:EC2_INSTANCE_TERMINATING` with `DefaultResult`
    /// CONTINUE: from then on, instances leaving `group` wait in `Terminating:Wait` (see
    /// moto_server.py) until `CompleteLifecycleAction` or `heartbeat_timeout_secs` without a
    /// heartbeat.
    pub async fn put_termination_hook(
        &self,
        group: &str,
        hook: &str,
        heartbeat_timeout_secs: i32,
    ) -> anyhow::Result<()> {
        self.autoscaling()
            .await
            .put_lifecycle_hook()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .lifecycle_transition("autoscaling:EC2_INSTANCE_TERMINATING")
            .heartbeat_timeout(heartbeat_timeout_secs)
            .default_result("CONTINUE")
            .send()
            .await
            .with_context(|| format!("PutLifecycleHook {group} {hook}"))?;
        Ok(())
    }

    /// `PutLifecycleHook` for `autoscaling:EC2_INSTANCE_LAUNCHING`: instances launched into
    /// `group` wait in `Pending:Wait`, and instances launched into its warm pool in
    /// `Warmed:Pending:Wait` (see moto_server.py), until `CompleteLifecycleAction` or
    /// `heartbeat_timeout_secs` without a heartbeat (then `default_result`: `CONTINUE` moves
    /// them on, `ABANDON` terminates them).
    pub async fn put_launch_hook(
        &self,
        group: &str,
        hook: &str,
        heartbeat_timeout_secs: i32,
        default_result: &str,
    ) -> anyhow::Result<()> {
        self.autoscaling()
            .await
            .put_lifecycle_hook()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .lifecycle_transition("autoscaling:EC2_INSTANCE_LAUNCHING")
            .heartbeat_timeout(heartbeat_timeout_secs)
            .default_result(default_result)
            .send()
            .await
            .with_context(|| format!("PutLifecycleHook {group} {hook}"))?;
        Ok(())
    }

    /// `CompleteLifecycleAction` for `instance_id`'s pending action on `hook` (a stand-in for
    /// the supervisor, or a test's own decision).
    pub async fn complete_lifecycle_action(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
        result: &str,
    ) -> anyhow::Result<()> {
        self.autoscaling()
            .await
            .complete_lifecycle_action()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .instance_id(instance_id)
            .lifecycle_action_result(result)
            .send()
            .await
            .with_context(|| format!("CompleteLifecycleAction {group} {hook} {instance_id}"))?;
        Ok(())
    }

    /// `PutWarmPool` on `group`: `min_size` instances at least, `pool_state` `Stopped`,
    /// `Hibernated` or `Running`, `max_prepared` the group's MaxGroupPreparedCapacity (`None`:
    /// the group's max size), ReuseOnScaleIn false. The emulator keeps the pool filled from
    /// then on (see moto_server.py).
    pub async fn put_warm_pool(
        &self,
        group: &str,
        min_size: i32,
        pool_state: &str,
        max_prepared: Option<i32>,
    ) -> anyhow::Result<()> {
        use aws_sdk_autoscaling::types::{InstanceReusePolicy, WarmPoolState};
        self.autoscaling()
            .await
            .put_warm_pool()
            .auto_scaling_group_name(group)
            .min_size(min_size)
            .set_max_group_prepared_capacity(max_prepared)
            .pool_state(WarmPoolState::from(pool_state))
            .instance_reuse_policy(
                InstanceReusePolicy::builder()
                    .reuse_on_scale_in(false)
                    .build(),
            )
            .send()
            .await
            .with_context(|| format!("PutWarmPool {group}"))?;
        Ok(())
    }

    /// `group`'s warm pool as the launcher reads it (`GET /_bed/warm_pool`, not logged as an
    /// AWS call): its configuration and its instances with their lifecycle states. A group
    /// without a pool answers `configured: false` and no instances.
    pub async fn warm_pool(&self, group: &str) -> anyhow::Result<WarmPool> {
        self.control(
            reqwest::Method::GET,
            &format!("/_bed/warm_pool?group={}", query_escape(group)),
            None,
        )
        .await
    }

    /// The termination hooks of `group`: `(name, heartbeat timeout, default result)`.
    pub async fn termination_hooks(
        &self,
        group: &str,
    ) -> anyhow::Result<Vec<(String, i32, String)>> {
        let out = self
            .autoscaling()
            .await
            .describe_lifecycle_hooks()
            .auto_scaling_group_name(group)
            .send()
            .await
            .with_context(|| format!("DescribeLifecycleHooks {group}"))?;
        Ok(out
            .lifecycle_hooks()
            .iter()
            .filter(|h| h.lifecycle_transition() == Some("autoscaling:EC2_INSTANCE_TERMINATING"))
            .map(|h| {
                (
                    h.lifecycle_hook_name().unwrap_or_default().to_string(),
                    h.heartbeat_timeout().unwrap_or_default(),
                    h.default_result().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    /// An operator's `SetDesiredCapacity` (HonorCooldown false).
    pub async fn set_desired(&self, group: &str, desired: i32) -> anyhow::Result<()> {
        self.autoscaling()
            .await
            .set_desired_capacity()
            .auto_scaling_group_name(group)
            .desired_capacity(desired)
            .honor_cooldown(false)
            .send()
            .await
            .with_context(|| format!("SetDesiredCapacity {group} {desired}"))?;
        Ok(())
    }

    /// An operator's `UpdateAutoScalingGroup` setting `MaxSize` (moto then lowers desired
    /// capacity to it, scaling in).
    pub async fn set_max_size(&self, group: &str, max: i32) -> anyhow::Result<()> {
        self.autoscaling()
            .await
            .update_auto_scaling_group()
            .auto_scaling_group_name(group)
            .max_size(max)
            .send()
            .await
            .with_context(|| format!("UpdateAutoScalingGroup {group} MaxSize={max}"))?;
        Ok(())
    }

    /// An operator's `TerminateInstanceInAutoScalingGroup`.
    pub async fn terminate_instance(
        &self,
        instance_id: &str,
        decrement: bool,
    ) -> anyhow::Result<()> {
        self.autoscaling()
            .await
            .terminate_instance_in_auto_scaling_group()
            .instance_id(instance_id)
            .should_decrement_desired_capacity(decrement)
            .send()
            .await
            .with_context(|| format!("TerminateInstanceInAutoScalingGroup {instance_id}"))?;
        Ok(())
    }

    /// `(metric name, dimensions as "Name=Value" strings)` of the metrics CloudWatch holds in
    /// `namespace` (`ListMetrics`).
    pub async fn list_metrics(
        &self,
        namespace: &str,
    ) -> anyhow::Result<Vec<(String, Vec<String>)>> {
        let body = self
            .query("monitoring", "ListMetrics", &[("Namespace", namespace)])
            .await?;
        fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
            let rest = &s[s.find(open)? + open.len()..];
            Some(&rest[..rest.find(close)?])
        }
        Ok(body
            .split("<MetricName>")
            .skip(1)
            .map(|chunk| {
                let name = chunk.split('<').next().unwrap_or_default().to_string();
                let dims = chunk
                    .split("<member>")
                    .skip(1)
                    .filter_map(|m| {
                        Some(format!(
                            "{}={}",
                            between(m, "<Name>", "</Name>")?,
                            between(m, "<Value>", "</Value>")?
                        ))
                    })
                    .collect();
                (name, dims)
            })
            .collect())
    }

    /// CreateStack from `cfn/agent-fleet.yaml` (CAPABILITY_IAM) with `params`, then checks the
    /// stack reached CREATE_COMPLETE (moto creates it synchronously).
    pub async fn create_stack(&self, stack: &str, params: &[(&str, &str)]) -> anyhow::Result<()> {
        let template = std::fs::read_to_string(repo_root().join("cfn/agent-fleet.yaml"))
            .context("reading cfn/agent-fleet.yaml")?;
        let mut form: Vec<(String, String)> = vec![
            ("StackName".into(), stack.into()),
            ("TemplateBody".into(), template),
            ("Capabilities.member.1".into(), "CAPABILITY_IAM".into()),
        ];
        for (i, (k, v)) in params.iter().enumerate() {
            form.push((
                format!("Parameters.member.{}.ParameterKey", i + 1),
                k.to_string(),
            ));
            form.push((
                format!("Parameters.member.{}.ParameterValue", i + 1),
                v.to_string(),
            ));
        }
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.query("cloudformation", "CreateStack", &form).await?;
        let described = self
            .query("cloudformation", "DescribeStacks", &[("StackName", stack)])
            .await?;
        if !described.contains("<StackStatus>CREATE_COMPLETE</StackStatus>") {
            bail!("stack {stack} not CREATE_COMPLETE:\n{described}");
        }
        Ok(())
    }

    /// One call of an AWS Query-protocol API (`cloudformation`, `ec2`, `iam`, `monitoring`), for services
    /// the tests crate has no SDK for. moto routes on the SigV4 credential scope and checks no
    /// signature, so a well-formed Authorization header is all the signing it needs. Returns
    /// the XML body of a 2xx answer.
    pub async fn query(
        &self,
        service: &str,
        action: &str,
        params: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let version = match service {
            "cloudformation" => "2010-05-15",
            "ec2" => "2016-11-15",
            "iam" => "2010-05-08",
            "monitoring" => "2010-08-01",
            other => bail!("no Query API version known for {other}"),
        };
        let mut form: Vec<(&str, &str)> = vec![("Action", action), ("Version", version)];
        form.extend_from_slice(params);
        let resp = self
            .post_as(service)?
            .form(&form)
            .send()
            .await
            .with_context(|| format!("{service} {action}"))?;
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() {
            bail!("{service} {action}: {status}: {body}");
        }
        Ok(body)
    }

    /// A `POST /` that moto routes to `service`: it routes on the SigV4 credential scope and
    /// checks no signature, so a well-formed Authorization header is all the signing needed.
    fn post_as(&self, service: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        Ok(reqwest::Client::builder()
            .no_proxy()
            .build()?
            .post(self.endpoint())
            .header(
                "Authorization",
                format!(
                    "AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/{service}/aws4_request, \
                     SignedHeaders=host, Signature=0"
                ),
            ))
    }

    /// One call of CloudWatch Logs (awsJson1_1: `X-Amz-Target: Logs_20140328.<action>`),
    /// for the tests' reads of what instances shipped. Returns the JSON answer of a 2xx.
    pub async fn logs_call(
        &self,
        action: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let resp = self
            .post_as("logs")?
            .header("X-Amz-Target", format!("Logs_20140328.{action}"))
            .header("Content-Type", "application/x-amz-json-1.1")
            .body(body.to_string())
            .send()
            .await
            .with_context(|| format!("logs {action}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("logs {action}: {status}: {text}");
        }
        Ok(serde_json::from_str(if text.is_empty() {
            "{}"
        } else {
            &text
        })?)
    }

    /// The stack's log group, as the template makes it.
    pub async fn create_log_group(&self, name: &str, retention_days: u32) -> anyhow::Result<()> {
        self.logs_call("CreateLogGroup", serde_json::json!({"logGroupName": name}))
            .await?;
        self.logs_call(
            "PutRetentionPolicy",
            serde_json::json!({"logGroupName": name, "retentionInDays": retention_days}),
        )
        .await?;
        Ok(())
    }

    /// Every event of one stream, oldest first (`GetLogEvents` from the head, all pages);
    /// empty when the stream does not exist.
    pub async fn log_events(&self, group: &str, stream: &str) -> anyhow::Result<Vec<LogRecord>> {
        let mut out = vec![];
        let mut token: Option<String> = None;
        loop {
            let mut req = serde_json::json!({
                "logGroupName": group, "logStreamName": stream, "startFromHead": true
            });
            if let Some(t) = &token {
                req["nextToken"] = t.clone().into();
            }
            let page = match self.logs_call("GetLogEvents", req).await {
                Ok(p) => p,
                Err(e) if e.to_string().contains("ResourceNotFoundException") => return Ok(out),
                Err(e) => return Err(e),
            };
            let events = page["events"].as_array().cloned().unwrap_or_default();
            let n = events.len();
            for e in events {
                out.push(LogRecord {
                    timestamp: e["timestamp"].as_i64().unwrap_or_default(),
                    message: e["message"].as_str().unwrap_or_default().to_string(),
                });
            }
            let next = page["nextForwardToken"].as_str().map(str::to_string);
            if n == 0 || next.is_none() || next == token {
                return Ok(out);
            }
            token = next;
        }
    }

    /// Whole request bodies of the actions the bed keeps (`PutLogEvents`), `seq > since`.
    pub async fn bodies(&self, since: u64) -> anyhow::Result<Vec<Body>> {
        let path = format!("/_bed/bodies?since={since}");
        let mut page: serde_json::Value = self.control(reqwest::Method::GET, &path, None).await?;
        Ok(serde_json::from_value(page["bodies"].take())?)
    }

    /// The user data (base64-decoded) of the launch template `group` launches from, at the
    /// version the group names (`$Default`, `$Latest` or a number), through the launch
    /// template or the mixed instances policy: what an instance the group launched now would
    /// read from IMDS. E.g. for a group made by `cfn/agent-fleet.yaml`, the lines
    /// `AGENT_FLEET_STACK=…`, `AGENT_FLEET_CONFIG_PARAMETER=…`, `AGENT_FLEET_ROLE=agent|scaler`.
    ///
    /// Fails for an unknown group, a group with a launch configuration, an unknown template or
    /// version (`GET /_bed/user_data` answers 404), or a template without user data.
    pub async fn group_user_data(&self, group: &str) -> anyhow::Result<String> {
        #[derive(Deserialize)]
        struct Answer {
            launch_template_name: String,
            version: u64,
            user_data: Option<String>,
        }
        let answer: Answer = self
            .control(
                reqwest::Method::GET,
                &format!("/_bed/user_data?group={}", query_escape(group)),
                None,
            )
            .await?;
        answer.user_data.ok_or_else(|| {
            anyhow!(
                "launch template {} (version {}) of group {group} has no user data",
                answer.launch_template_name,
                answer.version
            )
        })
    }

    /// The group's sizes and instances.
    pub async fn group(&self, name: &str) -> anyhow::Result<GroupState> {
        let out = self
            .autoscaling()
            .await
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
            .await
            .with_context(|| format!("DescribeAutoScalingGroups {name}"))?;
        let group = out
            .auto_scaling_groups()
            .iter()
            .find(|g| g.auto_scaling_group_name() == Some(name))
            .ok_or_else(|| anyhow!("no Auto Scaling group named {name}"))?;
        Ok(GroupState {
            name: name.to_string(),
            min: group.min_size().unwrap_or_default(),
            max: group.max_size().unwrap_or_default(),
            desired: group.desired_capacity().unwrap_or_default(),
            instances: group
                .instances()
                .iter()
                .map(|i| {
                    (
                        i.instance_id().unwrap_or_default().to_string(),
                        i.lifecycle_state()
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_default(),
                        i.health_status().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
        })
    }

    async fn control<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.endpoint());
        let mut req = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .with_context(|| format!("{method} {url}: body"))?;
        if !status.is_success() {
            bail!("{method} {url}: {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("{method} {url}: parsing {text}"))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// SIGKILL the child's process group (its pgid is its pid), then reap it.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn spawn_reader<R: std::io::Read + Send + 'static>(
    name: &str,
    pipe: R,
    log: Arc<Mutex<VecDeque<String>>>,
    mut listening: Option<tokio::sync::oneshot::Sender<u16>>,
) {
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line
                    .strip_prefix("LISTENING ")
                    .and_then(|p| p.trim().parse::<u16>().ok())
                {
                    if let Some(tx) = listening.take() {
                        let _ = tx.send(port);
                        continue;
                    }
                }
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                if log.len() >= STDERR_TAIL_LINES {
                    log.pop_front();
                }
                log.push_back(line);
            }
            // Dropping `listening` here (EOF before LISTENING) wakes the waiter with an error.
        });
    if let Err(e) = spawned {
        eprintln!("moto: could not spawn the {name} reader thread: {e}");
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for a query value.
fn query_escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn tail(log: &Mutex<VecDeque<String>>) -> String {
    let log = log.lock().unwrap_or_else(|e| e.into_inner());
    log.iter().cloned().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_autoscaling::error::ProvideErrorMetadata as _;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn moto_answers_like_aws_where_the_supervisor_depends_on_it() -> anyhow::Result<()> {
        let moto = Moto::start().await?;
        eprintln!("moto listening after {:?}", moto.started_in());
        let t = Instant::now();
        moto.warm_up().await;
        eprintln!("warm-up took {:?}", t.elapsed());
        let since = moto.last_seq().await?;

        moto.create_group("fleet", 1, 3, 2).await?;
        let g = moto.group("fleet").await?;
        assert_eq!((g.min, g.max, g.desired), (1, 3, 2));
        assert_eq!(g.in_service().len(), 2, "{g:?}");
        assert!(g.instances.iter().all(|(_, _, h)| h == "Healthy"), "{g:?}");

        let asg = moto.autoscaling().await;
        // JOB_FINISHED: terminate without decrement -> a replacement appears.
        let victim = g.in_service()[0].clone();
        asg.terminate_instance_in_auto_scaling_group()
            .instance_id(&victim)
            .should_decrement_desired_capacity(false)
            .send()
            .await?;
        let g = moto.group("fleet").await?;
        assert_eq!(g.desired, 2);
        assert_eq!(g.in_service().len(), 2, "{g:?}");
        assert!(g.state_of(&victim).is_none(), "{g:?}");

        // IDLE above min: decrement works; at min: ValidationError.
        let idle = g.in_service()[0].clone();
        asg.terminate_instance_in_auto_scaling_group()
            .instance_id(&idle)
            .should_decrement_desired_capacity(true)
            .send()
            .await?;
        let g = moto.group("fleet").await?;
        assert_eq!((g.desired, g.instances.len()), (1, 1), "{g:?}");
        let last = g.in_service()[0].clone();
        let err = asg
            .terminate_instance_in_auto_scaling_group()
            .instance_id(&last)
            .should_decrement_desired_capacity(true)
            .send()
            .await
            .err()
            .ok_or_else(|| anyhow!("decrement at min size succeeded"))?;
        assert_eq!(err.code(), Some("ValidationError"), "{err:?}");
        assert_eq!(moto.group("fleet").await?.desired, 1);

        // Unknown instance, desired above max / below min.
        let err = asg
            .terminate_instance_in_auto_scaling_group()
            .instance_id("i-0123456789abcdef0")
            .should_decrement_desired_capacity(false)
            .send()
            .await
            .err()
            .ok_or_else(|| anyhow!("terminating an unknown instance succeeded"))?;
        assert_eq!(err.code(), Some("ValidationError"), "{err:?}");
        for desired in [4, 0] {
            let err = asg
                .set_desired_capacity()
                .auto_scaling_group_name("fleet")
                .desired_capacity(desired)
                .honor_cooldown(false)
                .send()
                .await
                .err()
                .ok_or_else(|| anyhow!("desired {desired} outside [1, 3] accepted"))?;
            assert_eq!(err.code(), Some("ValidationError"), "{err:?}");
        }
        asg.set_desired_capacity()
            .auto_scaling_group_name("fleet")
            .desired_capacity(3)
            .honor_cooldown(false)
            .send()
            .await?;
        assert_eq!(moto.group("fleet").await?.in_service().len(), 3);

        // SSM round trip and a throttling fault on GetParameter.
        moto.put_parameter("/agent-fleet/test/token", "s3cr3t", true)
            .await?;
        assert_eq!(
            moto.get_parameter("/agent-fleet/test/token")
                .await?
                .as_deref(),
            Some("s3cr3t")
        );
        moto.inject_fault(serde_json::json!({
            "service": "ssm", "action": "GetParameter", "error": "ThrottlingException", "count": 1
        }))
        .await?;
        let ssm = moto.ssm().await;
        let err = ssm
            .get_parameter()
            .name("/agent-fleet/test/token")
            .send()
            .await
            .err()
            .ok_or_else(|| anyhow!("fault not injected"))?;
        assert_eq!(err.code(), Some("ThrottlingException"), "{err:?}");
        // count = 1: the next call goes through.
        assert!(moto
            .get_parameter("/agent-fleet/test/token")
            .await?
            .is_some());
        // A query-protocol fault parses too.
        moto.inject_fault(serde_json::json!({"service": "autoscaling", "error": "Throttling"}))
            .await?;
        let err = asg
            .describe_auto_scaling_groups()
            .send()
            .await
            .err()
            .ok_or_else(|| anyhow!("fault not injected"))?;
        assert_eq!(err.code(), Some("Throttling"), "{err:?}");
        moto.clear_faults().await;
        asg.describe_auto_scaling_groups().send().await?;
        assert!(moto
            .inject_fault(serde_json::json!({"service": "ssm", "typo": 1}))
            .await
            .is_err());

        // The call log.
        let calls = moto.calls(since).await?;
        let terminations: Vec<&Call> = calls
            .iter()
            .filter(|c| c.is("autoscaling", "TerminateInstanceInAutoScalingGroup"))
            .collect();
        assert_eq!(terminations.len(), 4, "{terminations:#?}");
        assert_eq!(terminations[0].param("InstanceId"), Some(victim.as_str()));
        assert_eq!(
            terminations[0].param("ShouldDecrementDesiredCapacity"),
            Some("false")
        );
        assert_eq!(terminations[0].status, Some(200));
        assert_eq!(
            terminations[2].param("ShouldDecrementDesiredCapacity"),
            Some("true")
        );
        assert_eq!(terminations[2].error.as_deref(), Some("ValidationError"));
        let desired: Vec<Option<&str>> = calls
            .iter()
            .filter(|c| c.is("autoscaling", "SetDesiredCapacity"))
            .map(|c| c.param("DesiredCapacity"))
            .collect();
        assert_eq!(desired, [Some("4"), Some("0"), Some("3")]);
        let put = calls
            .iter()
            .find(|c| c.is("ssm", "PutParameter"))
            .ok_or_else(|| anyhow!("PutParameter not logged"))?;
        assert_eq!(put.param("Name"), Some("/agent-fleet/test/token"));
        assert!(!serde_json::to_string(&put.params)?.contains("s3cr3t"));
        let throttled: Vec<&Call> = calls.iter().filter(|c| c.fault.is_some()).collect();
        assert_eq!(throttled.len(), 2, "{throttled:#?}");
        assert_eq!(throttled[0].error.as_deref(), Some("ThrottlingException"));
        // Timestamps are this machine's CLOCK_MONOTONIC.
        let now = monotonic_ns();
        assert!(calls
            .iter()
            .all(|c| c.t_ns <= now && c.end_ns >= Some(c.t_ns)));
        assert!(calls.windows(2).all(|w| w[0].seq < w[1].seq));

        moto.clear_calls().await;
        assert!(moto.calls(0).await?.is_empty());
        Ok(())
    }

    /// With a termination lifecycle hook, instances leaving the group wait in
    /// `Terminating:Wait`: heartbeats restart the timeout, `CompleteLifecycleAction` or the
    /// timeout ends the wait; without a pending action, the lifecycle calls are refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn termination_hooks_hold_instances_until_completed_or_timed_out() -> anyhow::Result<()> {
        let moto = Moto::start().await?;
        moto.create_group("held", 0, 4, 3).await?;
        moto.put_termination_hook("held", "drain", 2).await?;
        assert_eq!(
            moto.termination_hooks("held").await?,
            vec![("drain".to_string(), 2, "CONTINUE".to_string())]
        );
        let asg = moto.autoscaling().await;
        let waiting = |g: &GroupState| -> Vec<String> {
            g.instances
                .iter()
                .filter(|(_, s, _)| s == "Terminating:Wait")
                .map(|(i, _, _)| i.clone())
                .collect()
        };

        // Scale-in: one waits, and is not replaced.
        moto.set_desired("held", 2).await?;
        let g = moto.group("held").await?;
        let w = waiting(&g);
        assert_eq!(
            (w.len(), g.in_service().len(), g.desired),
            (1, 2, 2),
            "{g:?}"
        );
        let held = w[0].clone();
        // Heartbeats keep it past the 2 s timeout...
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            asg.record_lifecycle_action_heartbeat()
                .auto_scaling_group_name("held")
                .lifecycle_hook_name("drain")
                .instance_id(&held)
                .send()
                .await?;
        }
        assert_eq!(
            moto.group("held").await?.state_of(&held),
            Some("Terminating:Wait")
        );
        // ...and without them it goes (DefaultResult).
        tokio::time::sleep(Duration::from_millis(2300)).await;
        assert_eq!(moto.group("held").await?.state_of(&held), None);
        let err = asg
            .complete_lifecycle_action()
            .auto_scaling_group_name("held")
            .lifecycle_hook_name("drain")
            .instance_id(&held)
            .lifecycle_action_result("CONTINUE")
            .send()
            .await
            .err()
            .ok_or_else(|| anyhow!("completed an action that timed out"))?;
        assert_eq!(err.code(), Some("ValidationError"), "{err:?}");

        // TerminateInstanceInAutoScalingGroup without decrement: waits, and is replaced at
        // once; CompleteLifecycleAction ends it.
        let victim = moto.group("held").await?.in_service()[0].clone();
        moto.terminate_instance(&victim, false).await?;
        let g = moto.group("held").await?;
        assert_eq!(g.state_of(&victim), Some("Terminating:Wait"), "{g:?}");
        assert_eq!((g.in_service().len(), g.desired), (2, 2), "replaced: {g:?}");
        asg.complete_lifecycle_action()
            .auto_scaling_group_name("held")
            .lifecycle_hook_name("drain")
            .instance_id(&victim)
            .lifecycle_action_result("CONTINUE")
            .send()
            .await?;
        assert_eq!(moto.group("held").await?.state_of(&victim), None);

        // UpdateAutoScalingGroup lowering MaxSize below the instance count scales in the same way.
        moto.set_max_size("held", 1).await?;
        let g = moto.group("held").await?;
        assert_eq!(
            (waiting(&g).len(), g.in_service().len(), g.desired),
            (1, 1, 1),
            "{g:?}"
        );
        let calls = moto.calls(0).await?;
        assert!(calls
            .iter()
            .any(|c| c.is("autoscaling", "UpdateAutoScalingGroup")
                && c.param("MaxSize") == Some("1")));
        Ok(())
    }

    /// `Moto::env()` alone aims a child's default SDK config at moto: checked in a child
    /// process (this test binary running `env_child`) so no test mutates this process's env.
    #[tokio::test]
    async fn env_is_all_a_child_needs() -> anyhow::Result<()> {
        let moto = Moto::start().await?;
        moto.put_parameter("/agent-fleet/test/env", "from-moto", false)
            .await?;
        let out = tokio::process::Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "moto::tests::env_child",
                "--include-ignored",
                "--test-threads=1",
            ])
            .envs(moto.env())
            .env("BED_MOTO_ENV_CHILD", "1")
            .kill_on_drop(true)
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let calls = moto.calls(0).await?;
        assert!(calls.iter().any(
            |c| c.is("ssm", "GetParameter") && c.param("Name") == Some("/agent-fleet/test/env")
        ));
        Ok(())
    }

    #[tokio::test]
    #[ignore = "run by env_is_all_a_child_needs in a child process"]
    async fn env_child() -> anyhow::Result<()> {
        if std::env::var("BED_MOTO_ENV_CHILD").is_err() {
            return Ok(());
        }
        let config = aws_config::load_defaults(BehaviorVersion::latest()).await;
        assert_eq!(config.region().map(|r| r.as_ref()), Some(REGION));
        let out = aws_sdk_ssm::Client::new(&config)
            .get_parameter()
            .name("/agent-fleet/test/env")
            .send()
            .await?;
        assert_eq!(
            out.parameter.and_then(|p| p.value).as_deref(),
            Some("from-moto")
        );
        Ok(())
    }
}
