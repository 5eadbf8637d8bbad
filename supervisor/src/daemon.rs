//! `agent-supervisor run`: learn the stack, read config and token, then run the agent
//! until the instance ends. Everything that can be wrong with the input is found before
//! any agent starts, and named with its fix.

use crate::agent::config_file::{write_private, AgentConfig};
use crate::agent::{Launch, RunAs, RunningAgent, ShutdownReason};
use crate::aws::autoscaling::SdkAutoScaling;
use crate::aws::imds::{instance_info, SdkImds};
use crate::aws::ssm::{Parameter, ParameterStore, SdkParameterStore, SsmError};
use crate::config::{Role, Settings, StackIdentity};
use crate::leader::LeaderWork;
use crate::lifecycle::{decide, describe_status, terminate_self, Action, Backoff, Termination};
use crate::{hook, Shutdown};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::watch;

/// Knobs of the daemon itself (the AMI's systemd unit sets them), as opposed to the
/// runtime config the stack writes to SSM.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Overrides the role the user data gives (`AGENT_FLEET_ROLE`).
    pub role: Option<Role>,
    pub agent_binary: PathBuf,
    pub agent_user: String,
    pub work_dir: PathBuf,
    pub agent_env: Vec<(String, String)>,
    pub pass_env: Vec<String>,
    pub poweroff_command: Vec<String>,
    pub terminate_timeout: Duration,
    pub restart_backoff: Duration,
    pub restart_backoff_cap: Duration,
    pub drain_margin: Duration,
    pub imds_attempts: u32,
    pub aws_retry_backoff: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad or missing input: config, token, user data, IMDS. Exit code 2.
    #[error("{0}")]
    Input(String),
    /// Something failed at run time. Exit code 1.
    #[error("{0}")]
    Runtime(String),
    /// A second stop signal cut the drain short. Exit code 130.
    #[error("aborted by a second stop signal; the agent's process group was killed")]
    Aborted,
}

impl DaemonError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Input(_) => 2,
            Self::Runtime(_) => 1,
            Self::Aborted => 130,
        }
    }
}

/// What was learned before the agent could start.
pub struct Prepared {
    pub instance_id: String,
    pub identity: StackIdentity,
    pub settings: Settings,
    pub sdk: aws_config::SdkConfig,
}

/// Reads IMDS, the user data and the runtime config. Shared with `check`.
pub async fn prepare(opts: &RunOptions) -> Result<Prepared, DaemonError> {
    let imds = SdkImds::new();
    let info = instance_info(&imds, opts.imds_attempts, Duration::from_millis(200))
        .await
        .map_err(|e| {
            DaemonError::Input(format!(
                "cannot read instance metadata after {} attempts: {e}; fix: on EC2 the launch template must enable IMDSv2 (HttpEndpoint enabled, hop limit ≥ 1); elsewhere set AWS_EC2_METADATA_SERVICE_ENDPOINT",
                opts.imds_attempts
            ))
        })?;
    let identity = StackIdentity::from_user_data(&info.user_data)
        .map_err(|e| DaemonError::Input(format!("instance {}: {e}", info.instance_id)))?;
    let sdk = crate::aws::sdk_config(&info.region).await;
    let ssm = SdkParameterStore::new(&sdk);
    let raw = get_parameter(&ssm, &identity.config_parameter, opts.aws_retry_backoff)
        .await
        .map_err(|e| match e {
            SsmError::NotFound { name } => DaemonError::Input(format!(
                "runtime config parameter {name} does not exist; fix: deploy the stack ({}) with agent-fleet deploy, or correct {} in the user data",
                identity.stack_name,
                crate::config::USER_DATA_CONFIG_KEY
            )),
            e => DaemonError::Input(format!("cannot read the runtime config: {e}")),
        })?;
    let settings = Settings::parse(&identity.config_parameter, &raw.value)
        .map_err(|e| DaemonError::Input(e.to_string()))?;
    Ok(Prepared {
        instance_id: info.instance_id,
        identity,
        settings,
        sdk,
    })
}

/// GetParameter, retried with backoff on throttling and 5xx (the fleet shares one SSM
/// quota; a thundering herd at scale-up must not fail the boot).
pub async fn get_parameter<P: ParameterStore>(
    ssm: &P,
    name: &str,
    first_backoff: Duration,
) -> Result<Parameter, SsmError> {
    let mut delay = first_backoff;
    for attempt in 1.. {
        match ssm.get(name).await {
            Err(e) if e.is_transient() && attempt < 6 => {
                tracing::warn!(parameter = name, attempt, error = %e, "SSM call failed; retrying");
                tokio::time::sleep(delay.mul_f64(0.8 + fastrand::f64() * 0.4)).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            other => return other,
        }
    }
    unreachable!("the loop returns")
}

async fn read_token<P: ParameterStore>(
    ssm: &P,
    settings: &Settings,
    backoff: Duration,
) -> Result<String, DaemonError> {
    let p = get_parameter(ssm, &settings.token_parameter, backoff)
        .await
        .map_err(|e| match e {
            SsmError::NotFound { name } => DaemonError::Input(format!(
                "registration token parameter {name} does not exist; fix: store the agent type's token with `agent-fleet token set` (a SecureString), or correct token_parameter in {}",
                settings.config_parameter
            )),
            e => DaemonError::Input(format!(
                "cannot read the registration token parameter {}: {e}",
                settings.token_parameter
            )),
        })?;
    if !p.secure {
        tracing::warn!(parameter = %settings.token_parameter, "the registration token parameter is not a SecureString; store it encrypted (agent-fleet token set)");
    }
    let token = p.value.trim().to_string();
    if token.is_empty() {
        return Err(DaemonError::Input(format!(
            "registration token parameter {} is empty; fix: agent-fleet token set",
            settings.token_parameter
        )));
    }
    Ok(token)
}

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
    ];
    for name in &opts.pass_env {
        if let Ok(v) = std::env::var(name) {
            env.push((name.clone(), v));
        }
    }
    env.extend(opts.agent_env.iter().cloned());
    env
}

fn cache_env(settings: &Settings) -> Vec<String> {
    match &settings.cache_bucket {
        Some(b) => vec![
            "SEMAPHORE_CACHE_BACKEND=s3".into(),
            format!("SEMAPHORE_CACHE_S3_BUCKET={b}"),
            "SEMAPHORE_CACHE_USE_EC2_INSTANCE_PROFILE=true".into(),
        ],
        None => vec![],
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", fastrand::u8(..)))
        .collect()
}

async fn poweroff(cmd: &[String]) {
    let Some((prog, args)) = cmd.split_first() else {
        tracing::error!("no poweroff command configured; the instance stays up");
        return;
    };
    tracing::warn!(command = %cmd.join(" "), "powering off");
    match tokio::process::Command::new(prog).args(args).status().await {
        Ok(s) if s.success() => {}
        Ok(s) => tracing::error!(status = %describe_status(&s), "poweroff command failed"),
        Err(e) => tracing::error!(error = %e, "poweroff command could not run"),
    }
}

/// The daemon. Returns when drained (Ok), aborted, or on a fatal error.
pub async fn run(
    opts: RunOptions,
    shutdown: Shutdown,
    started: Instant,
) -> Result<(), DaemonError> {
    let Prepared {
        instance_id,
        identity,
        mut settings,
        sdk,
    } = prepare(&opts).await?;
    let config_read = started.elapsed();
    let ssm = SdkParameterStore::new(&sdk);
    let asg = SdkAutoScaling::new(&sdk);
    let mut token = read_token(&ssm, &settings, opts.aws_retry_backoff).await?;
    let token_read = started.elapsed();
    let role = opts.role.or(identity.role).unwrap_or_default();

    let (settings_tx, settings_rx) = watch::channel(settings.clone());
    let settings_tx = Arc::new(settings_tx);
    let _reload = AbortOnDrop(tokio::spawn(reload_config(
        ssm.clone(),
        settings_tx.clone(),
        opts.aws_retry_backoff,
    )));
    let mut leader = LeaderWork::start(
        &sdk,
        &identity.stack_name,
        &instance_id,
        role == Role::Scaler,
        settings_rx.clone(),
        &token,
    )
    .map_err(DaemonError::Runtime)?;
    if role == Role::Scaler {
        if leader.is_none() {
            tracing::warn!("scaler-only role, but dynamic scaling is off in the runtime config: this instance has nothing to do");
        }
        tracing::info!(
            instance_id = %instance_id,
            stack = %identity.stack_name,
            group = %settings.agent_group,
            "scaler-only role: no agent; standing for leader"
        );
        tokio::select! {
            _ = shutdown.drain.cancelled() => {}
            _ = shutdown.abort.cancelled() => {}
        }
        if let Some(l) = leader.take() {
            l.stop_and_release().await;
        }
        return Ok(());
    }

    let run_as = RunAs::lookup(&opts.agent_user).map_err(DaemonError::Input)?;
    let owner = run_as.as_ref().map(|r| (r.uid.as_raw(), r.gid.as_raw()));
    std::fs::create_dir_all(&opts.work_dir).map_err(|e| {
        DaemonError::Input(format!(
            "cannot create work dir {}: {e}; fix: --work-dir",
            opts.work_dir.display()
        ))
    })?;
    let socket = opts.work_dir.join("hook.sock");
    let hook_path = opts.work_dir.join("shutdown-hook.sh");
    let config_path = opts.work_dir.join("config.yaml");
    let exe = std::env::current_exe()
        .map_err(|e| DaemonError::Runtime(format!("cannot find own executable: {e}")))?;
    let script = hook::script(&exe, &socket).map_err(DaemonError::Input)?;
    write_private(&hook_path, script.as_bytes(), 0o755, None).map_err(|e| {
        DaemonError::Input(format!(
            "cannot write {}: {e}; fix: make --work-dir writable by root",
            hook_path.display()
        ))
    })?;
    let (listener, _server) = hook::HookServer::bind(&socket, owner)
        .map_err(|e| DaemonError::Input(format!("cannot listen on {}: {e}", socket.display())))?;
    let (reason_tx, mut reasons) = mpsc::unbounded_channel();
    let hook_task = tokio::spawn(hook::serve(listener, reason_tx));
    let _hook_guard = AbortOnDrop(hook_task);

    tracing::info!(
        instance_id = %instance_id,
        stack = %identity.stack_name,
        group = %settings.agent_group,
        endpoint = %settings.endpoint,
        "supervisor ready"
    );

    let mut backoff = Backoff::new(opts.restart_backoff, opts.restart_backoff_cap);
    let mut runs = 0u64;
    loop {
        if runs > 0 {
            refresh(&ssm, &opts, &settings_tx, &mut token).await;
            settings = settings_rx.borrow().clone();
        }
        runs += 1;
        let agent_name = format!("{instance_id}__{}", random_hex(6));
        let env_vars = cache_env(&settings);
        let rendered = AgentConfig {
            endpoint: &settings.endpoint,
            token: &token,
            no_https: settings.no_https,
            name: &agent_name,
            disconnect_after_job: settings.disconnect_after_job,
            idle_timeout: settings.idle_timeout,
            interruption_grace: settings.interruption_grace,
            shutdown_hook_path: &hook_path,
            env_vars: &env_vars,
        }
        .render();
        write_private(&config_path, rendered.as_bytes(), 0o600, owner).map_err(|e| {
            DaemonError::Runtime(format!(
                "cannot write the agent config {}: {e}",
                config_path.display()
            ))
        })?;
        drop(rendered);
        while reasons.try_recv().is_ok() {}

        let launch = Launch {
            binary: opts.agent_binary.clone(),
            config_path: config_path.clone(),
            run_as: run_as.clone(),
            env: agent_env(&opts, run_as.as_ref()),
            agent_name: agent_name.clone(),
            secret: token.clone(),
        };
        let mut agent = RunningAgent::spawn(&launch).map_err(|e| {
            DaemonError::Input(format!(
                "cannot start the agent {}: {e}; fix: install it there or pass --agent-binary",
                opts.agent_binary.display()
            ))
        })?;
        if runs == 1 {
            tracing::info!(
                agent = %agent_name,
                pid = agent.pid,
                config_read_ms = config_read.as_millis() as u64,
                token_read_ms = token_read.as_millis() as u64,
                spawned_ms = started.elapsed().as_millis() as u64,
                "agent started"
            );
        } else {
            tracing::info!(agent = %agent_name, pid = agent.pid, run = runs, "agent started");
        }

        let exit = tokio::select! {
            biased;
            _ = shutdown.drain.cancelled() => {
                if let Some(l) = leader.take() {
                    l.stop_and_release().await;
                }
                return drain(&mut agent, &settings, &opts, &shutdown, &mut reasons).await;
            }
            r = agent.wait() => r.map_err(|e| DaemonError::Runtime(format!("waiting for the agent: {e}")))?,
        };
        drop(agent);
        let mut reason = None;
        while let Ok(r) = reasons.try_recv() {
            reason = Some(r);
        }
        let action = decide(
            &exit,
            reason,
            false,
            &mut backoff,
            &settings.token_parameter,
        );
        tracing::info!(
            agent = %agent_name,
            reason = reason.map(ShutdownReason::as_str).unwrap_or("none"),
            status = %describe_status(&exit.status),
            registered = exit.registered,
            "agent exited"
        );
        match action {
            Action::Restart { after, why } => {
                if exit.registered {
                    tracing::warn!(
                        restart_in_ms = after.as_millis() as u64,
                        failures = backoff.failures(),
                        "{why}"
                    );
                } else {
                    tracing::error!(
                        restart_in_ms = after.as_millis() as u64,
                        failures = backoff.failures(),
                        "{why}"
                    );
                }
                tokio::select! {
                    biased;
                    _ = shutdown.drain.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(after) => {}
                }
            }
            Action::Terminate { decrement, why } => {
                tracing::info!(instance_id = %instance_id, decrement, why, "terminating this instance");
                let outcome = tokio::select! {
                    biased;
                    _ = shutdown.drain.cancelled() => return Ok(()),
                    t = terminate_self(&asg, &instance_id, decrement, opts.aws_retry_backoff, || poweroff(&opts.poweroff_command)) => t,
                };
                match outcome {
                    Termination::AtMinSize => {
                        tracing::info!(group = %settings.agent_group, "group at its min size: restarting the agent in place (no churn)");
                        continue;
                    }
                    Termination::Requested | Termination::PoweredOff => {
                        // The instance is going: hand leadership on now, not at SIGTERM.
                        if let Some(l) = leader.take() {
                            l.stop_and_release().await;
                        }
                        return wait_for_end(&opts, &shutdown).await;
                    }
                }
            }
        }
    }
}

/// Keeps the instance's last moments quiet: Auto Scaling stops us (SIGTERM) when it
/// terminates the instance. If it has not after `terminate_timeout`, power off.
async fn wait_for_end(opts: &RunOptions, shutdown: &Shutdown) -> Result<(), DaemonError> {
    tokio::select! {
        biased;
        _ = shutdown.drain.cancelled() => return Ok(()),
        _ = tokio::time::sleep(opts.terminate_timeout) => {}
    }
    tracing::error!(
        timeout_secs = opts.terminate_timeout.as_secs(),
        "instance still running long after its termination was requested"
    );
    poweroff(&opts.poweroff_command).await;
    shutdown.drain.cancelled().await;
    Ok(())
}

async fn drain(
    agent: &mut RunningAgent,
    settings: &Settings,
    opts: &RunOptions,
    shutdown: &Shutdown,
    reasons: &mut mpsc::UnboundedReceiver<ShutdownReason>,
) -> Result<(), DaemonError> {
    let grace = settings.interruption_grace + opts.drain_margin;
    tracing::info!(
        grace_secs = grace.as_secs(),
        registered = agent.is_registered(),
        "draining: asking the agent to stop (a second signal aborts)"
    );
    let stopped = tokio::select! {
        biased;
        _ = shutdown.abort.cancelled() => None,
        r = agent.stop(grace) => Some(r),
    };
    let exit = match stopped {
        Some(r) => r.map_err(|e| DaemonError::Runtime(format!("stopping the agent: {e}")))?,
        None => {
            tracing::warn!("second stop signal: killing the agent's process group now");
            let _ = agent.kill().await;
            return Err(DaemonError::Aborted);
        }
    };
    let mut reason = None;
    while let Ok(r) = reasons.try_recv() {
        reason = Some(r);
    }
    tracing::info!(
        reason = reason.map(ShutdownReason::as_str).unwrap_or("none"),
        status = %describe_status(&exit.status),
        "drained"
    );
    Ok(())
}

/// Re-reads config and token before an agent restart, so a rotated token or a changed
/// agent knob applies without a new instance. On failure the last good values stay.
async fn refresh<P: ParameterStore>(
    ssm: &P,
    opts: &RunOptions,
    settings: &watch::Sender<Settings>,
    token: &mut String,
) {
    reload_once(ssm, settings, opts.aws_retry_backoff).await;
    let current = settings.borrow().clone();
    match read_token(ssm, &current, opts.aws_retry_backoff).await {
        Ok(t) => *token = t,
        Err(e) => tracing::error!(error = %e, "keeping the previous registration token"),
    }
}

/// Reads the runtime config parameter again; publishes it when it changed.
async fn reload_once<P: ParameterStore>(
    ssm: &P,
    settings: &watch::Sender<Settings>,
    backoff: Duration,
) {
    let parameter = settings.borrow().config_parameter.clone();
    match get_parameter(ssm, &parameter, backoff).await {
        Ok(p) => match Settings::parse(&parameter, &p.value) {
            Ok(s) => {
                settings.send_if_modified(|cur| {
                    let changed = *cur != s;
                    if changed {
                        tracing::info!(parameter = %parameter, "runtime config changed: scaler knobs apply now, agent knobs at the next agent start");
                        *cur = s;
                    }
                    changed
                });
            }
            Err(e) => tracing::error!(error = %e, "keeping the previous runtime config"),
        },
        Err(e) => tracing::warn!(error = %e, "keeping the previous runtime config"),
    }
}

/// Live config: re-read every [`RELOAD_EVERY`] and on SIGHUP.
async fn reload_config<P: ParameterStore>(
    ssm: P,
    settings: Arc<watch::Sender<Settings>>,
    backoff: Duration,
) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let hup_recv = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = hup_recv => tracing::info!("SIGHUP: re-reading the runtime config"),
            _ = tokio::time::sleep(RELOAD_EVERY) => {}
        }
        reload_once(&ssm, &settings, backoff).await;
    }
}

/// How often the runtime config is re-read.
pub const RELOAD_EVERY: Duration = Duration::from_secs(60);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
