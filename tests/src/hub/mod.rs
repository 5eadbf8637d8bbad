//! Fake Semaphore hub: the self-hosted agent API (`/api/v1/self_hosted_agents`)
//! with the real server's semantics as described in
//! `shared/reference/semaphore-agent.md`, plus a control API for tests.
//!
//! The hub is an axum server on `127.0.0.1:<ephemeral>` that runs on the
//! caller's tokio runtime and stops when the [`Hub`] is dropped (or
//! [`Hub::stop`]ped). Everything is in memory.
//!
//! # Agent API (`Authorization: Token <t>`)
//!
//! | call | token | answer |
//! |---|---|---|
//! | `POST /register` | registration | 201 `{name, token}`; no header 401, wrong token 404, bad body/name 400 |
//! | `POST /sync` | access | 200 [`SyncResponse`]; unknown/disconnected token 401 |
//! | `GET /jobs/{id}` | access | 200 [`JobPayload`]; 404 when the job is not assigned to that agent |
//! | `POST /refresh` | access | 200 `{"token": …}`: a new token for the log of the agent's current job; 404 without a job |
//! | `POST /disconnect` | access | 200; the agent leaves the live set |
//! | `GET /metrics` | registration | 200 [`Metrics`]; wrong/missing token 401; [`Fault`]s apply here |
//!
//! What `/register` accepts, as the real server: `idle_timeout` and
//! `interruption_grace_period` are Go `int`s, any integer is taken (a negative one
//! counts as 0; the real agent refuses a negative idle timeout itself but sends a
//! negative grace period as configured); unknown fields are ignored. Names: 8–80
//! characters of `[a-zA-Z0-9-_/+]`, or an http(s) URL (a server-verified STS name) —
//! the server's rule as `shared/reference/semaphore-agent.md` states it; the real
//! agent itself only checks the length (or that the name parses as a URL), so a name
//! it accepts may still get 400 here, as from the real server.
//!
//! `next_sync_after` is [`HubOptions::next_sync_after_ms`] (200 ms by default, for fast
//! tests), or, with [`HubOptions::next_sync_after_max_ms`], a fresh random value in
//! the range for each answer: [`HubOptions::real_sync`] is the real server's 4–6 s.
//!
//! # Job logs
//!
//! Each job payload carries a `logger` ([`JobLogger`]: `method` `push`, a `url` —
//! `http://<host>/api/v1/logs/{job_id}` — and a per-job `token`), as the real job
//! request does. The agent pushes the job's log there as the real agent does
//! (`pkg/eventlogger/httpbackend.go`): `POST <url>?start_from=N`,
//! `Content-Type: text/plain`, `Authorization: Bearer <token>`, a body of JSON
//! events, one per line (`job_started`, `cmd_started` `{directive}`, `cmd_output`
//! `{output}`, `cmd_finished` `{directive, exit_code, started_at, finished_at}`,
//! `job_finished` `{result}`), `N` being the index of the first one in the job's log.
//! The hub answers what the agent expects:
//!
//! | push | answer | the real agent then |
//! |---|---|---|
//! | `N` = events stored | 200, all appended | moves `start_from` on |
//! | `N` < events stored (a re-sent batch) | 200, only the events past the stored ones appended: none twice | moves on |
//! | log space used up ([`HubOptions::max_log_events_per_job`] events stored) | 422, the job is `log_trimmed` (the push that reached the limit was taken whole) | stops pushing for good (and uploads the log as an artifact if `upload-job-logs` says so) |
//! | token not (or no longer) valid | 401 | `POST /refresh`, pushes the same batch with the new token at its next tick |
//! | `N` > events stored (a gap), a missing `start_from`, a line that is not a JSON event | 409 / 400, nothing stored | retries the same batch every tick (any other status) until its flush timeout |
//!
//! The 422 check comes before the token check, as in the agent's own mock log
//! service. What the real log service does with a gap is not known (the agent only
//! moves `start_from` on a 200, so it never makes one); the hub refuses it so a
//! stored log is always whole. [`Hub::expire_log_tokens`] makes every issued log
//! token stale (the next push gets 401: the refresh path runs once);
//! [`Hub::set_max_log_events`] changes the log space. The hub keeps the events
//! ([`JobInfo::log_events`], each once), the output lines derived from them
//! ([`JobInfo::output`], [`Hub::job_output`]), every push and its answer
//! ([`JobInfo::log_pushes`]), and the result the agent logged
//! ([`JobInfo::logged_result`]). Log pushes are never refused by an outage.
//!
//! Sync semantics (server side decides, reasons are lower-case on the wire):
//! * `waiting-for-jobs`: disconnect requested -> `shutdown`/`requested`;
//!   interrupted -> `shutdown`/`interrupted`; idle longer than `idle_timeout`
//!   (> 0, counted from registration or the end of the last job) ->
//!   `shutdown`/`idle`; a queued job -> `run-job` (FIFO); else `continue`.
//!   An agent that already has a job assigned gets the same `run-job` again
//!   (lost-response safety).
//! * `starting-job` / `running-job`: once `interrupted_at` was seen and the
//!   agent's `interruption_grace_period` has passed on the hub's clock since
//!   the hub first saw it -> `stop-job` (job state `Stopping`); else `continue`.
//!   A disconnect request waits for the job to end.
//! * `stopping-job`: `continue`.
//! * `finished-job`: the job is finished with `job_result` (empty -> `failed`);
//!   then interrupted -> `shutdown`/`interrupted`, single-job ->
//!   `shutdown`/`job-finished`, disconnect requested -> `shutdown`/`requested`,
//!   else `wait-for-jobs`.
//! * once a shutdown was answered, every later sync gets the same shutdown.
//!
//! An agent that has not synced for [`HubOptions::stale_agent_after_ms`] is
//! dropped (`disconnected = "stale"`) and its unfinished job fails, like the
//! real server deleting agents that stop syncing. A new registration with the
//! name of a live agent replaces it (`disconnected = "replaced"`, its job
//! fails). A name that is a URL (server-verified AWS STS name) is accepted and
//! the agent is named `sts-agent-<n>`.
//!
//! # Control API (no auth), for other processes
//!
//! * `POST /control/jobs` [`JobSpec`], optionally with the [`Epilogues`] keys -> `{"id": …}`
//! * `POST /control/logs` `{"expire_tokens": true, "max_events_per_job": N}` (either may
//!   be left out): [`Hub::expire_log_tokens`], [`Hub::set_max_log_events`]
//! * `GET /control/state` -> [`HubState`] (`jobs`, `agents`, `metrics`, `metrics_polls`, `fault`, `api_outage`, `metrics_outage`)
//! * `POST /control/agents/{name}/disconnect` -> 200, or 404 when no live agent has that name
//! * `POST /control/fault` JSON [`Fault`] or `null` (e.g. `"ServerError"`,
//!   `{"TooMany":{"retry_after_secs":3}}`, `{"Slow":{"ms":500}}`)
//! * `POST /control/token` `{"token": "…"}` (a bare JSON string or plain text also work)
//! * `POST /control/outage` `true`/`false`: the agent API (register, sync,
//!   jobs, disconnect) answers 503 while on; `/metrics` is unaffected. Or
//!   `{"agent_api": bool, "metrics": bool}` (either may be left out): with
//!   `metrics` on, `GET /metrics` answers 503 too (counted in `metrics_polls`) —
//!   Semaphore down as a whole ([`Hub::set_down`]). Job log pushes are never
//!   refused by an outage (`/refresh` is: it is part of the agent API).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Base path of the agent API.
pub const API_BASE: &str = "/api/v1/self_hosted_agents";

/// Path of a job's log (the job payload's `logger.url`), as on the real server.
pub const LOGS_BASE: &str = "/api/v1/logs";
const LOGS_ROUTE: &str = "/api/v1/logs/{id}";

/// The real server's `next_sync_after` range, in ms: each sync answer picks one at
/// random in it. Use with [`HubOptions::real_sync`].
pub const REAL_SYNC_MS: (u64, u64) = (4000, 6000);

/// Hub settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// `next_sync_after` in every sync answer, in ms; with
    /// [`next_sync_after_max_ms`](Self::next_sync_after_max_ms) the low end of the
    /// range. Default 200 (fast tests); the real server: 4000–6000 ([`REAL_SYNC_MS`]).
    pub next_sync_after_ms: u64,
    /// When greater than `next_sync_after_ms`, each sync answer picks
    /// `next_sync_after` uniformly in `[next_sync_after_ms, next_sync_after_max_ms]`,
    /// as the real server does (4–6 s). 0 (default) = always `next_sync_after_ms`.
    pub next_sync_after_max_ms: u64,
    /// The agent-type registration token.
    pub registration_token: String,
    /// An agent that has not synced for this long is dropped as `stale`
    /// (0 = never). Real server: 3 min.
    pub stale_agent_after_ms: u64,
    /// TCP port on 127.0.0.1 (0 = ephemeral).
    pub port: u16,
    /// Log space per job, in events (0 = unlimited): once a job's log holds this many
    /// events, further pushes are answered 422 (the push that reaches the limit is
    /// taken whole, as by the agent's own mock log service). [`Hub::set_max_log_events`]
    /// changes it.
    pub max_log_events_per_job: u64,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            next_sync_after_ms: 200,
            next_sync_after_max_ms: 0,
            registration_token: "reg-token".to_string(),
            stale_agent_after_ms: 180_000,
            port: 0,
            max_log_events_per_job: 0,
        }
    }
}

impl HubOptions {
    /// The default options with the real server's random 4–6 s sync interval.
    pub fn real_sync() -> HubOptions {
        HubOptions {
            next_sync_after_ms: REAL_SYNC_MS.0,
            next_sync_after_max_ms: REAL_SYNC_MS.1,
            ..HubOptions::default()
        }
    }

    /// The `next_sync_after` for one sync answer.
    fn pick_next_sync_after(&self) -> u64 {
        if self.next_sync_after_max_ms > self.next_sync_after_ms {
            fastrand::u64(self.next_sync_after_ms..=self.next_sync_after_max_ms)
        } else {
            self.next_sync_after_ms
        }
    }
}

/// A job to enqueue: shell commands (run one after the other in one shell session by
/// the agents, until the first that fails) and job env vars. JSON:
/// `{"commands":["echo hi"],"env":[["K","V"]]}`. Epilogues: [`Hub::enqueue_job_with_epilogues`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    #[serde(default)]
    pub commands: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

/// A job's epilogue commands (run after its commands, in the same shell session, with
/// `SEMAPHORE_JOB_RESULT` exported; not when the job was stopped). JSON keys as in
/// the job payload: `epilogue_always_commands`, `epilogue_on_pass_commands`,
/// `epilogue_on_fail_commands` (lists of strings).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Epilogues {
    pub epilogue_always_commands: Vec<String>,
    pub epilogue_on_pass_commands: Vec<String>,
    pub epilogue_on_fail_commands: Vec<String>,
}

/// One `POST /api/v1/logs/{id}` the hub answered, for tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPush {
    /// The `start_from` query parameter (None when missing or not a number).
    pub start_from: Option<u64>,
    /// Events in the body.
    pub events: u64,
    /// Events appended to the job's log (0 for a re-sent batch).
    pub appended: u64,
    /// The HTTP status answered.
    pub status: u16,
    /// ms since the hub started.
    pub at_ms: u64,
}

/// Life of a job on the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Not yet assigned (counted as `queued` in `/metrics`).
    Queued,
    /// Assigned to an agent by `run-job` (counted as `running`).
    Running,
    /// `stop-job` sent, not yet reported finished (counted as `running`).
    Stopping,
    /// Reported finished (or lost with its agent).
    Finished,
}

/// A job as the hub sees it. `*_ms` are milliseconds since the hub started;
/// the `Instant`s are not serialized (they read as "now" when deserialized).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    /// Name of the agent it was assigned to.
    pub agent: Option<String>,
    /// `passed`, `failed` or `stopped` once finished.
    pub result: Option<String>,
    #[serde(skip, default = "Instant::now")]
    pub queued_at: Instant,
    #[serde(skip)]
    pub started_at: Option<Instant>,
    #[serde(skip)]
    pub finished_at: Option<Instant>,
    pub queued_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// The job's output as the agent pushed it to its logger, line by line: the
    /// `output` of its `cmd_output` events, split into lines per command (a line never
    /// spans two commands; a trailing `\r` is dropped, as a PTY ends lines with `\r\n`).
    /// Directives (`cmd_started`) are not included: see [`JobInfo::log_events`].
    #[serde(default)]
    pub output: Vec<String>,
    /// Epilogue commands of the job payload.
    #[serde(default)]
    pub epilogues: Epilogues,
    /// The job's log as pushed: one JSON object per event (`job_started`,
    /// `cmd_started`, `cmd_output`, `cmd_finished`, `job_finished`), in order, each
    /// stored once however often it was sent.
    #[serde(default)]
    pub log_events: Vec<serde_json::Value>,
    /// Every log push the hub answered, in order.
    #[serde(default)]
    pub log_pushes: Vec<LogPush>,
    /// `POST /refresh` calls that issued a new log token for this job.
    #[serde(default)]
    pub log_token_refreshes: u64,
    /// The log space was used up (a push got 422).
    #[serde(default)]
    pub log_trimmed: bool,
}

impl JobInfo {
    /// The `result` of the `job_finished` log event: the result as the agent logged
    /// it (None until that event arrived).
    pub fn logged_result(&self) -> Option<String> {
        self.log_events
            .iter()
            .rev()
            .find(|e| e["event"] == "job_finished")
            .and_then(|e| e["result"].as_str())
            .map(str::to_string)
    }

    /// The directives of the `cmd_started` events, in order.
    pub fn logged_directives(&self) -> Vec<String> {
        self.log_events
            .iter()
            .filter(|e| e["event"] == "cmd_started")
            .filter_map(|e| e["directive"].as_str())
            .map(str::to_string)
            .collect()
    }
}

/// The output lines of a job log (see [`JobInfo::output`]).
pub fn output_lines(events: &[serde_json::Value]) -> Vec<String> {
    fn flush(cur: &mut String, out: &mut Vec<String>) {
        if cur.is_empty() {
            return;
        }
        let text = std::mem::take(cur);
        let mut parts: Vec<&str> = text.split('\n').collect();
        if parts.last() == Some(&"") {
            parts.pop();
        }
        out.extend(
            parts
                .iter()
                .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string()),
        );
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    for e in events {
        if e["event"] == "cmd_output" {
            if let Some(o) = e["output"].as_str() {
                cur.push_str(o);
            }
        } else {
            flush(&mut cur, &mut out);
        }
    }
    flush(&mut cur, &mut out);
    out
}

/// Life of an agent on the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Registered, no job (counted as `idle`).
    Idle,
    /// A job is assigned (counted as `occupied`).
    Busy,
    /// A `shutdown` was answered, `/disconnect` not yet received (counted as `idle`).
    ShuttingDown,
    /// Disconnected, stale or replaced; not counted.
    Gone,
}

/// An agent registration as the hub sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    pub state: AgentState,
    pub single_job: bool,
    /// Seconds, 0 = never.
    pub idle_timeout: u64,
    /// Seconds.
    pub interruption_grace_period: u64,
    pub version: String,
    pub pid: i64,
    pub os: String,
    pub arch: String,
    pub hostname: String,
    #[serde(skip, default = "Instant::now")]
    pub registered_at: Instant,
    pub registered_ms: u64,
    pub last_sync_ms: Option<u64>,
    pub syncs: u64,
    /// Currently assigned job.
    pub job: Option<String>,
    /// The agent reported `interrupted_at`.
    pub interrupted: bool,
    /// Disconnect requested through the control API / [`Hub::disconnect_agent`].
    pub disconnect_requested: bool,
    /// Reason sent with the `shutdown` action (lower-case wire form).
    pub shutdown_reason: Option<String>,
    /// Set once the agent is gone: the shutdown reason it was sent, or
    /// `unsolicited` (it called `/disconnect` on its own), `stale`, `replaced`.
    pub disconnected: Option<String>,
}

/// `/metrics` body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub jobs: JobMetrics,
    pub agents: AgentMetrics,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMetrics {
    pub queued: u32,
    pub running: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetrics {
    pub idle: u32,
    pub occupied: u32,
}

/// A fault injected into `GET /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    /// 401.
    Unauthorized,
    /// 429 with `Retry-After: <secs>`.
    TooMany { retry_after_secs: u64 },
    /// 500.
    ServerError,
    /// Answer normally after sleeping.
    Slow { ms: u64 },
    /// 200 with a body that is not JSON (`{"jobs":{"queued":N "running":N}}`).
    MalformedJson,
    /// 200 with a truncated body (`{"jobs":{"queued":N`).
    PartialJson,
}

/// Things that happen on the hub, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum HubEvent {
    JobQueued {
        id: String,
    },
    JobStarted {
        id: String,
        agent: String,
    },
    JobFinished {
        id: String,
        agent: String,
        result: String,
    },
    AgentRegistered {
        name: String,
    },
    /// The hub answered `shutdown` (reason in wire form, e.g. `job-finished`).
    AgentShutdown {
        name: String,
        reason: String,
    },
    /// The agent left the live set (`/disconnect`, stale or replaced).
    AgentDisconnected {
        name: String,
    },
    MetricsPolled,
}

/// `GET /control/state` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubState {
    pub jobs: Vec<JobInfo>,
    pub agents: Vec<AgentInfo>,
    pub metrics: Metrics,
    pub metrics_polls: u64,
    pub fault: Option<Fault>,
    pub api_outage: bool,
    #[serde(default)]
    pub metrics_outage: bool,
}

// ---------------------------------------------------------------- wire types

/// `POST /register` body (all fields optional on the wire).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RegisterRequest {
    pub name: String,
    pub version: String,
    pub pid: i64,
    pub os: String,
    pub arch: String,
    pub hostname: String,
    pub single_job: bool,
    /// Seconds (a Go `int` on the wire: the hub takes any integer, negative = 0).
    pub idle_timeout: i64,
    /// Seconds (a Go `int`: the real agent sends a negative value as configured; the
    /// hub takes any integer, negative = 0).
    pub interruption_grace_period: i64,
    pub job_id: String,
}

/// `POST /refresh` answer: a new token for the current job's log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RefreshTokenResponse {
    pub token: String,
}

/// `POST /register` 201 answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub name: String,
    pub token: String,
}

/// `POST /sync` body. `interrupted_at` is unix seconds, 0 = not interrupted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncRequest {
    pub state: String,
    pub job_id: String,
    pub job_result: String,
    pub interrupted_at: i64,
}

/// `POST /sync` answer. `action` is one of `continue`, `run-job`, `stop-job`,
/// `wait-for-jobs`, `shutdown`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncResponse {
    pub action: String,
    pub job_id: String,
    pub shutdown_reason: String,
    pub next_sync_after: u64,
}

/// One command of a job payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub directive: String,
}

/// One env var of a job payload; `value` is base64 (standard alphabet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

/// `GET /jobs/{id}` answer, a subset of the real agent's `JobRequest`:
///
/// ```json
/// {"id":"<uuid>","job_id":"<uuid>","executor":"shell",
///  "commands":[{"directive":"echo hi"}],
///  "epilogue_always_commands":[],"epilogue_on_pass_commands":[],"epilogue_on_fail_commands":[],
///  "env_vars":[{"name":"SEMAPHORE_JOB_ID","value":"<base64>"},{"name":"K","value":"<base64 of V>"}],
///  "files":[]}
/// ```
///
/// `SEMAPHORE_JOB_ID` is always the first env var, followed by the spec's env.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobPayload {
    pub id: String,
    pub job_id: String,
    pub executor: String,
    pub commands: Vec<Command>,
    pub epilogue_always_commands: Vec<Command>,
    pub epilogue_on_pass_commands: Vec<Command>,
    pub epilogue_on_fail_commands: Vec<Command>,
    pub env_vars: Vec<EnvVar>,
    pub files: Vec<serde_json::Value>,
    /// Where the job's output goes (see the module docs).
    pub logger: Option<JobLogger>,
}

/// The `logger` of a job payload: push the job's output to `url` with
/// `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobLogger {
    pub method: String,
    pub url: String,
    pub token: String,
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional, whitespace ignored).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for c in text.bytes() {
        if c == b'=' {
            break;
        }
        if c.is_ascii_whitespace() {
            continue;
        }
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Some(out)
}

/// Agent name rule: 8–80 chars of `[a-zA-Z0-9-_/+]`, or an http(s) URL.
pub fn valid_agent_name(name: &str) -> bool {
    if name.starts_with("https://") || name.starts_with("http://") {
        return name.len() > "https://".len();
    }
    (8..=80).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '+'))
}

// ---------------------------------------------------------------- state

struct AgentRec {
    info: AgentInfo,
    token: String,
    idle_since: Instant,
    last_sync: Instant,
    interrupted_seen: Option<Instant>,
}

impl AgentRec {
    fn live(&self) -> bool {
        self.info.disconnected.is_none()
    }

    fn snapshot(&self) -> AgentInfo {
        let mut info = self.info.clone();
        info.state = if info.disconnected.is_some() {
            AgentState::Gone
        } else if info.shutdown_reason.is_some() {
            AgentState::ShuttingDown
        } else if info.job.is_some() {
            AgentState::Busy
        } else {
            AgentState::Idle
        };
        info
    }
}

struct Inner {
    registration_token: String,
    jobs: Vec<JobInfo>,
    agents: Vec<AgentRec>,
    fault: Option<Fault>,
    api_outage: bool,
    metrics_outage: bool,
    metrics_polls: u64,
    /// When each `/metrics` request arrived, ms since the hub started.
    metrics_poll_ms: Vec<u64>,
    /// Job id -> the tokens its log pushes may carry (issued with the payload or by
    /// `/refresh`; emptied by [`Hub::expire_log_tokens`]).
    log_tokens: std::collections::HashMap<String, Vec<String>>,
    /// Log space per job in events (0 = unlimited).
    max_log_events: u64,
    sts_seq: u64,
}

struct Shared {
    inner: Mutex<Inner>,
    events: broadcast::Sender<HubEvent>,
    opts: HubOptions,
    epoch: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, ev: HubEvent) {
        // No receiver is fine.
        let _ = self.events.send(ev);
    }

    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Locks, reaps stale agents, and returns the guard.
    fn state(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        let now = Instant::now();
        let stale = self.opts.stale_agent_after_ms;
        if stale > 0 {
            let limit = Duration::from_millis(stale);
            let stale_idx: Vec<usize> = inner
                .agents
                .iter()
                .enumerate()
                .filter(|(_, a)| a.live() && now.saturating_duration_since(a.last_sync) > limit)
                .map(|(i, _)| i)
                .collect();
            for i in stale_idx {
                self.drop_agent(&mut inner, i, Some("stale"), now);
            }
        }
        inner
    }

    /// Removes an agent from the live set; its unfinished job fails.
    /// `why` None: the agent called `/disconnect` (reason = the shutdown
    /// reason it was sent, or `unsolicited`).
    fn drop_agent(&self, inner: &mut Inner, idx: usize, why: Option<&str>, now: Instant) {
        let Some(a) = inner.agents.get_mut(idx) else {
            return;
        };
        if !a.live() {
            return;
        }
        let reason = match why {
            Some(w) => w.to_string(),
            None => a
                .info
                .shutdown_reason
                .clone()
                .unwrap_or_else(|| "unsolicited".to_string()),
        };
        a.info.disconnected = Some(reason);
        let name = a.info.name.clone();
        if let Some(job) = a.info.job.take() {
            self.finish_job(inner, &job, &name, "failed", now);
        }
        self.emit(HubEvent::AgentDisconnected { name });
    }

    fn finish_job(&self, inner: &mut Inner, id: &str, agent: &str, result: &str, now: Instant) {
        let ms = self.ms(now);
        if let Some(j) = inner.jobs.iter_mut().find(|j| j.id == id) {
            if j.state == JobState::Finished {
                return;
            }
            j.state = JobState::Finished;
            j.result = Some(result.to_string());
            j.finished_at = Some(now);
            j.finished_ms = Some(ms);
            if j.agent.is_none() {
                j.agent = Some(agent.to_string());
            }
            self.emit(HubEvent::JobFinished {
                id: id.to_string(),
                agent: agent.to_string(),
                result: result.to_string(),
            });
        }
    }

    fn metrics(&self, inner: &Inner) -> Metrics {
        let mut m = Metrics::default();
        for j in &inner.jobs {
            match j.state {
                JobState::Queued => m.jobs.queued += 1,
                JobState::Running | JobState::Stopping => m.jobs.running += 1,
                JobState::Finished => {}
            }
        }
        for a in inner.agents.iter().filter(|a| a.live()) {
            if a.info.job.is_some() {
                m.agents.occupied += 1;
            } else {
                m.agents.idle += 1;
            }
        }
        m
    }

    fn enqueue(&self, spec: JobSpec, epilogues: Epilogues) -> String {
        let id = uuid();
        let now = Instant::now();
        let mut inner = self.state();
        inner.jobs.push(JobInfo {
            id: id.clone(),
            spec,
            state: JobState::Queued,
            agent: None,
            result: None,
            queued_at: now,
            started_at: None,
            finished_at: None,
            queued_ms: self.ms(now),
            started_ms: None,
            finished_ms: None,
            output: Vec::new(),
            epilogues,
            log_events: Vec::new(),
            log_pushes: Vec::new(),
            log_token_refreshes: 0,
            log_trimmed: false,
        });
        drop(inner);
        self.emit(HubEvent::JobQueued { id: id.clone() });
        id
    }

    fn disconnect_by_name(&self, name: &str) -> bool {
        let mut inner = self.state();
        let mut found = false;
        for a in inner
            .agents
            .iter_mut()
            .filter(|a| a.live() && a.info.name == name)
        {
            a.info.disconnect_requested = true;
            found = true;
        }
        found
    }

    fn snapshot(&self) -> HubState {
        let inner = self.state();
        HubState {
            jobs: inner.jobs.clone(),
            agents: inner.agents.iter().map(AgentRec::snapshot).collect(),
            metrics: self.metrics(&inner),
            metrics_polls: inner.metrics_polls,
            fault: inner.fault.clone(),
            api_outage: inner.api_outage,
            metrics_outage: inner.metrics_outage,
        }
    }

    /// The sync decision. Returns the answer (without `next_sync_after`).
    fn sync(&self, inner: &mut Inner, idx: usize, req: &SyncRequest, now: Instant) -> SyncResponse {
        let ms = self.ms(now);
        let Some(a) = inner.agents.get_mut(idx) else {
            return action("continue");
        };
        a.last_sync = now;
        a.info.syncs += 1;
        a.info.last_sync_ms = Some(ms);
        if req.interrupted_at > 0 && a.interrupted_seen.is_none() {
            a.interrupted_seen = Some(now);
            a.info.interrupted = true;
        }
        if let Some(reason) = &a.info.shutdown_reason {
            return shutdown_answer(reason);
        }
        let name = a.info.name.clone();
        let grace = Duration::from_secs(a.info.interruption_grace_period);
        let stop_due = a
            .interrupted_seen
            .is_some_and(|seen| now.saturating_duration_since(seen) >= grace);

        match req.state.as_str() {
            "finished-job" => {
                let job = if req.job_id.is_empty() {
                    a.info.job.clone()
                } else {
                    Some(req.job_id.clone())
                };
                let result = if req.job_result.is_empty() {
                    "failed".to_string()
                } else {
                    req.job_result.clone()
                };
                if a.info.job.is_some() {
                    a.info.job = None;
                    a.idle_since = now;
                }
                let (interrupted, single, requested) = (
                    a.interrupted_seen.is_some(),
                    a.info.single_job,
                    a.info.disconnect_requested,
                );
                if let Some(job) = job {
                    let mine = inner
                        .jobs
                        .iter()
                        .any(|j| j.id == job && j.agent.as_deref() == Some(name.as_str()));
                    if mine {
                        self.finish_job(inner, &job, &name, &result, now);
                    }
                }
                if interrupted {
                    self.shutdown(inner, idx, "interrupted")
                } else if single {
                    self.shutdown(inner, idx, "job-finished")
                } else if requested {
                    self.shutdown(inner, idx, "requested")
                } else {
                    action("wait-for-jobs")
                }
            }
            "starting-job" | "running-job" => {
                let Some(job) = a.info.job.clone() else {
                    return action("continue");
                };
                if stop_due {
                    if let Some(j) = inner.jobs.iter_mut().find(|j| j.id == job) {
                        if j.state == JobState::Running {
                            j.state = JobState::Stopping;
                        }
                    }
                    SyncResponse {
                        action: "stop-job".into(),
                        job_id: job,
                        ..SyncResponse::default()
                    }
                } else {
                    action("continue")
                }
            }
            "stopping-job" => action("continue"),
            _ => {
                // waiting-for-jobs (or anything unknown: treated as idle)
                if let Some(job) = a.info.job.clone() {
                    return SyncResponse {
                        action: "run-job".into(),
                        job_id: job,
                        ..SyncResponse::default()
                    };
                }
                let idle_for = now.saturating_duration_since(a.idle_since);
                let idle_limit = a.info.idle_timeout;
                if a.info.disconnect_requested {
                    return self.shutdown(inner, idx, "requested");
                }
                if a.interrupted_seen.is_some() {
                    return self.shutdown(inner, idx, "interrupted");
                }
                if idle_limit > 0 && idle_for > Duration::from_secs(idle_limit) {
                    return self.shutdown(inner, idx, "idle");
                }
                let Some(j) = inner.jobs.iter_mut().find(|j| j.state == JobState::Queued) else {
                    return action("continue");
                };
                j.state = JobState::Running;
                j.agent = Some(name.clone());
                j.started_at = Some(now);
                j.started_ms = Some(ms);
                let id = j.id.clone();
                if let Some(a) = inner.agents.get_mut(idx) {
                    a.info.job = Some(id.clone());
                }
                self.emit(HubEvent::JobStarted {
                    id: id.clone(),
                    agent: name,
                });
                SyncResponse {
                    action: "run-job".into(),
                    job_id: id,
                    ..SyncResponse::default()
                }
            }
        }
    }

    fn shutdown(&self, inner: &mut Inner, idx: usize, reason: &str) -> SyncResponse {
        if let Some(a) = inner.agents.get_mut(idx) {
            if a.info.shutdown_reason.is_none() {
                a.info.shutdown_reason = Some(reason.to_string());
                self.emit(HubEvent::AgentShutdown {
                    name: a.info.name.clone(),
                    reason: reason.to_string(),
                });
            }
        }
        shutdown_answer(reason)
    }
}

fn action(a: &str) -> SyncResponse {
    SyncResponse {
        action: a.to_string(),
        ..SyncResponse::default()
    }
}

fn shutdown_answer(reason: &str) -> SyncResponse {
    SyncResponse {
        action: "shutdown".into(),
        shutdown_reason: reason.to_string(),
        ..SyncResponse::default()
    }
}

fn random_hex(n: usize) -> String {
    (0..n)
        .map(|_| char::from(b"0123456789abcdef"[fastrand::usize(..16)]))
        .collect()
}

fn uuid() -> String {
    format!(
        "{}-{}-4{}-{}{}-{}",
        random_hex(8),
        random_hex(4),
        random_hex(3),
        char::from(b"89ab"[fastrand::usize(..4)]),
        random_hex(3),
        random_hex(12)
    )
}

// ---------------------------------------------------------------- the hub

/// The fake hub. Stops serving when dropped.
pub struct Hub {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Hub {
    /// Binds 127.0.0.1 and starts serving on the current tokio runtime.
    pub async fn start(opts: HubOptions) -> anyhow::Result<Hub> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.port)).await?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                registration_token: opts.registration_token.clone(),
                jobs: Vec::new(),
                agents: Vec::new(),
                fault: None,
                api_outage: false,
                metrics_outage: false,
                metrics_polls: 0,
                metrics_poll_ms: Vec::new(),
                log_tokens: std::collections::HashMap::new(),
                max_log_events: opts.max_log_events_per_job,
                sts_seq: 0,
            }),
            events,
            opts,
            epoch: Instant::now(),
        });
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            // Only ends on an accept loop error; nothing to report to.
            let _ = axum::serve(listener, app).await;
        });
        Ok(Hub { shared, addr, task })
    }

    /// Stops serving: the listener closes, idle keep-alive connections are
    /// closed, in-flight requests finish.
    pub async fn stop(mut self) {
        self.task.abort();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }

    /// `127.0.0.1:PORT` (agent config `endpoint`, used with `no-https: true`).
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The options the hub was started with.
    pub fn options(&self) -> &HubOptions {
        &self.shared.opts
    }

    /// Queues a job; returns its id (a UUID).
    pub fn enqueue_job(&self, job: JobSpec) -> String {
        self.shared.enqueue(job, Epilogues::default())
    }

    /// Queues a job with epilogue commands; returns its id.
    pub fn enqueue_job_with_epilogues(&self, job: JobSpec, epilogues: Epilogues) -> String {
        self.shared.enqueue(job, epilogues)
    }

    /// All jobs, in enqueue order.
    pub fn jobs(&self) -> Vec<JobInfo> {
        self.shared.state().jobs.clone()
    }

    /// One job by id.
    pub fn job(&self, id: &str) -> Option<JobInfo> {
        self.shared
            .state()
            .jobs
            .iter()
            .find(|j| j.id == id)
            .cloned()
    }

    /// All agent registrations ever made, in order (including gone ones).
    pub fn agents(&self) -> Vec<AgentInfo> {
        self.shared
            .state()
            .agents
            .iter()
            .map(AgentRec::snapshot)
            .collect()
    }

    /// Agents not yet gone (what `/metrics` counts).
    pub fn live_agents(&self) -> Vec<AgentInfo> {
        self.agents()
            .into_iter()
            .filter(|a| a.disconnected.is_none())
            .collect()
    }

    /// The numbers `GET /metrics` would answer right now.
    pub fn metrics(&self) -> Metrics {
        let inner = self.shared.state();
        self.shared.metrics(&inner)
    }

    /// Jobs, agents, metrics, fault: what `GET /control/state` answers.
    pub fn state(&self) -> HubState {
        self.shared.snapshot()
    }

    /// Like "disconnect" in the UI: the agent's next idle sync (or the end of
    /// its current job) answers `shutdown`/`requested`. Returns false when no
    /// live agent has that name.
    pub fn disconnect_agent(&self, name: &str) -> bool {
        self.shared.disconnect_by_name(name)
    }

    /// Fault for `GET /metrics` (None = healthy).
    pub fn set_fault(&self, f: Option<Fault>) {
        self.shared.lock().fault = f;
    }

    /// Token rotation: afterwards the old token gets 404 on register and 401
    /// on metrics. Already registered agents keep their access tokens.
    pub fn set_registration_token(&self, t: &str) {
        self.shared.lock().registration_token = t.to_string();
    }

    /// While on, the agent API (register/sync/jobs/disconnect) answers 503.
    pub fn set_api_outage(&self, on: bool) {
        self.shared.lock().api_outage = on;
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.shared.events.subscribe()
    }

    /// While on, `GET /metrics` answers 503 (the polls are still counted).
    pub fn set_metrics_outage(&self, on: bool) {
        self.shared.lock().metrics_outage = on;
    }

    /// Semaphore down as a whole: the agent API and `/metrics` answer 503 while on.
    pub fn set_down(&self, on: bool) {
        let mut inner = self.shared.lock();
        inner.api_outage = on;
        inner.metrics_outage = on;
    }

    /// Number of `GET /metrics` requests received (faulted ones included).
    pub fn metrics_polls(&self) -> u64 {
        self.shared.lock().metrics_polls
    }

    /// When each `GET /metrics` request arrived, as [`Instant`]s (faulted ones included).
    pub fn metrics_poll_times(&self) -> Vec<Instant> {
        let epoch = self.shared.epoch;
        self.shared
            .lock()
            .metrics_poll_ms
            .iter()
            .map(|ms| epoch + Duration::from_millis(*ms))
            .collect()
    }

    /// The output lines the agent pushed for a job (empty for an unknown job); see
    /// [`JobInfo::output`].
    pub fn job_output(&self, id: &str) -> Vec<String> {
        self.job(id).map(|j| j.output).unwrap_or_default()
    }

    /// The log events the agent pushed for a job (empty for an unknown job).
    pub fn job_log_events(&self, id: &str) -> Vec<serde_json::Value> {
        self.job(id).map(|j| j.log_events).unwrap_or_default()
    }

    /// Like an expired log token: every log token issued so far stops working, so the
    /// next push of every job's log gets 401 and the agent must `POST /refresh` for a
    /// new one (which then works).
    pub fn expire_log_tokens(&self) {
        for tokens in self.shared.lock().log_tokens.values_mut() {
            tokens.clear();
        }
    }

    /// Log space per job in events (0 = unlimited); see
    /// [`HubOptions::max_log_events_per_job`]. Applies to later pushes.
    pub fn set_max_log_events(&self, max: u64) {
        self.shared.lock().max_log_events = max;
    }

    /// Polls `cond` every 20 ms until it holds or `timeout` passes.
    pub async fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&Hub) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- HTTP

type S = State<Arc<Shared>>;

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(&format!("{API_BASE}/register"), post(register))
        .route(&format!("{API_BASE}/sync"), post(sync))
        .route(&format!("{API_BASE}/jobs/{{id}}"), get(get_job))
        .route(&format!("{API_BASE}/disconnect"), post(disconnect))
        .route(&format!("{API_BASE}/refresh"), post(refresh_log_token))
        .route(&format!("{API_BASE}/metrics"), get(metrics))
        .route("/control/jobs", post(control_jobs))
        .route("/control/state", get(control_state))
        .route(
            "/control/agents/{name}/disconnect",
            post(control_disconnect),
        )
        .route("/control/fault", post(control_fault))
        .route("/control/token", post(control_token))
        .route("/control/outage", post(control_outage))
        .route("/control/logs", post(control_logs))
        .route(LOGS_ROUTE, post(push_logs))
        .with_state(shared)
}

fn auth_token(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let t = v.strip_prefix("Token ")?.trim();
    Some(t.to_string())
}

fn message(status: StatusCode, msg: &str) -> Response {
    (status, Json(serde_json::json!({ "message": msg }))).into_response()
}

fn outage() -> Response {
    message(StatusCode::SERVICE_UNAVAILABLE, "service unavailable")
}

async fn register(State(s): S, headers: HeaderMap, body: Bytes) -> Response {
    let mut inner = s.state();
    if inner.api_outage {
        return outage();
    }
    let Some(token) = auth_token(&headers) else {
        return message(StatusCode::UNAUTHORIZED, "missing token");
    };
    if token != inner.registration_token {
        return message(StatusCode::NOT_FOUND, "not found");
    }
    let req: RegisterRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return message(StatusCode::BAD_REQUEST, &format!("bad request: {e}")),
    };
    if !valid_agent_name(&req.name) {
        return message(
            StatusCode::BAD_REQUEST,
            &format!("invalid agent name {:?}", req.name),
        );
    }
    let now = Instant::now();
    let name = if req.name.starts_with("http") {
        inner.sts_seq += 1;
        format!("sts-agent-{}", inner.sts_seq)
    } else {
        req.name.clone()
    };
    let clash: Vec<usize> = inner
        .agents
        .iter()
        .enumerate()
        .filter(|(_, a)| a.live() && a.info.name == name)
        .map(|(i, _)| i)
        .collect();
    for i in clash {
        s.drop_agent(&mut inner, i, Some("replaced"), now);
    }
    let token = random_hex(40);
    inner.agents.push(AgentRec {
        info: AgentInfo {
            name: name.clone(),
            state: AgentState::Idle,
            single_job: req.single_job,
            idle_timeout: u64::try_from(req.idle_timeout).unwrap_or(0),
            interruption_grace_period: u64::try_from(req.interruption_grace_period).unwrap_or(0),
            version: req.version,
            pid: req.pid,
            os: req.os,
            arch: req.arch,
            hostname: req.hostname,
            registered_at: now,
            registered_ms: s.ms(now),
            last_sync_ms: None,
            syncs: 0,
            job: None,
            interrupted: false,
            disconnect_requested: false,
            shutdown_reason: None,
            disconnected: None,
        },
        token: token.clone(),
        idle_since: now,
        last_sync: now,
        interrupted_seen: None,
    });
    drop(inner);
    s.emit(HubEvent::AgentRegistered { name: name.clone() });
    (StatusCode::CREATED, Json(RegisterResponse { name, token })).into_response()
}

/// Finds the live agent for an access token.
fn agent_index(inner: &Inner, headers: &HeaderMap) -> Option<usize> {
    let token = auth_token(headers)?;
    inner
        .agents
        .iter()
        .position(|a| a.live() && a.token == token)
}

async fn sync(State(s): S, headers: HeaderMap, body: Bytes) -> Response {
    let mut inner = s.state();
    if inner.api_outage {
        return outage();
    }
    let Some(idx) = agent_index(&inner, &headers) else {
        return message(StatusCode::UNAUTHORIZED, "unauthorized");
    };
    let req: SyncRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return message(StatusCode::BAD_REQUEST, &format!("bad request: {e}")),
    };
    let mut answer = s.sync(&mut inner, idx, &req, Instant::now());
    answer.next_sync_after = s.opts.pick_next_sync_after();
    (StatusCode::OK, Json(answer)).into_response()
}

async fn get_job(State(s): S, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let mut inner = s.state();
    if inner.api_outage {
        return outage();
    }
    let Some(idx) = agent_index(&inner, &headers) else {
        return message(StatusCode::UNAUTHORIZED, "unauthorized");
    };
    let name = inner.agents[idx].info.name.clone();
    let Some(job) = inner
        .jobs
        .iter()
        .find(|j| j.id == id && j.agent.as_deref() == Some(name.as_str()))
    else {
        return message(StatusCode::NOT_FOUND, "job not found");
    };
    let mut payload = job_payload(job);
    let tokens = inner.log_tokens.entry(id.clone()).or_default();
    if tokens.is_empty() {
        tokens.push(random_hex(32));
    }
    let token = tokens.last().cloned().unwrap_or_default();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    payload.logger = Some(JobLogger {
        method: "push".into(),
        url: format!("http://{host}{LOGS_BASE}/{id}"),
        token,
    });
    Json(payload).into_response()
}

/// The payload served for a job (see [`JobPayload`]).
pub fn job_payload(job: &JobInfo) -> JobPayload {
    let mut env_vars = vec![EnvVar {
        name: "SEMAPHORE_JOB_ID".into(),
        value: base64_encode(job.id.as_bytes()),
    }];
    env_vars.extend(job.spec.env.iter().map(|(k, v)| EnvVar {
        name: k.clone(),
        value: base64_encode(v.as_bytes()),
    }));
    JobPayload {
        id: job.id.clone(),
        job_id: job.id.clone(),
        executor: "shell".into(),
        commands: job
            .spec
            .commands
            .iter()
            .map(|c| Command {
                directive: c.clone(),
            })
            .collect(),
        env_vars,
        epilogue_always_commands: commands(&job.epilogues.epilogue_always_commands),
        epilogue_on_pass_commands: commands(&job.epilogues.epilogue_on_pass_commands),
        epilogue_on_fail_commands: commands(&job.epilogues.epilogue_on_fail_commands),
        ..JobPayload::default()
    }
}

fn commands(c: &[String]) -> Vec<Command> {
    c.iter()
        .map(|d| Command {
            directive: d.clone(),
        })
        .collect()
}

async fn disconnect(State(s): S, headers: HeaderMap) -> Response {
    let mut inner = s.state();
    if inner.api_outage {
        return outage();
    }
    let Some(idx) = agent_index(&inner, &headers) else {
        return message(StatusCode::UNAUTHORIZED, "unauthorized");
    };
    s.drop_agent(&mut inner, idx, None, Instant::now());
    (StatusCode::OK, Json(serde_json::json!({}))).into_response()
}

fn json_body(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

async fn metrics(State(s): S, headers: HeaderMap) -> Response {
    let (fault, down) = {
        let mut inner = s.state();
        inner.metrics_polls += 1;
        let ms = s.ms(Instant::now());
        inner.metrics_poll_ms.push(ms);
        (inner.fault.clone(), inner.metrics_outage)
    };
    s.emit(HubEvent::MetricsPolled);
    if down {
        return outage();
    }
    match fault {
        Some(Fault::Unauthorized) => return message(StatusCode::UNAUTHORIZED, "unauthorized"),
        Some(Fault::TooMany { retry_after_secs }) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, retry_after_secs.to_string())],
                Json(serde_json::json!({ "message": "too many requests" })),
            )
                .into_response();
        }
        Some(Fault::ServerError) => {
            return message(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
        }
        Some(Fault::Slow { ms }) => tokio::time::sleep(Duration::from_millis(ms)).await,
        _ => {}
    }
    let inner = s.state();
    if auth_token(&headers).as_deref() != Some(inner.registration_token.as_str()) {
        return message(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let m = s.metrics(&inner);
    drop(inner);
    match fault {
        Some(Fault::MalformedJson) => json_body(
            StatusCode::OK,
            format!(
                "{{\"jobs\":{{\"queued\":{} \"running\":{}}}}}",
                m.jobs.queued, m.jobs.running
            ),
        ),
        Some(Fault::PartialJson) => json_body(
            StatusCode::OK,
            format!("{{\"jobs\":{{\"queued\":{}", m.jobs.queued),
        ),
        _ => Json(m).into_response(),
    }
}

async fn control_jobs(State(s): S, body: Bytes) -> Response {
    #[derive(Deserialize)]
    struct ControlJob {
        #[serde(flatten)]
        spec: JobSpec,
        #[serde(flatten)]
        epilogues: Epilogues,
    }
    match serde_json::from_slice::<ControlJob>(&body) {
        Ok(j) => Json(serde_json::json!({ "id": s.enqueue(j.spec, j.epilogues) })).into_response(),
        Err(e) => message(StatusCode::BAD_REQUEST, &format!("bad job spec: {e}")),
    }
}

/// `POST /control/logs` `{"expire_tokens": true, "max_events_per_job": N}` (either
/// may be left out).
async fn control_logs(State(s): S, body: Bytes) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Parts {
        #[serde(default)]
        expire_tokens: bool,
        max_events_per_job: Option<u64>,
    }
    match serde_json::from_slice::<Parts>(&body) {
        Ok(p) => {
            let mut inner = s.lock();
            if p.expire_tokens {
                for tokens in inner.log_tokens.values_mut() {
                    tokens.clear();
                }
            }
            if let Some(max) = p.max_events_per_job {
                inner.max_log_events = max;
            }
            (StatusCode::OK, Json(serde_json::json!({ "ok": true }))).into_response()
        }
        Err(e) => message(
            StatusCode::BAD_REQUEST,
            &format!("expected {{\"expire_tokens\": bool, \"max_events_per_job\": N}}: {e}"),
        ),
    }
}

/// `POST /refresh` (access token): a new token for the log of the agent's current job.
async fn refresh_log_token(State(s): S, headers: HeaderMap) -> Response {
    let mut inner = s.state();
    if inner.api_outage {
        return outage();
    }
    let Some(idx) = agent_index(&inner, &headers) else {
        return message(StatusCode::UNAUTHORIZED, "unauthorized");
    };
    let Some(job) = inner.agents[idx].info.job.clone() else {
        return message(StatusCode::NOT_FOUND, "the agent has no job");
    };
    let token = random_hex(32);
    inner
        .log_tokens
        .entry(job.clone())
        .or_default()
        .push(token.clone());
    if let Some(j) = inner.jobs.iter_mut().find(|j| j.id == job) {
        j.log_token_refreshes += 1;
    }
    Json(RefreshTokenResponse { token }).into_response()
}

async fn control_state(State(s): S) -> Response {
    Json(s.snapshot()).into_response()
}

async fn control_disconnect(State(s): S, Path(name): Path<String>) -> Response {
    if s.disconnect_by_name(&name) {
        (StatusCode::OK, Json(serde_json::json!({ "ok": true }))).into_response()
    } else {
        message(StatusCode::NOT_FOUND, "no live agent with that name")
    }
}

async fn control_fault(State(s): S, body: Bytes) -> Response {
    match serde_json::from_slice::<Option<Fault>>(&body) {
        Ok(f) => {
            s.lock().fault = f;
            (StatusCode::OK, Json(serde_json::json!({ "ok": true }))).into_response()
        }
        Err(e) => message(StatusCode::BAD_REQUEST, &format!("bad fault: {e}")),
    }
}

async fn control_token(State(s): S, body: Bytes) -> Response {
    let token = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::String(t)) => t,
        Ok(v) => match v.get("token").and_then(|t| t.as_str()) {
            Some(t) => t.to_string(),
            None => return message(StatusCode::BAD_REQUEST, "expected {\"token\": \"…\"}"),
        },
        Err(_) => String::from_utf8_lossy(&body).trim().to_string(),
    };
    if token.is_empty() {
        return message(StatusCode::BAD_REQUEST, "empty token");
    }
    s.lock().registration_token = token;
    (StatusCode::OK, Json(serde_json::json!({ "ok": true }))).into_response()
}

async fn control_outage(State(s): S, body: Bytes) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Parts {
        agent_api: Option<bool>,
        metrics: Option<bool>,
    }
    if let Ok(on) = serde_json::from_slice::<bool>(&body) {
        s.lock().api_outage = on;
        return (StatusCode::OK, Json(serde_json::json!({ "ok": true }))).into_response();
    }
    match serde_json::from_slice::<Parts>(&body) {
        Ok(p) => {
            let mut inner = s.lock();
            if let Some(on) = p.agent_api {
                inner.api_outage = on;
            }
            if let Some(on) = p.metrics {
                inner.metrics_outage = on;
            }
            (StatusCode::OK, Json(serde_json::json!({ "ok": true }))).into_response()
        }
        Err(e) => message(
            StatusCode::BAD_REQUEST,
            &format!("expected true/false or {{\"agent_api\": bool, \"metrics\": bool}}: {e}"),
        ),
    }
}

/// `POST /api/v1/logs/{id}?start_from=N`: JSON event lines (see the module docs).
async fn push_logs(
    State(s): S,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_string);
    let start_from = query.get("start_from").and_then(|v| v.parse::<u64>().ok());
    let at_ms = s.ms(Instant::now());
    let mut inner = s.lock();
    let max = inner.max_log_events;
    let token_ok = match (&bearer, inner.log_tokens.get(&id)) {
        (Some(b), Some(valid)) => valid.iter().any(|t| t == b),
        _ => false,
    };
    let Some(job) = inner.jobs.iter_mut().find(|j| j.id == id) else {
        return message(StatusCode::NOT_FOUND, "no such job");
    };
    let mut push = LogPush {
        start_from,
        events: 0,
        appended: 0,
        status: 200,
        at_ms,
    };
    let answer = |job: &mut JobInfo, push: LogPush, status: StatusCode, msg: &str| {
        job.log_pushes.push(LogPush {
            status: status.as_u16(),
            ..push
        });
        message(status, msg)
    };
    // As the agent's own mock log service: log space first, then the token.
    if max > 0 && job.log_events.len() as u64 >= max {
        job.log_trimmed = true;
        return answer(
            job,
            push,
            StatusCode::UNPROCESSABLE_ENTITY,
            "no more space for this job's logs",
        );
    }
    if !token_ok {
        return answer(job, push, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let text = String::from_utf8_lossy(&body);
    let mut events = Vec::new();
    for line in text.split('\n').filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) if v.get("event").and_then(|e| e.as_str()).is_some() => events.push(v),
            _ => {
                push.events = events.len() as u64;
                return answer(
                    job,
                    push,
                    StatusCode::BAD_REQUEST,
                    &format!("not a JSON log event: {line:?}"),
                );
            }
        }
    }
    push.events = events.len() as u64;
    let Some(start) = start_from else {
        return answer(
            job,
            push,
            StatusCode::BAD_REQUEST,
            "start_from must be a non-negative integer",
        );
    };
    let have = job.log_events.len() as u64;
    if start > have {
        // A gap: events [have, start) never arrived. The agent only moves start_from
        // on a 200, so this is not a real agent's push; refuse it and keep the log whole.
        return answer(
            job,
            push,
            StatusCode::CONFLICT,
            &format!("start_from {start} is past the {have} events received"),
        );
    }
    // A re-sent batch (start < have): the events already stored are skipped.
    let skip = usize::try_from(have - start).unwrap_or(usize::MAX);
    for ev in events.into_iter().skip(skip) {
        job.log_events.push(ev);
        push.appended += 1;
    }
    job.output = output_lines(&job.log_events);
    job.log_pushes.push(push);
    (StatusCode::OK, Json(serde_json::json!({ "ok": true }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode as Status;

    const REG: &str = "reg-token";

    struct Api {
        http: reqwest::Client,
        base: String,
    }

    impl Api {
        fn new(hub: &Hub) -> Api {
            Api {
                http: {
                    agent_supervisor::tls::install_crypto_provider();
                    reqwest::Client::builder()
                }
                .no_proxy()
                .build()
                .expect("http client"),
                base: format!("{}{API_BASE}", hub.base_url()),
            }
        }

        /// `GET /jobs/{id}` with an access token.
        async fn job(&self, token: &str, id: &str) -> JobPayload {
            self.http
                .get(format!("{}/jobs/{id}", self.base))
                .header("Authorization", format!("Token {token}"))
                .send()
                .await
                .expect("get job")
                .json()
                .await
                .expect("job json")
        }

        async fn register_raw(
            &self,
            token: Option<&str>,
            body: serde_json::Value,
        ) -> reqwest::Response {
            let mut req = self
                .http
                .post(format!("{}/register", self.base))
                .json(&body);
            if let Some(t) = token {
                req = req.header("Authorization", format!("Token {t}"));
            }
            req.send().await.expect("register request")
        }

        async fn register(&self, name: &str, extra: serde_json::Value) -> RegisterResponse {
            let mut body = serde_json::json!({
                "name": name, "version": "v2.4.0", "pid": 1, "os": "linux", "arch": "x86_64",
                "hostname": "test", "single_job": false, "idle_timeout": 0,
                "interruption_grace_period": 0, "job_id": ""
            });
            if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                for (k, v) in e {
                    b.insert(k.clone(), v.clone());
                }
            }
            let resp = self.register_raw(Some(REG), body).await;
            assert_eq!(resp.status(), Status::CREATED);
            resp.json().await.expect("register body")
        }

        async fn sync_raw(&self, token: &str, req: &SyncRequest) -> reqwest::Response {
            self.http
                .post(format!("{}/sync", self.base))
                .header("Authorization", format!("Token {token}"))
                .json(req)
                .send()
                .await
                .expect("sync request")
        }

        async fn sync(
            &self,
            token: &str,
            state: &str,
            job_id: &str,
            result: &str,
            interrupted_at: i64,
        ) -> SyncResponse {
            let req = SyncRequest {
                state: state.into(),
                job_id: job_id.into(),
                job_result: result.into(),
                interrupted_at,
            };
            let resp = self.sync_raw(token, &req).await;
            assert_eq!(resp.status(), Status::OK);
            resp.json().await.expect("sync body")
        }

        async fn metrics(&self, token: Option<&str>) -> reqwest::Response {
            let mut req = self.http.get(format!("{}/metrics", self.base));
            if let Some(t) = token {
                req = req.header("Authorization", format!("Token {t}"));
            }
            req.send().await.expect("metrics request")
        }

        async fn disconnect(&self, token: &str) -> Status {
            self.http
                .post(format!("{}/disconnect", self.base))
                .header("Authorization", format!("Token {token}"))
                .send()
                .await
                .expect("disconnect request")
                .status()
        }
    }

    async fn hub() -> Hub {
        Hub::start(HubOptions::default()).await.expect("hub starts")
    }

    fn now_unix() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(1)
    }

    #[test]
    fn base64_round_trip() {
        for s in ["", "a", "ab", "abc", "abcd", "hello=world", "ü€"] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(base64_decode(&e).as_deref(), Some(s.as_bytes()), "{s}");
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert_eq!(base64_decode("!!"), None);
    }

    #[test]
    fn agent_names() {
        assert!(valid_agent_name("agent-01"));
        assert!(valid_agent_name("a/b+c_d-e"));
        assert!(!valid_agent_name("short"));
        assert!(!valid_agent_name("has space in it"));
        assert!(!valid_agent_name(&"x".repeat(81)));
        assert!(valid_agent_name(
            "https://sts.amazonaws.com/?Action=GetCallerIdentity"
        ));
    }

    #[tokio::test]
    async fn register_good_and_bad() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let mut events = hub.subscribe();
        let body = serde_json::json!({"name": "agent-one"});
        assert_eq!(
            api.register_raw(Some("wrong"), body.clone()).await.status(),
            Status::NOT_FOUND
        );
        assert_eq!(
            api.register_raw(None, body.clone()).await.status(),
            Status::UNAUTHORIZED
        );
        let bad = serde_json::json!({"name": "short"});
        assert_eq!(
            api.register_raw(Some(REG), bad).await.status(),
            Status::BAD_REQUEST
        );
        let bad = serde_json::json!({"name": "bad name!"});
        assert_eq!(
            api.register_raw(Some(REG), bad).await.status(),
            Status::BAD_REQUEST
        );
        assert!(hub.agents().is_empty());

        let r = api.register("agent-one", serde_json::json!({"single_job": true, "idle_timeout": 30, "interruption_grace_period": 7})).await;
        assert_eq!(r.name, "agent-one");
        assert!(!r.token.is_empty());
        let agents = hub.agents();
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].state, AgentState::Idle);
        assert!(agents[0].single_job);
        assert_eq!(agents[0].idle_timeout, 30);
        assert_eq!(agents[0].interruption_grace_period, 7);
        assert_eq!(agents[0].disconnected, None);
        assert_eq!(
            events.recv().await.ok(),
            Some(HubEvent::AgentRegistered {
                name: "agent-one".into()
            })
        );

        // URL name (server-verified STS name).
        let r = api
            .register(
                "https://sts.amazonaws.com/?Action=GetCallerIdentity",
                serde_json::json!({}),
            )
            .await;
        assert_eq!(r.name, "sts-agent-1");

        // Same name again replaces the live one.
        let r2 = api.register("agent-one", serde_json::json!({})).await;
        assert_ne!(r2.token, r.token);
        let a = hub.agents();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].disconnected.as_deref(), Some("replaced"));
        assert_eq!(hub.live_agents().len(), 2);
    }

    #[tokio::test]
    async fn job_assignment_and_payload() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let r = api.register("agent-jobs", serde_json::json!({})).await;
        let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
        assert_eq!(s.action, "continue");
        assert_eq!(s.next_sync_after, 200);

        let mut events = hub.subscribe();
        let id = hub.enqueue_job(JobSpec {
            commands: vec!["echo hi".into(), "true".into()],
            env: vec![("FOO".into(), "a=b c".into())],
        });
        assert_eq!(hub.metrics().jobs.queued, 1);
        let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
        assert_eq!(
            (s.action.as_str(), s.job_id.as_str()),
            ("run-job", id.as_str())
        );
        let m = hub.metrics();
        assert_eq!(
            (
                m.jobs.queued,
                m.jobs.running,
                m.agents.idle,
                m.agents.occupied
            ),
            (0, 1, 0, 1)
        );
        assert_eq!(hub.agents()[0].state, AgentState::Busy);

        // Lost response: still waiting -> same job again.
        let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
        assert_eq!(
            (s.action.as_str(), s.job_id.as_str()),
            ("run-job", id.as_str())
        );

        let payload = api.job(&r.token, &id).await;
        assert_eq!(payload.id, id);
        assert_eq!(payload.job_id, id);
        assert_eq!(payload.commands[0].directive, "echo hi");
        assert_eq!(payload.env_vars[0].name, "SEMAPHORE_JOB_ID");
        assert_eq!(payload.env_vars[1].name, "FOO");
        assert_eq!(
            base64_decode(&payload.env_vars[1].value).as_deref(),
            Some(b"a=b c".as_slice())
        );
        let other = api
            .http
            .get(format!("{}/jobs/nope", api.base))
            .header("Authorization", format!("Token {}", r.token))
            .send()
            .await
            .expect("get job");
        assert_eq!(other.status(), Status::NOT_FOUND);

        assert_eq!(
            api.sync(&r.token, "starting-job", &id, "", 0).await.action,
            "continue"
        );
        assert_eq!(
            api.sync(&r.token, "running-job", &id, "", 0).await.action,
            "continue"
        );
        let s = api.sync(&r.token, "finished-job", &id, "passed", 0).await;
        assert_eq!(s.action, "wait-for-jobs");
        let job = hub.job(&id).expect("job");
        assert_eq!(job.state, JobState::Finished);
        assert_eq!(job.result.as_deref(), Some("passed"));
        assert_eq!(job.agent.as_deref(), Some("agent-jobs"));
        assert!(job.started_at.is_some() && job.finished_at.is_some());
        // Repeated finished-job is harmless.
        assert_eq!(
            api.sync(&r.token, "finished-job", &id, "passed", 0)
                .await
                .action,
            "wait-for-jobs"
        );
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "continue"
        );

        let mut seen = Vec::new();
        while let Ok(ev) = events.try_recv() {
            seen.push(ev);
        }
        assert_eq!(
            seen,
            vec![
                HubEvent::JobQueued { id: id.clone() },
                HubEvent::JobStarted {
                    id: id.clone(),
                    agent: "agent-jobs".into()
                },
                HubEvent::JobFinished {
                    id: id.clone(),
                    agent: "agent-jobs".into(),
                    result: "passed".into()
                },
            ]
        );
        let m = hub.metrics();
        assert_eq!(
            (
                m.jobs.queued,
                m.jobs.running,
                m.agents.idle,
                m.agents.occupied
            ),
            (0, 0, 1, 0)
        );
    }

    #[tokio::test]
    async fn single_job_agent_shuts_down_after_its_job() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let r = api
            .register("agent-single", serde_json::json!({"single_job": true}))
            .await;
        let id = hub.enqueue_job(JobSpec::default());
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "run-job"
        );
        let s = api.sync(&r.token, "finished-job", &id, "failed", 0).await;
        assert_eq!(
            (s.action.as_str(), s.shutdown_reason.as_str()),
            ("shutdown", "job-finished")
        );
        assert_eq!(
            hub.job(&id).and_then(|j| j.result).as_deref(),
            Some("failed")
        );
        assert_eq!(hub.agents()[0].state, AgentState::ShuttingDown);
        // Sticky.
        let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
        assert_eq!(s.shutdown_reason, "job-finished");
        assert_eq!(api.disconnect(&r.token).await, Status::OK);
        let a = &hub.agents()[0];
        assert_eq!(a.state, AgentState::Gone);
        assert_eq!(a.disconnected.as_deref(), Some("job-finished"));
        assert!(hub.live_agents().is_empty());
        let resp = api.sync_raw(&r.token, &SyncRequest::default()).await;
        assert_eq!(resp.status(), Status::UNAUTHORIZED);
        assert_eq!(api.disconnect(&r.token).await, Status::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn idle_agent_is_shut_down_by_the_server() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let r = api
            .register("agent-idle", serde_json::json!({"idle_timeout": 1}))
            .await;
        let never = api
            .register("agent-never", serde_json::json!({"idle_timeout": 0}))
            .await;
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "continue"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
        assert_eq!(
            (s.action.as_str(), s.shutdown_reason.as_str()),
            ("shutdown", "idle")
        );
        assert_eq!(
            api.sync(&never.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "continue"
        );
    }

    #[tokio::test]
    async fn idle_time_counts_from_the_end_of_the_last_job() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let r = api
            .register("agent-idle2", serde_json::json!({"idle_timeout": 1}))
            .await;
        let id = hub.enqueue_job(JobSpec::default());
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "run-job"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            api.sync(&r.token, "running-job", &id, "", 0).await.action,
            "continue"
        );
        assert_eq!(
            api.sync(&r.token, "finished-job", &id, "passed", 0)
                .await
                .action,
            "wait-for-jobs"
        );
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "continue"
        );
    }

    #[tokio::test]
    async fn requested_disconnect() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let r = api.register("agent-req1", serde_json::json!({})).await;
        let busy = api.register("agent-req2", serde_json::json!({})).await;
        let id = hub.enqueue_job(JobSpec::default());
        assert_eq!(
            api.sync(&busy.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "run-job"
        );

        assert!(hub.disconnect_agent("agent-req1"));
        assert!(!hub.disconnect_agent("agent-nobody"));
        let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
        assert_eq!(
            (s.action.as_str(), s.shutdown_reason.as_str()),
            ("shutdown", "requested")
        );

        // Through the control API; a busy agent finishes its job first.
        let url = format!("{}/control/agents/agent-req2/disconnect", hub.base_url());
        assert_eq!(
            api.http.post(&url).send().await.expect("control").status(),
            Status::OK
        );
        let url = format!("{}/control/agents/agent-nobody/disconnect", hub.base_url());
        assert_eq!(
            api.http.post(&url).send().await.expect("control").status(),
            Status::NOT_FOUND
        );
        assert_eq!(
            api.sync(&busy.token, "running-job", &id, "", 0)
                .await
                .action,
            "continue"
        );
        let s = api
            .sync(&busy.token, "finished-job", &id, "passed", 0)
            .await;
        assert_eq!(
            (s.action.as_str(), s.shutdown_reason.as_str()),
            ("shutdown", "requested")
        );
    }

    #[tokio::test]
    async fn interrupted_while_idle() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let r = api
            .register(
                "agent-int1",
                serde_json::json!({"interruption_grace_period": 60}),
            )
            .await;
        hub.enqueue_job(JobSpec::default());
        let s = api
            .sync(&r.token, "waiting-for-jobs", "", "", now_unix())
            .await;
        assert_eq!(
            (s.action.as_str(), s.shutdown_reason.as_str()),
            ("shutdown", "interrupted")
        );
        assert_eq!(
            hub.metrics().jobs.queued,
            1,
            "an interrupted agent gets no job"
        );
        assert!(hub.agents()[0].interrupted);
    }

    #[tokio::test]
    async fn interrupted_while_running_stops_the_job_after_the_grace_period() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let mut events = hub.subscribe();
        let r = api
            .register(
                "agent-int2",
                serde_json::json!({"interruption_grace_period": 1}),
            )
            .await;
        let id = hub.enqueue_job(JobSpec::default());
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "run-job"
        );
        let at = now_unix();
        assert_eq!(
            api.sync(&r.token, "running-job", &id, "", at).await.action,
            "continue"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            api.sync(&r.token, "running-job", &id, "", at).await.action,
            "continue"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        let s = api.sync(&r.token, "running-job", &id, "", at).await;
        assert_eq!(
            (s.action.as_str(), s.job_id.as_str()),
            ("stop-job", id.as_str())
        );
        assert_eq!(hub.job(&id).map(|j| j.state), Some(JobState::Stopping));
        assert_eq!(hub.metrics().jobs.running, 1);
        assert_eq!(
            api.sync(&r.token, "stopping-job", &id, "", at).await.action,
            "continue"
        );
        let s = api.sync(&r.token, "finished-job", &id, "stopped", at).await;
        assert_eq!(
            (s.action.as_str(), s.shutdown_reason.as_str()),
            ("shutdown", "interrupted")
        );
        let job = hub.job(&id).expect("job");
        assert_eq!(
            (job.state, job.result.as_deref()),
            (JobState::Finished, Some("stopped"))
        );
        assert_eq!(api.disconnect(&r.token).await, Status::OK);
        assert_eq!(hub.agents()[0].disconnected.as_deref(), Some("interrupted"));
        let mut shutdowns = Vec::new();
        while let Ok(ev) = events.try_recv() {
            if let HubEvent::AgentShutdown { reason, .. } = ev {
                shutdowns.push(reason);
            }
        }
        assert_eq!(shutdowns, vec!["interrupted".to_string()]);
    }

    #[tokio::test]
    async fn interrupted_with_zero_grace_stops_at_once() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let r = api.register("agent-int3", serde_json::json!({})).await;
        let id = hub.enqueue_job(JobSpec::default());
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "run-job"
        );
        let s = api.sync(&r.token, "running-job", &id, "", now_unix()).await;
        assert_eq!(s.action, "stop-job");
    }

    #[tokio::test]
    async fn metrics_counts_and_auth() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let a = api.register("agent-m-1", serde_json::json!({})).await;
        let _b = api.register("agent-m-2", serde_json::json!({})).await;
        for _ in 0..3 {
            hub.enqueue_job(JobSpec::default());
        }
        assert_eq!(
            api.sync(&a.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "run-job"
        );
        let resp = api.metrics(Some(REG)).await;
        assert_eq!(resp.status(), Status::OK);
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(
            body,
            serde_json::json!({"jobs": {"queued": 2, "running": 1}, "agents": {"idle": 1, "occupied": 1}})
        );
        assert_eq!(
            api.metrics(Some("wrong")).await.status(),
            Status::UNAUTHORIZED
        );
        assert_eq!(api.metrics(None).await.status(), Status::UNAUTHORIZED);
        assert_eq!(hub.metrics_polls(), 3);
        assert_eq!(
            hub.metrics(),
            serde_json::from_value::<Metrics>(body).expect("metrics")
        );
    }

    #[tokio::test]
    async fn metrics_faults() {
        let hub = hub().await;
        let api = Api::new(&hub);
        hub.enqueue_job(JobSpec::default());
        hub.enqueue_job(JobSpec::default());
        hub.enqueue_job(JobSpec::default());

        hub.set_fault(Some(Fault::Unauthorized));
        assert_eq!(api.metrics(Some(REG)).await.status(), Status::UNAUTHORIZED);

        hub.set_fault(Some(Fault::TooMany {
            retry_after_secs: 7,
        }));
        let resp = api.metrics(Some(REG)).await;
        assert_eq!(resp.status(), Status::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("7")
        );

        hub.set_fault(Some(Fault::ServerError));
        assert_eq!(
            api.metrics(Some(REG)).await.status(),
            Status::INTERNAL_SERVER_ERROR
        );

        hub.set_fault(Some(Fault::Slow { ms: 300 }));
        let t = Instant::now();
        let resp = api.metrics(Some(REG)).await;
        assert_eq!(resp.status(), Status::OK);
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(resp.json::<Metrics>().await.is_ok());

        hub.set_fault(Some(Fault::MalformedJson));
        let resp = api.metrics(Some(REG)).await;
        assert_eq!(resp.status(), Status::OK);
        let text = resp.text().await.expect("text");
        assert!(
            serde_json::from_str::<serde_json::Value>(&text).is_err(),
            "{text}"
        );

        hub.set_fault(Some(Fault::PartialJson));
        let resp = api.metrics(Some(REG)).await;
        assert_eq!(resp.status(), Status::OK);
        let text = resp.text().await.expect("text");
        assert_eq!(text, r#"{"jobs":{"queued":3"#);

        // Through the control API, and back to healthy.
        let url = format!("{}/control/fault", hub.base_url());
        let resp = api
            .http
            .post(&url)
            .body(r#"{"TooMany":{"retry_after_secs":2}}"#)
            .send()
            .await
            .expect("fault");
        assert_eq!(resp.status(), Status::OK);
        assert_eq!(
            api.metrics(Some(REG)).await.status(),
            Status::TOO_MANY_REQUESTS
        );
        let resp = api
            .http
            .post(&url)
            .body("null")
            .send()
            .await
            .expect("fault");
        assert_eq!(resp.status(), Status::OK);
        assert_eq!(api.metrics(Some(REG)).await.status(), Status::OK);
        hub.set_fault(Some(Fault::ServerError));
        hub.set_fault(None);
        assert_eq!(api.metrics(Some(REG)).await.status(), Status::OK);
        assert_eq!(hub.metrics_polls(), 9);
    }

    #[tokio::test]
    async fn token_rotation() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let r = api.register("agent-rot1", serde_json::json!({})).await;
        hub.set_registration_token("new-token");
        let body = serde_json::json!({"name": "agent-rot2"});
        assert_eq!(
            api.register_raw(Some(REG), body.clone()).await.status(),
            Status::NOT_FOUND
        );
        assert_eq!(api.metrics(Some(REG)).await.status(), Status::UNAUTHORIZED);
        assert_eq!(api.metrics(Some("new-token")).await.status(), Status::OK);
        assert_eq!(
            api.register_raw(Some("new-token"), body).await.status(),
            Status::CREATED
        );
        // Registered agents keep working.
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "continue"
        );

        let url = format!("{}/control/token", hub.base_url());
        let resp = api
            .http
            .post(&url)
            .json(&serde_json::json!({"token": "third"}))
            .send()
            .await
            .expect("token");
        assert_eq!(resp.status(), Status::OK);
        assert_eq!(
            api.metrics(Some("new-token")).await.status(),
            Status::UNAUTHORIZED
        );
        assert_eq!(api.metrics(Some("third")).await.status(), Status::OK);
    }

    #[tokio::test]
    async fn control_api_jobs_and_state() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let url = format!("{}/control/jobs", hub.base_url());
        let spec = JobSpec {
            commands: vec!["sleep 1".into()],
            env: vec![("A".into(), "1".into())],
        };
        let resp: serde_json::Value = api
            .http
            .post(&url)
            .json(&spec)
            .send()
            .await
            .expect("post")
            .json()
            .await
            .expect("json");
        let id = resp["id"].as_str().expect("id").to_string();
        let _ = api.register("agent-ctl1", serde_json::json!({})).await;
        let state: HubState = api
            .http
            .get(format!("{}/control/state", hub.base_url()))
            .send()
            .await
            .expect("state")
            .json()
            .await
            .expect("state json");
        assert_eq!(state.jobs.len(), 1);
        assert_eq!(state.jobs[0].id, id);
        assert_eq!(state.jobs[0].spec, spec);
        assert_eq!(state.jobs[0].state, JobState::Queued);
        assert_eq!(state.agents[0].name, "agent-ctl1");
        assert_eq!(state.metrics.jobs.queued, 1);
        assert_eq!(state.metrics.agents.idle, 1);
        let bad = api
            .http
            .post(&url)
            .body("{not json")
            .send()
            .await
            .expect("post");
        assert_eq!(bad.status(), Status::BAD_REQUEST);
    }

    #[tokio::test]
    async fn stale_agents_are_dropped_and_their_job_fails() {
        let hub = Hub::start(HubOptions {
            stale_agent_after_ms: 200,
            ..HubOptions::default()
        })
        .await
        .expect("hub");
        let api = Api::new(&hub);
        let r = api.register("agent-stale", serde_json::json!({})).await;
        let id = hub.enqueue_job(JobSpec::default());
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "run-job"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(hub.agents()[0].disconnected.as_deref(), Some("stale"));
        assert_eq!(
            hub.job(&id).and_then(|j| j.result).as_deref(),
            Some("failed")
        );
        assert_eq!(
            api.sync_raw(&r.token, &SyncRequest::default())
                .await
                .status(),
            Status::UNAUTHORIZED
        );
    }

    #[tokio::test]
    async fn outage_and_stop() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let r = api.register("agent-out1", serde_json::json!({})).await;
        hub.set_api_outage(true);
        let resp = api.sync_raw(&r.token, &SyncRequest::default()).await;
        assert_eq!(resp.status(), Status::SERVICE_UNAVAILABLE);
        assert_eq!(api.metrics(Some(REG)).await.status(), Status::OK);
        hub.set_api_outage(false);
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "continue"
        );
        hub.stop().await;
        // Keep-alive connections are closed too.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = api.http.post(format!("{}/sync", api.base)).send().await;
        assert!(err.is_err(), "hub still answering after stop");
    }

    #[tokio::test]
    async fn down_as_a_whole_and_poll_times() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let r = api.register("agent-down1", serde_json::json!({})).await;
        hub.set_down(true);
        assert_eq!(
            api.metrics(Some(REG)).await.status(),
            Status::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            api.sync_raw(&r.token, &SyncRequest::default())
                .await
                .status(),
            Status::SERVICE_UNAVAILABLE
        );
        assert!(hub.state().metrics_outage && hub.state().api_outage);
        hub.set_down(false);
        assert_eq!(api.metrics(Some(REG)).await.status(), Status::OK);
        // Through the control API: metrics alone.
        let url = format!("{}/control/outage", hub.base_url());
        let resp = api
            .http
            .post(&url)
            .body(r#"{"metrics": true}"#)
            .send()
            .await
            .expect("outage");
        assert_eq!(resp.status(), Status::OK);
        assert_eq!(
            api.metrics(Some(REG)).await.status(),
            Status::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "continue"
        );
        let bad = api
            .http
            .post(&url)
            .body(r#"{"metric": true}"#)
            .send()
            .await
            .expect("outage");
        assert_eq!(bad.status(), Status::BAD_REQUEST);
        assert_eq!(hub.metrics_polls(), 3);
        let times = hub.metrics_poll_times();
        assert_eq!(times.len(), 3);
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
    }

    /// Registers, takes a job and reads its payload: (access token, job id, logger).
    async fn job_with_logger(api: &Api, hub: &Hub, name: &str) -> (String, String, JobLogger) {
        let r = api.register(name, serde_json::json!({})).await;
        let id = hub.enqueue_job(JobSpec::default());
        assert_eq!(
            api.sync(&r.token, "waiting-for-jobs", "", "", 0)
                .await
                .action,
            "run-job"
        );
        let payload = api.job(&r.token, &id).await;
        (r.token, id, payload.logger.expect("a logger"))
    }

    async fn push(api: &Api, logger: &JobLogger, token: &str, start: &str, body: &str) -> Status {
        api.http
            .post(format!("{}?start_from={start}", logger.url))
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "text/plain")
            .body(body.to_string())
            .send()
            .await
            .expect("push")
            .status()
    }

    fn out(o: &str) -> String {
        format!(
            "{}\n",
            serde_json::json!({"event": "cmd_output", "timestamp": 1, "output": o})
        )
    }

    fn ev(kind: &str, extra: serde_json::Value) -> String {
        let mut v = serde_json::json!({"event": kind, "timestamp": 1});
        if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        format!("{v}\n")
    }

    #[tokio::test]
    async fn job_logs_are_json_events_with_start_from() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let (_, id, logger) = job_with_logger(&api, &hub, "agent-logs1").await;
        assert_eq!(logger.method, "push");
        assert!(
            logger.url.ends_with(&format!("{LOGS_BASE}/{id}")),
            "{}",
            logger.url
        );
        let t = logger.token.clone();
        let first = format!(
            "{}{}{}{}",
            ev("job_started", serde_json::json!({})),
            ev("cmd_started", serde_json::json!({"directive": "echo one"})),
            out("one\r\ntw"),
            out("o\n"),
        );
        assert_eq!(
            push(&api, &logger, "wrong", "0", &first).await,
            Status::UNAUTHORIZED
        );
        assert_eq!(push(&api, &logger, &t, "0", &first).await, Status::OK);
        // The same batch again (a lost answer): nothing twice.
        assert_eq!(push(&api, &logger, &t, "0", &first).await, Status::OK);
        // Overlapping: two known, one new.
        let next = format!(
            "{}{}{}",
            out("o\n"),
            ev(
                "cmd_finished",
                serde_json::json!({"directive": "echo one", "exit_code": 0})
            ),
            ev(
                "cmd_started",
                serde_json::json!({"directive": "printf three"})
            ),
        );
        let overlap = format!("{}{next}", out("one\r\ntw"));
        assert_eq!(push(&api, &logger, &t, "2", &overlap).await, Status::OK);
        // A gap, no start_from, not JSON: refused, nothing stored.
        let later = format!(
            "{}{}",
            out("three"),
            ev("job_finished", serde_json::json!({"result": "passed"}))
        );
        assert_eq!(push(&api, &logger, &t, "9", &later).await, Status::CONFLICT);
        assert_eq!(
            push(&api, &logger, &t, "x", &later).await,
            Status::BAD_REQUEST
        );
        assert_eq!(
            push(&api, &logger, &t, "6", "plain text\n").await,
            Status::BAD_REQUEST
        );
        assert_eq!(hub.job_log_events(&id).len(), 6);
        assert_eq!(push(&api, &logger, &t, "6", &later).await, Status::OK);
        let job = hub.job(&id).expect("job");
        assert_eq!(job.log_events.len(), 8);
        assert_eq!(hub.job_output(&id), vec!["one", "two", "three"]);
        assert_eq!(job.logged_result().as_deref(), Some("passed"));
        assert_eq!(job.logged_directives(), vec!["echo one", "printf three"]);
        let statuses: Vec<u16> = job.log_pushes.iter().map(|p| p.status).collect();
        assert_eq!(statuses, vec![401, 200, 200, 200, 409, 400, 400, 200]);
        let appended: Vec<u64> = job.log_pushes.iter().map(|p| p.appended).collect();
        assert_eq!(appended, vec![0, 4, 0, 2, 0, 0, 0, 2]);
    }

    #[tokio::test]
    async fn an_expired_log_token_is_refreshed() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let (access, id, logger) = job_with_logger(&api, &hub, "agent-logs2").await;
        let batch = out("x\n");
        hub.expire_log_tokens();
        assert_eq!(
            push(&api, &logger, &logger.token, "0", &batch).await,
            Status::UNAUTHORIZED
        );
        let refresh = |token: String| {
            api.http
                .post(format!("{}/refresh", api.base))
                .header("Authorization", format!("Token {token}"))
                .send()
        };
        assert_eq!(
            refresh("nope".into()).await.expect("refresh").status(),
            Status::UNAUTHORIZED
        );
        let resp = refresh(access.clone()).await.expect("refresh");
        assert_eq!(resp.status(), Status::OK);
        let new: RefreshTokenResponse = resp.json().await.expect("json");
        assert_ne!(new.token, logger.token);
        assert_eq!(
            push(&api, &logger, &new.token, "0", &batch).await,
            Status::OK
        );
        assert_eq!(hub.job_output(&id), vec!["x"]);
        assert_eq!(hub.job(&id).map(|j| j.log_token_refreshes), Some(1));
        // Through the control API.
        let url = format!("{}/control/logs", hub.base_url());
        let resp = api
            .http
            .post(&url)
            .body(r#"{"expire_tokens": true}"#)
            .send()
            .await
            .expect("control");
        assert_eq!(resp.status(), Status::OK);
        assert_eq!(
            push(&api, &logger, &new.token, "1", &batch).await,
            Status::UNAUTHORIZED
        );
        // Without a job there is nothing to refresh.
        assert_eq!(
            api.sync(&access, "finished-job", &id, "passed", 0)
                .await
                .action,
            "wait-for-jobs"
        );
        assert_eq!(
            refresh(access).await.expect("refresh").status(),
            Status::NOT_FOUND
        );
    }

    #[tokio::test]
    async fn log_space_used_up_is_422() {
        let hub = Hub::start(HubOptions {
            max_log_events_per_job: 3,
            ..HubOptions::default()
        })
        .await
        .expect("hub");
        let api = Api::new(&hub);
        let (_, id, logger) = job_with_logger(&api, &hub, "agent-logs3").await;
        let t = &logger.token;
        let two = format!("{}{}", out("a\n"), out("b\n"));
        assert_eq!(push(&api, &logger, t, "0", &two).await, Status::OK);
        assert_eq!(push(&api, &logger, t, "2", &two).await, Status::OK);
        assert_eq!(hub.job_output(&id), vec!["a", "b", "a", "b"]);
        assert_eq!(
            push(&api, &logger, t, "4", &two).await,
            Status::UNPROCESSABLE_ENTITY
        );
        // Before the token check.
        assert_eq!(
            push(&api, &logger, "wrong", "4", &two).await,
            Status::UNPROCESSABLE_ENTITY
        );
        assert!(hub.job(&id).is_some_and(|j| j.log_trimmed));
        hub.set_max_log_events(0);
        assert_eq!(push(&api, &logger, t, "3", &two).await, Status::OK);
        assert_eq!(hub.job_log_events(&id).len(), 5, "one known, one new");
    }

    #[tokio::test]
    async fn sync_interval_range() {
        let hub = Hub::start(HubOptions::real_sync()).await.expect("hub");
        let api = Api::new(&hub);
        let r = api.register("agent-sync1", serde_json::json!({})).await;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
            assert!(
                (4000..=6000).contains(&s.next_sync_after),
                "{}",
                s.next_sync_after
            );
            seen.insert(s.next_sync_after);
        }
        assert!(seen.len() > 1, "random: {seen:?}");
        assert_eq!(HubOptions::default().next_sync_after_ms, 200);
    }

    #[tokio::test]
    async fn register_takes_any_integer_timeouts() {
        let hub = hub().await;
        let api = Api::new(&hub);
        api.register(
            "agent-neg1",
            serde_json::json!({"interruption_grace_period": -5, "idle_timeout": -1, "extra": 1}),
        )
        .await;
        let a = &hub.agents()[0];
        assert_eq!((a.idle_timeout, a.interruption_grace_period), (0, 0));
    }

    #[tokio::test]
    async fn epilogues_are_in_the_payload() {
        let hub = hub().await;
        let api = Api::new(&hub);
        let r = api.register("agent-epi1", serde_json::json!({})).await;
        let id = hub.enqueue_job_with_epilogues(
            JobSpec::default(),
            Epilogues {
                epilogue_always_commands: vec!["echo always".into()],
                epilogue_on_pass_commands: vec![],
                epilogue_on_fail_commands: vec!["echo failed".into()],
            },
        );
        api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
        let payload = api.job(&r.token, &id).await;
        assert_eq!(payload.epilogue_always_commands[0].directive, "echo always");
        assert_eq!(
            payload.epilogue_on_fail_commands[0].directive,
            "echo failed"
        );
        let url = format!("{}/control/jobs", hub.base_url());
        let resp = api
            .http
            .post(&url)
            .body(r#"{"commands":["true"],"epilogue_on_pass_commands":["echo ok"]}"#)
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), Status::OK);
        let jobs = hub.jobs();
        assert_eq!(jobs[1].epilogues.epilogue_on_pass_commands, vec!["echo ok"]);
    }
}
