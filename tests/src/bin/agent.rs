//! Fake Semaphore `agent` (becomes `target/<profile>/agent`), honouring the
//! real agent's CLI, config, process-tree, signal, API and shutdown-hook
//! contract (`shared/reference/semaphore-agent.md`) against the fake hub.
//!
//! * `agent start --config-file <path>` (or `--config-file=<path>`); anything
//!   else is a usage error, exit 1.
//! * The config YAML may only hold the keys in [`KNOWN_KEYS`]; an unknown key,
//!   a wrong type, a missing `endpoint`/`token`, an `env-vars` entry that is not
//!   exactly `NAME=VALUE` (a value containing `=` is fatal), a `files` entry that
//!   is not `host:container`, a bad `upload-job-logs` or a bad `name` exit 1.
//!   `SEMAPHORE_AGENT_<KEY>` env vars (dashes → underscores) override scalar
//!   keys (flag > env > file; flags other than `--config-file` are not taken).
//! * Process tree: the started process is a wrapper that re-executes itself
//!   (`FAKE_AGENT_CHILD=1`) as a child in its own process group, forwards
//!   SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to it and exits with its
//!   code. If the child dies from a signal, the wrapper runs the agent again
//!   in-process (a new registration), like the real panicwrap wrapper.
//! * Only talks to loopback endpoints (127.0.0.0/8, localhost, ::1); any other
//!   endpoint fails registration without sending traffic.
//!
//! Test-bed knobs (env):
//! * `FAKE_AGENT_EVENTS=<path>`: append JSON lines
//!   `{"event","pid","mono_ns","unix_ms","name",…}`; events: `start` (the
//!   wrapper, first thing), `child_start`, `registered`, `register_failed`,
//!   `job_started`, `job_finished` (`job_id`, `result`), `interrupted`,
//!   `shutdown` (`reason`), `hook` (`reason`, `path`), `hook_done` (`code`),
//!   `child_exit` (`code`, `reason`), `rerun` (`signal`), `exit` (`code`; the
//!   wrapper, right before it exits). `mono_ns` is CLOCK_MONOTONIC.
//! * `FAKE_AGENT_REGISTER_TRIES` (30), `FAKE_AGENT_REGISTER_INTERVAL_MS` (1000)
//! * `FAKE_AGENT_SYNC_TIMEOUT_SECS` (600): no good sync for that long →
//!   shutdown `UNABLE_TO_SYNC`, exit 1
//! * `FAKE_AGENT_DISCONNECT_TRIES` (5), `FAKE_AGENT_DISCONNECT_INTERVAL_MS` (200)
//! * `FAKE_AGENT_HOOK_SLEEP_SECS`: sleep this long in the shutdown-hook step
//!   (before the hook runs; also without a hook) — a hanging-hook drill
//! * `FAKE_AGENT_HOOK_HANG_SECS`: the shutdown hook itself hangs this long after
//!   its script returned (it runs as `bash -c 'bash <hook>; sleep N'`, in the
//!   agent's process group) — the other hanging-hook drill
//!
//! Jobs: each command runs as `bash -c <command>` with the agent's environment
//! plus the config's `env-vars` and the job's env vars, in its own process group.
//! Its output lines go to the agent's log (`job <id8>: <line>`) and, when the
//! job payload has a `push` logger, to the logger URL (the hub records them:
//! [`agent_fleet_tests::hub::JobInfo::output`]) before the job is reported
//! finished.
//! * `SEMAPHORE_AGENT_LOG_FILE_PATH`: also append the log there (the real
//!   agent defaults to `/tmp/agent_log`; the fake only logs to stdout by default)

use std::ffi::OsString;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_fleet_tests::hub::{
    base64_decode, valid_agent_name, JobLogger, JobPayload, RegisterRequest, RegisterResponse,
    SyncRequest, SyncResponse, API_BASE,
};
use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, Notify};

const CHILD_ENV: &str = "FAKE_AGENT_CHILD";
const VERSION: &str = "v2.4.0-fake";
const USAGE: &str = "Usage: agent start --config-file <path>";

/// Config keys the agent accepts.
pub const KNOWN_KEYS: &[&str] = &[
    "endpoint",
    "token",
    "no-https",
    "name",
    "disconnect-after-job",
    "disconnect-after-idle-timeout",
    "interruption-grace-period",
    "shutdown-hook-path",
    "pre-job-hook-path",
    "post-job-hook-path",
    "env-vars",
    "files",
    "fail-on-missing-files",
    "upload-job-logs",
];

// ---------------------------------------------------------------- logging

static LOG_NAME: Mutex<String> = Mutex::new(String::new());
static LAST_REASON: Mutex<Option<String>> = Mutex::new(None);

fn set_log_name(name: &str) {
    *LOG_NAME.lock().unwrap_or_else(PoisonError::into_inner) = name.to_string();
}

fn log_name() -> String {
    LOG_NAME
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

fn set_last_reason(reason: &str) {
    *LAST_REASON.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.to_string());
}

fn last_reason() -> Option<String> {
    LAST_REASON
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Go layout `Jan _2 15:04:05.000`, UTC.
fn timestamp(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let month_name = MONTHS
        .get(usize::try_from(month - 1).unwrap_or(0))
        .copied()
        .unwrap_or("Jan");
    format!(
        "{month_name} {day:>2} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn log(msg: &str) {
    let name = log_name();
    let ts = timestamp(SystemTime::now());
    let mut text = String::new();
    for line in msg.lines() {
        text.push_str(&format!("{ts} {name} : {line}\n"));
    }
    if msg.is_empty() {
        text.push_str(&format!("{ts} {name} : \n"));
    }
    // The test harness only captures `print!`; the binary must not panic on EPIPE.
    #[cfg(test)]
    print!("{text}");
    #[cfg(not(test))]
    {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
    if let Some(path) = std::env::var_os("SEMAPHORE_AGENT_LOG_FILE_PATH") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(text.as_bytes());
        }
    }
}

// ---------------------------------------------------------------- events

fn mono_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(ts.tv_nsec()).unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// Appends one JSON line to `$FAKE_AGENT_EVENTS` (if set).
fn event(kind: &str, extra: serde_json::Value) {
    let Some(path) = std::env::var_os("FAKE_AGENT_EVENTS") else {
        return;
    };
    let mut obj = serde_json::Map::new();
    obj.insert("event".into(), kind.into());
    obj.insert("pid".into(), std::process::id().into());
    obj.insert("mono_ns".into(), mono_ns().into());
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
        .unwrap_or(0);
    obj.insert("unix_ms".into(), unix_ms.into());
    let name = log_name();
    if !name.is_empty() {
        obj.insert("name".into(), name.into());
    }
    if let serde_json::Value::Object(extra) = extra {
        obj.extend(extra);
    }
    let mut line = serde_json::Value::Object(obj).to_string();
    line.push('\n');
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        // One write(2) per line, O_APPEND: lines from several processes don't interleave.
        let _ = f.write_all(line.as_bytes());
    }
}

// ---------------------------------------------------------------- config

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    endpoint: Option<String>,
    token: Option<String>,
    no_https: Option<bool>,
    name: Option<String>,
    disconnect_after_job: Option<bool>,
    disconnect_after_idle_timeout: Option<u64>,
    interruption_grace_period: Option<u64>,
    shutdown_hook_path: Option<String>,
    pre_job_hook_path: Option<String>,
    post_job_hook_path: Option<String>,
    env_vars: Option<Vec<String>>,
    files: Option<Vec<String>>,
    fail_on_missing_files: Option<bool>,
    upload_job_logs: Option<String>,
}

/// The resolved agent configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Config {
    endpoint: String,
    token: String,
    no_https: bool,
    /// Configured name, or a random one.
    name: String,
    disconnect_after_job: bool,
    idle_timeout: u64,
    interruption_grace_period: u64,
    shutdown_hook_path: Option<String>,
    pre_job_hook_path: Option<String>,
    post_job_hook_path: Option<String>,
    env_vars: Vec<(String, String)>,
    files: Vec<(String, String)>,
    fail_on_missing_files: bool,
    upload_job_logs: String,
}

fn env_bool(key: &str, v: &str) -> anyhow::Result<bool> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => bail!("{key}: expected a boolean, got {v:?}"),
    }
}

fn env_u64(key: &str, v: &str) -> anyhow::Result<u64> {
    v.parse()
        .map_err(|_| anyhow!("{key}: expected a non-negative integer, got {v:?}"))
}

/// Parses and validates a config file's text; `env` looks up
/// `SEMAPHORE_AGENT_*` overrides.
fn parse_config(text: &str, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).context("config file is not valid YAML")?;
    let value = match value {
        serde_yaml::Value::Null => serde_yaml::Value::Mapping(serde_yaml::Mapping::new()),
        v @ serde_yaml::Value::Mapping(_) => v,
        _ => bail!("config file must be a YAML mapping of keys"),
    };
    if let serde_yaml::Value::Mapping(m) = &value {
        for (k, v) in m {
            let key = match k {
                serde_yaml::Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            };
            if !KNOWN_KEYS.contains(&key.as_str()) {
                bail!("unknown config key {key:?}");
            }
            let mut one = serde_yaml::Mapping::new();
            one.insert(k.clone(), v.clone());
            if let Err(e) = serde_yaml::from_value::<FileConfig>(serde_yaml::Value::Mapping(one)) {
                bail!("config key {key:?}: {e}");
            }
        }
    }
    let mut f: FileConfig =
        serde_yaml::from_value(value).context("invalid value in config file")?;

    let envkey = |k: &str| format!("SEMAPHORE_AGENT_{}", k.to_uppercase().replace('-', "_"));
    let str_over = |k: &str, slot: &mut Option<String>| {
        if let Some(v) = env(&envkey(k)) {
            *slot = Some(v);
        }
    };
    str_over("endpoint", &mut f.endpoint);
    str_over("token", &mut f.token);
    str_over("name", &mut f.name);
    str_over("shutdown-hook-path", &mut f.shutdown_hook_path);
    str_over("pre-job-hook-path", &mut f.pre_job_hook_path);
    str_over("post-job-hook-path", &mut f.post_job_hook_path);
    str_over("upload-job-logs", &mut f.upload_job_logs);
    for (k, slot) in [
        ("no-https", &mut f.no_https),
        ("disconnect-after-job", &mut f.disconnect_after_job),
        ("fail-on-missing-files", &mut f.fail_on_missing_files),
    ] {
        let ek = envkey(k);
        if let Some(v) = env(&ek) {
            *slot = Some(env_bool(&ek, &v)?);
        }
    }
    for (k, slot) in [
        (
            "disconnect-after-idle-timeout",
            &mut f.disconnect_after_idle_timeout,
        ),
        (
            "interruption-grace-period",
            &mut f.interruption_grace_period,
        ),
    ] {
        let ek = envkey(k);
        if let Some(v) = env(&ek) {
            *slot = Some(env_u64(&ek, &v)?);
        }
    }

    let endpoint = f
        .endpoint
        .filter(|s| !s.is_empty())
        .context("endpoint is required")?;
    if endpoint.contains("://") {
        bail!("endpoint must be host[:port] without a scheme, got {endpoint:?}");
    }
    let token = f
        .token
        .filter(|s| !s.is_empty())
        .context("token is required")?;
    let name = match f.name.filter(|s| !s.is_empty()) {
        Some(n) if valid_agent_name(&n) => n,
        Some(n) => {
            bail!("name {n:?} is invalid: it must be 8-80 characters of [a-zA-Z0-9-_/+] or a URL")
        }
        None => (0..20).map(|_| fastrand::alphanumeric()).collect(),
    };
    let mut env_vars = Vec::new();
    for e in f.env_vars.unwrap_or_default() {
        let parts: Vec<&str> = e.split('=').collect();
        match parts.as_slice() {
            [k, v] if !k.is_empty() => env_vars.push((k.to_string(), v.to_string())),
            _ => bail!("env-vars: {e:?} is not NAME=VALUE (a value may not contain '=')"),
        }
    }
    let mut files = Vec::new();
    for e in f.files.unwrap_or_default() {
        let parts: Vec<&str> = e.split(':').collect();
        match parts.as_slice() {
            [h, c] if !h.is_empty() && !c.is_empty() => files.push((h.to_string(), c.to_string())),
            _ => bail!("files: {e:?} is not host:container"),
        }
    }
    let upload_job_logs = f.upload_job_logs.unwrap_or_else(|| "never".to_string());
    if !matches!(
        upload_job_logs.as_str(),
        "never" | "always" | "when-trimmed"
    ) {
        bail!("upload-job-logs: {upload_job_logs:?} is not one of never, always, when-trimmed");
    }
    let hook = |p: Option<String>| p.filter(|s| !s.is_empty());
    Ok(Config {
        endpoint,
        token,
        no_https: f.no_https.unwrap_or(false),
        name,
        disconnect_after_job: f.disconnect_after_job.unwrap_or(false),
        idle_timeout: f.disconnect_after_idle_timeout.unwrap_or(0),
        interruption_grace_period: f.interruption_grace_period.unwrap_or(0),
        shutdown_hook_path: hook(f.shutdown_hook_path),
        pre_job_hook_path: hook(f.pre_job_hook_path),
        post_job_hook_path: hook(f.post_job_hook_path),
        env_vars,
        files,
        fail_on_missing_files: f.fail_on_missing_files.unwrap_or(false),
        upload_job_logs,
    })
}

/// `start --config-file <path>` → path.
fn parse_args(args: &[String]) -> anyhow::Result<String> {
    match args {
        [start, flag, path] if start == "start" && flag == "--config-file" && !path.is_empty() => {
            Ok(path.clone())
        }
        [start, flag] if start == "start" => match flag.strip_prefix("--config-file=") {
            Some(p) if !p.is_empty() => Ok(p.to_string()),
            _ => bail!("{USAGE}"),
        },
        _ => bail!("{USAGE}"),
    }
}

// ---------------------------------------------------------------- knobs

#[derive(Debug, Clone)]
struct Knobs {
    register_tries: u64,
    register_interval: Duration,
    sync_timeout: Duration,
    disconnect_tries: u64,
    disconnect_interval: Duration,
    hook_sleep: Duration,
    hook_hang: Duration,
}

fn knob(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => match v.trim().parse() {
            Ok(n) => n,
            Err(_) => {
                log(&format!("ignoring {name}={v:?}: not a number"));
                default
            }
        },
        Err(_) => default,
    }
}

impl Knobs {
    fn from_env() -> Knobs {
        Knobs {
            register_tries: knob("FAKE_AGENT_REGISTER_TRIES", 30).max(1),
            register_interval: Duration::from_millis(knob("FAKE_AGENT_REGISTER_INTERVAL_MS", 1000)),
            sync_timeout: Duration::from_secs(knob("FAKE_AGENT_SYNC_TIMEOUT_SECS", 600)),
            disconnect_tries: knob("FAKE_AGENT_DISCONNECT_TRIES", 5).max(1),
            disconnect_interval: Duration::from_millis(knob(
                "FAKE_AGENT_DISCONNECT_INTERVAL_MS",
                200,
            )),
            hook_sleep: Duration::from_secs(knob("FAKE_AGENT_HOOK_SLEEP_SECS", 0)),
            hook_hang: Duration::from_secs(knob("FAKE_AGENT_HOOK_HANG_SECS", 0)),
        }
    }
}

// ---------------------------------------------------------------- API client

fn loopback_host(endpoint: &str) -> bool {
    let host = if let Some(rest) = endpoint.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        endpoint.split(':').next().unwrap_or_default()
    };
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

struct Api {
    http: reqwest::Client,
    base: String,
    loopback: bool,
    endpoint: String,
    access_token: Mutex<String>,
}

impl Api {
    fn new(cfg: &Config, knobs: &Knobs) -> anyhow::Result<Api> {
        let timeout = knobs
            .sync_timeout
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        let http = {
            agent_supervisor::tls::install_crypto_provider();
            reqwest::Client::builder()
        }
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(format!("SemaphoreAgent/{VERSION}"))
        .no_proxy()
        .build()?;
        let scheme = if cfg.no_https { "http" } else { "https" };
        Ok(Api {
            http,
            base: format!("{scheme}://{}{API_BASE}", cfg.endpoint),
            loopback: loopback_host(&cfg.endpoint),
            endpoint: cfg.endpoint.clone(),
            access_token: Mutex::new(String::new()),
        })
    }

    fn guard(&self) -> anyhow::Result<()> {
        if self.loopback {
            Ok(())
        } else {
            bail!(
                "the fake agent only talks to loopback endpoints, not {:?}",
                self.endpoint
            )
        }
    }

    fn token(&self) -> String {
        self.access_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn register(&self, cfg: &Config, reg_token: &str) -> anyhow::Result<RegisterResponse> {
        self.guard()?;
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let body = RegisterRequest {
            name: cfg.name.clone(),
            version: VERSION.to_string(),
            pid: i64::from(std::process::id()),
            os: "Ubuntu".to_string(),
            arch: arch.to_string(),
            hostname,
            single_job: cfg.disconnect_after_job,
            idle_timeout: cfg.idle_timeout,
            interruption_grace_period: cfg.interruption_grace_period,
            job_id: String::new(),
        };
        let resp = self
            .http
            .post(format!("{}/register", self.base))
            .header("Authorization", format!("Token {reg_token}"))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        if status != reqwest::StatusCode::CREATED {
            bail!("register request got HTTP {}", status.as_u16());
        }
        let r: RegisterResponse = resp.json().await?;
        *self
            .access_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = r.token.clone();
        Ok(r)
    }

    async fn sync(&self, req: &SyncRequest) -> anyhow::Result<SyncResponse> {
        self.guard()?;
        let resp = self
            .http
            .post(format!("{}/sync", self.base))
            .header("Authorization", format!("Token {}", self.token()))
            .json(req)
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::OK {
            bail!(
                "failed to sync with upstream, got HTTP {}",
                resp.status().as_u16()
            );
        }
        Ok(resp.json().await?)
    }

    async fn get_job(&self, id: &str) -> anyhow::Result<JobPayload> {
        self.guard()?;
        let resp = self
            .http
            .get(format!("{}/jobs/{id}", self.base))
            .header("Authorization", format!("Token {}", self.token()))
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::OK {
            bail!("get job got HTTP {}", resp.status().as_u16());
        }
        Ok(resp.json().await?)
    }

    async fn disconnect(&self) -> anyhow::Result<()> {
        self.guard()?;
        let resp = self
            .http
            .post(format!("{}/disconnect", self.base))
            .header("Authorization", format!("Token {}", self.token()))
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::OK {
            bail!("disconnect got HTTP {}", resp.status().as_u16());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- jobs

/// What the sync loop reports; shared with the job task.
#[derive(Debug, Default)]
struct Slot {
    state: String,
    job_id: String,
    result: String,
    stopping: bool,
    /// Per-job stop signal (a fresh one for every job, so a stale permit
    /// never stops the next job).
    stop: Option<Arc<Notify>>,
}

struct JobCtx {
    api: Arc<Api>,
    cfg: Config,
    slot: Arc<Mutex<Slot>>,
}

fn lock_slot(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

fn base_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| k != CHILD_ENV)
        .collect()
}

fn spawn_logged(
    cmd: &mut tokio::process::Command,
    tag: String,
    sink: Option<&mpsc::UnboundedSender<String>>,
) -> std::io::Result<tokio::process::Child> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let streams = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ];
    for stream in streams.into_iter().flatten() {
        let tag = tag.clone();
        let sink = sink.cloned();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                log(&format!("{tag}: {l}"));
                if let Some(s) = &sink {
                    let _ = s.send(l);
                }
            }
        });
    }
    Ok(child)
}

/// Pushes a job's output lines to its logger (batched, in order) until every sender is
/// gone. Only to loopback, like the rest of the fake's traffic.
fn start_log_pusher(
    http: reqwest::Client,
    logger: JobLogger,
) -> (mpsc::UnboundedSender<String>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let task = tokio::spawn(async move {
        let host = reqwest::Url::parse(&logger.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        let allowed = logger.method == "push" && loopback_host(&host);
        if !allowed {
            log(&format!(
                "job logs: not pushing to {:?} (method {:?}; the fake only talks to loopback)",
                logger.url, logger.method
            ));
        }
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(l) = rx.try_recv() {
                batch.push(l);
            }
            if !allowed {
                continue;
            }
            let body = batch.join("\n");
            for attempt in 1..=3 {
                let sent = http
                    .post(&logger.url)
                    .header("Authorization", format!("Bearer {}", logger.token))
                    .header("Content-Type", "text/plain")
                    .body(body.clone())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => break,
                    Ok(r) => log(&format!(
                        "job logs: push attempt {attempt} got HTTP {}",
                        r.status().as_u16()
                    )),
                    Err(e) => log(&format!("job logs: push attempt {attempt} failed: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    (tx, task)
}

/// Runs `bash -c <script>` (or `bash <path>`) in its own process group;
/// returns Some(success) or None when stopped.
async fn run_step(
    args: &[&str],
    env: &[(OsString, OsString)],
    tag: &str,
    stop: &Notify,
    sink: Option<&mpsc::UnboundedSender<String>>,
) -> Option<bool> {
    let mut cmd = tokio::process::Command::new("bash");
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .process_group(0);
    let mut child = match spawn_logged(&mut cmd, tag.to_string(), sink) {
        Ok(c) => c,
        Err(e) => {
            log(&format!("{tag}: could not start bash: {e}"));
            return Some(false);
        }
    };
    let pgid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(nix::unistd::Pid::from_raw);
    tokio::select! {
        st = child.wait() => Some(st.is_ok_and(|s| s.success())),
        () = stop.notified() => {
            if let Some(pg) = pgid {
                let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGTERM);
                if tokio::time::timeout(Duration::from_secs(1), child.wait()).await.is_err() {
                    let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait().await;
                }
            }
            None
        }
    }
}

async fn run_job(ctx: Arc<JobCtx>, id: String, stop: Arc<Notify>) {
    let mut payload = None;
    for attempt in 1..=5 {
        match ctx.api.get_job(&id).await {
            Ok(p) => {
                payload = Some(p);
                break;
            }
            Err(e) => {
                log(&format!("[Get job] attempt {attempt} failed: {e:#}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let mut result = "failed";
    let mut stopped = false;
    if let Some(payload) = payload {
        {
            let mut s = lock_slot(&ctx.slot);
            if s.state == "starting-job" {
                s.state = "running-job".into();
            }
            stopped = s.stopping;
        }
        log(&format!("Running job {id}"));
        event("job_started", serde_json::json!({ "job_id": id }));
        let mut env = base_env();
        for (k, v) in &ctx.cfg.env_vars {
            env.push((k.into(), v.into()));
        }
        for e in &payload.env_vars {
            let v = base64_decode(&e.value).unwrap_or_default();
            env.push((
                e.name.clone().into(),
                String::from_utf8_lossy(&v).into_owned().into(),
            ));
        }
        let tag = format!("job {}", id.get(..8).unwrap_or(&id));
        let (sink_tx, pusher) = match payload.logger.clone() {
            Some(logger) => {
                let (tx, task) = start_log_pusher(ctx.api.http.clone(), logger);
                (Some(tx), Some(task))
            }
            None => (None, None),
        };
        let sink = sink_tx.as_ref();
        if !stopped {
            if let Some(hook) = &ctx.cfg.pre_job_hook_path {
                match run_step(&[hook.as_str()], &env, &tag, &stop, sink).await {
                    None => stopped = true,
                    Some(false) => log(&format!("pre-job hook {hook} failed (ignored)")),
                    Some(true) => {}
                }
            }
        }
        result = "passed";
        for c in &payload.commands {
            if stopped || lock_slot(&ctx.slot).stopping {
                stopped = true;
                break;
            }
            match run_step(&["-c", c.directive.as_str()], &env, &tag, &stop, sink).await {
                None => {
                    stopped = true;
                    break;
                }
                Some(false) => {
                    result = "failed";
                    break;
                }
                Some(true) => {}
            }
        }
        if let Some(hook) = &ctx.cfg.post_job_hook_path {
            if !stopped {
                if let Some(false) = run_step(&[hook.as_str()], &env, &tag, &stop, sink).await {
                    log(&format!("post-job hook {hook} failed (ignored)"));
                }
            }
        }
        // The output is at the hub before the job is reported finished (bounded: a
        // process the job left behind may hold its pipes open).
        // Once the readers' clones are gone too (EOF), the pusher ends.
        drop(sink_tx);
        if let Some(mut task) = pusher {
            if tokio::time::timeout(Duration::from_secs(3), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    } else {
        log(&format!("Could not get job {id}"));
    }
    let mut s = lock_slot(&ctx.slot);
    if stopped || s.stopping {
        result = "stopped";
    }
    s.state = "finished-job".into();
    s.result = result.into();
    drop(s);
    log(&format!("Job {id} finished: {result}"));
    event(
        "job_finished",
        serde_json::json!({ "job_id": id, "result": result }),
    );
}

// ---------------------------------------------------------------- agent

fn reason_from_wire(r: &str) -> &'static str {
    match r {
        "idle" => "IDLE",
        "job-finished" => "JOB_FINISHED",
        "requested" => "REQUESTED",
        "interrupted" => "INTERRUPTED",
        _ => "UNKNOWN",
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0)
}

/// Registers, syncs, runs jobs, shuts down. Returns the exit code.
/// `interrupts` delivers SIGTERM/SIGINT seen after `registered` was set.
async fn run_agent(
    cfg: Config,
    knobs: Knobs,
    registered: Arc<AtomicBool>,
    mut interrupts: mpsc::UnboundedReceiver<()>,
) -> i32 {
    set_log_name(&cfg.name);
    log("Starting Agent");
    let api = match Api::new(&cfg, &knobs) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            log(&format!("failed to register agent: {e:#}"));
            return 1;
        }
    };

    log("Registering Agent");
    let mut last_err = String::new();
    let mut reg = None;
    for attempt in 1..=knobs.register_tries {
        match api.register(&cfg, &cfg.token).await {
            Ok(r) => {
                reg = Some(r);
                break;
            }
            Err(e) => {
                last_err = format!("{e:#}");
                log(&format!("[Register] attempt {attempt} failed: {last_err}"));
                if attempt < knobs.register_tries {
                    tokio::time::sleep(knobs.register_interval).await;
                }
            }
        }
    }
    let Some(reg) = reg else {
        log(&format!("failed to register agent: {last_err}"));
        event("register_failed", serde_json::json!({ "error": last_err }));
        return 1;
    };
    set_log_name(&reg.name);
    registered.store(true, Ordering::SeqCst);
    event("registered", serde_json::json!({}));
    log("Starting to poll for jobs");

    let slot = Arc::new(Mutex::new(Slot {
        state: "waiting-for-jobs".into(),
        ..Slot::default()
    }));
    let ctx = Arc::new(JobCtx {
        api: api.clone(),
        cfg: cfg.clone(),
        slot: slot.clone(),
    });
    let mut interrupted_at: i64 = 0;
    let mut last_good = Instant::now();
    let mut interval = Duration::from_millis(fastrand::u64(3000..6000));
    let mut interrupts_open = true;

    let (reason, code) = loop {
        let req = {
            let s = lock_slot(&slot);
            SyncRequest {
                state: s.state.clone(),
                job_id: s.job_id.clone(),
                job_result: if s.state == "finished-job" {
                    s.result.clone()
                } else {
                    String::new()
                },
                interrupted_at,
            }
        };
        match api.sync(&req).await {
            Ok(resp) => {
                last_good = Instant::now();
                interval = if resp.next_sync_after > 0 {
                    Duration::from_millis(resp.next_sync_after)
                } else {
                    Duration::from_millis(fastrand::u64(3000..6000))
                };
                match resp.action.as_str() {
                    "run-job" => {
                        let mut s = lock_slot(&slot);
                        if s.state == "waiting-for-jobs" && !resp.job_id.is_empty() {
                            log(&format!(
                                "SYNC response (action: run-job, job: {})",
                                resp.job_id
                            ));
                            s.state = "starting-job".into();
                            s.job_id = resp.job_id.clone();
                            s.result.clear();
                            s.stopping = false;
                            let stop = Arc::new(Notify::new());
                            s.stop = Some(stop.clone());
                            drop(s);
                            tokio::spawn(run_job(ctx.clone(), resp.job_id.clone(), stop));
                        }
                    }
                    "stop-job" => {
                        let mut s = lock_slot(&slot);
                        if !s.stopping
                            && matches!(s.state.as_str(), "starting-job" | "running-job")
                            && (resp.job_id.is_empty() || resp.job_id == s.job_id)
                        {
                            log(&format!(
                                "SYNC response (action: stop-job, job: {})",
                                s.job_id
                            ));
                            s.stopping = true;
                            s.state = "stopping-job".into();
                            if let Some(stop) = &s.stop {
                                stop.notify_one();
                            }
                        }
                    }
                    "wait-for-jobs" => {
                        let mut s = lock_slot(&slot);
                        if s.state == "finished-job" || s.state == "waiting-for-jobs" {
                            s.state = "waiting-for-jobs".into();
                            s.job_id.clear();
                            s.result.clear();
                            s.stopping = false;
                            s.stop = None;
                        }
                    }
                    "shutdown" => {
                        log(&format!(
                            "Agent shutdown requested by Semaphore due to: {}",
                            resp.shutdown_reason
                        ));
                        break (reason_from_wire(&resp.shutdown_reason), 0);
                    }
                    _ => {}
                }
            }
            Err(e) => {
                log(&format!("[SYNC ERR] Failed to sync with API: {e:#}"));
                if last_good.elapsed() > knobs.sync_timeout {
                    log(&format!(
                        "Unable to sync with Semaphore for over {:?}.",
                        knobs.sync_timeout
                    ));
                    break ("UNABLE_TO_SYNC", 1);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            got = interrupts.recv(), if interrupts_open => {
                match got {
                    Some(()) if interrupted_at == 0 => {
                        interrupted_at = unix_now();
                        log("Received interrupt signal: reporting interrupted_at and syncing now");
                        event("interrupted", serde_json::json!({ "interrupted_at": interrupted_at }));
                    }
                    Some(()) => log("Ignoring repeated interrupt signal"),
                    None => interrupts_open = false,
                }
            }
        }
    };
    shutdown(&api, &cfg, &knobs, reason).await;
    code
}

async fn shutdown(api: &Api, cfg: &Config, knobs: &Knobs, reason: &str) {
    set_last_reason(reason);
    event("shutdown", serde_json::json!({ "reason": reason }));
    log("Disconnecting the Agent from Semaphore");
    let mut ok = false;
    for attempt in 1..=knobs.disconnect_tries {
        match api.disconnect().await {
            Ok(()) => {
                ok = true;
                break;
            }
            Err(e) => {
                log(&format!("[Disconnect] attempt {attempt} failed: {e:#}"));
                if attempt < knobs.disconnect_tries {
                    tokio::time::sleep(knobs.disconnect_interval).await;
                }
            }
        }
    }
    if ok {
        log("Disconnected.");
    } else {
        log(&format!(
            "Failed to disconnect from Semaphore even after {} tries",
            knobs.disconnect_tries
        ));
    }

    event(
        "hook",
        serde_json::json!({ "reason": reason, "path": cfg.shutdown_hook_path }),
    );
    if !knobs.hook_sleep.is_zero() {
        log(&format!(
            "FAKE_AGENT_HOOK_SLEEP_SECS: sleeping {:?}",
            knobs.hook_sleep
        ));
        tokio::time::sleep(knobs.hook_sleep).await;
    }
    if let Some(path) = &cfg.shutdown_hook_path {
        log(&format!("Executing shutdown hook from {path}"));
        let mut cmd = tokio::process::Command::new("bash");
        if knobs.hook_hang.is_zero() {
            cmd.arg(path);
        } else {
            log(&format!(
                "FAKE_AGENT_HOOK_HANG_SECS: the hook will hang {:?} after its script",
                knobs.hook_hang
            ));
            cmd.args(["-c", "bash \"$1\"; exec sleep \"$2\"", "hook"])
                .arg(path)
                .arg(knobs.hook_hang.as_secs().to_string());
        }
        let out = cmd
            .env_remove(CHILD_ENV)
            .env("SEMAPHORE_AGENT_SHUTDOWN_REASON", reason)
            .stdin(std::process::Stdio::null())
            .output()
            .await;
        match out {
            Ok(o) => {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                if !o.status.success() {
                    log(&format!("Error executing shutdown hook: {}", o.status));
                }
                if !text.trim().is_empty() {
                    log(&format!("Output: {text}"));
                }
                event("hook_done", serde_json::json!({ "code": o.status.code() }));
            }
            Err(e) => {
                log(&format!("Error executing shutdown hook: {e}"));
                event("hook_done", serde_json::json!({ "code": null }));
            }
        }
    }
    log(&format!("Agent shutting down due to: {reason}"));
}

/// The agent proper (child, or the wrapper after a signal death).
async fn agent_main(args: &[String], role: &str) -> i32 {
    event("child_start", serde_json::json!({ "role": role }));
    let registered = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::unbounded_channel();
    // Handle SIGTERM/SIGINT from the start: ignored until registration completes.
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            let registered = registered.clone();
            tokio::spawn(async move {
                let mut first = true;
                loop {
                    let name = tokio::select! {
                        s = term.recv() => { if s.is_none() { break; } "SIGTERM" }
                        s = int.recv() => { if s.is_none() { break; } "SIGINT" }
                    };
                    if !registered.load(Ordering::SeqCst) {
                        log(&format!("Ignoring {name}: agent not registered yet"));
                    } else if first {
                        first = false;
                        if tx.send(()).is_err() {
                            break;
                        }
                    } else {
                        log(&format!("Ignoring {name}: already interrupted"));
                    }
                }
            });
        }
        _ => {
            eprintln!("error: could not install signal handlers");
            return 1;
        }
    }

    let path = match parse_args(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: could not read config file {path}: {e}");
            return 1;
        }
    };
    let cfg = match parse_config(&text, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: config file {path}: {e:#}");
            return 1;
        }
    };
    set_log_name(&cfg.name);
    run_agent(cfg, Knobs::from_env(), registered, rx).await
}

/// The wrapper: re-executes itself as the child and forwards signals.
async fn wrapper_main(args: Vec<String>) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot find own executable: {e}");
            return 1;
        }
    };
    let kinds = [
        (SignalKind::terminate(), nix::sys::signal::Signal::SIGTERM),
        (SignalKind::interrupt(), nix::sys::signal::Signal::SIGINT),
        (SignalKind::hangup(), nix::sys::signal::Signal::SIGHUP),
        (SignalKind::quit(), nix::sys::signal::Signal::SIGQUIT),
        (
            SignalKind::user_defined1(),
            nix::sys::signal::Signal::SIGUSR1,
        ),
        (
            SignalKind::user_defined2(),
            nix::sys::signal::Signal::SIGUSR2,
        ),
    ];
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel();
    let mut listeners = Vec::new();
    for (kind, sig) in kinds {
        match signal(kind) {
            Ok(mut s) => {
                let tx = sig_tx.clone();
                listeners.push(tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        if tx.send(sig).is_err() {
                            break;
                        }
                    }
                }));
            }
            Err(e) => {
                eprintln!("error: could not install signal handler: {e}");
                return 1;
            }
        }
    }
    drop(sig_tx);
    let mut child = match tokio::process::Command::new(&exe)
        .args(&args)
        .env(CHILD_ENV, "1")
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: could not start the agent process: {e}");
            return 1;
        }
    };
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(nix::unistd::Pid::from_raw);
    let status = loop {
        tokio::select! {
            st = child.wait() => break st,
            Some(sig) = sig_rx.recv() => {
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::kill(pid, sig);
                }
            }
        }
    };
    for l in listeners {
        l.abort();
    }
    match status {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            if let Some(code) = st.code() {
                return code;
            }
            let sig = st.signal().unwrap_or(0);
            eprintln!("agent: agent process died from signal {sig}; running the agent again");
            event("rerun", serde_json::json!({ "signal": sig }));
            agent_main(&args, "inprocess").await
        }
        Err(e) => {
            eprintln!("error: waiting for the agent process: {e}");
            1
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn main() {
    let is_child = std::env::var_os(CHILD_ENV).is_some_and(|v| v == "1");
    if !is_child {
        event("start", serde_json::json!({ "role": "wrapper" }));
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match runtime() {
        Ok(rt) => {
            let code = if is_child {
                rt.block_on(agent_main(&args, "child"))
            } else {
                rt.block_on(wrapper_main(args))
            };
            // Don't wait for detached job output readers or a job left behind.
            rt.shutdown_timeout(Duration::from_millis(100));
            code
        }
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            1
        }
    };
    let reason = last_reason();
    if is_child {
        event(
            "child_exit",
            serde_json::json!({ "code": code, "reason": reason }),
        );
    } else {
        event(
            "exit",
            serde_json::json!({ "code": code, "reason": reason }),
        );
    }
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_fleet_tests::hub::{Hub, HubOptions, JobSpec, JobState};
    use std::path::PathBuf;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> anyhow::Result<Config> {
        parse_config(text, &no_env)
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    const MIN: &str = "endpoint: 127.0.0.1:9\ntoken: t\n";

    #[test]
    fn minimal_config_and_defaults() {
        let c = parse(MIN).expect("valid");
        assert_eq!(c.endpoint, "127.0.0.1:9");
        assert_eq!(c.token, "t");
        assert!(!c.no_https && !c.disconnect_after_job && !c.fail_on_missing_files);
        assert_eq!((c.idle_timeout, c.interruption_grace_period), (0, 0));
        assert_eq!(c.name.len(), 20, "random name");
        assert!(valid_agent_name(&c.name));
        assert_eq!(c.upload_job_logs, "never");
        assert_eq!(c.shutdown_hook_path, None);
    }

    #[test]
    fn full_config() {
        let c = parse(
            "endpoint: 127.0.0.1:9\ntoken: t\nno-https: true\nname: i-0123456789abcdef0\n\
             disconnect-after-job: true\ndisconnect-after-idle-timeout: 300\n\
             interruption-grace-period: 60\nshutdown-hook-path: /opt/hook.sh\n\
             pre-job-hook-path: /opt/pre.sh\npost-job-hook-path: ''\n\
             env-vars: [SEMAPHORE_CACHE_BACKEND=s3, EMPTY=]\nfiles: ['/a:/b']\n\
             fail-on-missing-files: true\nupload-job-logs: when-trimmed\n",
        )
        .expect("valid");
        assert!(c.no_https && c.disconnect_after_job && c.fail_on_missing_files);
        assert_eq!(c.name, "i-0123456789abcdef0");
        assert_eq!((c.idle_timeout, c.interruption_grace_period), (300, 60));
        assert_eq!(c.shutdown_hook_path.as_deref(), Some("/opt/hook.sh"));
        assert_eq!(c.pre_job_hook_path.as_deref(), Some("/opt/pre.sh"));
        assert_eq!(c.post_job_hook_path, None);
        assert_eq!(
            c.env_vars,
            vec![
                ("SEMAPHORE_CACHE_BACKEND".to_string(), "s3".to_string()),
                ("EMPTY".to_string(), String::new())
            ]
        );
        assert_eq!(c.files, vec![("/a".to_string(), "/b".to_string())]);
        assert_eq!(c.upload_job_logs, "when-trimmed");
    }

    #[test]
    fn strict_keys_and_types() {
        assert!(err(&format!("{MIN}log-level: debug\n")).contains("\"log-level\""));
        assert!(err(&format!("{MIN}disconnect_after_job: true\n")).contains("disconnect_after_job"));
        assert!(err(&format!("{MIN}no-https: \"yes\"\n")).contains("no-https"));
        assert!(err(&format!("{MIN}interruption-grace-period: -1\n"))
            .contains("interruption-grace-period"));
        assert!(err(&format!("{MIN}disconnect-after-idle-timeout: 1.5\n"))
            .contains("disconnect-after-idle-timeout"));
        assert!(err(&format!("{MIN}env-vars: A=b\n")).contains("env-vars"));
        assert!(err("token: t\n").contains("endpoint"));
        assert!(err("endpoint: 127.0.0.1:9\n").contains("token"));
        assert!(err("- a\n- b\n").contains("mapping"));
        assert!(err("endpoint: https://x.example\ntoken: t\n").contains("scheme"));
        assert!(err(&format!("{MIN}env-vars: [A=b=c]\n")).contains("A=b=c"));
        assert!(err(&format!("{MIN}env-vars: [NOVALUE]\n")).contains("NOVALUE"));
        assert!(err(&format!("{MIN}env-vars: [=x]\n")).contains("=x"));
        assert!(err(&format!("{MIN}files: [nocolon]\n")).contains("nocolon"));
        assert!(err(&format!("{MIN}upload-job-logs: sometimes\n")).contains("upload-job-logs"));
        assert!(err(&format!("{MIN}name: short\n")).contains("short"));
        assert!(err(&format!("{MIN}name: has spaces in it\n")).contains("has spaces"));
        assert!(parse("").is_err());
    }

    #[test]
    fn env_overrides_file() {
        let env = |k: &str| match k {
            "SEMAPHORE_AGENT_NAME" => Some("from-env-name".to_string()),
            "SEMAPHORE_AGENT_NO_HTTPS" => Some("true".to_string()),
            "SEMAPHORE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT" => Some("42".to_string()),
            _ => None,
        };
        let c = parse_config(&format!("{MIN}name: from-file-name\n"), &env).expect("valid");
        assert_eq!(c.name, "from-env-name");
        assert!(c.no_https);
        assert_eq!(c.idle_timeout, 42);
        let bad =
            |k: &str| (k == "SEMAPHORE_AGENT_DISCONNECT_AFTER_JOB").then(|| "maybe".to_string());
        assert!(parse_config(MIN, &bad).is_err());
    }

    #[test]
    fn cli_args() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_args(&v(&["start", "--config-file", "/c.yaml"]))
                .ok()
                .as_deref(),
            Some("/c.yaml")
        );
        assert_eq!(
            parse_args(&v(&["start", "--config-file=/c.yaml"]))
                .ok()
                .as_deref(),
            Some("/c.yaml")
        );
        for bad in [
            &[][..],
            &["start"][..],
            &["start", "--config-file"][..],
            &["start", "--config-file="][..],
            &["start", "--config", "/c.yaml"][..],
            &["run", "--config-file", "/c.yaml"][..],
            &["start", "--config-file", "/c.yaml", "--name", "x"][..],
        ] {
            assert!(parse_args(&v(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn log_timestamp_is_go_layout() {
        assert_eq!(timestamp(UNIX_EPOCH), "Jan  1 00:00:00.000");
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(timestamp(t), "Nov 14 22:13:20.123");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(timestamp(t), "Feb 29 00:00:00.000");
    }

    #[test]
    fn only_loopback() {
        assert!(loopback_host("127.0.0.1:8080"));
        assert!(loopback_host("127.1.2.3"));
        assert!(loopback_host("localhost:1"));
        assert!(loopback_host("[::1]:80"));
        assert!(!loopback_host("myorg.semaphoreci.com"));
        assert!(!loopback_host("10.0.0.1:80"));
    }

    // ------------------------------------------------ in-process protocol runs

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "fake-agent-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).expect("tmpdir");
        d
    }

    fn knobs() -> Knobs {
        Knobs {
            register_tries: 3,
            register_interval: Duration::from_millis(50),
            sync_timeout: Duration::from_secs(600),
            disconnect_tries: 2,
            disconnect_interval: Duration::from_millis(10),
            hook_sleep: Duration::ZERO,
            hook_hang: Duration::ZERO,
        }
    }

    struct Run {
        hub: Hub,
        dir: PathBuf,
        cfg: Config,
    }

    async fn setup(tag: &str, extra: &str) -> Run {
        let hub = Hub::start(HubOptions {
            next_sync_after_ms: 50,
            ..HubOptions::default()
        })
        .await
        .expect("hub");
        let dir = tmpdir(tag);
        let hook = dir.join("hook.sh");
        std::fs::write(
            &hook,
            format!(
                "echo \"$SEMAPHORE_AGENT_SHUTDOWN_REASON\" > {}\n",
                dir.join("hook.out").display()
            ),
        )
        .expect("hook");
        let cfg = parse(&format!(
            "endpoint: {}\ntoken: reg-token\nno-https: true\nname: agent-{tag}\n\
             shutdown-hook-path: {}\n{extra}",
            hub.endpoint(),
            hook.display()
        ))
        .expect("config");
        Run { hub, dir, cfg }
    }

    fn spawn_agent(
        run: &Run,
        knobs: Knobs,
    ) -> (mpsc::UnboundedSender<()>, tokio::task::JoinHandle<i32>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = tokio::spawn(run_agent(
            run.cfg.clone(),
            knobs,
            Arc::new(AtomicBool::new(false)),
            rx,
        ));
        (tx, handle)
    }

    async fn finish(handle: tokio::task::JoinHandle<i32>) -> i32 {
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("agent finishes in time")
            .expect("agent task")
    }

    fn hook_reason(run: &Run) -> Option<String> {
        std::fs::read_to_string(run.dir.join("hook.out"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    #[tokio::test]
    async fn single_job_run_with_env_and_hook() {
        let run = setup(
            "single1",
            "disconnect-after-job: true\nenv-vars: [CFG_V=c]\n",
        )
        .await;
        let out = run.dir.join("job.out");
        let id = run.hub.enqueue_job(JobSpec {
            commands: vec![
                format!(
                    "echo \"$CFG_V $JOB_V $SEMAPHORE_JOB_ID\" > {}",
                    out.display()
                ),
                "test -z \"$FAKE_AGENT_CHILD\"".to_string(),
            ],
            env: vec![("JOB_V".into(), "j w".into())],
        });
        let (_tx, handle) = spawn_agent(&run, knobs());
        assert_eq!(finish(handle).await, 0);
        assert_eq!(
            std::fs::read_to_string(&out).expect("job output").trim(),
            format!("c j w {id}")
        );
        assert_eq!(hook_reason(&run).as_deref(), Some("JOB_FINISHED"));
        let job = run.hub.job(&id).expect("job");
        assert_eq!(
            (job.state, job.result.as_deref()),
            (JobState::Finished, Some("passed"))
        );
        let agents = run.hub.agents();
        assert_eq!(agents[0].disconnected.as_deref(), Some("job-finished"));
        assert!(agents[0].single_job);
        let _ = std::fs::remove_dir_all(&run.dir);
    }

    #[tokio::test]
    async fn failed_job_then_idle_shutdown() {
        let run = setup("idle1", "disconnect-after-idle-timeout: 1\n").await;
        let id = run.hub.enqueue_job(JobSpec {
            commands: vec!["exit 3".into(), "echo not reached".into()],
            env: vec![],
        });
        let (_tx, handle) = spawn_agent(&run, knobs());
        assert_eq!(finish(handle).await, 0);
        assert_eq!(
            run.hub.job(&id).and_then(|j| j.result).as_deref(),
            Some("failed")
        );
        assert_eq!(hook_reason(&run).as_deref(), Some("IDLE"));
        assert_eq!(run.hub.agents()[0].disconnected.as_deref(), Some("idle"));
        let _ = std::fs::remove_dir_all(&run.dir);
    }

    #[tokio::test]
    async fn interrupt_stops_a_running_job() {
        let run = setup("int1", "interruption-grace-period: 1\n").await;
        let id = run.hub.enqueue_job(JobSpec {
            commands: vec!["sleep 30".into()],
            env: vec![],
        });
        let (tx, handle) = spawn_agent(&run, knobs());
        let running = run
            .hub
            .wait_until(Duration::from_secs(10), |h| {
                h.job(&id).is_some_and(|j| j.state == JobState::Running)
            })
            .await;
        assert!(running);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        tx.send(()).expect("interrupt");
        tx.send(()).expect("second interrupt is ignored");
        assert_eq!(finish(handle).await, 0);
        assert!(
            t.elapsed() >= Duration::from_secs(1),
            "grace period honoured"
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(
            run.hub.job(&id).and_then(|j| j.result).as_deref(),
            Some("stopped")
        );
        assert_eq!(hook_reason(&run).as_deref(), Some("INTERRUPTED"));
        let _ = std::fs::remove_dir_all(&run.dir);
    }

    #[tokio::test]
    async fn unable_to_sync_exits_1() {
        let run = setup("nosync1", "").await;
        let mut k = knobs();
        k.sync_timeout = Duration::from_secs(1);
        let (_tx, handle) = spawn_agent(&run, k);
        assert!(
            run.hub
                .wait_until(Duration::from_secs(10), |h| h
                    .agents()
                    .first()
                    .is_some_and(|a| a.syncs > 0))
                .await
        );
        run.hub.set_api_outage(true);
        assert_eq!(finish(handle).await, 1);
        assert_eq!(hook_reason(&run).as_deref(), Some("UNABLE_TO_SYNC"));
        let _ = std::fs::remove_dir_all(&run.dir);
    }

    #[tokio::test]
    async fn several_jobs_then_requested() {
        let run = setup("multi1", "").await;
        let ids: Vec<String> = (0..3)
            .map(|i| {
                run.hub.enqueue_job(JobSpec {
                    commands: vec![format!("exit {}", i % 2)],
                    env: vec![],
                })
            })
            .collect();
        let (_tx, handle) = spawn_agent(&run, knobs());
        assert!(
            run.hub
                .wait_until(Duration::from_secs(15), |h| h
                    .jobs()
                    .iter()
                    .all(|j| j.state == JobState::Finished))
                .await
        );
        let results: Vec<Option<String>> = ids
            .iter()
            .map(|id| run.hub.job(id).and_then(|j| j.result))
            .collect();
        assert_eq!(
            results,
            vec![
                Some("passed".to_string()),
                Some("failed".to_string()),
                Some("passed".to_string())
            ]
        );
        assert!(run.hub.disconnect_agent("agent-multi1"));
        assert_eq!(finish(handle).await, 0);
        assert_eq!(hook_reason(&run).as_deref(), Some("REQUESTED"));
        assert_eq!(run.hub.agents().len(), 1, "one registration for all jobs");
        let _ = std::fs::remove_dir_all(&run.dir);
    }

    #[tokio::test]
    async fn failed_registration_exits_1_without_hook() {
        let run = setup("noreg1", "").await;
        run.hub.set_registration_token("rotated");
        let (_tx, handle) = spawn_agent(&run, knobs());
        assert_eq!(finish(handle).await, 1);
        assert_eq!(hook_reason(&run), None);
        assert!(run.hub.agents().is_empty());
        let _ = std::fs::remove_dir_all(&run.dir);
    }

    #[tokio::test]
    async fn requested_disconnect_with_a_hanging_hook() {
        let run = setup("req1", "").await;
        let mut k = knobs();
        k.hook_sleep = Duration::from_secs(1);
        let (_tx, handle) = spawn_agent(&run, k);
        assert!(
            run.hub
                .wait_until(Duration::from_secs(10), |h| !h.live_agents().is_empty())
                .await
        );
        assert!(run.hub.disconnect_agent("agent-req1"));
        let t = Instant::now();
        assert_eq!(finish(handle).await, 0);
        assert!(t.elapsed() >= Duration::from_secs(1));
        assert_eq!(hook_reason(&run).as_deref(), Some("REQUESTED"));
        let _ = std::fs::remove_dir_all(&run.dir);
    }

    #[tokio::test]
    async fn a_hook_that_hangs_after_its_script_holds_the_exit() {
        let run = setup("hang1", "disconnect-after-idle-timeout: 1\n").await;
        let mut k = knobs();
        k.hook_hang = Duration::from_secs(2);
        let (_tx, handle) = spawn_agent(&run, k);
        let t = Instant::now();
        assert_eq!(finish(handle).await, 0);
        // The script ran (the reason is out) and then the hook hung.
        assert_eq!(hook_reason(&run).as_deref(), Some("IDLE"));
        assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());
        let _ = std::fs::remove_dir_all(&run.dir);
    }

    #[tokio::test]
    async fn job_output_reaches_the_hub() {
        let run = setup("logs1", "disconnect-after-job: true\n").await;
        let id = run.hub.enqueue_job(JobSpec {
            commands: vec![
                "echo one; echo two >&2".into(),
                "printf 'three\\nfour\\n'".into(),
            ],
            env: vec![],
        });
        let (_tx, handle) = spawn_agent(&run, knobs());
        assert_eq!(finish(handle).await, 0);
        let out = run.hub.job_output(&id);
        for line in ["one", "two", "three", "four"] {
            assert!(out.iter().any(|l| l == line), "{line} in {out:?}");
        }
        let pos = |l: &str| out.iter().position(|x| x == l);
        assert!(pos("three") < pos("four"), "in order: {out:?}");
        let _ = std::fs::remove_dir_all(&run.dir);
    }
}
