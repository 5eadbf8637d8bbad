//! What the hub records and shows: jobs, agents, `/metrics`, faults, events, and the
//! `GET /control/state` snapshot.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// A job to enqueue: shell commands (run one after the other in one shell session by
/// the agents, until the first that fails) and job env vars. JSON:
/// `{"commands":["echo hi"],"env":[["K","V"]]}`. Epilogues:
/// [`Hub::enqueue_job_with_epilogues`](super::Hub::enqueue_job_with_epilogues).
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
    /// Disconnect requested through the control API /
    /// [`Hub::disconnect_agent`](super::Hub::disconnect_agent).
    pub disconnect_requested: bool,
    /// Reason sent with the `shutdown` action (lower-case wire form).
    pub shutdown_reason: Option<String>,
    /// Set once the agent is gone: the shutdown reason it was sent, or
    /// `unsolicited` (it called `/disconnect` on its own), `stale`, `replaced`.
    pub disconnected: Option<String>,
    /// For an agent that registered with a pre-signed STS URL: the identity STS answered
    /// with (its name is made from it).
    #[serde(default)]
    pub verified: Option<super::VerifiedIdentity>,
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
