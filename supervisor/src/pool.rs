//! The warm pool: an instance Auto Scaling launched into the group's warm pool warms up
//! and waits; one taken from the pool serves as a cold one would, only sooner.
//!
//! At boot, after the instance's identity and runtime config, the supervisor reads IMDS
//! `autoscaling/target-lifecycle-state` ([`Target`]):
//!
//! | target | the supervisor |
//! |---|---|
//! | `Warmed:Stopped`, `Warmed:Hibernated`, `Warmed:Running` | warms up without the token ([`Warmup`]: the Docker daemon answering, `warm_images` pulled, the agent's and the toolbox's files read once into the page cache), writes [`WARMED_MARKER`], completes the launch lifecycle action (`CONTINUE`, heartbeating while the warm-up runs), then waits, polling the target every [`POLL_EVERY`], until `InService`. Never reads the token, never starts an agent, never ends its instance: a stop (the pool powering the instance off) needs nothing |
//! | `InService` | a start: `warm` when the marker is there (a stopped pool's instance restarted, or a running or hibernated one taken into service), else `cold`. With a launch hook it completes the action of the way into service (`Pending:Wait`) in the background. A warm start checks first that the instance is still what the group would launch now ([`stale`]); a stale one ends without decrement, and a fresh instance replaces it |
//!
//! The isolation level and the IMDS firewall are token-free: a pooled instance applies
//! them while warming, which takes them off the warm start's path.
//!
//! AWS: "When the instance is in the warm pool, the value of
//! `autoscaling/target-lifecycle-state` is `Warmed:Stopped`, `Warmed:Running` or
//! `Warmed:Hibernated`"; a launch lifecycle hook puts an instance launched into the pool
//! in `Warmed:Pending:Wait`, and one leaving the pool in `Pending:Wait` (Auto Scaling User
//! Guide, Warm pools; Lifecycle hooks for warm pools).

use crate::aws::autoscaling::{
    AsgError, AutoScaling, LaunchTemplates, LifecycleActions, TemplateRef,
};
use crate::aws::imds::{ImdsError, Metadata};
use crate::aws::ssm::ParameterStore;
use crate::interrupt::{LifecycleWait, TARGET_STATE_PATH};
use crate::notify::Notifier;
use crate::Shutdown;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The marker in the work dir: this instance warmed up in the pool.
pub const WARMED_MARKER: &str = "warmed";
/// How often a warmed instance asks IMDS whether it is in service yet.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// IMDS `meta-data/ami-id`: the AMI the instance booted from.
pub const AMI_PATH: &str = "/latest/meta-data/ami-id";

/// `autoscaling/target-lifecycle-state`, as far as the supervisor cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `Warmed:Stopped`, `Warmed:Hibernated` or `Warmed:Running` (the part after the colon).
    Warmed(String),
    InService,
    /// Anything else (`Terminated`, `Detached`, `Standby`, …).
    Other(String),
    /// IMDS has no such item (not in a group), or did not answer.
    Unknown,
}

impl Target {
    pub fn parse(text: &str) -> Self {
        match text.trim() {
            "InService" => Self::InService,
            s => match s.strip_prefix("Warmed:") {
                Some(state) => Self::Warmed(state.to_string()),
                None => Self::Other(s.to_string()),
            },
        }
    }

    pub fn is_warmed(&self) -> bool {
        matches!(self, Self::Warmed(_))
    }
}

/// How this supervisor's instance came to serve: the `Start` dimension of the boot
/// timing ([`crate::boot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartKind {
    /// Launched straight into service (or a supervisor that cannot tell).
    #[default]
    Cold,
    /// Taken from the warm pool, warmed.
    Warm,
}

impl StartKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cold => "cold",
            Self::Warm => "warm",
        }
    }

    /// In service, and warmed in the pool (the marker the warm-up wrote).
    pub fn of(work_dir: &Path) -> Self {
        match work_dir.join(WARMED_MARKER).exists() {
            true => Self::Warm,
            false => Self::Cold,
        }
    }
}

/// Reads the target lifecycle state. With a warm pool (`pooled`) an unanswered or missing
/// item is asked again for up to ~10 s: taking a pooled instance for an in-service one
/// would start an agent in the pool.
pub async fn target<M: Metadata>(imds: &M, pooled: bool) -> Target {
    let attempts = if pooled { 20 } else { 2 };
    for attempt in 1..=attempts {
        match imds.get(TARGET_STATE_PATH).await {
            Ok(v) => return Target::parse(&v),
            Err(ImdsError::NotFound { .. }) if !pooled => return Target::Unknown,
            Err(e) => {
                tracing::debug!(attempt, error = %e, "target lifecycle state not known yet");
                if attempt < attempts {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    Target::Unknown
}

/// The token-free work done in the pool.
pub trait Warmup: Send + Sync {
    /// Warms what it can; never fails (each step logs its own trouble).
    fn warm_up(&self) -> impl Future<Output = ()> + Send;
}

/// How a pooled supervisor's wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// Auto Scaling took the instance into service while this supervisor ran (a running
    /// pool, or a hibernated instance resumed).
    InService,
    /// A stop signal: the pool stops (or hibernates) the instance, or systemd stops us.
    Stopped,
}

/// A pooled instance's stay in the pool: warm up, complete the launch action, wait.
pub struct Pool<'a, A, M, W> {
    pub asg: &'a A,
    pub imds: &'a M,
    pub warmup: &'a W,
    /// The launch hook's wait (`None`: the runtime config names none).
    pub launch: Option<LifecycleWait>,
    /// The termination hook's wait: Auto Scaling may end a pooled instance (the pool
    /// shrinks, an instance refresh), and holds it in `Warmed:Terminating:Wait` too.
    pub termination: Option<LifecycleWait>,
    pub work_dir: &'a Path,
    pub aws_retry_backoff: Duration,
}

impl<A, M, W> Pool<'_, A, M, W>
where
    A: LifecycleActions,
    M: Metadata,
    W: Warmup,
{
    /// Runs until the instance is in service or a stop signal comes. Never ends the
    /// instance, never reads the token.
    pub async fn stay(&self, state: &str, shutdown: &Shutdown, notify: &mut Notifier) -> Left {
        let started = tokio::time::Instant::now();
        tracing::info!(
            target_state = %format!("Warmed:{state}"),
            "in the warm pool: warming up (no token, no agent)"
        );
        // Ready now: systemd's start timeout (5 min) must not end a warm-up that pulls
        // images for longer, nor a supervisor that waits in a running pool. The watchdog
        // is fed throughout.
        notify.ready("in the warm pool: warming up");
        if !self.warm_with_heartbeats(shutdown, notify).await {
            return Left::Stopped;
        }
        let marker = self.work_dir.join(WARMED_MARKER);
        let written = std::fs::create_dir_all(self.work_dir)
            .and_then(|()| std::fs::write(&marker, format!("warmed in the pool ({state})\n")));
        if let Err(e) = written {
            tracing::warn!(path = %marker.display(), error = %e, "cannot write the warmed marker: a start from the pool will count as cold");
        }
        let warm_ms = started.elapsed().as_millis() as u64;
        match &self.launch {
            Some(wait) => {
                let done = tokio::select! {
                    biased;
                    _ = shutdown.drain.cancelled() => return Left::Stopped,
                    d = wait.complete(self.asg, self.aws_retry_backoff) => d,
                };
                match done {
                    Ok(attempts) => tracing::info!(
                        lifecycle_hook = %wait.hook.name,
                        result = "CONTINUE",
                        attempts,
                        warm_ms,
                        "warmed: launch lifecycle action completed; the pool may stop this instance now"
                    ),
                    Err(e) => tracing::warn!(
                        lifecycle_hook = %wait.hook.name,
                        error = %e,
                        warm_ms,
                        "warmed, but the launch lifecycle action could not be completed; Auto Scaling moves on after the heartbeat timeout (CONTINUE)"
                    ),
                }
            }
            None => tracing::info!(
                warm_ms,
                "warmed; the runtime config names no launch hook, so there is nothing to complete"
            ),
        }
        notify.status("warmed, in the warm pool: waiting to be taken into service");
        self.wait_in_service(shutdown, notify).await
    }

    /// The warm-up, heartbeating the launch action at a third of its timeout. False if a
    /// stop signal came first.
    async fn warm_with_heartbeats(&self, shutdown: &Shutdown, notify: &mut Notifier) -> bool {
        let warm = self.warmup.warm_up();
        tokio::pin!(warm);
        let every = self
            .launch
            .as_ref()
            .map(|w| crate::interrupt::heartbeat_every(w.hook.heartbeat_timeout));
        let mut beat_at = every.map(|e| tokio::time::Instant::now() + e);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.drain.cancelled() => return false,
                _ = &mut warm => return true,
                _ = notify.watchdog_due() => notify.ping(),
                _ = sleep_until(beat_at) => {
                    if let (Some(wait), Some(e)) = (&self.launch, every) {
                        let _ = tokio::time::timeout(Duration::from_secs(10), wait.heartbeat(self.asg)).await;
                        beat_at = Some(tokio::time::Instant::now() + e);
                    }
                }
            }
        }
    }

    /// Polls the target lifecycle state until `InService`. A pooled instance Auto Scaling
    /// terminates has nothing to drain: its termination action is completed at once.
    async fn wait_in_service(&self, shutdown: &Shutdown, notify: &mut Notifier) -> Left {
        let mut last = None;
        let mut terminating = false;
        loop {
            match self
                .imds
                .get(TARGET_STATE_PATH)
                .await
                .map(|v| Target::parse(&v))
            {
                Ok(Target::InService) => {
                    tracing::info!("taken from the warm pool into service");
                    return Left::InService;
                }
                Ok(Target::Warmed(s) | Target::Other(s)) if s == "Terminated" && !terminating => {
                    terminating = true;
                    notify.status("in the warm pool: Auto Scaling is terminating this instance");
                    self.complete_termination().await;
                }
                Ok(t) => {
                    if last.as_ref() != Some(&t) {
                        tracing::debug!(target_state = ?t, "still in the warm pool");
                        last = Some(t);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "target lifecycle state not read"),
            }
            let next = tokio::time::Instant::now() + POLL_EVERY;
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.drain.cancelled() => {
                        tracing::info!("stop signal in the warm pool: nothing to do (the pool stops this instance; it is not ended)");
                        return Left::Stopped;
                    }
                    _ = notify.watchdog_due() => notify.ping(),
                    _ = tokio::time::sleep_until(next) => break,
                }
            }
        }
    }
}

impl<A, M, W> Pool<'_, A, M, W>
where
    A: LifecycleActions,
{
    async fn complete_termination(&self) {
        let Some(wait) = &self.termination else {
            tracing::info!("Auto Scaling is terminating this pooled instance: no agent to drain");
            return;
        };
        match wait.complete(self.asg, self.aws_retry_backoff).await {
            Ok(_) => tracing::info!(
                lifecycle_hook = %wait.hook.name,
                result = "CONTINUE",
                "Auto Scaling is terminating this pooled instance: no agent to drain, lifecycle action completed"
            ),
            Err(e) => tracing::warn!(
                lifecycle_hook = %wait.hook.name,
                error = %e,
                "could not complete the termination lifecycle action of this pooled instance; Auto Scaling moves on after the heartbeat timeout"
            ),
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Completes the launch action of the way into service (`Pending:Wait`), in the
/// background: the agent's start does not wait for it. Auto Scaling answers
/// ValidationError when no action is pending (a cold launch the hook did not hold long
/// enough for us, or a second supervisor); that is logged at debug.
pub fn complete_in_background<A>(
    asg: A,
    wait: LifecycleWait,
    backoff: Duration,
) -> tokio::task::JoinHandle<()>
where
    A: LifecycleActions + 'static,
{
    use tracing::Instrument;
    tokio::spawn(
        async move {
            match wait.complete(&asg, backoff).await {
                Ok(attempts) => tracing::info!(
                    lifecycle_hook = %wait.hook.name,
                    result = "CONTINUE",
                    attempts,
                    "launch lifecycle action completed: Auto Scaling puts this instance in service"
                ),
                Err(AsgError::Validation { .. }) => tracing::debug!(
                    lifecycle_hook = %wait.hook.name,
                    "no launch lifecycle action pending for this instance"
                ),
                Err(e) => tracing::warn!(
                    lifecycle_hook = %wait.hook.name,
                    error = %e,
                    "could not complete the launch lifecycle action; Auto Scaling moves on after the heartbeat timeout (CONTINUE)"
                ),
            }
        }
        .in_current_span(),
    )
}

/// Why a pooled instance is no longer what its group launches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staleness {
    /// The group launches another launch template, or another version of it.
    Template {
        instance: TemplateRef,
        group: TemplateRef,
    },
    /// The image parameter names another AMI than the one this instance booted from.
    Image {
        parameter: String,
        instance: String,
        current: String,
    },
}

impl Staleness {
    pub fn describe(&self) -> String {
        match self {
            Self::Template { instance, group } => format!(
                "launched from launch template {} version {}, the group now launches {} version {}",
                instance.label(),
                instance.version.as_deref().unwrap_or("?"),
                group.label(),
                group.version.as_deref().unwrap_or("?")
            ),
            Self::Image {
                parameter,
                instance,
                current,
            } => format!("booted from {instance}, {parameter} now names {current}"),
        }
    }
}

/// Pure: the instance's launch template against the group's. Only numeric versions are
/// compared (`$Latest`/`$Default` say nothing about what this instance got).
pub fn template_staleness(instance: &TemplateRef, group: &TemplateRef) -> Option<Staleness> {
    let stale = Staleness::Template {
        instance: instance.clone(),
        group: group.clone(),
    };
    if let (Some(a), Some(b)) = (&instance.id, &group.id) {
        if a != b {
            return Some(stale);
        }
    }
    let number = |v: &Option<String>| v.as_deref().and_then(|v| v.parse::<u64>().ok());
    match (number(&instance.version), number(&group.version)) {
        (Some(a), Some(b)) if a != b => Some(stale),
        _ => None,
    }
}

/// Whether this pooled instance is stale: launched from an older launch template version,
/// or (with `image_parameter`) booted from another AMI than the parameter names now.
/// Anything that cannot be read counts as current: a wrong "stale" would churn the
/// whole pool, a wrong "current" serves one job from the older image.
pub async fn stale<A, M, P>(
    asg: &A,
    imds: &M,
    ssm: &P,
    group: &str,
    instance_id: &str,
    image_parameter: Option<&str>,
) -> Option<Staleness>
where
    A: LaunchTemplates,
    M: Metadata,
    P: ParameterStore,
{
    let bound = Duration::from_secs(10);
    // Both at once: a warm start waits for this (alongside the token's read).
    let templates = async {
        tokio::try_join!(
            asg.instance_template(instance_id),
            asg.group_template(group)
        )
    };
    match tokio::time::timeout(bound, templates).await {
        Ok(Ok((Some(instance), Some(group)))) => {
            if let Some(s) = template_staleness(&instance, &group) {
                return Some(s);
            }
        }
        Ok(Ok(_)) => tracing::debug!("launch templates unknown: not compared"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot compare launch template versions; serving")
        }
        Err(_) => tracing::warn!("launch template versions not read in time; serving"),
    }
    let parameter = image_parameter?;
    let images = async {
        let instance = imds.get(AMI_PATH).await.map_err(|e| e.to_string())?;
        let current = ssm.get(parameter).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((
            instance.trim().to_string(),
            current.value.trim().to_string(),
        ))
    };
    match tokio::time::timeout(bound, images).await {
        Ok(Ok((instance, current))) if instance != current && current.starts_with("ami-") => {
            Some(Staleness::Image {
                parameter: parameter.to_string(),
                instance,
                current,
            })
        }
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            tracing::warn!(parameter, error = %e, "cannot compare this instance's AMI with the image parameter; serving");
            None
        }
        Err(_) => {
            tracing::warn!(parameter, "AMI comparison not done in time; serving");
            None
        }
    }
}

/// How a stale pooled instance ends: without decrement (the group launches a fresh one),
/// once its launch action is completed, then waiting for Auto Scaling — as every other
/// end of an instance does ([`crate::coordinator`]), but before any agent or leader work.
pub struct Ending<'a> {
    pub instance_id: &'a str,
    /// The background completion of the launch action (see [`complete_in_background`]).
    pub launched: Option<tokio::task::JoinHandle<()>>,
    pub poweroff: &'a [String],
    pub terminate_timeout: Duration,
    pub aws_retry_backoff: Duration,
}

impl Ending<'_> {
    pub async fn stale<A: AutoScaling>(
        self,
        asg: &A,
        why: &Staleness,
        shutdown: Shutdown,
        mut notify: Notifier,
    ) -> Result<(), crate::startup::DaemonError> {
        tracing::warn!(
            why = %why.describe(),
            decrement = false,
            interruption = "stale",
            "this pooled instance is no longer what the group launches: terminating it without decrement instead of serving (a fresh instance replaces it)"
        );
        notify.status("stale pooled instance: terminating it");
        if let Some(task) = self.launched {
            let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
        }
        let poweroff = self.poweroff;
        let terminate = crate::lifecycle::terminate_self(
            asg,
            self.instance_id,
            false,
            self.aws_retry_backoff,
            || crate::coordinator::poweroff(poweroff),
        );
        tokio::select! {
            biased;
            _ = shutdown.drain.cancelled() => return Ok(()),
            _ = notify.during("terminating the instance", Duration::from_secs(600), terminate) => {}
        }
        notify.status("stale pooled instance: waiting for Auto Scaling to stop it");
        let power_off_at = tokio::time::Instant::now().checked_add(self.terminate_timeout);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.drain.cancelled() => {
                    notify.stopping("stopping: the stale instance is being terminated");
                    return Ok(());
                }
                _ = notify.watchdog_due() => notify.ping(),
                _ = sleep_until(power_off_at) => {
                    crate::coordinator::poweroff(poweroff).await;
                    shutdown.drain.cancelled().await;
                    return Ok(());
                }
            }
        }
    }
}

/// The warm-up on an instance: the Docker daemon, images, files into the page cache.
pub struct HostWarmup {
    /// The `docker` CLI (a name looked up in `PATH`, or a path).
    pub docker: PathBuf,
    /// How long to wait for the Docker daemon to answer; zero: do not wait.
    pub docker_wait: Duration,
    pub images: Vec<String>,
    /// Longest one pull may take.
    pub pull_bound: Duration,
    /// Files and directories read once (directories recursively, no symlinks followed).
    pub files: Vec<PathBuf>,
    /// At most this many bytes are read.
    pub read_budget: u64,
}

/// The most one warm-up reads into the page cache.
pub const READ_BUDGET: u64 = 2 << 30;

impl Warmup for HostWarmup {
    async fn warm_up(&self) {
        let docker_up = self.docker_ready().await;
        if docker_up {
            for image in &self.images {
                self.pull(image).await;
            }
        } else if !self.images.is_empty() {
            tracing::warn!(
                images = self.images.len(),
                "the Docker daemon did not answer: warm_images not pulled"
            );
        }
        let (files, budget) = (self.files.clone(), self.read_budget);
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || read_all(&files, budget)).await {
            Ok((read, bytes)) => tracing::info!(
                files = read,
                bytes,
                took_ms = started.elapsed().as_millis() as u64,
                "agent and toolbox files read into the page cache"
            ),
            Err(e) => tracing::warn!(error = %e, "reading files into the page cache failed"),
        }
    }
}

impl HostWarmup {
    /// `docker info` until it answers, within `docker_wait`. False when there is no
    /// `docker` or the daemon never answered.
    async fn docker_ready(&self) -> bool {
        let deadline = tokio::time::Instant::now() + self.docker_wait;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let mut cmd = tokio::process::Command::new(&self.docker);
            cmd.arg("info")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            match tokio::time::timeout(Duration::from_secs(10), cmd.status()).await {
                Ok(Ok(s)) if s.success() => {
                    tracing::info!(tries, "the Docker daemon answers");
                    return true;
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::info!(docker = %self.docker.display(), "no docker on this instance: nothing to warm there");
                    return false;
                }
                _ => {}
            }
            if tokio::time::Instant::now() + Duration::from_secs(1) > deadline {
                if !self.docker_wait.is_zero() {
                    tracing::warn!(
                        tries,
                        wait_secs = self.docker_wait.as_secs(),
                        "the Docker daemon did not answer `docker info` in time"
                    );
                }
                return false;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn pull(&self, image: &str) {
        let started = std::time::Instant::now();
        let mut cmd = tokio::process::Command::new(&self.docker);
        // `--` after the options: an image never reads as one (config refuses a leading
        // dash too).
        cmd.args(["pull", "--quiet", "--"])
            .arg(image)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let took = || started.elapsed().as_millis() as u64;
        match tokio::time::timeout(self.pull_bound, cmd.output()).await {
            Ok(Ok(out)) if out.status.success() => {
                tracing::info!(image, took_ms = took(), "warm image pulled")
            }
            Ok(Ok(out)) => tracing::warn!(
                image,
                took_ms = took(),
                error = %String::from_utf8_lossy(&out.stderr).trim(),
                "warm image not pulled"
            ),
            Ok(Err(e)) => tracing::warn!(image, error = %e, "warm image not pulled"),
            Err(_) => tracing::warn!(
                image,
                bound_secs = self.pull_bound.as_secs(),
                "warm image pull took too long: given up"
            ),
        }
    }
}

/// Reads every regular file under `roots` once, within `budget` bytes; missing paths
/// are skipped. Returns (files, bytes).
pub fn read_all(roots: &[PathBuf], budget: u64) -> (u64, u64) {
    use std::io::Read;
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut stack: Vec<PathBuf> = roots.to_vec();
    let mut buf = vec![0u8; 1 << 20];
    while let Some(path) = stack.pop() {
        if bytes >= budget {
            break;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if meta.is_file() {
            let Ok(mut f) = std::fs::File::open(&path) else {
                continue;
            };
            files += 1;
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 || bytes >= budget {
                    break;
                }
                bytes += n as u64;
            }
        }
    }
    (files, bytes)
}

#[cfg(test)]
mod tests;
