//! The agent API (`/api/v1/self_hosted_agents`) and the job logs (`/api/v1/logs/{id}`),
//! as the real server answers them (see the module docs of [`crate::hub`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::state::{random_hex, AgentRec, Inner, Shared};
use super::{
    base64_encode, output_lines, valid_agent_name, AgentInfo, AgentState, Command, EnvVar, Fault,
    HubEvent, JobInfo, JobLogger, JobPayload, LogPush, RefreshTokenResponse, RegisterRequest,
    RegisterResponse, SyncRequest, API_BASE, LOGS_BASE,
};

const LOGS_ROUTE: &str = "/api/v1/logs/{id}";

pub(super) type S = State<Arc<Shared>>;

/// The agent API and the job log routes.
pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(&format!("{API_BASE}/register"), post(register))
        .route(&format!("{API_BASE}/sync"), post(sync))
        .route(&format!("{API_BASE}/jobs/{{id}}"), get(get_job))
        .route(&format!("{API_BASE}/disconnect"), post(disconnect))
        .route(&format!("{API_BASE}/refresh"), post(refresh_log_token))
        .route(&format!("{API_BASE}/metrics"), get(metrics))
        .route(LOGS_ROUTE, post(push_logs))
}

fn auth_token(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let t = v.strip_prefix("Token ")?.trim();
    Some(t.to_string())
}

pub(super) fn message(status: StatusCode, msg: &str) -> Response {
    (status, Json(serde_json::json!({ "message": msg }))).into_response()
}

fn outage() -> Response {
    message(StatusCode::SERVICE_UNAVAILABLE, "service unavailable")
}

async fn register(State(s): S, headers: HeaderMap, body: Bytes) -> Response {
    let (req, sts_endpoint) = {
        let inner = s.state();
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
        (req, inner.sts_endpoint.clone())
    };
    let is_url = req.name.starts_with("https://") || req.name.starts_with("http://");
    if !valid_agent_name(&req.name) {
        // A URL is never quoted back: it may carry a session token.
        let shown = if is_url { "(a URL)" } else { req.name.as_str() };
        return message(
            StatusCode::BAD_REQUEST,
            &format!("invalid agent name {shown:?}"),
        );
    }
    // A URL name is verified before the hub's state is touched (the lock is not held
    // across the request to the emulator).
    let verified =
        match (is_url, sts_endpoint) {
            (false, _) => None,
            (true, None) => return message(
                StatusCode::BAD_REQUEST,
                "agent name is a URL, but this hub verifies no STS names (no STS endpoint given)",
            ),
            (true, Some(endpoint)) => {
                match super::sts::verify(&req.name, &endpoint, std::time::SystemTime::now()).await {
                    Ok(identity) => Some(identity),
                    Err(refusal) => return refusal.response(),
                }
            }
        };
    let name = match &verified {
        Some(identity) => identity.agent_name(&random_hex(6)),
        None => req.name.clone(),
    };
    let mut inner = s.state();
    if inner.api_outage {
        return outage();
    }
    let now = Instant::now();
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
            verified,
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
