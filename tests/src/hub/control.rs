//! The control API (`/control/…`, no auth): what tests in other processes use to queue
//! jobs, read the state and inject faults (see the module docs of [`crate::hub`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::http::{message, S};
use super::state::Shared;
use super::{Epilogues, Fault, JobSpec};

/// The control routes.
pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
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
        .route("/control/sts", post(control_sts))
}

/// `POST /control/sts` `{"endpoint": "http://127.0.0.1:PORT"}` (or `null`): see
/// [`Hub::verify_sts_names_with`](super::Hub::verify_sts_names_with).
async fn control_sts(State(s): S, body: Bytes) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sts {
        endpoint: Option<String>,
    }
    let endpoint = match serde_json::from_slice::<Sts>(&body) {
        Ok(Sts { endpoint: None }) => None,
        Ok(Sts { endpoint: Some(e) }) => match super::sts::endpoint(&e) {
            Ok(url) => Some(url),
            Err(e) => return message(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        Err(e) => {
            return message(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"endpoint\": \"http://127.0.0.1:PORT\" or null}}: {e}"),
            )
        }
    };
    s.lock().sts_endpoint = endpoint;
    (StatusCode::OK, Json(serde_json::json!({ "ok": true }))).into_response()
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
