//! The agent process: one owner, one process group.
//!
//! The agent binary is a wrapper that re-executes itself as a child; SIGKILL to the
//! wrapper alone would orphan a still-registered child. So the agent always starts in a
//! new process group and every signal goes to the whole group. SIGTERM is sent only
//! after the agent said it registered (before that, the real agent's child dies from it
//! and the wrapper registers a *new* agent); then grace; then SIGKILL to the group.
//!
//! Two things follow from the agent's output lines besides logging them:
//!
//! - **The token leaves `config.yaml`** as soon as the agent says it registered
//!   ([`REGISTERED_LINE`]): jobs run as the agent user, who can read the file. Should the
//!   agent's child die from a signal later, the real agent's wrapper re-runs the agent
//!   in-process, which reads the config again, finds no token and exits 1 — instead of
//!   silently registering a second agent. The supervisor then sees a crash after
//!   registration and restarts the agent (with backoff, counted towards replacing the
//!   instance), writing the token again.
//! - **The agent's shutdown is bounded.** The real agent runs its shutdown hook
//!   synchronously with no timeout, after up to 100 disconnect tries. Once the agent says
//!   it is shutting down ([`SHUTDOWN_BEGAN_LINES`]), it has [`shutdown_timeout`] to exit;
//!   then its group is killed, and if its hook never returned, the supervisor runs the
//!   hook in its place with the reason the agent logged, so the instance still ends as
//!   that reason says.

pub mod cgroup;
pub mod config_file;
pub mod containers;
pub mod netns;
pub mod owner;
pub mod presign;

use crate::telemetry::AGENT_TARGET;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Gid, Pid, Uid};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::Instrument;

/// The line after which the agent is registered and polling (agent's listener).
pub const REGISTERED_LINE: &str = "Starting to poll for jobs";

/// The line in which the agent logs a job handed to it: the real agent's
/// `SYNC response (action: run-job, job: <id>)` (pkg/listener/selfhostedapi/sync.go).
pub const JOB_ASSIGNED_LINE: &str = "SYNC response (action: run-job";

/// Lines (messages, after [`message_of`]) with which the agent starts shutting down, and
/// the reason each implies. The real agent logs the first two before it disconnects
/// from Semaphore (`pkg/listener/job_processor.go`); the wire form of the reason
/// follows `due to: `.
pub const SHUTDOWN_BEGAN_LINES: &[&str] = &[
    "Agent shutdown requested by Semaphore due to: ",
    "Unable to sync with Semaphore for over",
    "Disconnecting the Agent from Semaphore",
];

/// The agent's messages (after [`message_of`]) an operator needs in the journal at INFO:
/// registration, the jobs handed to it and their end, and its shutdown — the real agent's
/// wording (`pkg/listener`, `pkg/jobs`). Everything else it says (its 13-line banner,
/// three lines per sync, log pushing) goes to DEBUG: about 50,000 lines a day for an idle
/// agent at a 5 s sync. Lines that look like errors go to WARN ([`agent_line_level`]).
pub const OPERATOR_LINES: &[&str] = &[
    "Starting Agent",
    REGISTERED_LINE,
    JOB_ASSIGNED_LINE,
    "SYNC response (action: stop-job",
    "SYNC request (state: finished-job",
    "Running job",
    "Stopping job",
    "Regular commands",
    "Termination signal received",
    SHUTDOWN_BEGAN_LINES[0],
    SHUTDOWN_BEGAN_LINES[1],
    SHUTDOWN_BEGAN_LINES[2],
    "Disconnected.",
    "Executing shutdown hook",
    SHUTDOWN_DONE_LINE,
];

/// The journal level of one agent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineLevel {
    Warn,
    Info,
    Debug,
}

/// How loud an agent message is in the journal: error-looking lines at WARN (the agent's
/// log format carries no level), [`OPERATOR_LINES`] at INFO, the rest at DEBUG
/// (`AGENT_SUPERVISOR_LOG=info,agent=debug` shows them).
pub fn agent_line_level(message: &str) -> LineLevel {
    if looks_like_error(message) {
        LineLevel::Warn
    } else if OPERATOR_LINES.iter().any(|l| message.starts_with(l)) {
        LineLevel::Info
    } else {
        LineLevel::Debug
    }
}

fn looks_like_error(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    ["error", "failed", "fatal", "panic"]
        .iter()
        .any(|w| lower.contains(w))
}

/// The line the agent logs after its shutdown hook returned, with the hook's reason.
pub const SHUTDOWN_DONE_LINE: &str = "Agent shutting down due to: ";

/// The environment variable that bounds the agent's shutdown (seconds), see
/// [`shutdown_timeout`].
pub const SHUTDOWN_TIMEOUT_ENV: &str = "AGENT_SUPERVISOR_AGENT_SHUTDOWN_TIMEOUT_SECS";

/// How long the agent may take from the first of [`SHUTDOWN_BEGAN_LINES`] to its exit
/// by default. A healthy agent needs a second (one `/disconnect`; our hook returns at
/// once); one whose API is down retries `/disconnect` for up to ~100 s, and cutting
/// that short only skips calls that were failing anyway.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// The bound on the agent's shutdown: `$AGENT_SUPERVISOR_AGENT_SHUTDOWN_TIMEOUT_SECS`,
/// else [`DEFAULT_SHUTDOWN_TIMEOUT`]; at most [`MAX_SHUTDOWN_TIMEOUT`].
pub fn shutdown_timeout() -> Duration {
    parse_shutdown_timeout(std::env::var(SHUTDOWN_TIMEOUT_ENV).ok().as_deref())
}

/// The longest shutdown bound taken from the environment (a day): a larger value would
/// mean "never", and could overflow a deadline.
pub const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn parse_shutdown_timeout(value: Option<&str>) -> Duration {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_SHUTDOWN_TIMEOUT))
        .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT)
}

/// What a shutdown line says: `(began, reason)`; for [`SHUTDOWN_DONE_LINE`] `began` is
/// false (the hook returned).
fn shutdown_news(message: &str) -> Option<(bool, Option<ShutdownReason>)> {
    if let Some(r) = message.strip_prefix(SHUTDOWN_DONE_LINE) {
        return Some((false, Some(ShutdownReason::parse(r))));
    }
    let line = SHUTDOWN_BEGAN_LINES
        .iter()
        .position(|l| message.starts_with(l))?;
    let reason = match line {
        0 => message
            .strip_prefix(SHUTDOWN_BEGAN_LINES[0])
            .map(ShutdownReason::parse),
        1 => Some(ShutdownReason::UnableToSync),
        _ => None,
    };
    Some((true, reason))
}

/// The agent's shutdown, as its output tells it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Winding {
    /// When it first said it is shutting down.
    began_at: Option<Instant>,
    /// The reason it gave, if any.
    reason: Option<ShutdownReason>,
    /// It said its shutdown hook returned.
    hook_done: bool,
}

/// The job id of a [`JOB_ASSIGNED_LINE`].
pub fn assigned_job(line: &str) -> Option<&str> {
    let rest = &line[line.find(JOB_ASSIGNED_LINE)? + JOB_ASSIGNED_LINE.len()..];
    let id = rest.split_once("job: ")?.1;
    let id = id
        .split(|c: char| c == ')' || c == ',' || c.is_whitespace())
        .next()?;
    (!id.is_empty()).then_some(id)
}

/// What the agent said about itself so far, from its output lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// When it said it registered and polls for jobs.
    pub registered_at: Option<Instant>,
    /// When it was handed its first job.
    pub first_job_at: Option<Instant>,
    /// Jobs handed to it, and the last one's id.
    pub jobs: u32,
    pub last_job: Option<String>,
}

/// `SEMAPHORE_AGENT_SHUTDOWN_REASON`, as the agent hands it to its shutdown hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    Idle,
    JobFinished,
    Requested,
    Interrupted,
    UnableToSync,
    Unknown,
}

impl ShutdownReason {
    pub fn parse(s: &str) -> Self {
        match s.trim().to_ascii_uppercase().replace('-', "_").as_str() {
            "IDLE" => Self::Idle,
            "JOB_FINISHED" => Self::JobFinished,
            "REQUESTED" => Self::Requested,
            "INTERRUPTED" => Self::Interrupted,
            "UNABLE_TO_SYNC" => Self::UnableToSync,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "IDLE",
            Self::JobFinished => "JOB_FINISHED",
            Self::Requested => "REQUESTED",
            Self::Interrupted => "INTERRUPTED",
            Self::UnableToSync => "UNABLE_TO_SYNC",
            Self::Unknown => "UNKNOWN",
        }
    }
}

impl std::fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The unprivileged user the agent runs as.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups (docker, …), resolved before fork.
    pub groups: Vec<Gid>,
    pub home: PathBuf,
}

impl RunAs {
    /// Looks the user up. `None` when it is the current user: no switch needed.
    pub fn lookup(name: &str) -> Result<Option<Self>, String> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| format!("looking up agent user {name:?}: {e}"))?
            .ok_or_else(|| {
                format!("agent user {name:?} does not exist; fix: create it (the AMI's provisioning does) or pass --agent-user")
            })?;
        if user.uid == nix::unistd::geteuid() {
            return Ok(None);
        }
        let cname = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(|e| format!("reading groups of {name:?}: {e}"))?;
        Ok(Some(Self {
            name: name.to_string(),
            uid: user.uid,
            gid: user.gid,
            groups,
            // The agent starts in its home; a user without one (`nobody`) starts in `/`
            // rather than fail its exec with a misleading "No such file or directory".
            home: if user.dir.is_dir() {
                user.dir
            } else {
                PathBuf::from("/")
            },
        }))
    }
}

/// How to start the agent. `Debug` leaves out the token.
#[derive(Clone)]
pub struct Launch {
    pub binary: PathBuf,
    pub config_path: PathBuf,
    pub run_as: Option<RunAs>,
    /// The agent's whole environment: nothing of the daemon's leaks through.
    pub env: Vec<(String, String)>,
    pub agent_name: String,
    /// On each forwarded line (the journal's `INSTANCE_ID`).
    pub instance_id: String,
    /// Replaced by `[redacted]` in any forwarded line that contains it.
    pub secret: String,
    /// The shutdown hook the supervisor wrote and named in the agent's config. Run in the
    /// agent's place if the agent is killed before its hook returns; never read back from
    /// the config, which the agent user owns.
    pub shutdown_hook: Option<PathBuf>,
    /// The agent's own cgroup, joined before exec (see [`cgroup`]).
    pub cgroup: Option<cgroup::Joiner>,
    /// Under `strict`, rootless Docker's network namespace, joined before the privilege
    /// drop (see [`netns`]).
    pub netns: Option<netns::NetNs>,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("binary", &self.binary)
            .field("config_path", &self.config_path)
            .field("run_as", &self.run_as)
            .field("env", &self.env)
            .field("agent_name", &self.agent_name)
            .field("instance_id", &self.instance_id)
            .field("secret", &"[redacted]")
            .field("shutdown_hook", &self.shutdown_hook)
            .field("cgroup", &self.cgroup.is_some())
            .finish()
    }
}

/// A running agent and its process group.
pub struct RunningAgent {
    child: Child,
    pgid: Pid,
    pub pid: u32,
    progress: watch::Receiver<Progress>,
    winding: watch::Receiver<Winding>,
    last_error: Arc<Mutex<Option<String>>>,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
    /// [`Launch::shutdown_hook`].
    shutdown_hook: Option<PathBuf>,
    /// The user the agent runs as; its stand-in hook runs as that user too.
    run_as: Option<RunAs>,
    /// See [`shutdown_timeout`].
    shutdown_timeout: Duration,
    /// The group was killed because the agent overran its shutdown.
    overran: bool,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct AgentExit {
    pub status: ExitStatus,
    pub registered: bool,
    /// The agent's last error-looking output line, for messages.
    pub last_error: Option<String>,
}

impl RunningAgent {
    pub fn spawn(launch: &Launch) -> std::io::Result<Self> {
        let mut cmd = Command::new(&launch.binary);
        cmd.arg("start")
            .arg("--config-file")
            .arg(&launch.config_path)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        // First into its cgroup (as root), then down to the agent user.
        if let Some(cgroup) = &launch.cgroup {
            cgroup.join_on_spawn(&mut cmd);
        }
        if let Some(ns) = &launch.netns {
            ns.join_on_spawn(&mut cmd);
        }
        if let Some(run_as) = &launch.run_as {
            cmd.current_dir(&run_as.home);
            drop_privileges(&mut cmd, run_as.clone());
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or_default();
        let (progress_tx, progress) = watch::channel(Progress::default());
        let progress_tx = Arc::new(progress_tx);
        let (winding_tx, winding) = watch::channel(Winding::default());
        let winding_tx = Arc::new(winding_tx);
        let last_error = Arc::new(Mutex::new(None));
        let mut forwarders = Vec::new();
        if let Some(out) = child.stdout.take() {
            forwarders.push(tokio::spawn(
                forward(
                    out,
                    "stdout",
                    launch.clone_for_forward(),
                    progress_tx.clone(),
                    winding_tx.clone(),
                    last_error.clone(),
                )
                .in_current_span(),
            ));
        }
        if let Some(err) = child.stderr.take() {
            forwarders.push(tokio::spawn(
                forward(
                    err,
                    "stderr",
                    launch.clone_for_forward(),
                    progress_tx,
                    winding_tx,
                    last_error.clone(),
                )
                .in_current_span(),
            ));
        }
        Ok(Self {
            child,
            pgid: Pid::from_raw(pid as i32),
            pid,
            progress,
            winding,
            last_error,
            forwarders,
            shutdown_hook: launch.shutdown_hook.clone(),
            run_as: launch.run_as.clone(),
            shutdown_timeout: shutdown_timeout(),
            overran: false,
        })
    }

    pub fn is_registered(&self) -> bool {
        self.progress.borrow().registered_at.is_some()
    }

    /// Resolves once the agent says it registered (never, if it does not).
    pub async fn wait_registered(&mut self) {
        let _ = self.progress.wait_for(|p| p.registered_at.is_some()).await;
    }

    /// What the agent said so far.
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// A watch on the agent's progress, for [`progress_changed`].
    pub fn progress_watch(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Sends a signal to the agent's whole process group.
    pub fn signal(&self, sig: Signal) {
        match killpg(self.pgid, sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(pgid = self.pgid.as_raw(), signal = %sig, error = %e, "signalling the agent's process group failed")
            }
        }
    }

    /// Waits for the agent to exit, then makes sure nothing of its group survives.
    pub async fn wait(&mut self) -> std::io::Result<AgentExit> {
        let status = self.exited().await?;
        Ok(self.finish(status).await)
    }

    /// The shutdown reason the agent logged, if it is shutting down (its hook hands the
    /// daemon the same reason; this is what the agent said on its own).
    pub fn said_reason(&self) -> Option<ShutdownReason> {
        self.winding.borrow().reason
    }

    /// Resolves when the agent process exits. Cancel-safe (a `select!` branch); follow
    /// it with [`RunningAgent::finish`].
    ///
    /// Once the agent says it is shutting down, it has [`shutdown_timeout`] to exit; then
    /// its group is killed (the real agent waits for its shutdown hook with no timeout,
    /// so a hanging hook would otherwise keep the instance up forever).
    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        let mut winding = self.winding.clone();
        let bound = self.shutdown_timeout;
        let since = tokio::select! {
            s = self.child.wait() => return s,
            since = overrun(&mut winding, bound) => since,
        };
        tracing::warn!(
            shutdown_timeout_secs = bound.as_secs(),
            since_ms = since.as_millis() as u64,
            "the agent is still running {} s after it began shutting down (a hanging shutdown hook?); killing its process group",
            bound.as_secs()
        );
        self.overran = true;
        self.signal(Signal::SIGKILL);
        self.child.wait().await
    }

    /// Stops the agent: SIGTERM to the group (only once registered, see the module
    /// doc), up to `grace` for it to exit, then SIGKILL to the group.
    pub async fn stop(&mut self, grace: Duration) -> std::io::Result<AgentExit> {
        if self.is_registered() {
            self.signal(Signal::SIGTERM);
            if let Ok(status) = tokio::time::timeout(grace, self.child.wait()).await {
                return Ok(self.finish(status?).await);
            }
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "agent still running after the grace period; killing its process group"
            );
        }
        self.kill().await
    }

    /// SIGKILL to the group, at once.
    pub async fn kill(&mut self) -> std::io::Result<AgentExit> {
        self.signal(Signal::SIGKILL);
        let status = self.child.wait().await?;
        Ok(self.finish(status).await)
    }

    /// After the agent exited: kills what is left of its group, collects its output.
    pub async fn finish(&mut self, status: ExitStatus) -> AgentExit {
        // The wrapper is gone; anything left in its group (a child it orphaned) goes too.
        self.signal(Signal::SIGKILL);
        for f in self.forwarders.drain(..) {
            // A process outside the group may still hold the pipe; don't wait for it.
            let _ = tokio::time::timeout(Duration::from_millis(500), f).await;
        }
        let winding = self.winding.borrow().clone();
        if let (true, Some(reason), false) = (self.overran, winding.reason, winding.hook_done) {
            self.run_hook_for_agent(reason).await;
        }
        AgentExit {
            status,
            registered: self.is_registered(),
            last_error: self.last_error.lock().ok().and_then(|g| g.clone()),
        }
    }
}

impl RunningAgent {
    /// The agent was killed before its shutdown hook returned: runs the hook the
    /// supervisor wrote for it ([`Launch::shutdown_hook`], never the path in the agent's
    /// config, which the agent user can rewrite) the way the agent would — `bash <hook>`,
    /// as the agent user — with the reason it logged, so the reason reaches the daemon
    /// the usual way (over the hook socket). Bounded; failures are logged.
    async fn run_hook_for_agent(&self, reason: ShutdownReason) {
        let Some(path) = &self.shutdown_hook else {
            tracing::error!(exit_reason = %reason, "the agent was killed before its shutdown hook ran, and no hook was configured to run in its place");
            return;
        };
        let hook = path.display();
        tracing::warn!(hook = %hook, exit_reason = %reason, "the agent was killed before its shutdown hook returned: running the hook in its place with the reason it logged");
        let mut cmd = Command::new("bash");
        if let Some(run_as) = &self.run_as {
            cmd.current_dir(&run_as.home);
            drop_privileges(&mut cmd, run_as.clone());
        }
        cmd.arg(path)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env(crate::shutdown_hook::REASON_ENV, reason.as_str())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match tokio::time::timeout(Duration::from_secs(10), cmd.output()).await {
            Ok(Ok(out)) if out.status.success() => {}
            Ok(Ok(out)) => tracing::error!(
                hook = %hook,
                status = %out.status,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "the shutdown hook failed"
            ),
            Ok(Err(e)) => {
                tracing::error!(hook = %hook, error = %e, "the shutdown hook could not run")
            }
            Err(_) => tracing::error!(hook = %hook, "the shutdown hook did not return within 10 s"),
        }
    }
}

/// Resolves `bound` after the agent began shutting down, with how long ago that was;
/// never while it does not shut down.
async fn overrun(winding: &mut watch::Receiver<Winding>, bound: Duration) -> Duration {
    let began = match winding.wait_for(|w| w.began_at.is_some()).await {
        Ok(w) => w.began_at,
        Err(_) => None,
    };
    let Some(began) = began else {
        return std::future::pending().await;
    };
    let Some(at) = began.checked_add(bound) else {
        return std::future::pending().await;
    };
    tokio::time::sleep_until(at.into()).await;
    began.elapsed()
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(Signal::SIGKILL);
        }
    }
}

struct ForwardCtx {
    agent_name: String,
    instance_id: String,
    secret: String,
    config_path: PathBuf,
}

impl Launch {
    fn clone_for_forward(&self) -> ForwardCtx {
        ForwardCtx {
            agent_name: self.agent_name.clone(),
            instance_id: self.instance_id.clone(),
            secret: self.secret.clone(),
            config_path: self.config_path.clone(),
        }
    }
}

/// Takes the token out of the agent's config once it registered (see the module docs).
fn remove_token(path: &std::path::Path) {
    match config_file::remove_token(path) {
        Ok(true) => tracing::info!(
            path = %path.display(),
            "the agent registered: registration token removed from its config"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(
            path = %path.display(),
            error = %e,
            "cannot remove the registration token from the agent's config; jobs may be able to read it"
        ),
    }
}

/// The longest agent output line forwarded, in bytes: 16 KiB.
///
/// The agent's lines are its own log lines (job output goes to Semaphore, not here): a
/// few hundred bytes, an error quoting an API answer perhaps a few KiB, so 16 KiB keeps
/// every real one whole. A runaway agent — or a stream that stops sending newlines —
/// must not make the supervisor buffer without bound (its memory is the fleet's: an OOM
/// kill ends the agent's job), so the rest of a longer line is dropped and the forwarded
/// part says how many bytes.
const MAX_LINE_BYTES: usize = 16 * 1024;

/// Reads one line into `buf` (cleared first; the `\n` is consumed, not kept), keeping at
/// most `max` bytes of it and consuming the rest unread. Returns `None` at the end of the
/// stream with nothing read, else how many bytes of the line were dropped.
///
/// Unlike `read_until`, which grows its buffer to the whole line, this holds at most
/// `max` bytes plus the reader's own buffer, however long the line.
async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<usize>> {
    buf.clear();
    let mut dropped = 0usize;
    let mut read_any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(read_any.then_some(dropped));
        }
        read_any = true;
        let newline = available.iter().position(|b| *b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        let keep = chunk.len().min(max.saturating_sub(buf.len()));
        buf.extend_from_slice(&chunk[..keep]);
        dropped = dropped.saturating_add(chunk.len() - keep);
        let used = newline.map_or(chunk.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(Some(dropped));
        }
    }
}

/// Cuts from the end of a truncated line any start of `secret`: the cut may have split
/// the secret, and its first part must not be logged either. Returns the bytes cut.
fn cut_partial_secret(buf: &mut Vec<u8>, secret: &str) -> usize {
    let secret = secret.as_bytes();
    let longest = secret.len().saturating_sub(1).min(buf.len());
    match (1..=longest).rev().find(|k| buf.ends_with(&secret[..*k])) {
        Some(k) => {
            buf.truncate(buf.len() - k);
            k
        }
        None => 0,
    }
}

async fn forward<R: AsyncRead + Unpin>(
    stream: R,
    stream_name: &'static str,
    ctx: ForwardCtx,
    progress: Arc<watch::Sender<Progress>>,
    winding: Arc<watch::Sender<Winding>>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::with_capacity(256);
    loop {
        let mut dropped = match read_line_bounded(&mut reader, &mut buf, MAX_LINE_BYTES).await {
            Ok(Some(dropped)) => dropped,
            Ok(None) | Err(_) => break,
        };
        if dropped > 0 {
            dropped += cut_partial_secret(&mut buf, &ctx.secret);
        }
        let raw = String::from_utf8_lossy(&buf);
        let mut line = message_of(raw.trim_end());
        if !ctx.secret.is_empty() && line.contains(ctx.secret.as_str()) {
            line = line.replace(ctx.secret.as_str(), "[redacted]");
        }
        if dropped > 0 {
            line.push_str(&format!(" … [{dropped} more bytes dropped]"));
        }
        if line.trim().is_empty() {
            continue;
        }
        if line.contains(REGISTERED_LINE) {
            let now = Instant::now();
            let first = progress.send_if_modified(|p| {
                let first = p.registered_at.is_none();
                p.registered_at.get_or_insert(now);
                first
            });
            if first {
                // At once, before the line is logged: the first job may start right away.
                // A handful of small file operations.
                remove_token(&ctx.config_path);
            }
        }
        if let Some((began, reason)) = shutdown_news(&line) {
            let now = Instant::now();
            winding.send_if_modified(|w| {
                let before = w.clone();
                if began {
                    w.began_at.get_or_insert(now);
                } else {
                    w.hook_done = true;
                }
                if reason.is_some() {
                    w.reason = reason;
                }
                *w != before
            });
        }
        if let Some(job) = assigned_job(&line) {
            let now = Instant::now();
            progress.send_modify(|p| {
                p.first_job_at.get_or_insert(now);
                p.jobs += 1;
                p.last_job = Some(job.to_string());
            });
        }
        let level = agent_line_level(&line);
        if level == LineLevel::Warn {
            if let Ok(mut g) = last_error.lock() {
                *g = Some(line.clone());
            }
        }
        macro_rules! agent_line {
            ($level:ident) => {
                tracing::$level!(
                    target: AGENT_TARGET,
                    instance_id = %ctx.instance_id,
                    agent_name = %ctx.agent_name,
                    stream = stream_name,
                    "{line}"
                )
            };
        }
        match level {
            LineLevel::Warn => agent_line!(warn),
            LineLevel::Info => agent_line!(info),
            LineLevel::Debug => agent_line!(debug),
        }
    }
}

/// Resolves with the news when the agent registered or was handed a job; never once its
/// output has ended. Cancel-safe: a `select!` branch of the main loop.
pub async fn progress_changed(watch: &mut watch::Receiver<Progress>) -> Progress {
    if watch.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    watch.borrow_and_update().clone()
}

/// Strips the agent's `Jan _2 15:04:05.000 <agent-name> : ` prefix, if present.
pub fn message_of(line: &str) -> String {
    let looks_timestamped = line.len() > 20
        && line.as_bytes().get(3) == Some(&b' ')
        && line
            .get(..3)
            .is_some_and(|m| m.chars().all(|c| c.is_ascii_alphabetic()));
    if looks_timestamped {
        if let Some((_, msg)) = line.split_once(" : ") {
            return msg.to_string();
        }
    }
    line.to_string()
}

/// Switches to the agent user in the child between fork and exec, keeping its
/// supplementary groups (std's `uid()` would drop them, losing the docker group).
#[allow(unsafe_code)]
fn drop_privileges(cmd: &mut Command, run_as: RunAs) {
    // SAFETY: the closure runs in the forked child before exec. It only makes the
    // setgroups/setgid/setuid system calls on values computed before the fork: no
    // allocation, no locks, nothing that is not async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&run_as.groups).map_err(std::io::Error::from)?;
            nix::unistd::setgid(run_as.gid).map_err(std::io::Error::from)?;
            nix::unistd::setuid(run_as.uid).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_timeouts_from_the_environment_are_bounded() {
        assert_eq!(parse_shutdown_timeout(None), DEFAULT_SHUTDOWN_TIMEOUT);
        assert_eq!(parse_shutdown_timeout(Some("x")), DEFAULT_SHUTDOWN_TIMEOUT);
        assert_eq!(
            parse_shutdown_timeout(Some(" 90 ")),
            Duration::from_secs(90)
        );
        let huge = parse_shutdown_timeout(Some("18446744073709551615"));
        assert_eq!(huge, MAX_SHUTDOWN_TIMEOUT);
        assert!(Instant::now().checked_add(huge).is_some());
    }

    #[test]
    fn launch_debug_leaves_out_the_token() {
        let launch = Launch {
            binary: "/a".into(),
            config_path: "/c".into(),
            run_as: None,
            env: vec![],
            agent_name: "n".into(),
            instance_id: "i-1".into(),
            secret: "tok-SECRET-123".into(),
            shutdown_hook: Some("/w/hook.sh".into()),
            cgroup: None,
            netns: None,
        };
        let shown = format!("{launch:?}");
        assert!(!shown.contains("tok-SECRET-123"), "{shown}");
        assert!(
            shown.contains("[redacted]") && shown.contains("/w/hook.sh"),
            "{shown}"
        );
    }

    #[test]
    fn reasons_parse_from_hook_and_wire_forms() {
        assert_eq!(ShutdownReason::parse("IDLE"), ShutdownReason::Idle);
        assert_eq!(
            ShutdownReason::parse("job-finished"),
            ShutdownReason::JobFinished
        );
        assert_eq!(
            ShutdownReason::parse("UNABLE_TO_SYNC"),
            ShutdownReason::UnableToSync
        );
        assert_eq!(ShutdownReason::parse("what"), ShutdownReason::Unknown);
    }

    #[test]
    fn job_assignment_lines_name_the_job() {
        assert_eq!(
            assigned_job("SYNC response (action: run-job, job: 3b1c-77)"),
            Some("3b1c-77")
        );
        assert_eq!(
            assigned_job(&message_of(
                "Jan  2 15:04:05.000 i-1__ab : SYNC response (action: run-job, job: j1)"
            )),
            Some("j1")
        );
        assert_eq!(
            assigned_job("SYNC response (action: stop-job, job: j1)"),
            None
        );
        assert_eq!(assigned_job("SYNC response (action: continue)"), None);
        assert_eq!(assigned_job("SYNC response (action: run-job, job: )"), None);
    }

    #[test]
    fn shutdown_lines_give_the_reason() {
        assert_eq!(
            shutdown_news("Agent shutdown requested by Semaphore due to: job-finished"),
            Some((true, Some(ShutdownReason::JobFinished)))
        );
        assert_eq!(
            shutdown_news("Agent shutdown requested by Semaphore due to: idle"),
            Some((true, Some(ShutdownReason::Idle)))
        );
        assert_eq!(
            shutdown_news("Unable to sync with Semaphore for over 10m0s."),
            Some((true, Some(ShutdownReason::UnableToSync)))
        );
        assert_eq!(
            shutdown_news("Disconnecting the Agent from Semaphore"),
            Some((true, None))
        );
        assert_eq!(
            shutdown_news("Agent shutting down due to: IDLE"),
            Some((false, Some(ShutdownReason::Idle)))
        );
        // A job's output in the agent's log (the fake prefixes it) is not the agent's word.
        assert_eq!(
            shutdown_news("job 1234abcd: Disconnecting the Agent from Semaphore"),
            None
        );
        assert_eq!(shutdown_news("SYNC response (action: continue)"), None);
    }

    #[test]
    fn only_what_an_operator_needs_is_logged_at_info() {
        // The real agent's words (pkg/listener, pkg/jobs, pkg/eventlogger).
        for info in [
            "Starting Agent",
            "Starting to poll for jobs",
            "SYNC response (action: run-job, job: 8c5e6c1b-ae51-4b6e-a5d3-2b1c8f0e0a11)",
            "SYNC request (state: finished-job, job: 8c5e, result: stopped)",
            "Running job 8c5e6c1b",
            "Stopping job",
            "Regular commands finished successfully",
            "Termination signal received",
            "Agent shutdown requested by Semaphore due to: interrupted",
            "Disconnecting the Agent from Semaphore",
            "Disconnected.",
            "Executing shutdown hook from /var/lib/agent-supervisor/shutdown-hook.sh",
            "Agent shutting down due to: INTERRUPTED",
        ] {
            assert_eq!(agent_line_level(info), LineLevel::Info, "{info}");
        }
        for debug in [
            "   11     00000000    11   000000000  ",
            "SYNC request (state: waiting-for-jobs)",
            "SYNC response (action: continue)",
            "Waiting 4.7s for next sync...",
            "Waiting 2.1s to push next batch of logs...",
            "No logs to push - skipping",
            "Registering Agent",
        ] {
            assert_eq!(agent_line_level(debug), LineLevel::Debug, "{debug}");
        }
        for warn in [
            "[Register] attempt [3] failed with [404 Not Found] - retrying in 1s",
            "[SYNC ERR] Failed to sync with API: 503",
            "Error pushing logs: connection refused",
        ] {
            assert_eq!(agent_line_level(warn), LineLevel::Warn, "{warn}");
        }
    }

    /// Every line of `input` as `read_line_bounded` gives it, through a reader buffer of
    /// `capacity` bytes.
    async fn lines_of(input: &[u8], capacity: usize, max: usize) -> Vec<(Vec<u8>, usize)> {
        let mut reader = BufReader::with_capacity(capacity, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some(dropped) = read_line_bounded(&mut reader, &mut buf, max)
            .await
            .expect("in-memory read")
        {
            assert!(buf.len() <= max);
            out.push((buf.clone(), dropped));
        }
        out
    }

    #[tokio::test]
    async fn lines_are_cut_at_the_bound_and_the_rest_skipped() {
        let l = |s: &str, d: usize| (s.as_bytes().to_vec(), d);
        assert_eq!(lines_of(b"", 4, 8).await, vec![]);
        assert_eq!(
            lines_of(b"a\n\nbb\r\nlast", 3, 8).await,
            vec![l("a", 0), l("", 0), l("bb\r", 0), l("last", 0)]
        );
        let long = format!("{}\nnext\n{}", "x".repeat(108), "y".repeat(9));
        assert_eq!(
            lines_of(long.as_bytes(), 5, 8).await,
            vec![l("xxxxxxxx", 100), l("next", 0), l("yyyyyyyy", 1)]
        );
    }

    #[tokio::test]
    async fn a_huge_line_is_never_buffered_whole() {
        let mut input = vec![b'z'; 4 * 1024 * 1024];
        input.extend_from_slice(b"\nafter\n");
        let mut reader = BufReader::new(&input[..]);
        let mut buf = Vec::new();
        let dropped = read_line_bounded(&mut reader, &mut buf, MAX_LINE_BYTES)
            .await
            .expect("read");
        assert_eq!(buf.len(), MAX_LINE_BYTES);
        assert_eq!(dropped, Some(4 * 1024 * 1024 - MAX_LINE_BYTES));
        assert!(buf.capacity() <= 2 * MAX_LINE_BYTES, "{}", buf.capacity());
        read_line_bounded(&mut reader, &mut buf, MAX_LINE_BYTES)
            .await
            .expect("read");
        assert_eq!(buf, b"after");
    }

    #[test]
    fn a_secret_split_by_the_cut_is_cut_too() {
        let secret = "tok-SECRET";
        for (kept, after, cut) in [
            ("line tok-SE", "line ", 6),
            ("line t", "line ", 1),
            ("line tok-SECRE", "line ", 9),
            ("line tok-SECRET", "line tok-SECRET", 0),
            ("line x", "line x", 0),
            ("tok", "", 3),
        ] {
            let mut buf = kept.as_bytes().to_vec();
            assert_eq!(cut_partial_secret(&mut buf, secret), cut, "{kept}");
            assert_eq!(buf, after.as_bytes(), "{kept}");
        }
        let mut buf = b"abc".to_vec();
        assert_eq!(cut_partial_secret(&mut buf, ""), 0);
    }

    proptest::proptest! {
        /// Any bytes, any reader buffer size, any bound: each line comes back as its
        /// first `max` bytes, with the count of the rest.
        #[test]
        fn bounded_lines_match_a_plain_split(
            input in proptest::collection::vec(
                proptest::prop_oneof![proptest::prelude::Just(b'\n'), proptest::prelude::any::<u8>()],
                0..600,
            ),
            capacity in 1usize..64,
            max in 0usize..40,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let got = rt.block_on(lines_of(&input, capacity, max));
            let mut want: Vec<(Vec<u8>, usize)> = input
                .split(|b| *b == b'\n')
                .map(|line| (line[..line.len().min(max)].to_vec(), line.len().saturating_sub(max)))
                .collect();
            if input.last().is_none_or(|b| *b == b'\n') {
                want.pop();
            }
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn agent_prefix_is_stripped() {
        assert_eq!(
            message_of("Jan  2 15:04:05.000 i-1__ab : Starting to poll for jobs"),
            "Starting to poll for jobs"
        );
        assert_eq!(message_of("plain line"), "plain line");
    }
}
