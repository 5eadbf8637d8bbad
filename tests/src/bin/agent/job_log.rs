//! A job's log, pushed to the hub as the real agent's HTTP log backend does (see the
//! crate docs).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use agent_fleet_tests::semaphore_wire::JobLogger;

use crate::api::{loopback_host, Api};
use crate::config::LogCadence;
use crate::lock;
use crate::log::{go_duration, log, unix_now};

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
pub(crate) struct JobLog {
    events: Arc<Mutex<Vec<String>>>,
    state: Arc<Mutex<PushState>>,
    pusher: Option<tokio::task::JoinHandle<()>>,
    cadence: LogCadence,
}

impl JobLog {
    pub(crate) fn start(api: Arc<Api>, logger: Option<JobLogger>, cadence: LogCadence) -> JobLog {
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

    pub(crate) fn job_started(&self) {
        self.write(serde_json::json!({"event": "job_started", "timestamp": unix_now()}));
    }

    pub(crate) fn job_finished(&self, result: &str) {
        self.write(
            serde_json::json!({"event": "job_finished", "timestamp": unix_now(), "result": result}),
        );
    }

    pub(crate) fn cmd_started(&self, directive: &str) {
        self.write(serde_json::json!({"event": "cmd_started", "timestamp": unix_now(), "directive": directive}));
    }

    pub(crate) fn cmd_output(&self, output: &str) {
        self.write(
            serde_json::json!({"event": "cmd_output", "timestamp": unix_now(), "output": output}),
        );
    }

    pub(crate) fn cmd_finished(&self, directive: &str, code: i32, started_at: i64) {
        self.write(serde_json::json!({
            "event": "cmd_finished", "timestamp": unix_now(), "directive": directive,
            "exit_code": code, "started_at": started_at, "finished_at": unix_now(),
        }));
    }

    /// Flushes: waits (polling) until everything is pushed, the log service refused
    /// more, or the flush timeout passed.
    pub(crate) async fn close(mut self) {
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
