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
//! | `POST /register` | registration | 201 `{name, token}`; no header 401, wrong token 404, bad body/name 400; a URL name while the emulator is unreachable 503 |
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
//! fails).
//!
//! A name that is a URL must be a pre-signed STS `GetCallerIdentity` URL for the
//! emulator the hub was given ([`Hub::verify_sts_names_with`], `POST /control/sts`): the
//! hub checks it, GETs it and names the agent `<last part of the ARN>__<hex>` (an
//! instance id on EC2); [`AgentInfo::verified`] keeps the ARN and account. What this
//! proves, and what it cannot (moto checks no signature): the `sts` module docs. A URL
//! name that fails is refused with 400 (503 when the emulator cannot be reached); with no
//! emulator given, every URL name is refused.
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
//! * `POST /control/sts` `{"endpoint": "http://127.0.0.1:PORT"}` or `{"endpoint": null}`:
//!   [`Hub::verify_sts_names_with`]
//! * `POST /control/outage` `true`/`false`: the agent API (register, sync,
//!   jobs, disconnect) answers 503 while on; `/metrics` is unaffected. Or
//!   `{"agent_api": bool, "metrics": bool}` (either may be left out): with
//!   `metrics` on, `GET /metrics` answers 503 too (counted in `metrics_polls`) —
//!   Semaphore down as a whole ([`Hub::set_down`]). Job log pushes are never
//!   refused by an outage (`/refresh` is: it is part of the agent API).
//!
//! # Layout
//!
//! [`Hub`] and [`HubOptions`] here; what the hub records and shows in `records`
//! ([`JobInfo`], [`AgentInfo`], [`HubState`], [`HubEvent`]…), its state and the sync
//! decision in `state`, the agent API and the job logs in `http`, the control API in
//! `control`. The wire types are [`crate::semaphore_wire`]'s, re-exported here.

mod control;
mod http;
mod records;
mod state;
mod sts;
#[cfg(test)]
mod tests;

pub use crate::semaphore_wire::{
    base64_decode, base64_encode, valid_agent_name, Command, EnvVar, JobLogger, JobPayload,
    RefreshTokenResponse, RegisterRequest, RegisterResponse, SyncRequest, SyncResponse, API_BASE,
    LOGS_BASE,
};
pub use http::job_payload;
pub use records::{
    output_lines, AgentInfo, AgentMetrics, AgentState, Epilogues, Fault, HubEvent, HubState,
    JobInfo, JobMetrics, JobSpec, JobState, LogPush, Metrics,
};
pub use sts::VerifiedIdentity;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use tokio::sync::broadcast;

use state::{AgentRec, Inner, Shared};

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
                sts_endpoint: None,
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

    /// Verify URL names (pre-signed STS `GetCallerIdentity`, see `sts`) against the
    /// emulator at `endpoint` (an http(s) URL on a loopback address: the hub fetches no
    /// other host); `None`: refuse them (the default).
    pub fn verify_sts_names_with(&self, endpoint: Option<&str>) -> anyhow::Result<()> {
        let url = endpoint.map(sts::endpoint).transpose()?;
        self.shared.lock().sts_endpoint = url;
        Ok(())
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

/// The agent API, the job logs and the control API, on one listener.
fn router(shared: Arc<Shared>) -> Router {
    http::routes().merge(control::routes()).with_state(shared)
}
