//! The agent proper, as the real agent's `pkg/listener`: registers, syncs, runs jobs,
//! shuts down (disconnect, then the shutdown hook).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_fleet_tests::semaphore_wire::SyncRequest;
use tokio::sync::{mpsc, Notify};

use crate::api::Api;
use crate::config::{Config, Knobs};
use crate::job::{run_job, JobCtx, Slot};
use crate::log::{banner, event, go_duration, log, set_last_reason, set_log_name, unix_now};
use crate::{lock, CHILD_ENV};

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
pub(crate) async fn run_agent(
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
