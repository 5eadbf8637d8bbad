//! Fake Semaphore `agent` (becomes `target/<profile>/agent`), honouring the real agent's
//! CLI, config, process-tree, signal, API, job-log and shutdown-hook contract against the
//! fake hub. The real agent (`shared/real-agent`, `pkg/listener`, `pkg/jobs`,
//! `pkg/eventlogger`) is the reference; `tests/tests/hub_conformance.rs` runs both
//! against the same checks.
//!
//! * `agent start --config-file <path>` (or `--config-file=<path>`); anything else is a
//!   usage error, exit 1.
//! * Config, read as the real agent (viper) reads it: the 25 keys of [`KNOWN_KEYS`]
//!   (case-insensitive); `SEMAPHORE_AGENT_<KEY>` (dashes → underscores, non-empty)
//!   overrides any key, lists included (split on whitespace). Values are read leniently:
//!   booleans take `true`/`1`/`t`/`TRUE`… and YAML 1.1's `yes`/`on`/`y` (a string
//!   that is none of these reads as false, with a warning line), integers take numbers,
//!   numeric strings (`"300"`, `"0x10"`, `"5.0"`) and truncate floats, anything else
//!   reads as 0 (with a warning line); a list where a string is expected reads as "".
//!   Fatal, as in the real agent (exit 1): an unknown key or a nested mapping,
//!   a missing `endpoint`/`token`, a negative `disconnect-after-idle-timeout` or
//!   `kubernetes-pod-start-timeout`, an `env-vars`/`kubernetes-labels` entry that is not
//!   exactly `NAME=VALUE` (a value containing `=` is fatal), a `files` entry that is not
//!   `host:container`, `job-id` without `disconnect-after-job`, a bad `upload-job-logs`,
//!   a `name` (or the `name-from-env` variable's value) that is neither 8–80 bytes long
//!   nor a URL. `kubernetes-*` keys are accepted and otherwise ignored (jobs always use
//!   the shell executor).
//! * Strictnesses kept on purpose, beyond the real agent's, because each catches a
//!   mistake of our supervisor that the real agent would only show later or elsewhere:
//!   - an `env-vars` entry with an empty name (`=x`): the real agent takes it and every
//!     job then fails in its "Exporting environment variables" step;
//!   - an `endpoint` with a scheme (`https://…`): the real agent builds
//!     `https://https://…` and fails every registration attempt for 30 s;
//!   - only `start --config-file <path>`: the real agent takes every key as a flag too;
//!     the supervisor must use the file;
//!   - only loopback endpoints (127.0.0.0/8, localhost, ::1), logger URLs included: a
//!     test bed must never reach a real Semaphore.
//! * Process tree: the started process is a wrapper that re-executes itself
//!   (`FAKE_AGENT_CHILD=1`) as a child in its own process group, forwards
//!   SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to it and exits with its code (the
//!   real panicwrap wrapper forwards every signal). The child handles SIGTERM/SIGINT
//!   only once registered, as the real one (its handler is set up with the job
//!   processor): a SIGTERM before that kills it, and when the child dies from a signal
//!   the wrapper runs the agent again, in its own process (an `exec` of itself with
//!   `FAKE_AGENT_CHILD=rerun`: same pid, default signal dispositions, like the real
//!   wrapper falling through to `main`), which registers again from attempt 1.
//! * Once registered: the first SIGTERM/SIGINT sets `interrupted_at` and syncs at once;
//!   later ones are ignored. A finished job is reported at once (a forced sync).
//! * Registration: any 2xx is success. Log lines as the real agent's (`Jan _2
//!   15:04:05.000 <name> : <msg>`, on stdout and, with `SEMAPHORE_AGENT_LOG_FILE_PATH`, in
//!   that file; the real agent defaults to `/tmp/agent_log`, the fake logs to stdout
//!   only by default), with the real wording for everything the supervisor parses
//!   (`Starting to poll for jobs`, `SYNC response (action: run-job, job: <id>)`,
//!   `Agent shutdown requested by Semaphore due to: <reason>`, `Disconnecting the Agent
//!   from Semaphore`, `Unable to sync with Semaphore for over 10 minutes.`, `Agent
//!   shutting down due to: <REASON>`), the 13-line banner at each start and the three
//!   lines per sync.
//!
//! Jobs, as the real shell executor runs them: one `bash` session per job (the real
//! one is `bash --login` on a PTY; the fake's is `bash --noprofile --norc` on pipes,
//! stdout and stderr merged, commands' stdin `/dev/null`, its own process group). In
//! it, in order: "Exporting environment variables" (the job's env vars, then the
//! config's `env-vars`, sorted by name, from a file that is sourced), "Injecting Files"
//! (the payload's `files` are not written), the pre-job hook (`bash <hook>`, or
//! `source <hook>` with `source-pre-job-hook`; a failure fails the job only with
//! `fail-on-pre-job-hook-error`), the commands (each sourced from a file, so an `export`
//! is seen by the next; the first that fails ends them: the job failed; exit 130 reads
//! `SEMAPHORE_JOB_RESULT`), then — unless the job was stopped — the epilogues with
//! `SEMAPHORE_JOB_RESULT` exported (always, then on-pass or on-fail; their failures do
//! not change the result), then the post-job hook. A command that exits the shell
//! (`exit 3`) fails with code 1 and so does every later one, as on the real agent.
//! `stop-job` kills the session's process group (SIGTERM, SIGKILL after 1 s): the job
//! is `stopped`; at the end of a job the group gets SIGHUP (the real agent closes the
//! PTY).
//!
//! Job logs, as the real agent's HTTP log backend: the events (`job_started`,
//! `cmd_started`, `cmd_output` per line, `cmd_finished`, `job_finished`) are kept in
//! memory and pushed to the payload's `logger.url` (`method` `push`) as JSON lines with
//! `?start_from=N`, `Content-Type: text/plain`, `Authorization: Bearer <token>`, at most
//! 2000 events a request, one request per tick; `start_from` moves on only on a 200; a
//! 401 calls `POST /refresh` and the next tick pushes the same batch with the new
//! token; a 422 stops pushing for good; anything else is retried at the next tick. At
//! the end of the job the agent logs `job_finished`, then waits (polling, up to 60 s) for
//! the pusher to flush everything, and only then reports the job finished to the hub,
//! as the real agent does. The cadence: `FAKE_AGENT_LOG_CADENCE=real` is the real
//! agent's (a tick every 1.5–3 s, 250–500 ms while flushing, the flush polled every
//! 1 s: a job is reported 1–4.5 s after its last command); the default `fast` is
//! 100–200 ms, 25–50 ms and 25 ms, because the existing suites' timings assume a job
//! reported soon after its last command (their shells finish in well under a second).
//!
//! Test-bed knobs (env):
//! * `FAKE_AGENT_EVENTS=<path>`: append JSON lines
//!   `{"event","pid","mono_ns","unix_ms","name",…}`; events: `start` (the
//!   wrapper, first thing), `child_start` (`role`: `child` or `inprocess`),
//!   `registered`, `register_failed`, `job_started`, `job_finished` (`job_id`,
//!   `result`), `interrupted`, `shutdown` (`reason`), `hook` (`reason`, `path`),
//!   `hook_done` (`code`), `child_exit` (`code`, `reason`), `rerun` (`signal`), `exit`
//!   (`code`; the wrapper or its re-run, right before it exits). `mono_ns` is
//!   CLOCK_MONOTONIC.
//! * `FAKE_AGENT_REGISTER_TRIES` (30), `FAKE_AGENT_REGISTER_INTERVAL_MS` (1000)
//! * `FAKE_AGENT_SYNC_TIMEOUT_SECS` (600): no good sync for that long →
//!   shutdown `UNABLE_TO_SYNC`, exit 1
//! * `FAKE_AGENT_DISCONNECT_TRIES` (5; real 100), `FAKE_AGENT_DISCONNECT_INTERVAL_MS`
//!   (200; real 1000)
//! * `FAKE_AGENT_LOG_CADENCE` (`fast`, or `real`): see above
//! * `FAKE_AGENT_HOOK_SLEEP_SECS`: sleep this long in the shutdown-hook step
//!   (before the hook runs; also without a hook) — a hanging-hook drill
//! * `FAKE_AGENT_HOOK_HANG_SECS`: the shutdown hook itself hangs this long after
//!   its script returned (it runs as `bash -c 'bash <hook>; sleep N'`, in the
//!   agent's process group) — the other hanging-hook drill

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_fleet_tests::hub::{
    base64_decode, Command, JobLogger, JobPayload, RefreshTokenResponse, RegisterRequest,
    RegisterResponse, SyncRequest, SyncResponse, API_BASE,
};
use anyhow::{bail, Context};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, Notify};

const CHILD_ENV: &str = "FAKE_AGENT_CHILD";
const VERSION: &str = "v2.4.0-fake";
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

// ---------------------------------------------------------------- logging

static LOG_NAME: Mutex<String> = Mutex::new(String::new());
static LAST_REASON: Mutex<Option<String>> = Mutex::new(None);

/// The name in log lines: the agent's name, or `[host]` while it is a URL (as the
/// real agent's formatter does until the server names the agent).
fn set_log_name(name: &str) {
    let shown = if is_request_uri(name) {
        reqwest::Url::parse(name)
            .ok()
            .and_then(|u| u.host_str().map(|h| format!("[{h}]")))
            .unwrap_or_else(|| "[]".to_string())
    } else {
        name.to_string()
    };
    *LOG_NAME.lock().unwrap_or_else(PoisonError::into_inner) = shown;
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

fn write_out(text: &str) {
    // The test harness only captures `print!`; the binary must not panic on EPIPE.
    #[cfg(test)]
    print!("{text}");
    #[cfg(not(test))]
    {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

fn log(msg: &str) {
    let name = log_name();
    let ts = timestamp(SystemTime::now());
    let prefix = if name.is_empty() {
        format!("{ts} :")
    } else {
        format!("{ts} {name} :")
    };
    let mut text = String::new();
    for line in msg.lines() {
        text.push_str(&format!("{prefix} {line}\n"));
    }
    if msg.is_empty() {
        text.push_str(&format!("{prefix} \n"));
    }
    write_out(&text);
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

/// The real agent's hello message (stdout only, not in the log file).
fn banner() {
    const LINES: [&str; 13] = [
        "                                      ",
        "                 00000000000          ",
        "               0000000000000000       ",
        "             00000000000000000000     ",
        "          00000000000    0000000000   ",
        "   11     00000000    11   000000000  ",
        " 111111   000000   1111111   000000   ",
        "111111111   00   111111111     00     ",
        "  111111111    1111111111             ",
        "    1111111111111111111               ",
        "      111111111111111                 ",
        "         111111111                    ",
        "                                      ",
    ];
    let mut text = String::new();
    for l in LINES {
        text.push_str(l);
        text.push('\n');
    }
    write_out(&text);
}

/// Go's `time.Duration` string for whole milliseconds: `200ms`, `4.5s`, `1m0.5s`.
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = |ms: u128| {
        let s = format!("{}.{:03}", ms / 1000, ms % 1000);
        let s = s.trim_end_matches('0').trim_end_matches('.').to_string();
        format!("{s}s")
    };
    if ms < 60_000 {
        return secs(ms);
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    if h > 0 {
        format!("{h}h{m}m{}", secs(rest))
    } else {
        format!("{m}m{}", secs(rest))
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

/// Go's `url.ParseRequestURI` succeeding, roughly: an absolute path, or a scheme
/// (`[a-zA-Z][a-zA-Z0-9+.-]*:`) followed by something.
fn is_request_uri(s: &str) -> bool {
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
fn valid_config_name(name: &str) -> bool {
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
fn go_parse_int(s: &str) -> Option<i64> {
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
struct Config {
    endpoint: String,
    token: String,
    no_https: bool,
    /// Configured name, or a random one.
    name: String,
    disconnect_after_job: bool,
    job_id: String,
    idle_timeout: i64,
    interruption_grace_period: i64,
    shutdown_hook_path: Option<String>,
    pre_job_hook_path: Option<String>,
    post_job_hook_path: Option<String>,
    fail_on_pre_job_hook_error: bool,
    source_pre_job_hook: bool,
    env_vars: Vec<(String, String)>,
    files: Vec<(String, String)>,
    fail_on_missing_files: bool,
    upload_job_logs: String,
    /// Values read as false/0/"" that were not what the key expects (logged at start).
    warnings: Vec<String>,
}

/// Parses and validates a config file's text; `env` looks up `SEMAPHORE_AGENT_*`
/// overrides (and the `name-from-env` variable).
fn parse_config(text: &str, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
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

/// How often job logs are pushed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LogCadence {
    /// Between two pushes while the job runs, ms (min, max).
    push_ms: (u64, u64),
    /// Between two pushes once the job is done, ms (min, max).
    flush_ms: (u64, u64),
    /// How often the end of the job checks whether the flush is done.
    flush_poll: Duration,
    /// How long the end of the job waits for the flush.
    flush_timeout: Duration,
    /// Log every tick, as the real agent does.
    verbose: bool,
}

impl LogCadence {
    const REAL: LogCadence = LogCadence {
        push_ms: (1500, 3000),
        flush_ms: (250, 500),
        flush_poll: Duration::from_secs(1),
        flush_timeout: Duration::from_secs(60),
        verbose: true,
    };
    const FAST: LogCadence = LogCadence {
        push_ms: (100, 200),
        flush_ms: (25, 50),
        flush_poll: Duration::from_millis(25),
        flush_timeout: Duration::from_secs(60),
        verbose: false,
    };

    fn delay(&self, flushing: bool) -> Duration {
        let (lo, hi) = if flushing {
            self.flush_ms
        } else {
            self.push_ms
        };
        Duration::from_millis(fastrand::u64(lo..=hi.max(lo)))
    }
}

#[derive(Debug, Clone)]
struct Knobs {
    register_tries: u64,
    register_interval: Duration,
    sync_timeout: Duration,
    disconnect_tries: u64,
    disconnect_interval: Duration,
    hook_sleep: Duration,
    hook_hang: Duration,
    log_cadence: LogCadence,
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
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
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
            job_id: cfg.job_id.clone(),
        };
        let url = format!("{}/register", self.base);
        let resp = self
            .http
            .post(&url)
            .header("Authorization", format!("Token {reg_token}"))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "register request to {url} got HTTP {}: {}",
                status.as_u16(),
                text.trim()
            );
        }
        let r: RegisterResponse = serde_json::from_str(&text)?;
        *self
            .access_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = r.token.clone();
        Ok(r)
    }

    async fn sync(&self, req: &SyncRequest) -> anyhow::Result<SyncResponse> {
        self.guard()?;
        match req.state.as_str() {
            "waiting-for-jobs" => log(&format!("SYNC request (state: {})", req.state)),
            "finished-job" => log(&format!(
                "SYNC request (state: {}, job: {}, result: {})",
                req.state, req.job_id, req.job_result
            )),
            _ => log(&format!(
                "SYNC request (state: {}, job: {})",
                req.state, req.job_id
            )),
        }
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
        let r: SyncResponse = resp.json().await?;
        match r.action.as_str() {
            "continue" | "wait-for-jobs" => log(&format!("SYNC response (action: {})", r.action)),
            "run-job" | "stop-job" => log(&format!(
                "SYNC response (action: {}, job: {})",
                r.action, r.job_id
            )),
            "shutdown" => log(&format!(
                "SYNC response (action: {}, reason: {})",
                r.action, r.shutdown_reason
            )),
            other => log(&format!("SYNC response: {other:?}")),
        }
        Ok(r)
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
            bail!(
                "failed to describe job, got HTTP {}",
                resp.status().as_u16()
            );
        }
        Ok(resp.json().await?)
    }

    /// `POST /refresh`: a new token for the current job's log.
    async fn refresh_token(&self) -> anyhow::Result<String> {
        self.guard()?;
        log("Refreshing token for current job logs...");
        let resp = self
            .http
            .post(format!("{}/refresh", self.base))
            .header("Authorization", format!("Token {}", self.token()))
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::OK {
            bail!(
                "failed to refresh token, got HTTP {}",
                resp.status().as_u16()
            );
        }
        let r: RefreshTokenResponse = resp.json().await?;
        log("Successfully refreshed token for current job logs.");
        Ok(r.token)
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

// ---------------------------------------------------------------- job logs

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0)
}

/// What the pusher and the end of the job share.
#[derive(Debug, Default)]
struct PushState {
    /// The job is done: push what is left, then stop.
    flush: bool,
    /// Stop pushing (flushed, 422, or given up).
    stop: bool,
    /// The log service said the space is used up (422).
    space_used_up: bool,
}

/// A job's log: events kept in memory and, with a `push` logger, pushed to the hub as
/// the real agent's HTTP backend does.
struct JobLog {
    events: Arc<Mutex<Vec<String>>>,
    state: Arc<Mutex<PushState>>,
    pusher: Option<tokio::task::JoinHandle<()>>,
    cadence: LogCadence,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl JobLog {
    fn start(api: Arc<Api>, logger: Option<JobLogger>, cadence: LogCadence) -> JobLog {
        let events = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Mutex::new(PushState::default()));
        let pusher = match logger {
            Some(l) if l.method == "push" => {
                let host = reqwest::Url::parse(&l.url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
                    .unwrap_or_default();
                if loopback_host(&host) {
                    Some(tokio::spawn(push_loop(
                        api,
                        l,
                        events.clone(),
                        state.clone(),
                        cadence,
                    )))
                } else {
                    log(&format!(
                        "job logs: not pushing to {:?} (the fake only talks to loopback)",
                        l.url
                    ));
                    None
                }
            }
            _ => None,
        };
        JobLog {
            events,
            state,
            pusher,
            cadence,
        }
    }

    fn write(&self, ev: serde_json::Value) {
        lock(&self.events).push(ev.to_string());
    }

    fn job_started(&self) {
        self.write(serde_json::json!({"event": "job_started", "timestamp": unix_now()}));
    }

    fn job_finished(&self, result: &str) {
        self.write(
            serde_json::json!({"event": "job_finished", "timestamp": unix_now(), "result": result}),
        );
    }

    fn cmd_started(&self, directive: &str) {
        self.write(serde_json::json!({"event": "cmd_started", "timestamp": unix_now(), "directive": directive}));
    }

    fn cmd_output(&self, output: &str) {
        self.write(
            serde_json::json!({"event": "cmd_output", "timestamp": unix_now(), "output": output}),
        );
    }

    fn cmd_finished(&self, directive: &str, code: i32, started_at: i64) {
        self.write(serde_json::json!({
            "event": "cmd_finished", "timestamp": unix_now(), "directive": directive,
            "exit_code": code, "started_at": started_at, "finished_at": unix_now(),
        }));
    }

    /// Flushes: waits (polling) until everything is pushed, the log service refused
    /// more, or the flush timeout passed.
    async fn close(mut self) {
        let Some(task) = self.pusher.take() else {
            return;
        };
        lock(&self.state).flush = true;
        log("Waiting for all logs to be flushed...");
        let deadline = Instant::now() + self.cadence.flush_timeout;
        loop {
            if lock(&self.state).stop {
                break;
            }
            if Instant::now() >= deadline {
                log("Could not push all logs - giving up");
                break;
            }
            tokio::time::sleep(self.cadence.flush_poll).await;
        }
        let used_up = {
            let mut s = lock(&self.state);
            s.stop = true;
            s.space_used_up
        };
        if used_up {
            log("upload-job-logs: the job's log was trimmed (the fake does not upload it as an artifact)");
        }
        task.abort();
    }
}

/// The real agent's `HTTPBackend.push`: one request per tick, `start_from` moving on
/// only on a 200.
async fn push_loop(
    api: Arc<Api>,
    logger: JobLogger,
    events: Arc<Mutex<Vec<String>>>,
    state: Arc<Mutex<PushState>>,
    cadence: LogCadence,
) {
    const MAX_LINES_PER_REQUEST: usize = 2000;
    log(&format!("Logs will be pushed to {}", logger.url));
    let mut token = logger.token.clone();
    let mut start_from: usize = 0;
    loop {
        let flushing = {
            let s = lock(&state);
            if s.stop {
                break;
            }
            s.flush
        };
        let delay = cadence.delay(flushing);
        if cadence.verbose {
            log(&format!(
                "Waiting {} to push next batch of logs...",
                go_duration(delay)
            ));
        }
        tokio::time::sleep(delay).await;
        // The flag is read after the sleep, as the real agent reads it in newRequest.
        let flushing = lock(&state).flush;
        let (body, next) = {
            let ev = lock(&events);
            let end = ev.len().min(start_from + MAX_LINES_PER_REQUEST);
            let mut body = String::new();
            for e in ev.get(start_from..end).unwrap_or_default() {
                body.push_str(e);
                body.push('\n');
            }
            (body, end.max(start_from))
        };
        if next == start_from {
            if flushing {
                log("No more logs to flush - stopping");
                lock(&state).stop = true;
            } else if cadence.verbose {
                log("No logs to push - skipping");
            }
            continue;
        }
        if cadence.verbose {
            log(&format!(
                "Pushing next batch of logs with {} log events...",
                next - start_from
            ));
        }
        let url = format!("{}?start_from={start_from}", logger.url);
        let sent = api
            .http
            .post(&url)
            .header("Content-Type", "text/plain")
            .header("Authorization", format!("Bearer {token}"))
            .body(body)
            .send()
            .await;
        match sent {
            Err(e) => log(&format!("Error pushing logs: {e}")),
            Ok(r) => match r.status().as_u16() {
                200 => start_from = next,
                422 => {
                    let mut s = lock(&state);
                    s.stop = true;
                    s.space_used_up = true;
                    log("Error pushing logs: no more space available for logs - stopping");
                }
                401 => match api.refresh_token().await {
                    Ok(t) => {
                        token = t;
                        log(&format!(
                            "Error pushing logs: request to {url} failed: {}",
                            r.status()
                        ));
                    }
                    Err(e) => log(&format!("Error pushing logs: {e:#}")),
                },
                _ => log(&format!(
                    "Error pushing logs: request to {url} failed: {}",
                    r.status()
                )),
            },
        }
    }
    log("Stopped pushing logs.");
}

// ---------------------------------------------------------------- the job's shell

/// One `bash` session for a job, fed one instruction at a time (see the module docs).
struct Session {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    output: mpsc::UnboundedReceiver<Vec<u8>>,
    buf: Vec<u8>,
    pgid: Option<nix::unistd::Pid>,
    dir: PathBuf,
    end_mark: String,
    alive: bool,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    Exit(i32),
    Stopped,
}

fn base_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| k != CHILD_ENV)
        .collect()
}

/// Go's `shellQuote` (pkg/shell/env.go).
fn shell_quote(s: &str) -> String {
    if s.is_empty() {
        return "''".to_string();
    }
    let plain = s
        .chars()
        .all(|c| c.is_alphanumeric() || c == '_' || "@%+=:,./-".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\"'\"'"))
    }
}

impl Session {
    fn start() -> anyhow::Result<Session> {
        let dir = std::env::temp_dir().join(format!(
            "fake-agent-job-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir)?;
        let (mut reader, writer) = std::io::pipe()?;
        let writer2 = writer.try_clone()?;
        let mut cmd = tokio::process::Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-s"])
            .env_clear()
            .envs(base_env())
            .stdin(std::process::Stdio::piped())
            .stdout(writer)
            .stderr(writer2)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn()?;
        // The parent's copies of the write end are gone with `cmd`.
        drop(cmd);
        let stdin = child.stdin.take();
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(nix::unistd::Pid::from_raw);
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(chunk[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Session {
            child,
            stdin,
            output: rx,
            buf: Vec::new(),
            pgid,
            dir,
            end_mark: format!("949556c7-{:016x}-end", fastrand::u64(..)),
            alive: true,
        })
    }

    /// Sends complete lines of `buf` (everything before `upto`) as output; keeps a
    /// trailing partial line unless `all`.
    fn emit(&mut self, upto: usize, all: bool, out: &mut (dyn FnMut(&str) + Send)) {
        let upto = upto.min(self.buf.len());
        let cut = if all {
            upto
        } else {
            self.buf[..upto]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1)
        };
        if cut == 0 {
            return;
        }
        let taken: Vec<u8> = self.buf.drain(..cut).collect();
        let text = String::from_utf8_lossy(&taken);
        for line in text.split_inclusive('\n') {
            out(line);
        }
    }

    /// Runs one command in the session: `source`d from a file, so it changes the
    /// session. `out` gets its output line by line.
    async fn run(
        &mut self,
        command: &str,
        stop: &Notify,
        out: &mut (dyn FnMut(&str) + Send),
    ) -> Ran {
        if !self.alive {
            log("Error writing instruction: the job's shell is gone");
            return Ran::Exit(1);
        }
        let file = self.dir.join("current-agent-cmd");
        if let Err(e) = std::fs::write(&file, command) {
            log(&format!("Err: {e}"));
            return Ran::Exit(1);
        }
        let instruction = format!(
            "source {} </dev/null; AGENT_CMD_RESULT=$?; printf '\\001 %s %d\\n' '{}' \"$AGENT_CMD_RESULT\"\n",
            shell_quote(&file.display().to_string()),
            self.end_mark
        );
        let written = match self.stdin.as_mut() {
            Some(w) => w.write_all(instruction.as_bytes()).await.is_ok() && w.flush().await.is_ok(),
            None => false,
        };
        if !written {
            self.alive = false;
            log("Error writing instruction: the job's shell is gone");
            return Ran::Exit(1);
        }
        let marker = format!("\u{1} {} ", self.end_mark).into_bytes();
        loop {
            // The end marker: `\x01 <mark> <code>\n`.
            if let Some(i) = self.buf.iter().position(|&b| b == 1) {
                self.emit(i, true, out);
                if self.buf.len() >= marker.len() {
                    if self.buf.starts_with(&marker) {
                        if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                            let code = String::from_utf8_lossy(&self.buf[marker.len()..nl])
                                .trim()
                                .parse::<i32>()
                                .unwrap_or(1);
                            self.buf.drain(..=nl);
                            return Ran::Exit(code);
                        }
                    } else {
                        // Not our marker: output like any other.
                        self.buf.remove(0);
                        out("\u{1}");
                        continue;
                    }
                }
            } else {
                let len = self.buf.len();
                self.emit(len, false, out);
            }
            tokio::select! {
                chunk = self.output.recv() => match chunk {
                    Some(c) => self.buf.extend_from_slice(&c),
                    None => {
                        // Every writer is gone: the shell died (e.g. `exit 3`).
                        let len = self.buf.len();
                        self.emit(len, true, out);
                        self.alive = false;
                        return Ran::Exit(1);
                    }
                },
                _ = self.child.wait() => {
                    // The shell died; what it wrote is in the pipe already.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    while let Ok(c) = self.output.try_recv() {
                        self.buf.extend_from_slice(&c);
                    }
                    let len = self.buf.len();
                    self.emit(len, true, out);
                    self.alive = false;
                    return Ran::Exit(1);
                }
                () = stop.notified() => {
                    self.kill_hard().await;
                    let len = self.buf.len();
                    self.emit(len, true, out);
                    return Ran::Stopped;
                }
            }
        }
    }

    /// `stop-job`: SIGTERM to the session's group, SIGKILL after 1 s.
    async fn kill_hard(&mut self) {
        self.alive = false;
        self.stdin = None;
        if let Some(pg) = self.pgid {
            let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(1), self.child.wait())
                .await
                .is_err()
            {
                let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
                let _ = self.child.wait().await;
            }
        }
    }

    /// The end of a job: the group gets SIGHUP (a closed PTY), the shell SIGKILL.
    async fn close(mut self) {
        self.stdin = None;
        if let Some(pg) = self.pgid {
            let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGHUP);
        }
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await;
        let _ = std::fs::remove_dir_all(&self.dir);
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
    knobs: Knobs,
    slot: Arc<Mutex<Slot>>,
    /// Wakes the sync loop (the real agent's forced sync on a finished job).
    force_sync: Arc<Notify>,
}

/// The steps of a job on the shell executor (see the module docs).
struct Executor<'a> {
    session: Session,
    log: &'a JobLog,
    stop: &'a Notify,
    /// Stopped by `stop-job`: nothing more runs.
    stopped: bool,
    /// Stopped by the job itself (exit 130): no epilogues, the result stands.
    skip_epilogues: bool,
}

impl Executor<'_> {
    /// A logged command (`cmd_started`, output, `cmd_finished`).
    async fn command(&mut self, directive: &str, command: &str, preamble: &[String]) -> i32 {
        if self.stopped {
            return 1;
        }
        let started = unix_now();
        self.log.cmd_started(directive);
        for p in preamble {
            self.log.cmd_output(p);
        }
        let log = self.log;
        let ran = self
            .session
            .run(command, self.stop, &mut |o| log.cmd_output(o))
            .await;
        let code = match ran {
            Ran::Exit(c) => c,
            Ran::Stopped => {
                self.stopped = true;
                1
            }
        };
        self.log.cmd_finished(directive, code, started);
        code
    }

    /// A command whose output is not logged.
    async fn silent(&mut self, command: &str) -> (i32, String) {
        if self.stopped {
            return (1, String::new());
        }
        let mut text = String::new();
        match self
            .session
            .run(command, self.stop, &mut |o| text.push_str(o))
            .await
        {
            Ran::Exit(c) => (c, text),
            Ran::Stopped => {
                self.stopped = true;
                (1, text)
            }
        }
    }

    /// "Exporting environment variables": a file of exports, sourced.
    async fn export_env(&mut self, vars: &[(String, String)]) -> i32 {
        let started = unix_now();
        let directive = "Exporting environment variables";
        self.log.cmd_started(directive);
        let mut env: BTreeMap<&str, &str> = BTreeMap::new();
        for (k, v) in vars {
            env.insert(k, v);
        }
        let mut file = String::new();
        for (k, v) in &env {
            self.log.cmd_output(&format!("Exporting {k}\n"));
            file.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
        let path = self.session.dir.join(format!(
            ".env-{}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let code = if std::fs::write(&path, file).is_err() {
            1
        } else {
            self.silent(&format!(
                "source {}",
                shell_quote(&path.display().to_string())
            ))
            .await
            .0
        };
        self.log.cmd_finished(directive, code, started);
        code
    }

    /// Commands until the first that fails; the last exit code (1 for none run).
    async fn until_first_failure(&mut self, commands: &[Command]) -> i32 {
        let mut last = 1;
        for c in commands {
            if self.stopped {
                return 1;
            }
            last = self.command(&c.directive, &c.directive, &[]).await;
            if last != 0 {
                break;
            }
        }
        last
    }
}

async fn run_job(ctx: Arc<JobCtx>, id: String, stop: Arc<Notify>) {
    let mut payload = None;
    // The real agent: 10 attempts, 3 s apart.
    for attempt in 1..=10 {
        match ctx.api.get_job(&id).await {
            Ok(p) => {
                payload = Some(p);
                break;
            }
            Err(e) => {
                if attempt == 10 {
                    log(&format!("Could not get job {id}: [Get job] failed after [{attempt}] attempts - giving up: {e:#}"));
                } else {
                    log(&format!(
                        "[Get job] attempt [{attempt}] failed with [{e:#}] - retrying in 3s"
                    ));
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
            }
        }
    }
    let result = match payload {
        Some(p) => run_payload(&ctx, &id, p, &stop).await,
        None => "failed".to_string(),
    };
    let mut s = lock(&ctx.slot);
    s.state = "finished-job".into();
    s.result = result.clone();
    drop(s);
    event(
        "job_finished",
        serde_json::json!({ "job_id": id, "result": result }),
    );
    ctx.force_sync.notify_one();
}

/// Runs a job payload; returns its result (`passed`, `failed`, `stopped`).
async fn run_payload(ctx: &JobCtx, id: &str, payload: JobPayload, stop: &Notify) -> String {
    {
        let mut s = lock(&ctx.slot);
        if s.state == "starting-job" {
            s.state = "running-job".into();
        }
    }
    log(&format!("Running job {id}"));
    event("job_started", serde_json::json!({ "job_id": id }));
    let jlog = JobLog::start(
        ctx.api.clone(),
        payload.logger.clone(),
        ctx.knobs.log_cadence,
    );
    jlog.job_started();
    let session = match Session::start() {
        Ok(s) => Some(s),
        Err(e) => {
            log(&format!("Failed to start executor: {e}"));
            None
        }
    };
    let mut result = "failed".to_string();
    let mut epilogues_run = false;
    let mut stopped = lock(&ctx.slot).stopping;
    if let Some(session) = session {
        let mut ex = Executor {
            session,
            log: &jlog,
            stop,
            stopped,
            skip_epilogues: false,
        };
        result = regular_commands(ctx, &payload, &mut ex).await;
        if !ex.stopped && !ex.skip_epilogues {
            // Epilogues: failures do not change the result.
            ex.export_env(&[("SEMAPHORE_JOB_RESULT".to_string(), result.clone())])
                .await;
            log("Starting epilogue always commands");
            ex.until_first_failure(&payload.epilogue_always_commands)
                .await;
            if !ex.stopped {
                if result == "passed" {
                    log("Starting epilogue on pass commands");
                    ex.until_first_failure(&payload.epilogue_on_pass_commands)
                        .await;
                } else {
                    log("Starting epilogue on fail commands");
                    ex.until_first_failure(&payload.epilogue_on_fail_commands)
                        .await;
                }
            }
            epilogues_run = true;
        }
        match &ctx.cfg.post_job_hook_path {
            None => log("No post-job hook configured."),
            Some(hook) if !ex.stopped => {
                log(&format!("Executing post-job hook at {hook}"));
                let cmd = format!("bash {hook}");
                let code = ex
                    .command(
                        "Running the post-job hook configured in the agent",
                        &cmd,
                        &[format!("Running: {cmd}\n")],
                    )
                    .await;
                if code == 0 {
                    log("Post-job hook executed successfully.");
                } else {
                    log(&format!(
                        "Error executing post-job hook - hook return exit code {code}"
                    ));
                }
            }
            Some(_) => {}
        }
        stopped = ex.stopped;
        if stopped {
            ex.session.kill_hard().await;
        }
        ex.session.close().await;
    }
    if stopped || (epilogues_run && lock(&ctx.slot).stopping) {
        result = "stopped".to_string();
    }
    // As the real agent: job_finished logged, the log flushed, then reported.
    jlog.job_finished(&result);
    jlog.close().await;
    log("Job teardown finished");
    result
}

/// Env vars, files, pre-job hook, commands: the result before the epilogues.
async fn regular_commands(ctx: &JobCtx, payload: &JobPayload, ex: &mut Executor<'_>) -> String {
    let mut vars = Vec::new();
    for e in &payload.env_vars {
        let v = base64_decode(&e.value).unwrap_or_default();
        vars.push((e.name.clone(), String::from_utf8_lossy(&v).into_owned()));
    }
    vars.extend(ctx.cfg.env_vars.iter().cloned());
    if ex.export_env(&vars).await != 0 {
        log("Failed to export env vars");
        return "failed".into();
    }
    let started = unix_now();
    ex.log.cmd_started("Injecting Files");
    ex.log.cmd_finished("Injecting Files", 0, started);
    match &ctx.cfg.pre_job_hook_path {
        None => log("No pre-job hook configured."),
        Some(hook) => {
            log(&format!("Executing pre-job hook at {hook}"));
            let cmd = if ctx.cfg.source_pre_job_hook {
                format!("source {hook}")
            } else {
                format!("bash {hook}")
            };
            let warning = if ctx.cfg.fail_on_pre_job_hook_error {
                "The agent is configured to fail the job if the pre-job hook fails."
            } else {
                "The agent is configured to proceed with the job even if the pre-job hook fails."
            };
            let code = ex
                .command(
                    "Running the pre-job hook configured in the agent",
                    &cmd,
                    &[format!("Running: {cmd}\n"), format!("Warning: {warning}\n")],
                )
                .await;
            if code == 0 {
                log("Pre-job hook executed successfully.");
            } else if ctx.cfg.fail_on_pre_job_hook_error {
                log("Error executing pre-job hook - failing job");
                return "failed".into();
            } else {
                log("Error executing pre-job hook - proceeding");
            }
        }
    }
    let code = if payload.commands.is_empty() {
        0
    } else {
        ex.until_first_failure(&payload.commands).await
    };
    if ex.stopped || lock(&ctx.slot).stopping {
        ex.stopped = true;
        log("Regular commands were stopped");
        return "stopped".into();
    }
    if code == 130 {
        // Stopped by the job itself: SEMAPHORE_JOB_RESULT says how.
        ex.skip_epilogues = true;
        let started = unix_now();
        ex.log.cmd_started("Checking job result");
        let (_, out) = ex.silent("echo $SEMAPHORE_JOB_RESULT").await;
        let status = out.trim_matches('\n').to_string();
        let (line, result) = match status.as_str() {
            "passed" => (
                "SEMAPHORE_JOB_RESULT=passed - stopping job and marking it as passed".to_string(),
                "passed",
            ),
            "failed" => (
                "SEMAPHORE_JOB_RESULT=failed - stopping job and marking it as failed".to_string(),
                "failed",
            ),
            other => (
                format!(
                    "SEMAPHORE_JOB_RESULT is set to '{other}' - stopping job and marking it as stopped"
                ),
                "stopped",
            ),
        };
        ex.log.cmd_output(&line);
        ex.log.cmd_finished("Checking job result", 0, started);
        return result.into();
    }
    if code == 0 {
        log("Regular commands finished successfully");
        "passed".into()
    } else {
        log("Regular commands finished with failure");
        "failed".into()
    }
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

/// The real agent's interval after a failed sync, or a sync answer without one.
fn default_sync_interval() -> Duration {
    Duration::from_millis(fastrand::u64(3000..6000))
}

/// Registers, syncs, runs jobs, shuts down. Returns the exit code.
/// `registered` is notified once registration succeeded; `interrupts` delivers the
/// SIGTERM/SIGINTs seen after that.
async fn run_agent(
    cfg: Config,
    knobs: Knobs,
    registered: Arc<Notify>,
    mut interrupts: mpsc::UnboundedReceiver<()>,
) -> i32 {
    banner();
    set_log_name(&cfg.name);
    for w in &cfg.warnings {
        log(&format!("config: {w}"));
    }
    log("Starting Agent");
    log("Registering Agent");
    let api = match Api::new(&cfg, &knobs) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            log(&format!(
                "Could not start agent: failed to register agent: {e:#}"
            ));
            return 1;
        }
    };

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
                if attempt < knobs.register_tries {
                    log(&format!(
                        "[Register] attempt [{attempt}] failed with [{last_err}] - retrying in {}",
                        go_duration(knobs.register_interval)
                    ));
                    tokio::time::sleep(knobs.register_interval).await;
                } else {
                    last_err = format!(
                        "[Register] failed after [{attempt}] attempts - giving up: {last_err}"
                    );
                }
            }
        }
    }
    let Some(reg) = reg else {
        log(&format!(
            "Could not start agent: failed to register agent: {last_err}"
        ));
        event("register_failed", serde_json::json!({ "error": last_err }));
        return 1;
    };
    set_log_name(&reg.name);
    registered.notify_one();
    event("registered", serde_json::json!({}));
    log("Starting to poll for jobs");

    let slot = Arc::new(Mutex::new(Slot {
        state: "waiting-for-jobs".into(),
        ..Slot::default()
    }));
    let force_sync = Arc::new(Notify::new());
    let ctx = Arc::new(JobCtx {
        api: api.clone(),
        cfg: cfg.clone(),
        knobs: knobs.clone(),
        slot: slot.clone(),
        force_sync: force_sync.clone(),
    });
    let mut interrupted_at: i64 = 0;
    let mut last_good = Instant::now();
    let mut interrupts_open = true;

    let (reason, code) = loop {
        let req = {
            let s = lock(&slot);
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
        let interval = match api.sync(&req).await {
            Ok(resp) => {
                last_good = Instant::now();
                match resp.action.as_str() {
                    "run-job" => {
                        let mut s = lock(&slot);
                        if s.state == "waiting-for-jobs" && !resp.job_id.is_empty() {
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
                        let mut s = lock(&slot);
                        if !s.stopping && matches!(s.state.as_str(), "starting-job" | "running-job")
                        {
                            log("Stopping job");
                            s.stopping = true;
                            s.state = "stopping-job".into();
                            if let Some(stop) = &s.stop {
                                stop.notify_one();
                            }
                        }
                    }
                    "wait-for-jobs" => {
                        let mut s = lock(&slot);
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
                if resp.next_sync_after > 0 {
                    Duration::from_millis(resp.next_sync_after)
                } else {
                    default_sync_interval()
                }
            }
            Err(e) => {
                log(&format!("[SYNC ERR] Failed to sync with API: {e:#}"));
                if last_good.elapsed() > knobs.sync_timeout {
                    let over = if knobs.sync_timeout == Duration::from_secs(600) {
                        "10 minutes".to_string()
                    } else {
                        go_duration(knobs.sync_timeout)
                    };
                    log(&format!("Unable to sync with Semaphore for over {over}."));
                    break ("UNABLE_TO_SYNC", 1);
                }
                default_sync_interval()
            }
        };
        log(&format!(
            "Waiting {} for next sync...",
            go_duration(interval)
        ));
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = force_sync.notified() => {}
            got = interrupts.recv(), if interrupts_open => {
                match got {
                    Some(()) if interrupted_at == 0 => {
                        log("Termination signal received");
                        interrupted_at = unix_now();
                        event("interrupted", serde_json::json!({ "interrupted_at": interrupted_at }));
                    }
                    // Later signals are ignored, as by the real agent.
                    Some(()) => {}
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
                if attempt < knobs.disconnect_tries {
                    log(&format!(
                        "[Disconnect] attempt [{attempt}] failed with [{e:#}] - retrying in {}",
                        go_duration(knobs.disconnect_interval)
                    ));
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
                if o.status.success() {
                    log(&format!("Output: {text}"));
                } else {
                    log(&format!("Error executing shutdown hook: {}", o.status));
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

/// The agent proper (the child, or the wrapper's re-run).
async fn agent_main(args: &[String], role: &str) -> i32 {
    event("child_start", serde_json::json!({ "role": role }));
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
            log(&format!("Couldn't find config file {path}: {e}"));
            return 1;
        }
    };
    let cfg = match parse_config(&text, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            log(&format!("{e:#}"));
            return 1;
        }
    };
    // SIGTERM/SIGINT are handled only once registered (before that they kill the
    // process, and the wrapper runs the agent again), as in the real agent.
    let registered = Arc::new(Notify::new());
    let (tx, rx) = mpsc::unbounded_channel();
    {
        let registered = registered.clone();
        tokio::spawn(async move {
            registered.notified().await;
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                log("error: could not install signal handlers");
                return;
            };
            loop {
                tokio::select! {
                    s = term.recv() => if s.is_none() { break; },
                    s = int.recv() => if s.is_none() { break; },
                }
                if tx.send(()).is_err() {
                    break;
                }
            }
        });
    }
    run_agent(cfg, Knobs::from_env(), registered, rx).await
}

/// The wrapper: re-executes itself as the child and forwards signals. When the child
/// dies from a signal, it becomes the agent itself (an `exec` with
/// `FAKE_AGENT_CHILD=rerun`).
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
            use std::os::unix::process::CommandExt;
            use std::os::unix::process::ExitStatusExt;
            if let Some(code) = st.code() {
                return code;
            }
            let sig = st.signal().unwrap_or(0);
            eprintln!("agent: agent process died from signal {sig}; running the agent again");
            event("rerun", serde_json::json!({ "signal": sig }));
            // exec: same pid, caught signals back to their defaults.
            let err = std::process::Command::new(&exe)
                .args(&args)
                .env(CHILD_ENV, "rerun")
                .exec();
            eprintln!("error: could not run the agent again: {err}");
            1
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
    let role = std::env::var(CHILD_ENV).unwrap_or_default();
    if role.is_empty() {
        event("start", serde_json::json!({ "role": "wrapper" }));
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match runtime() {
        Ok(rt) => {
            let code = match role.as_str() {
                "1" => rt.block_on(agent_main(&args, "child")),
                "rerun" => rt.block_on(agent_main(&args, "inprocess")),
                _ => rt.block_on(wrapper_main(args)),
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
    if role == "1" {
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
    use agent_fleet_tests::hub::{Epilogues, Hub, HubOptions, JobSpec, JobState};
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
        assert!(valid_config_name(&c.name));
        assert!(
            agent_fleet_tests::hub::valid_agent_name(&c.name),
            "the hub takes it"
        );
        assert_eq!(c.upload_job_logs, "never");
        assert_eq!(c.shutdown_hook_path, None);
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn full_config() {
        let c = parse(
            "endpoint: 127.0.0.1:9\ntoken: t\nno-https: true\nname: i-0123456789abcdef0\n\
             disconnect-after-job: true\ndisconnect-after-idle-timeout: 300\n\
             interruption-grace-period: 60\nshutdown-hook-path: /opt/hook.sh\n\
             pre-job-hook-path: /opt/pre.sh\npost-job-hook-path: ''\n\
             env-vars: [SEMAPHORE_CACHE_BACKEND=s3, EMPTY=]\nfiles: ['/a:/b']\n\
             fail-on-missing-files: true\nupload-job-logs: when-trimmed\n\
             fail-on-pre-job-hook-error: true\nsource-pre-job-hook: true\njob-id: j1\n\
             kubernetes-executor: false\nkubernetes-labels: [a=b]\n\
             kubernetes-pod-start-timeout: 10\nname-from-env: X\nconfig-file: /c\n",
        )
        .expect("valid");
        assert!(c.no_https && c.disconnect_after_job && c.fail_on_missing_files);
        assert!(c.fail_on_pre_job_hook_error && c.source_pre_job_hook);
        assert_eq!(c.name, "i-0123456789abcdef0");
        assert_eq!(c.job_id, "j1");
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
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn values_are_read_leniently() {
        let c = parse(&format!(
            "{MIN}no-https: \"true\"\ndisconnect-after-job: yes\n\
             disconnect-after-idle-timeout: \"300\"\ninterruption-grace-period: 1.9\n\
             fail-on-missing-files: 1\nName: UPPER-case-key\nenv-vars: \"A=1 B=2\"\n"
        ))
        .expect("valid");
        assert!(c.no_https && c.disconnect_after_job && c.fail_on_missing_files);
        assert_eq!((c.idle_timeout, c.interruption_grace_period), (300, 1));
        assert_eq!(c.name, "UPPER-case-key");
        assert_eq!(
            c.env_vars,
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // Not what the key expects: false / 0 / "", with a warning.
        let c = parse(&format!(
            "{MIN}no-https: \"maybe\"\ninterruption-grace-period: soon\n\
             disconnect-after-idle-timeout: 0x10\nname: [a, b]\n"
        ))
        .expect("valid");
        assert!(!c.no_https);
        assert_eq!((c.idle_timeout, c.interruption_grace_period), (16, 0));
        assert_eq!(c.name.len(), 20, "random name");
        assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
        // Negative grace periods go to the server as they are.
        let c = parse(&format!("{MIN}interruption-grace-period: -5\n")).expect("valid");
        assert_eq!(c.interruption_grace_period, -5);
        // Names: only the length, or a URL.
        let c = parse(&format!("{MIN}name: has spaces in it\n")).expect("valid");
        assert_eq!(c.name, "has spaces in it");
        let url = "https://sts.amazonaws.com/?Action=GetCallerIdentity";
        assert_eq!(
            parse(&format!("{MIN}name: '{url}'\n")).expect("url").name,
            url
        );
        assert_eq!(parse(&format!("{MIN}name: /x\n")).expect("path").name, "/x");
    }

    #[test]
    fn fatal_config_errors() {
        assert!(
            err(&format!("{MIN}log-level: debug\n")).contains("Unrecognized option 'log-level'")
        );
        assert!(err(&format!("{MIN}disconnect_after_job: true\n")).contains("disconnect_after_job"));
        assert!(err(&format!("{MIN}name:\n  first: x\n")).contains("'name.first'"));
        assert!(err(&format!("{MIN}disconnect-after-idle-timeout: -1\n")).contains("negative"));
        assert!(err(&format!("{MIN}kubernetes-pod-start-timeout: -1\n")).contains("negative"));
        assert!(err("token: t\n").contains("endpoint was not specified"));
        assert!(err("endpoint: 127.0.0.1:9\n").contains("token was not specified"));
        assert!(err("endpoint: 127.0.0.1:9\ntoken: ''\n").contains("token"));
        assert!(err("- a\n- b\n").contains("mapping"));
        assert!(err("endpoint: https://x.example\ntoken: t\n").contains("scheme"));
        assert!(err(&format!("{MIN}env-vars: [A=b=c]\n")).contains("A=b=c"));
        assert!(err(&format!("{MIN}env-vars: [NOVALUE]\n")).contains("NOVALUE"));
        assert!(err(&format!("{MIN}env-vars: [=x]\n")).contains("empty name"));
        assert!(err(&format!("{MIN}files: [nocolon]\n")).contains("nocolon"));
        assert!(err(&format!("{MIN}kubernetes-labels: [nolabel]\n")).contains("nolabel"));
        assert!(err(&format!("{MIN}upload-job-logs: sometimes\n")).contains("upload-job-logs"));
        assert!(err(&format!("{MIN}job-id: j\n")).contains("job-id"));
        assert!(err(&format!("{MIN}name: short\n")).contains("short"));
        assert!(err(&format!("{MIN}name: '{}'\n", "x".repeat(81))).contains("81"));
        assert!(parse("").is_err());
    }

    #[test]
    fn env_overrides_every_key() {
        let env = |k: &str| match k {
            "SEMAPHORE_AGENT_NAME" => Some("from-env-name".to_string()),
            "SEMAPHORE_AGENT_NO_HTTPS" => Some("true".to_string()),
            "SEMAPHORE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT" => Some("42".to_string()),
            "SEMAPHORE_AGENT_ENV_VARS" => Some("X=1 Y=2".to_string()),
            "SEMAPHORE_AGENT_TOKEN" => Some(String::new()),
            _ => None,
        };
        let c = parse_config(
            &format!("{MIN}name: from-file-name\nenv-vars: [Z=3]\n"),
            &env,
        )
        .expect("valid");
        assert_eq!(c.name, "from-env-name");
        assert!(c.no_https);
        assert_eq!(c.idle_timeout, 42);
        assert_eq!(c.token, "t", "an empty variable does not override");
        assert_eq!(
            c.env_vars,
            vec![("X".into(), "1".into()), ("Y".into(), "2".into())]
        );
        // `yes` is YAML's, not strconv's: from the environment it reads as false.
        let env =
            |k: &str| (k == "SEMAPHORE_AGENT_DISCONNECT_AFTER_JOB").then(|| "yes".to_string());
        let c = parse_config(MIN, &env).expect("valid");
        assert!(!c.disconnect_after_job);
        assert_eq!(c.warnings.len(), 1);
        // name-from-env
        let env = |k: &str| (k == "MY_NAME").then(|| "named-by-env".to_string());
        let c = parse_config(&format!("{MIN}name-from-env: MY_NAME\n"), &env).expect("valid");
        assert_eq!(c.name, "named-by-env");
    }

    #[test]
    fn go_formats() {
        assert_eq!(go_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(go_duration(Duration::from_millis(4500)), "4.5s");
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_secs(600)), "10m0s");
        assert_eq!(go_parse_int("300"), Some(300));
        assert_eq!(go_parse_int("300.00"), Some(300));
        assert_eq!(go_parse_int("010"), Some(8));
        assert_eq!(go_parse_int("-0x10"), Some(-16));
        assert_eq!(go_parse_int("abc"), None);
        assert_eq!(go_parse_int("1.5"), None);
        assert_eq!(shell_quote("a b'c"), "'a b'\"'\"'c'");
        assert_eq!(shell_quote("plain/path-1"), "plain/path-1");
        assert_eq!(shell_quote(""), "''");
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
            log_cadence: LogCadence::FAST,
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
            Arc::new(Notify::new()),
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
                    // `exit` would end the job's shell session: a subshell's exit status.
                    commands: vec![format!("(exit {})", i % 2)],
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

    #[tokio::test]
    async fn one_shell_session_epilogues_and_the_log() {
        let run = setup(
            "session1",
            "disconnect-after-job: true\nenv-vars: [CFG_V=c]\n",
        )
        .await;
        let id = run.hub.enqueue_job_with_epilogues(
            JobSpec {
                commands: vec![
                    "export FROM_FIRST=seen; cd /".into(),
                    "echo \"first: $FROM_FIRST in $PWD\"".into(),
                    "false".into(),
                    "echo not reached".into(),
                ],
                env: vec![("JOB_V".into(), "j w".into())],
            },
            Epilogues {
                epilogue_always_commands: vec!["echo \"always $SEMAPHORE_JOB_RESULT\"".into()],
                epilogue_on_pass_commands: vec!["echo on-pass".into()],
                epilogue_on_fail_commands: vec!["echo \"on-fail $FROM_FIRST\"".into()],
            },
        );
        let (_tx, handle) = spawn_agent(&run, knobs());
        assert_eq!(finish(handle).await, 0);
        let job = run.hub.job(&id).expect("job");
        assert_eq!(job.result.as_deref(), Some("failed"));
        assert_eq!(job.logged_result().as_deref(), Some("failed"));
        let out = &job.output;
        for line in [
            "Exporting CFG_V",
            "Exporting JOB_V",
            "Exporting SEMAPHORE_JOB_ID",
            "first: seen in /",
            "Exporting SEMAPHORE_JOB_RESULT",
            "always failed",
            "on-fail seen",
        ] {
            assert!(out.iter().any(|l| l == line), "{line} in {out:?}");
        }
        assert!(
            !out.iter().any(|l| l == "not reached" || l == "on-pass"),
            "{out:?}"
        );
        assert_eq!(
            job.logged_directives(),
            vec![
                "Exporting environment variables",
                "Injecting Files",
                "export FROM_FIRST=seen; cd /",
                "echo \"first: $FROM_FIRST in $PWD\"",
                "false",
                "Exporting environment variables",
                "echo \"always $SEMAPHORE_JOB_RESULT\"",
                "echo \"on-fail $FROM_FIRST\"",
            ]
        );
        assert_eq!(
            job.log_events.first().map(|e| e["event"].clone()),
            Some("job_started".into())
        );
        assert!(
            job.log_pushes.iter().all(|p| p.status == 200),
            "{:?}",
            job.log_pushes
        );
        let _ = std::fs::remove_dir_all(&run.dir);
    }

    #[tokio::test]
    async fn exit_in_a_command_ends_the_shell() {
        let run = setup("exit1", "disconnect-after-job: true\n").await;
        let id = run.hub.enqueue_job_with_epilogues(
            JobSpec {
                commands: vec!["echo before; exit 0".into(), "echo after".into()],
                env: vec![],
            },
            Epilogues {
                epilogue_always_commands: vec!["echo epilogue".into()],
                ..Epilogues::default()
            },
        );
        let (_tx, handle) = spawn_agent(&run, knobs());
        assert_eq!(finish(handle).await, 0);
        let job = run.hub.job(&id).expect("job");
        assert_eq!(
            job.result.as_deref(),
            Some("failed"),
            "{:?}",
            job.log_events
        );
        assert!(job.output.iter().any(|l| l == "before"), "{:?}", job.output);
        assert!(!job.output.iter().any(|l| l == "after" || l == "epilogue"));
        let _ = std::fs::remove_dir_all(&run.dir);
    }

    #[tokio::test]
    async fn log_token_refresh_and_log_space() {
        let run = setup("refresh1", "disconnect-after-job: true\n").await;
        run.hub.set_max_log_events(12);
        let id = run.hub.enqueue_job(JobSpec {
            commands: vec![
                "sleep 0.5; for i in $(seq 1 20); do echo line $i; done; sleep 0.5".into(),
                "echo last".into(),
            ],
            env: vec![],
        });
        let (_tx, handle) = spawn_agent(&run, knobs());
        assert!(
            run.hub
                .wait_until(Duration::from_secs(10), |h| h
                    .job(&id)
                    .is_some_and(|j| !j.log_events.is_empty()))
                .await
        );
        run.hub.expire_log_tokens();
        assert_eq!(finish(handle).await, 0);
        let job = run.hub.job(&id).expect("job");
        assert_eq!(job.result.as_deref(), Some("passed"));
        assert_eq!(job.log_token_refreshes, 1, "{:?}", job.log_pushes);
        assert!(job.log_trimmed);
        assert!(job.log_events.len() >= 12, "{}", job.log_events.len());
        assert!(
            job.logged_result().is_none(),
            "job_finished came after the 422"
        );
        let statuses: Vec<u16> = job.log_pushes.iter().map(|p| p.status).collect();
        assert_eq!(
            statuses.iter().filter(|s| **s == 401).count(),
            1,
            "{statuses:?}"
        );
        assert_eq!(
            statuses.last(),
            Some(&422),
            "no push after the 422: {statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 422).count(),
            1,
            "{statuses:?}"
        );
        let _ = std::fs::remove_dir_all(&run.dir);
    }
}
