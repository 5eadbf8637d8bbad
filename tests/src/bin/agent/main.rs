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
//!
//! Layout: `main` picks the role (wrapper, child, re-run); `wrapper` is the wrapper
//! process; `listener` registers, syncs and shuts down; `job` runs a job on the shell
//! executor and `job_log` pushes its log; `api` is the agent API client; `config` reads
//! the config file, the command line and the `FAKE_AGENT_*` knobs; `log` writes the
//! agent's own log and the event file.

mod api;
mod config;
mod job;
mod job_log;
mod listener;
mod log;
#[cfg(test)]
mod tests;
mod wrapper;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, Notify};

use crate::config::{parse_args, parse_config, Knobs};
use crate::listener::run_agent;
use crate::log::{event, last_reason, log};
use crate::wrapper::wrapper_main;

const CHILD_ENV: &str = "FAKE_AGENT_CHILD";
const VERSION: &str = "v2.4.0-fake";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
