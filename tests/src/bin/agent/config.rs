//! The agent's config, read as the real agent (viper) reads it (see the crate docs), its
//! command line, and the test bed's knobs (`FAKE_AGENT_*`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::log::log;

const USAGE: &str = "Usage: agent start --config-file <path>";

/// Config keys the agent accepts: the real agent's `ValidConfigKeys`.
pub const KNOWN_KEYS: &[&str] = &[
    "config-file",
    "name",
    "name-from-env",
    "endpoint",
    "token",
    "no-https",
    "shutdown-hook-path",
    "pre-job-hook-path",
    "post-job-hook-path",
    "disconnect-after-job",
    "job-id",
    "disconnect-after-idle-timeout",
    "env-vars",
    "files",
    "fail-on-missing-files",
    "upload-job-logs",
    "fail-on-pre-job-hook-error",
    "source-pre-job-hook",
    "interruption-grace-period",
    "kubernetes-executor",
    "kubernetes-pod-spec",
    "kubernetes-allowed-images",
    "kubernetes-pod-start-timeout",
    "kubernetes-labels",
    "kubernetes-default-image",
];

/// Go's `url.ParseRequestURI` succeeding, roughly: an absolute path, or a scheme
/// (`[a-zA-Z][a-zA-Z0-9+.-]*:`) followed by something.
pub(crate) fn is_request_uri(s: &str) -> bool {
    if s.starts_with('/') {
        return true;
    }
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'))
        && !rest.is_empty()
}

/// The real agent's name check: a URL, or 8–80 bytes.
pub(crate) fn valid_config_name(name: &str) -> bool {
    is_request_uri(name) || (8..=80).contains(&name.len())
}

/// A random name like the real agent's: base64 (URL alphabet) of 15 random bytes.
fn random_name() -> String {
    const URL_B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..20)
        .map(|_| char::from(URL_B64[fastrand::usize(..64)]))
        .collect()
}

/// One config value as viper would hold it: from the YAML file, or a string from the
/// environment.
#[derive(Debug, Clone)]
enum Raw {
    Yaml(serde_yaml::Value),
    Env(String),
}

/// Go's `strconv.ParseInt(s, 0, 64)` after cast's `trimZeroDecimal`.
pub(crate) fn go_parse_int(s: &str) -> Option<i64> {
    let mut t = s;
    // trimZeroDecimal: "300.00" -> "300".
    if let Some((int, frac)) = t.split_once('.') {
        if !frac.is_empty() && frac.chars().all(|c| c == '0') {
            t = int;
        }
    }
    let (neg, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d.to_string())
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_string())
    } else {
        (10, lower.clone())
    };
    let digits = if radix != 10 || body.contains('_') {
        digits.replace('_', "")
    } else {
        digits
    };
    if digits.is_empty() || digits.starts_with('+') || digits.starts_with('-') {
        return None;
    }
    let v = i64::from_str_radix(&digits, radix).ok()?;
    Some(if neg { -v } else { v })
}

/// Go's `strconv.ParseBool`.
fn go_parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// YAML 1.1 booleans (the real agent's YAML reader resolves unquoted ones).
fn yaml11_bool(s: &str) -> Option<bool> {
    match s {
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

fn number_string(n: &serde_yaml::Number) -> String {
    if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(u) = n.as_u64() {
        u.to_string()
    } else {
        let f = n.as_f64().unwrap_or(0.0);
        if f.fract() == 0.0 && f.abs() < 1e15 {
            format!("{f:.0}")
        } else {
            f.to_string()
        }
    }
}

/// The values of a config file plus `SEMAPHORE_AGENT_*` overrides, read with cast's
/// rules. Warnings (a value read as false/0/"") go to `warnings`.
struct Values {
    map: BTreeMap<String, Raw>,
    warnings: Vec<String>,
}

impl Values {
    fn get(&self, key: &str) -> Option<&Raw> {
        self.map.get(key)
    }

    fn string(&mut self, key: &str) -> String {
        match self.get(key).cloned() {
            None => String::new(),
            Some(Raw::Env(s)) => s,
            Some(Raw::Yaml(v)) => match v {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Bool(b) => b.to_string(),
                serde_yaml::Value::Number(n) => number_string(&n),
                serde_yaml::Value::Null => String::new(),
                other => {
                    self.warnings.push(format!(
                        "{key}: {other:?} is not a string: read as \"\" (as the real agent does)"
                    ));
                    String::new()
                }
            },
        }
    }

    fn boolean(&mut self, key: &str) -> bool {
        let (b, bad) = match self.get(key) {
            None => (false, None),
            Some(Raw::Env(s)) => match go_parse_bool(s) {
                Some(b) => (b, None),
                None => (false, Some(s.clone())),
            },
            Some(Raw::Yaml(v)) => match v {
                serde_yaml::Value::Bool(b) => (*b, None),
                serde_yaml::Value::Null => (false, None),
                serde_yaml::Value::Number(n) => match n.as_i64() {
                    Some(i) => (i != 0, None),
                    None => (false, Some(number_string(n))),
                },
                serde_yaml::Value::String(s) => match go_parse_bool(s).or_else(|| yaml11_bool(s)) {
                    Some(b) => (b, None),
                    None => (false, Some(s.clone())),
                },
                other => (false, Some(format!("{other:?}"))),
            },
        };
        if let Some(bad) = bad {
            self.warnings.push(format!(
                "{key}: {bad:?} is not a boolean: read as false (as the real agent does)"
            ));
        }
        b
    }

    fn int(&mut self, key: &str) -> i64 {
        let (i, bad) = match self.get(key) {
            None => (0, None),
            Some(Raw::Env(s)) => match go_parse_int(s) {
                Some(i) => (i, None),
                None => (0, Some(s.clone())),
            },
            Some(Raw::Yaml(v)) => match v {
                serde_yaml::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => (i, None),
                    // Saturating, as a Go int(float64) on amd64 would not be; fine here.
                    (None, Some(f)) => (f.trunc() as i64, None),
                    _ => (0, Some(number_string(n))),
                },
                serde_yaml::Value::Bool(b) => (i64::from(*b), None),
                serde_yaml::Value::Null => (0, None),
                serde_yaml::Value::String(s) => match go_parse_int(s) {
                    Some(i) => (i, None),
                    None => (0, Some(s.clone())),
                },
                other => (0, Some(format!("{other:?}"))),
            },
        };
        if let Some(bad) = bad {
            self.warnings.push(format!(
                "{key}: {bad:?} is not an integer: read as 0 (as the real agent does)"
            ));
        }
        i
    }

    fn list(&mut self, key: &str) -> Vec<String> {
        match self.get(key).cloned() {
            None => Vec::new(),
            Some(Raw::Env(s)) => s.split_whitespace().map(str::to_string).collect(),
            Some(Raw::Yaml(v)) => match v {
                serde_yaml::Value::Sequence(items) => items
                    .iter()
                    .map(|item| match item {
                        serde_yaml::Value::String(s) => s.clone(),
                        serde_yaml::Value::Bool(b) => b.to_string(),
                        serde_yaml::Value::Number(n) => number_string(n),
                        _ => String::new(),
                    })
                    .collect(),
                serde_yaml::Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
                serde_yaml::Value::Null => Vec::new(),
                other => {
                    self.warnings.push(format!(
                        "{key}: {other:?} is not a list: read as [] (as the real agent does)"
                    ));
                    Vec::new()
                }
            },
        }
    }
}

/// The resolved agent configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) endpoint: String,
    pub(crate) token: String,
    pub(crate) no_https: bool,
    /// Configured name, or a random one.
    pub(crate) name: String,
    pub(crate) disconnect_after_job: bool,
    pub(crate) job_id: String,
    pub(crate) idle_timeout: i64,
    pub(crate) interruption_grace_period: i64,
    pub(crate) shutdown_hook_path: Option<String>,
    pub(crate) pre_job_hook_path: Option<String>,
    pub(crate) post_job_hook_path: Option<String>,
    pub(crate) fail_on_pre_job_hook_error: bool,
    pub(crate) source_pre_job_hook: bool,
    pub(crate) env_vars: Vec<(String, String)>,
    pub(crate) files: Vec<(String, String)>,
    pub(crate) fail_on_missing_files: bool,
    pub(crate) upload_job_logs: String,
    /// Values read as false/0/"" that were not what the key expects (logged at start).
    pub(crate) warnings: Vec<String>,
}

/// Parses and validates a config file's text; `env` looks up `SEMAPHORE_AGENT_*`
/// overrides (and the `name-from-env` variable).
pub(crate) fn parse_config(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Config> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).context("Error reading config file: not valid YAML")?;
    let mapping = match value {
        serde_yaml::Value::Null => serde_yaml::Mapping::new(),
        serde_yaml::Value::Mapping(m) => m,
        _ => bail!("Error reading config file: not a mapping of keys"),
    };
    let mut map = BTreeMap::new();
    for (k, v) in mapping {
        let key = match &k {
            serde_yaml::Value::String(s) => s.to_lowercase(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            serde_yaml::Value::Number(n) => number_string(n),
            other => serde_yaml::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_lowercase(),
        };
        // viper flattens a nested mapping into `key.sub` keys: none is valid.
        if let serde_yaml::Value::Mapping(m) = &v {
            let sub = m
                .keys()
                .next()
                .and_then(|s| s.as_str().map(str::to_lowercase))
                .unwrap_or_default();
            bail!("Unrecognized option '{key}.{sub}'. Exiting...");
        }
        if !KNOWN_KEYS.contains(&key.as_str()) {
            bail!("Unrecognized option '{key}'. Exiting...");
        }
        map.insert(key, Raw::Yaml(v));
    }
    for key in KNOWN_KEYS {
        let var = format!("SEMAPHORE_AGENT_{}", key.to_uppercase().replace('-', "_"));
        if let Some(v) = env(&var).filter(|v| !v.is_empty()) {
            map.insert((*key).to_string(), Raw::Env(v));
        }
    }
    let mut vals = Values {
        map,
        warnings: Vec::new(),
    };

    let disconnect_after_job = vals.boolean("disconnect-after-job");
    let job_id = vals.string("job-id");
    if !job_id.is_empty() && !disconnect_after_job {
        bail!("job-id can only be used if disconnect-after-job is also used. Exiting...");
    }
    let upload_job_logs = match vals.get("upload-job-logs") {
        None => "never".to_string(),
        Some(_) => vals.string("upload-job-logs"),
    };
    if !matches!(
        upload_job_logs.as_str(),
        "never" | "always" | "when-trimmed"
    ) {
        bail!(
            "Unsupported value '{upload_job_logs}' for 'upload-job-logs'. Allowed values are: \
             [never always when-trimmed]. Exiting..."
        );
    }
    let name = vals.string("name");
    let name = if !name.is_empty() {
        if !valid_config_name(&name) {
            bail!(
                "Agent name validation failed: name should have between 8 and 80 characters. \
                 '{name}' has {}",
                name.len()
            );
        }
        name
    } else {
        let var = vals.string("name-from-env");
        if var.is_empty() {
            random_name()
        } else {
            let n = env(&var).unwrap_or_default();
            if !valid_config_name(&n) {
                bail!(
                    "Agent name validation failed: name should have between 8 and 80 \
                     characters. '{n}' has {}",
                    n.len()
                );
            }
            n
        }
    };
    let endpoint = vals.string("endpoint");
    if endpoint.is_empty() {
        bail!("Semaphore endpoint was not specified. Exiting...");
    }
    if endpoint.contains("://") {
        bail!(
            "endpoint must be host[:port] without a scheme, got {endpoint:?} (the fake is \
             stricter than the real agent here)"
        );
    }
    let token = vals.string("token");
    if token.is_empty() {
        bail!("Agent registration token was not specified. Exiting...");
    }
    let idle_timeout = vals.int("disconnect-after-idle-timeout");
    if idle_timeout < 0 {
        bail!("Idle timeout can't be negative. Exiting...");
    }
    if vals.int("kubernetes-pod-start-timeout") < 0 {
        bail!("Kubernetes pod start timeout can't be negative. Exiting...");
    }
    let no_https = vals.boolean("no-https");
    let mut env_vars = Vec::new();
    for e in vals.list("env-vars") {
        let parts: Vec<&str> = e.split('=').collect();
        match parts.as_slice() {
            [k, v] if !k.is_empty() => env_vars.push((k.to_string(), v.to_string())),
            [_, _] => bail!(
                "Error parsing --env-vars: {e} has an empty name (the fake is stricter than \
                 the real agent here)"
            ),
            _ => bail!("Error parsing --env-vars: {e} is not a valid environment variable"),
        }
    }
    let mut files = Vec::new();
    for e in vals.list("files") {
        let parts: Vec<&str> = e.split(':').collect();
        match parts.as_slice() {
            [h, c] => files.push((h.to_string(), c.to_string())),
            _ => bail!("Error parsing --files: {e} is not a valid file injection"),
        }
    }
    for e in vals.list("kubernetes-labels") {
        if e.split('=').count() != 2 {
            bail!("Error parsing --kubernetes-labels: {e} is not a valid label");
        }
    }
    let _ = vals.list("kubernetes-allowed-images");
    for key in [
        "kubernetes-executor",
        "kubernetes-pod-spec",
        "kubernetes-default-image",
        "config-file",
    ] {
        let _ = vals.string(key);
    }
    let interruption_grace_period = vals.int("interruption-grace-period");
    let hook = |p: String| Some(p).filter(|s| !s.is_empty());
    let shutdown_hook_path = hook(vals.string("shutdown-hook-path"));
    let pre_job_hook_path = hook(vals.string("pre-job-hook-path"));
    let post_job_hook_path = hook(vals.string("post-job-hook-path"));
    let fail_on_pre_job_hook_error = vals.boolean("fail-on-pre-job-hook-error");
    let source_pre_job_hook = vals.boolean("source-pre-job-hook");
    let fail_on_missing_files = vals.boolean("fail-on-missing-files");
    Ok(Config {
        endpoint,
        token,
        no_https,
        name,
        disconnect_after_job,
        job_id,
        idle_timeout,
        interruption_grace_period,
        shutdown_hook_path,
        pre_job_hook_path,
        post_job_hook_path,
        fail_on_pre_job_hook_error,
        source_pre_job_hook,
        env_vars,
        files,
        fail_on_missing_files,
        upload_job_logs,
        warnings: vals.warnings,
    })
}

/// `start --config-file <path>` → path.
pub(crate) fn parse_args(args: &[String]) -> anyhow::Result<String> {
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

/// How often job logs are pushed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogCadence {
    /// Between two pushes while the job runs, ms (min, max).
    push_ms: (u64, u64),
    /// Between two pushes once the job is done, ms (min, max).
    flush_ms: (u64, u64),
    /// How often the end of the job checks whether the flush is done.
    pub(crate) flush_poll: Duration,
    /// How long the end of the job waits for the flush.
    pub(crate) flush_timeout: Duration,
    /// Log every tick, as the real agent does.
    pub(crate) verbose: bool,
}

impl LogCadence {
    const REAL: LogCadence = LogCadence {
        push_ms: (1500, 3000),
        flush_ms: (250, 500),
        flush_poll: Duration::from_secs(1),
        flush_timeout: Duration::from_secs(60),
        verbose: true,
    };
    pub(crate) const FAST: LogCadence = LogCadence {
        push_ms: (100, 200),
        flush_ms: (25, 50),
        flush_poll: Duration::from_millis(25),
        flush_timeout: Duration::from_secs(60),
        verbose: false,
    };

    pub(crate) fn delay(&self, flushing: bool) -> Duration {
        let (lo, hi) = if flushing {
            self.flush_ms
        } else {
            self.push_ms
        };
        Duration::from_millis(fastrand::u64(lo..=hi.max(lo)))
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Knobs {
    pub(crate) register_tries: u64,
    pub(crate) register_interval: Duration,
    pub(crate) sync_timeout: Duration,
    pub(crate) disconnect_tries: u64,
    pub(crate) disconnect_interval: Duration,
    pub(crate) hook_sleep: Duration,
    pub(crate) hook_hang: Duration,
    pub(crate) log_cadence: LogCadence,
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
    pub(crate) fn from_env() -> Knobs {
        let log_cadence = match std::env::var("FAKE_AGENT_LOG_CADENCE").as_deref() {
            Ok("real") => LogCadence::REAL,
            Ok("fast") | Err(_) => LogCadence::FAST,
            Ok(other) => {
                log(&format!(
                    "ignoring FAKE_AGENT_LOG_CADENCE={other:?}: not fast or real"
                ));
                LogCadence::FAST
            }
        };
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
            log_cadence,
        }
    }
}
