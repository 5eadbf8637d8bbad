//! The agent owner: the task that renders `config.yaml`, spawns and watches the agent,
//! owns the channel its shutdown hook reports on, and tells the coordinator what happens
//! ([`AgentEvent`]). It obeys [`AgentCommand`]s: start a run, drain within a deadline,
//! kill. One run at a time; the coordinator decides whether there is a next.
//!
//! The registration token lives here and in the rendered `config.yaml` only while an
//! agent starts (the agent removes the file once it has read it).

use super::cgroup::AgentCgroup;
use super::config_file::{write_private, AgentConfig};
use super::presign::{AgentName, Presigner};
use super::{progress_changed, AgentExit, Launch, Progress, RunAs, RunningAgent, ShutdownReason};
use crate::aws::imds::Metadata;
use crate::aws::ssm::ParameterStore;
use crate::config::Settings;
use crate::jobcreds::{JobAws, JobEnv};
use crate::lifecycle::describe_status;
use crate::startup::{DaemonError, RunOptions};
use crate::{boot, interrupt, shutdown_hook, AbortOnDrop};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// What the coordinator asks of the agent owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCommand {
    /// Start the next run (re-reading config and token first, from the second run on).
    Start,
    /// Stop the running agent: SIGTERM to its group (once registered), SIGKILL after
    /// `within`.
    Drain { within: Duration },
    /// SIGKILL to the agent's group at once.
    Kill,
}

/// What the agent owner tells the coordinator.
#[derive(Debug)]
pub enum AgentEvent {
    Started(Box<Started>),
    /// The agent said something that changes its progress (registered, a job).
    Progress(Progress),
    /// The agent exited (on its own, or drained or killed), with the reason its shutdown
    /// hook gave, if it ran.
    Exited {
        exit: AgentExit,
        reason: Option<ShutdownReason>,
    },
    /// The agent could not be started (fatal).
    Failed(DaemonError),
}

/// A run that started.
#[derive(Debug, Clone)]
pub struct Started {
    pub name: String,
    pub pid: u32,
    /// 1 for the first run of this supervisor.
    pub run: u64,
    /// The interruption grace the agent registered with (cut on spot).
    pub grace: Duration,
    /// The runtime config this run started with.
    pub settings: Settings,
}

/// The agent owner (see the module doc).
pub struct AgentOwner<P, M> {
    opts: RunOptions,
    instance_id: String,
    ssm: P,
    imds: M,
    settings: Arc<watch::Sender<Settings>>,
    token: String,
    run_as: Option<RunAs>,
    hook_path: PathBuf,
    config_path: PathBuf,
    reasons: shutdown_hook::ReasonSlot,
    _hook_server: (shutdown_hook::HookServer, AbortOnDrop<()>),
    boot: boot::Report,
    runs: u64,
    /// The agent's own cgroup, where the system has cgroup v2.
    cgroup: Option<AgentCgroup>,
    /// The current (or last) run's agent name.
    name: String,
    spot: Option<bool>,
    /// The region and job role credentials jobs are told about ([`Self::with_job_aws`]).
    job_aws: JobAws,
}

impl<P: ParameterStore, M: Metadata> AgentOwner<P, M> {
    /// Prepares the work dir: the agent's user, the shutdown hook script and its socket.
    /// Every problem here is an input problem, found before any agent starts.
    pub fn new(
        opts: &RunOptions,
        instance_id: &str,
        (ssm, imds): (P, M),
        settings: Arc<watch::Sender<Settings>>,
        token: String,
        boot: boot::Report,
    ) -> Result<Self, DaemonError> {
        let run_as = RunAs::lookup(&opts.agent_user).map_err(DaemonError::Input)?;
        let owner = run_as.as_ref().map(|r| (r.uid.as_raw(), r.gid.as_raw()));
        std::fs::create_dir_all(&opts.work_dir).map_err(|e| {
            DaemonError::Input(format!(
                "cannot create work dir {}: {e}; fix: --work-dir",
                opts.work_dir.display()
            ))
        })?;
        let socket = shutdown_hook::socket_path(&opts.work_dir).map_err(DaemonError::Input)?;
        let hook_path = opts.work_dir.join("shutdown-hook.sh");
        let exe = std::env::current_exe()
            .map_err(|e| DaemonError::Runtime(format!("cannot find own executable: {e}")))?;
        let script = shutdown_hook::script(&exe, &socket).map_err(DaemonError::Input)?;
        write_private(&hook_path, script.as_bytes(), 0o755, None).map_err(|e| {
            DaemonError::Input(format!(
                "cannot write {}: {e}; fix: make --work-dir writable by root",
                hook_path.display()
            ))
        })?;
        let (listener, server) = shutdown_hook::HookServer::bind(&socket, owner).map_err(|e| {
            DaemonError::Input(format!("cannot listen on {}: {e}", socket.display()))
        })?;
        let cgroup = agent_cgroup(opts)?;
        let reasons = shutdown_hook::ReasonSlot::default();
        let agent_uid = run_as
            .as_ref()
            .map(|r| r.uid.as_raw())
            .unwrap_or_else(|| nix::unistd::geteuid().as_raw());
        let serving = AbortOnDrop(tokio::spawn(
            shutdown_hook::serve(listener, reasons.clone(), agent_uid).in_current_span(),
        ));
        Ok(Self {
            opts: opts.clone(),
            instance_id: instance_id.to_string(),
            ssm,
            imds,
            settings,
            token,
            run_as,
            hook_path,
            config_path: opts.work_dir.join("config.yaml"),
            reasons,
            _hook_server: (server, serving),
            boot,
            runs: 0,
            cgroup,
            name: String::new(),
            spot: None,
            job_aws: JobAws::default(),
        })
    }

    /// Tells every run's jobs about AWS: the region and the job role's credentials
    /// endpoint, with a new token for each run.
    pub fn with_job_aws(mut self, job_aws: JobAws) -> Self {
        self.job_aws = job_aws;
        self
    }

    /// Serves the coordinator's commands until it hangs up (a running agent's group is
    /// killed then).
    pub async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<AgentCommand>,
        events: mpsc::UnboundedSender<AgentEvent>,
    ) {
        while let Some(command) = commands.recv().await {
            if command != AgentCommand::Start {
                continue; // nothing runs: nothing to stop
            }
            let agent = match self.start().await {
                Ok((agent, started)) => {
                    let _ = events.send(AgentEvent::Started(Box::new(started)));
                    agent
                }
                Err(e) => {
                    let _ = events.send(AgentEvent::Failed(e));
                    return;
                }
            };
            match self.watch(agent, &mut commands, &events).await {
                Some(exited) => {
                    let _ = events.send(exited);
                }
                None => return,
            }
        }
    }

    async fn start(&mut self) -> Result<(RunningAgent, Started), DaemonError> {
        self.runs += 1;
        if self.runs > 1 {
            self.boot.give_up();
            // A restart in place (never after a job): the earlier run's containers go too.
            let uid = self.run_as.as_ref().map(|r| r.uid.as_raw());
            super::containers::Containers::for_agent_uid(uid)
                .remove_all()
                .await;
            // Bounded: a wedged SSM must not keep the instance from its next agent.
            let refresh = crate::reload::refresh(
                &self.ssm,
                &self.settings,
                &mut self.token,
                self.opts.aws_retry_backoff,
            );
            if tokio::time::timeout(STEP_BOUND, refresh).await.is_err() {
                tracing::warn!(
                    bound_secs = STEP_BOUND.as_secs(),
                    "re-reading config and token took too long; starting with the previous ones"
                );
            }
        }
        // Nothing of an earlier run may meet the next: a restart in place (only ever of an
        // agent that had no job, see `lifecycle::one_job_per_vm`) starts in an empty cgroup.
        self.sweep("before the agent starts").await;
        let settings = self.settings.borrow().clone();
        let name = self.agent_name(&settings).await?;
        let on_spot = self.on_spot().await;
        let grace = interrupt::registered_grace(
            settings.interruption_grace,
            on_spot,
            self.opts.drain_margin,
        );
        if grace < settings.interruption_grace && self.runs == 1 {
            tracing::warn!(
                interruption_grace_secs = settings.interruption_grace.as_secs(),
                registered_grace_secs = grace.as_secs(),
                "spot instance: the agent's interruption grace is cut so that a drain after a two-minute spot notice ends before the reclaim"
            );
        }
        // Under strict, the agent and its jobs live in rootless Docker's network.
        let netns = self.netns(&settings)?;
        // A token for this run's jobs only: the previous run's stops working. Served where
        // the jobs' loopback is.
        let credentials = match &self.job_aws.credentials {
            Some(c) => Some(
                c.issue_in(netns.as_ref())
                    .await
                    .map_err(DaemonError::Runtime)?,
            ),
            None => None,
        };
        let env_vars = jobs_env(
            &settings,
            self.job_aws.region.as_deref(),
            credentials.as_ref(),
        );
        let rendered = AgentConfig {
            endpoint: &settings.endpoint,
            token: &self.token,
            no_https: settings.no_https,
            name: name.for_agent(),
            disconnect_after_job: settings.disconnect_after_job,
            idle_timeout: settings.idle_timeout,
            interruption_grace: grace,
            shutdown_hook_path: &self.hook_path,
            env_vars: &env_vars,
        }
        .render();
        let owner = self
            .run_as
            .as_ref()
            .map(|r| (r.uid.as_raw(), r.gid.as_raw()));
        write_private(&self.config_path, rendered.as_bytes(), 0o600, owner).map_err(|e| {
            DaemonError::Runtime(format!(
                "cannot write the agent config {}: {e}",
                self.config_path.display()
            ))
        })?;
        drop(rendered);
        self.reasons.take();
        let launch = Launch {
            binary: self.opts.agent_binary.clone(),
            config_path: self.config_path.clone(),
            run_as: self.run_as.clone(),
            env: agent_env(&self.opts, self.run_as.as_ref()),
            agent_name: name.label().to_string(),
            instance_id: self.instance_id.clone(),
            secret: self.token.clone(),
            shutdown_hook: Some(self.hook_path.clone()),
            cgroup: match &self.cgroup {
                Some(c) => Some(c.joiner().map_err(|e| {
                    DaemonError::Runtime(format!(
                        "cannot open the agent's cgroup {}: {e}",
                        c.dir().display()
                    ))
                })?),
                None => None,
            },
            netns,
        };
        let agent = RunningAgent::spawn(&launch).map_err(|e| {
            DaemonError::Input(format!(
                "cannot start the agent {}: {e}; fix: install it there or pass --agent-binary",
                self.opts.agent_binary.display()
            ))
        })?;
        if self.runs == 1 {
            self.boot.spawned(Instant::now());
        }
        self.name = name.label().to_string();
        tracing::info!(agent_name = %self.name, pid = agent.pid, run = self.runs, "agent started");
        let started = Started {
            name: self.name.clone(),
            pid: agent.pid,
            run: self.runs,
            grace,
            settings,
        };
        Ok((agent, started))
    }

    /// This run's agent name: `<instance id>__<random>`, or with `use_pre_signed_url` a
    /// fresh signed URL (see [`super::presign`]). No signed name, no start: a name Semaphore
    /// cannot verify is not what the operator asked for.
    async fn agent_name(&self, settings: &Settings) -> Result<AgentName, DaemonError> {
        if !settings.use_pre_signed_url {
            let name = format!("{}__{}", self.instance_id, random_hex(6));
            return Ok(AgentName::plain(name));
        }
        let backoff = self.opts.aws_retry_backoff;
        let signed = match Presigner::for_instance(&self.imds, backoff).await {
            Ok(p) => p.name(&self.instance_id, backoff).await,
            Err(e) => Err(e),
        };
        signed.map_err(|e| {
            if e.is_input() {
                DaemonError::Input(e.to_string())
            } else {
                DaemonError::Runtime(e.to_string())
            }
        })
    }

    /// Watches one run to its end; obeys drain and kill. `None`: the coordinator hung up.
    async fn watch(
        &mut self,
        mut agent: RunningAgent,
        commands: &mut mpsc::UnboundedReceiver<AgentCommand>,
        events: &mpsc::UnboundedSender<AgentEvent>,
    ) -> Option<AgentEvent> {
        let mut progress = agent.progress_watch();
        let mut drained = false;
        let exit = loop {
            tokio::select! {
                s = agent.exited() => {
                    let exit = match s {
                        Ok(s) => agent.finish(s).await,
                        Err(e) => return Some(AgentEvent::Failed(DaemonError::Runtime(format!("waiting for the agent: {e}")))),
                    };
                    break exit;
                }
                p = progress_changed(&mut progress) => {
                    if self.runs == 1 {
                        self.boot.progress(&p).await;
                    }
                    let _ = events.send(AgentEvent::Progress(p));
                }
                c = commands.recv() => match c {
                    Some(AgentCommand::Drain { within }) => match self.drain(&mut agent, within, commands).await {
                        Ok(exit) => {
                            drained = true;
                            break exit;
                        }
                        Err(e) => return Some(AgentEvent::Failed(e)),
                    },
                    Some(AgentCommand::Kill) => match agent.kill().await {
                        Ok(exit) => break exit,
                        Err(e) => return Some(AgentEvent::Failed(DaemonError::Runtime(format!("killing the agent: {e}")))),
                    },
                    Some(AgentCommand::Start) => {}
                    None => return None,
                },
            }
        };
        self.sweep("after the agent exited").await;
        if let Some(c) = &self.job_aws.credentials {
            c.revoke();
        }
        // What the agent said last (a job handed to it just before it exited) reaches the
        // coordinator before the exit does.
        if progress.has_changed().unwrap_or(false) {
            let _ = events.send(AgentEvent::Progress(progress.borrow_and_update().clone()));
        }
        let reason = self.reasons.take();
        if drained {
            tracing::info!(
                agent_name = %self.name,
                exit_reason = reason.map(ShutdownReason::as_str).unwrap_or("none"),
                status = %describe_status(&exit.status),
                "drained"
            );
        }
        Some(AgentEvent::Exited { exit, reason })
    }

    /// SIGTERM to the group, SIGKILL after `within`; a `Kill` meanwhile kills at once.
    async fn drain(
        &mut self,
        agent: &mut RunningAgent,
        within: Duration,
        commands: &mut mpsc::UnboundedReceiver<AgentCommand>,
    ) -> Result<AgentExit, DaemonError> {
        tracing::info!(
            agent_name = %self.name,
            grace_secs = within.as_secs(),
            registered = agent.is_registered(),
            "draining: asking the agent to stop (a second signal aborts)"
        );
        let jobs_before = agent.progress().jobs;
        let killed = async {
            loop {
                match commands.recv().await {
                    Some(AgentCommand::Kill) | None => return,
                    Some(_) => {}
                }
            }
        };
        let stopped = tokio::select! {
            biased;
            _ = killed => None,
            r = agent.stop(within) => Some(r),
        };
        let exit = match stopped {
            Some(r) => r.map_err(|e| DaemonError::Runtime(format!("stopping the agent: {e}")))?,
            None => {
                tracing::warn!("killing the agent's process group now");
                agent
                    .kill()
                    .await
                    .map_err(|e| DaemonError::Runtime(format!("killing the agent: {e}")))?
            }
        };
        let p = agent.progress();
        if p.jobs > jobs_before {
            tracing::warn!(
                agent_name = %self.name,
                job = p.last_job.as_deref().unwrap_or("unknown"),
                "a job reached the agent while it was being stopped: it had the interruption grace"
            );
        }
        Ok(exit)
    }

    /// Whether this is a spot instance (IMDS `instance-life-cycle`), read once; unknown
    /// (IMDS does not answer) counts as on-demand.
    async fn on_spot(&mut self) -> bool {
        if let Some(s) = self.spot {
            return s;
        }
        let read = self.imds.get(interrupt::LIFE_CYCLE_PATH);
        let s = match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(v)) => v.trim() == "spot",
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "instance-life-cycle unknown: on-demand assumed");
                false
            }
            Err(_) => false,
        };
        self.spot = Some(s);
        s
    }
}

impl<P, M> AgentOwner<P, M> {
    /// Kills whatever is left in the agent's cgroup (processes a job moved out of the
    /// agent's process group), and says so.
    /// Under `strict`, rootless Docker's network namespace, looked up at every start (a
    /// job may have restarted rootless dockerd). Without it the agent does not start: its
    /// jobs' `--net=host` containers would be out of their reach.
    fn netns(&self, settings: &Settings) -> Result<Option<super::netns::NetNs>, DaemonError> {
        match (settings.job_isolation, &self.run_as) {
            (crate::config::JobIsolation::Strict, Some(r)) => {
                super::netns::NetNs::rootless_docker(r.uid.as_raw())
                    .map(Some)
                    .map_err(|e| {
                        DaemonError::Runtime(format!(
                            "job isolation strict: {e}; the agent does not start outside rootless Docker's network"
                        ))
                    })
            }
            _ => Ok(None),
        }
    }

    async fn sweep(&self, when: &str) {
        let Some(cgroup) = &self.cgroup else {
            return;
        };
        match cgroup.kill().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                agent_name = %self.name,
                processes = n,
                cgroup = %cgroup.dir().display(),
                "processes of the agent's run were still alive {when}: killed them"
            ),
            Err(e) => tracing::error!(
                cgroup = %cgroup.dir().display(),
                error = %e,
                "cannot empty the agent's cgroup {when}"
            ),
        }
    }
}

/// The agent's cgroup: under `--agent-cgroup` (an error there is the operator's to fix),
/// else under the supervisor's own cgroup v2 (without one, the agent runs without, and
/// the log says what that leaves open).
fn agent_cgroup(opts: &RunOptions) -> Result<Option<AgentCgroup>, DaemonError> {
    if let Some(base) = &opts.agent_cgroup {
        return AgentCgroup::create(base).map(Some).map_err(|e| {
            DaemonError::Input(format!(
                "{e}; fix: --agent-cgroup names a cgroup v2 directory the supervisor may manage"
            ))
        });
    }
    let created = AgentCgroup::own_base().map(|base| AgentCgroup::create(&base));
    match created {
        Some(Ok(c)) => {
            tracing::info!(cgroup = %c.dir().display(), "the agent runs in a cgroup of its own");
            Ok(Some(c))
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "no cgroup of its own for the agent: processes a job moves out of the agent's process group outlive it; fix: Delegate=yes in the supervisor's unit, or --agent-cgroup");
            Ok(None)
        }
        None => {
            tracing::warn!("no cgroup v2 on this system: processes a job moves out of the agent's process group outlive it");
            Ok(None)
        }
    }
}

/// Longest re-reading config and token before a restart may take.
const STEP_BOUND: Duration = Duration::from_secs(300);

fn agent_env(opts: &RunOptions, run_as: Option<&RunAs>) -> Vec<(String, String)> {
    let (user, home) = match run_as {
        Some(r) => (r.name.clone(), r.home.to_string_lossy().into_owned()),
        None => (
            std::env::var("USER").unwrap_or_else(|_| opts.agent_user.clone()),
            std::env::var("HOME").unwrap_or_else(|_| "/".into()),
        ),
    };
    let mut env = vec![
        (
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        ("HOME".into(), home),
        ("USER".into(), user.clone()),
        ("LOGNAME".into(), user),
        ("LANG".into(), "C.UTF-8".into()),
        // The agent logs to stdout (forwarded to the journal) and, by default, appends the
        // same lines to /tmp/agent_log for ever: no log file outside the journal.
        ("SEMAPHORE_AGENT_LOG_FILE_PATH".into(), "/dev/null".into()),
    ];
    for name in &opts.pass_env {
        if let Ok(v) = std::env::var(name) {
            env.push((name.clone(), v));
        }
    }
    env.extend(opts.agent_env.iter().cloned());
    env
}

/// The `env-vars` every job of a run gets: the cache bucket, the job role's credentials
/// endpoint with this run's token, and with either the region (`AWS_REGION`, and
/// `AWS_DEFAULT_REGION` for the AWS CLI v1): an SDK in a job cannot ask IMDS for it.
///
/// No `SEMAPHORE_CACHE_USE_EC2_INSTANCE_PROFILE`: it pins the cache CLI to IMDS (the instance
/// profile's credentials and IMDS's region), which jobs may not reach. Without it the CLI
/// loads the AWS SDK's default chain, which finds the endpoint (and, where IMDS is open to
/// jobs, the instance profile last).
fn jobs_env(
    settings: &Settings,
    region: Option<&str>,
    credentials: Option<&JobEnv>,
) -> Vec<String> {
    let mut env = Vec::new();
    if let Some(b) = &settings.cache_bucket {
        env.push("SEMAPHORE_CACHE_BACKEND=s3".to_string());
        env.push(format!("SEMAPHORE_CACHE_S3_BUCKET={b}"));
    }
    if let Some(c) = credentials {
        env.extend(c.vars());
    }
    if let (false, Some(r)) = (env.is_empty(), region) {
        env.push(format!("AWS_REGION={r}"));
        env.push(format!("AWS_DEFAULT_REGION={r}"));
    }
    env
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", fastrand::u8(..)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;
    use crate::jobcreds::JobCredentials;

    fn settings(extra: &str) -> Settings {
        let json = format!(
            r#"{{"endpoint":"org.semaphoreci.com","token_parameter":"/s/token","agent_group":"s-agents"{extra}}}"#
        );
        Settings::parse("/s/config", &json).expect("settings")
    }

    #[tokio::test]
    async fn jobs_get_the_cache_the_endpoint_and_the_region_and_never_the_instance_profile() {
        let plain = settings("");
        assert!(jobs_env(&plain, Some("eu-west-1"), None).is_empty());

        let cache = settings(r#","cache_bucket":"ci-cache""#);
        assert_eq!(
            jobs_env(&cache, Some("eu-west-1"), None),
            [
                "SEMAPHORE_CACHE_BACKEND=s3",
                "SEMAPHORE_CACHE_S3_BUCKET=ci-cache",
                "AWS_REGION=eu-west-1",
                "AWS_DEFAULT_REGION=eu-west-1",
            ]
        );

        let listener = crate::jobcreds::bind_loopback().await.expect("bind");
        struct Never;
        impl crate::jobcreds::CredentialSource for Never {
            async fn fetch(
                &self,
            ) -> Result<crate::aws::sts::SessionCredentials, crate::aws::query::QueryError>
            {
                std::future::pending().await
            }
        }
        let endpoint = JobCredentials::start(listener, Never).expect("endpoint");
        let issued = endpoint.issue().expect("token");
        let env = jobs_env(&cache, Some("eu-west-1"), Some(&issued));
        assert_eq!(env[2..4], issued.vars());
        assert_eq!(env.len(), 6);
        assert!(
            !env.iter().any(|e| e.contains("INSTANCE_PROFILE")),
            "{env:?}"
        );
        // The agent refuses a value with `=` in its env-vars.
        assert!(env
            .iter()
            .all(|e| !e.split_once('=').expect("NAME=VALUE").1.contains('=')));
    }
}
