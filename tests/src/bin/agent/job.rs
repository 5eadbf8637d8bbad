//! Running a job as the real shell executor does: one `bash` session, the env vars,
//! the hooks, the commands and epilogues (see the crate docs).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_fleet_tests::semaphore_wire::{base64_decode, Command, JobPayload};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};

use crate::api::Api;
use crate::config::{Config, Knobs};
use crate::job_log::JobLog;
use crate::log::{event, log, unix_now};
use crate::{lock, CHILD_ENV};

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
pub(crate) fn shell_quote(s: &str) -> String {
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
pub(crate) struct Slot {
    pub(crate) state: String,
    pub(crate) job_id: String,
    pub(crate) result: String,
    pub(crate) stopping: bool,
    /// Per-job stop signal (a fresh one for every job, so a stale permit
    /// never stops the next job).
    pub(crate) stop: Option<Arc<Notify>>,
}

pub(crate) struct JobCtx {
    pub(crate) api: Arc<Api>,
    pub(crate) cfg: Config,
    pub(crate) knobs: Knobs,
    pub(crate) slot: Arc<Mutex<Slot>>,
    /// Wakes the sync loop (the real agent's forced sync on a finished job).
    pub(crate) force_sync: Arc<Notify>,
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

pub(crate) async fn run_job(ctx: Arc<JobCtx>, id: String, stop: Arc<Notify>) {
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
