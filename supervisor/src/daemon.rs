//! `agent-supervisor run`: learn the stack, read config and token, then run the agent
//! until the instance ends. Everything that can be wrong with the input is found before
//! any agent starts, and named with its fix.

use crate::agent::config_file::{write_private, AgentConfig};
use crate::agent::{progress_changed, Launch, Progress, RunAs, RunningAgent, ShutdownReason};
use crate::aws::autoscaling::SdkAutoScaling;
use crate::aws::cloudwatch::{MetricsSink, QueryCloudWatch};
use crate::aws::imds::{launch_time, Metadata, SdkImds};
use crate::aws::ssm::{ParameterStore, SdkParameterStore};
use crate::config::{Role, Settings};
use crate::election::LeaderWork;
use crate::election::Leadership;
use crate::interrupt::{self, Interruption, Notice};
use crate::lifecycle::{decide, describe_status, terminate_self, Action, Backoff, Termination};
use crate::notify::Notifier;
use crate::{boot, shutdown_hook, Shutdown};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tokio::sync::watch;
use tracing::Instrument;

use crate::startup::{get_parameter, prepare, read_token, Prepared};
pub use crate::startup::{DaemonError, RunOptions};

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

/// Longest a step of the main loop that talks to AWS may take before the systemd watchdog
/// is left to fire (see [`Notifier::during`]): the SDK's 30 s operation timeout times the
/// retries, with room to spare.
const AWS_STEP_BOUND: Duration = Duration::from_secs(600);
/// Longest one lifecycle heartbeat may hold the main loop (the SDK's own operation
/// timeout is 30 s, systemd's `WatchdogSec=`).
const HEARTBEAT_BOUND: Duration = Duration::from_secs(10);
/// Longest stopping the election and scaler and releasing the lease may take.
const LEADER_STOP_BOUND: Duration = Duration::from_secs(120);

/// The daemon's root span. Its fields are recorded once known and carried by every record
/// of the daemon and of the tasks it starts — the agent's forwarded lines included — so
/// journald stores them as `INSTANCE_ID`, `STACK` and `ROLE` (see [`crate::telemetry`]).
fn root_span() -> tracing::Span {
    tracing::info_span!(
        "supervisor",
        instance_id = tracing::field::Empty,
        stack = tracing::field::Empty,
        role = tracing::field::Empty
    )
}

/// The daemon. Returns when drained (Ok), aborted, or on a fatal error. `notify` talks
/// to systemd (a no-op outside it); `start` is the process start, taken in `main`.
pub async fn run(
    opts: RunOptions,
    shutdown: Shutdown,
    notify: Notifier,
    start: boot::Start,
) -> Result<(), DaemonError> {
    let span = root_span();
    run_in(opts, shutdown, notify, start, span.clone())
        .instrument(span)
        .await
}

async fn run_in(
    opts: RunOptions,
    shutdown: Shutdown,
    mut notify: Notifier,
    start: boot::Start,
    span: tracing::Span,
) -> Result<(), DaemonError> {
    notify.status("starting: reading instance metadata, runtime config and token");
    let Prepared {
        instance_id,
        identity,
        mut settings,
        sdk,
    } = prepare(&opts).await?;
    let config_read = Instant::now();
    span.record("instance_id", instance_id.as_str());
    span.record("stack", identity.stack_name.as_str());
    let ssm = SdkParameterStore::new(&sdk);
    let asg = SdkAutoScaling::new(&sdk);
    let mut token = read_token(&ssm, &settings, opts.aws_retry_backoff).await?;
    let token_read = Instant::now();
    let role = opts.role.or(identity.role).unwrap_or_default();
    span.record("role", role.as_str());
    if role == Role::Agent {
        // Before anything runs: a socket path that cannot be bound would stop the agent's
        // start much later.
        shutdown_hook::socket_path(&opts.work_dir).map_err(DaemonError::Input)?;
    }

    let (settings_tx, settings_rx) = watch::channel(settings.clone());
    let settings_tx = Arc::new(settings_tx);
    let _reload = AbortOnDrop(tokio::spawn(
        reload_config(ssm.clone(), settings_tx.clone(), opts.aws_retry_backoff).in_current_span(),
    ));
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
            tracing::warn!(
                "scaler-only role, but dynamic scaling is off in the runtime config: this instance has nothing to do"
            );
        }
        tracing::info!(
            group = %settings.agent_group,
            "scaler-only role: no agent; standing for leader"
        );
        let mut shown = scaler_status(leader.as_ref().map(|l| l.leadership.borrow().clone()));
        notify.ready(&shown);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.drain.cancelled() => break,
                _ = shutdown.abort.cancelled() => break,
                l = leadership_changed(&mut leader) => {
                    // Every renew moves the lease's deadline; say only what changed.
                    let status = scaler_status(Some(l));
                    if status != shown {
                        notify.status(&status);
                        shown = status;
                    }
                }
                _ = notify.watchdog_due() => notify.ping(),
            }
        }
        notify.stopping("stopping: handing leadership on");
        hand_leadership_on(&mut leader, &mut notify).await;
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
    let socket = shutdown_hook::socket_path(&opts.work_dir).map_err(DaemonError::Input)?;
    let hook_path = opts.work_dir.join("shutdown-hook.sh");
    let config_path = opts.work_dir.join("config.yaml");
    let exe = std::env::current_exe()
        .map_err(|e| DaemonError::Runtime(format!("cannot find own executable: {e}")))?;
    let script = shutdown_hook::script(&exe, &socket).map_err(DaemonError::Input)?;
    write_private(&hook_path, script.as_bytes(), 0o755, None).map_err(|e| {
        DaemonError::Input(format!(
            "cannot write {}: {e}; fix: make --work-dir writable by root",
            hook_path.display()
        ))
    })?;
    let (listener, _server) = shutdown_hook::HookServer::bind(&socket, owner)
        .map_err(|e| DaemonError::Input(format!("cannot listen on {}: {e}", socket.display())))?;
    let (reason_tx, mut reasons) = mpsc::unbounded_channel();
    let hook_task = tokio::spawn(shutdown_hook::serve(listener, reason_tx).in_current_span());
    let _hook_guard = AbortOnDrop(hook_task);

    tracing::info!(
        group = %settings.agent_group,
        endpoint = %settings.endpoint,
        "supervisor ready"
    );

    // Boot timing: once per instance (the marker survives a restart of the supervisor).
    let marker = opts.work_dir.join(boot::MARKER);
    let mut boot = BootReport::new(!marker.exists(), start, config_read, token_read);

    // Interruptions (see `crate::interrupt`): IMDS notices, and this instance's age.
    let (notice_tx, notice_rx) = mpsc::unbounded_channel();
    let _watcher = AbortOnDrop(tokio::spawn(
        interrupt::watch(SdkImds::new(), interrupt::POLL_EVERY, notice_tx).in_current_span(),
    ));
    // Read from IMDS when an age limit first needs it.
    let mut launched: Option<SystemTime> = None;
    // Read from IMDS before the first agent starts (its grace depends on it).
    let mut spot: Option<bool> = None;
    let mut end = Ending {
        opts: &opts,
        asg: &asg,
        instance_id: &instance_id,
        shutdown: &shutdown,
        sdk: &sdk,
        stack: &identity.stack_name,
        notices: notice_rx,
        notices_open: true,
        terminating: None,
        completed: false,
        heartbeats: 0,
        replace: None,
    };

    let mut backoff = Backoff::new(opts.restart_backoff, opts.restart_backoff_cap);
    let mut runs = 0u64;
    let mut lead_term = leader
        .as_ref()
        .and_then(|l| leading_term(&l.leadership.borrow()));
    loop {
        // An instance past its age, at risk or being terminated starts no new agent (the
        // settings are re-read below, before an agent starts; these checks need no fresh
        // copy, and a spot notice must not wait for SSM).
        settings = settings_rx.borrow().clone();
        if end.replace.is_none() {
            if let Some(max) = settings.max_uptime {
                let launched = launch_of(&mut launched, start.wall).await;
                if interrupt::uptime_left(launched, max, SystemTime::now()).is_zero() {
                    tracing::info!(
                        max_uptime_secs = max.as_secs(),
                        age_secs = SystemTime::now()
                            .duration_since(launched)
                            .unwrap_or_default()
                            .as_secs(),
                        interruption = "max_uptime",
                        "older than max_uptime_secs: replacing this instance"
                    );
                    end.replace = Some(Interruption::MaxUptime);
                }
            }
        }
        if let Some(kind) = end.pending() {
            tracing::info!(
                exit_reason = "none",
                interruption = kind.as_str(),
                decrement = false,
                why = kind.why(),
                "terminating this instance"
            );
            notify.status(&format!("terminating instance ({})", kind.why()));
            match end
                .finish(&mut notify, &mut leader, &settings, false, kind.why())
                .await
            {
                Finished::Ended => return Ok(()),
                Finished::AtMinSize => continue,
            }
        }
        if runs > 0 {
            boot.give_up();
            notify
                .during(
                    "re-reading config and token",
                    AWS_STEP_BOUND,
                    refresh(&ssm, &opts, &settings_tx, &mut token),
                )
                .await;
            settings = settings_rx.borrow().clone();
        }
        runs += 1;
        let agent_name = format!("{instance_id}__{}", random_hex(6));
        let env_vars = cache_env(&settings);
        let on_spot = spot_of(&mut spot).await;
        let agent_grace =
            interrupt::registered_grace(settings.interruption_grace, on_spot, opts.drain_margin);
        if agent_grace < settings.interruption_grace && runs == 1 {
            tracing::warn!(
                interruption_grace_secs = settings.interruption_grace.as_secs(),
                registered_grace_secs = agent_grace.as_secs(),
                "spot instance: the agent's interruption grace is cut so that a drain after a two-minute spot notice ends before the reclaim"
            );
        }
        // When a drained agent's group is killed: the grace, then what the agent needs to
        // hear the stop, report the job and shut down (`interrupt::DRAIN_MARGIN`).
        let drain_budget = agent_grace + opts.drain_margin;
        let rendered = AgentConfig {
            endpoint: &settings.endpoint,
            token: &token,
            no_https: settings.no_https,
            name: &agent_name,
            disconnect_after_job: settings.disconnect_after_job,
            idle_timeout: settings.idle_timeout,
            interruption_grace: agent_grace,
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
            instance_id: instance_id.clone(),
            secret: token.clone(),
            shutdown_hook: Some(hook_path.clone()),
        };
        let mut agent = RunningAgent::spawn(&launch).map_err(|e| {
            DaemonError::Input(format!(
                "cannot start the agent {}: {e}; fix: install it there or pass --agent-binary",
                opts.agent_binary.display()
            ))
        })?;
        let mut agent_status = format!("agent running (agent name {agent_name}), registering");
        if runs == 1 {
            boot.spawned(Instant::now());
            tracing::info!(
                agent_name = %agent_name,
                pid = agent.pid,
                config_read_ms = config_read.saturating_duration_since(start.at).as_millis() as u64,
                token_read_ms = token_read.saturating_duration_since(start.at).as_millis() as u64,
                spawned_ms = start.at.elapsed().as_millis() as u64,
                "agent started"
            );
            notify.ready(&with_lead(&agent_status, lead_term));
        } else {
            tracing::info!(agent_name = %agent_name, pid = agent.pid, run = runs, "agent started");
            notify.status(&with_lead(&agent_status, lead_term));
        }

        // This run's deadlines: the age limit, and (while a busy agent holds Auto Scaling's
        // lifecycle wait) the next heartbeat and the drain that must beat the hook's
        // global timeout.
        let far = tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let mut uptime_at = match (settings.max_uptime, &end.replace) {
            (Some(max), None) => {
                let launched = launch_of(&mut launched, start.wall).await;
                tokio::time::Instant::now()
                    + interrupt::uptime_left(launched, max, SystemTime::now())
            }
            _ => far,
        };
        let hook = end.lifecycle_wait(&settings);
        let mut beat_at = far;
        let mut force_at = far;
        let mut progress = agent.progress_watch();
        let ran = loop {
            let holding = beat_at != far;
            tokio::select! {
                biased;
                _ = shutdown.drain.cancelled() => {
                    let grace = drain_budget;
                    notify.stopping(&format!(
                        "draining: the agent {agent_name} has up to {} s to stop",
                        grace.as_secs()
                    ));
                    hand_leadership_on(&mut leader, &mut notify).await;
                    let drained = drain(&mut agent, &agent_name, grace, &shutdown, &mut reasons);
                    notify
                        .during("the drain", grace + Duration::from_secs(30), drained)
                        .await?;
                    if end.terminating.is_some() && !end.completed {
                        end.complete(&mut notify, &settings).await;
                    }
                    return Ok(());
                }
                s = agent.exited() => {
                    let s = s.map_err(|e| DaemonError::Runtime(format!("waiting for the agent: {e}")))?;
                    break RunEnd::Exited(agent.finish(s).await);
                }
                n = end.next_notice() => {
                    let busy = waits_for_job(&agent, &settings);
                    if let Some(kind) = end.take_notice(n, busy, &settings).await {
                        break RunEnd::Drain(kind);
                    }
                    if end.terminating.is_some() {
                        if leader.is_some() {
                            hand_leadership_on(&mut leader, &mut notify).await;
                            lead_term = None;
                        }
                        if let (Some(h), false) = (&hook, holding) {
                            let now = tokio::time::Instant::now();
                            beat_at = now + interrupt::heartbeat_every(h.hook.heartbeat_timeout);
                            force_at = now + interrupt::force_drain_after(
                                h.hook.heartbeat_timeout,
                                drain_budget,
                            );
                        }
                    }
                    notify.status(&with_pending(&with_lead(&agent_status, lead_term), &end));
                }
                _ = tokio::time::sleep_until(uptime_at), if uptime_at != far => {
                    uptime_at = far;
                    if end.replace.is_none() {
                        let busy = waits_for_job(&agent, &settings);
                        tracing::info!(
                            max_uptime_secs = settings.max_uptime.map(|m| m.as_secs()).unwrap_or_default(),
                            busy,
                            interruption = "max_uptime",
                            "older than max_uptime_secs: replacing this instance{}",
                            if busy { " after its job" } else { "" }
                        );
                        end.replace = Some(Interruption::MaxUptime);
                        if !busy {
                            break RunEnd::Drain(Interruption::MaxUptime);
                        }
                        notify.status(&with_pending(&with_lead(&agent_status, lead_term), &end));
                    }
                }
                _ = tokio::time::sleep_until(beat_at), if holding => {
                    if let Some(h) = &hook {
                        end.heartbeat(&mut notify, h).await;
                        beat_at = tokio::time::Instant::now() + interrupt::heartbeat_every(h.hook.heartbeat_timeout);
                    }
                }
                _ = tokio::time::sleep_until(force_at), if holding => {
                    tracing::warn!(
                        agent_name = %agent_name,
                        interruption = "lifecycle",
                        "the lifecycle hook's wait is nearly over and the job still runs: draining the agent so the job is stopped cleanly"
                    );
                    break RunEnd::Drain(Interruption::Lifecycle);
                }
                p = progress_changed(&mut progress) => {
                    if runs == 1 {
                        boot.progress(&p, &marker, &identity.stack_name, &sdk).await;
                    }
                    agent_status = match &p.last_job {
                        Some(job) => format!("agent running (agent name {agent_name}), job {job}"),
                        None => format!("agent running (agent name {agent_name}), waiting for jobs"),
                    };
                    notify.status(&with_pending(&with_lead(&agent_status, lead_term), &end));
                }
                l = leadership_changed(&mut leader) => {
                    let term = leading_term(&l);
                    if term != lead_term {
                        lead_term = term;
                        notify.status(&with_pending(&with_lead(&agent_status, lead_term), &end));
                    }
                }
                _ = notify.watchdog_due() => notify.ping(),
            }
        };

        let exit = match ran {
            RunEnd::Exited(exit) => exit,
            RunEnd::Drain(kind) => {
                // The supervisor stops the agent itself: spot notice, Auto Scaling's
                // termination, or a replacement of an idle agent's instance.
                hand_leadership_on(&mut leader, &mut notify).await;
                let grace = drain_budget;
                let kill_after = match &kind {
                    Interruption::Spot(a) => {
                        interrupt::spot_kill_after(grace, a.time, SystemTime::now())
                    }
                    _ => grace,
                };
                if kill_after < grace {
                    tracing::warn!(
                        grace_secs = grace.as_secs(),
                        kill_after_secs = kill_after.as_secs(),
                        "the interruption grace does not fit before the spot interruption: the agent's group is killed sooner (keep interruption_grace_secs under ~100 s on spot)"
                    );
                }
                notify.status(&format!(
                    "{}: draining the agent {agent_name}, up to {} s",
                    kind.why(),
                    kill_after.as_secs()
                ));
                let jobs_before = agent.progress().jobs;
                if jobs_before > 0 && !settings.disconnect_after_job {
                    tracing::info!(
                        agent_name = %agent_name,
                        jobs = jobs_before,
                        interruption = kind.as_str(),
                        "the agent takes several jobs (disconnect_after_job off): draining it now, so it takes no more; a running job has the interruption grace"
                    );
                }
                let drained = drain(&mut agent, &agent_name, kill_after, &shutdown, &mut reasons);
                let hook = end.terminating.and(end.lifecycle_wait(&settings));
                let reason = notify
                    .during(
                        "the drain",
                        kill_after + Duration::from_secs(30),
                        with_heartbeats(drained, hook.as_ref(), &asg, &mut end.heartbeats),
                    )
                    .await?;
                let p = agent.progress();
                if p.jobs > jobs_before {
                    tracing::warn!(
                        agent_name = %agent_name,
                        job = p.last_job.as_deref().unwrap_or("unknown"),
                        "a job reached the agent while it was being stopped: it had the interruption grace"
                    );
                }
                drop(agent);
                tracing::info!(
                    agent_name = %agent_name,
                    exit_reason = reason.map(ShutdownReason::as_str).unwrap_or("none"),
                    interruption = kind.as_str(),
                    decrement = false,
                    why = kind.why(),
                    "terminating this instance"
                );
                if shutdown.drain.is_cancelled() {
                    if end.terminating.is_some() && !end.completed {
                        end.complete(&mut notify, &settings).await;
                    }
                    notify.stopping("stopping: the instance was being terminated");
                    return Ok(());
                }
                match end
                    .finish(&mut notify, &mut leader, &settings, false, kind.why())
                    .await
                {
                    Finished::Ended => return Ok(()),
                    Finished::AtMinSize => continue,
                }
            }
        };
        drop(agent);
        let mut reason = None;
        while let Ok(r) = reasons.try_recv() {
            reason = Some(r);
        }
        let exit_reason = reason.map(ShutdownReason::as_str).unwrap_or("none");
        let action = decide(
            &exit,
            reason,
            false,
            &mut backoff,
            &settings.token_parameter,
        );
        tracing::info!(
            agent_name = %agent_name,
            exit_reason,
            status = %describe_status(&exit.status),
            registered = exit.registered,
            "agent exited"
        );
        if end.terminating.is_some() {
            // Auto Scaling is terminating this instance and waited for the agent.
            tracing::info!(
                agent_name = %agent_name,
                exit_reason,
                interruption = "lifecycle",
                decrement = false,
                why = Interruption::Lifecycle.why(),
                "terminating this instance"
            );
            match end
                .finish(
                    &mut notify,
                    &mut leader,
                    &settings,
                    false,
                    Interruption::Lifecycle.why(),
                )
                .await
            {
                Finished::Ended => return Ok(()),
                Finished::AtMinSize => continue,
            }
        }
        // A replacement was waiting for the job: a restart becomes that replacement (not
        // after a registration failure: a new instance would fail the same way).
        let action = match (action, &end.replace) {
            (Action::Restart { .. }, Some(kind)) if exit.registered => Action::Terminate {
                decrement: false,
                why: kind.why(),
            },
            (action, _) => action,
        };
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
                notify.status(&with_lead(
                    &format!(
                        "agent exited ({exit_reason}, {}); restarting it in {} s",
                        describe_status(&exit.status),
                        after.as_secs()
                    ),
                    lead_term,
                ));
                match end.wait(&mut notify, after, &settings).await {
                    Waited::Stop => {
                        notify.stopping("stopping: no agent running");
                        if end.terminating.is_some() && !end.completed {
                            end.complete(&mut notify, &settings).await;
                        }
                        return Ok(());
                    }
                    // The top of the loop ends the instance if a notice asked for it.
                    Waited::Elapsed | Waited::Notice => {}
                }
            }
            Action::Terminate { decrement, why } => {
                tracing::info!(
                    agent_name = %agent_name,
                    exit_reason,
                    interruption = end.replace.as_ref().map(Interruption::as_str).unwrap_or("none"),
                    decrement,
                    why,
                    "terminating this instance"
                );
                notify.status(&format!(
                    "terminating instance ({why}, agent exit reason {exit_reason})"
                ));
                match end
                    .finish(&mut notify, &mut leader, &settings, decrement, why)
                    .await
                {
                    Finished::Ended => return Ok(()),
                    Finished::AtMinSize if end.replace.is_some() => {
                        // Replace it after all (the loop's top: without decrement).
                        continue;
                    }
                    Finished::AtMinSize => {
                        tracing::info!(group = %settings.agent_group, "group at its min size: restarting the agent in place (no churn)");
                        notify.status(&with_lead(
                            "group at its min size: restarting the agent in place",
                            lead_term,
                        ));
                        continue;
                    }
                }
            }
        }
    }
}

/// What `systemctl status` says of a scaler-only instance.
fn scaler_status(leadership: Option<Leadership>) -> String {
    match leadership {
        None => "scaler-only role: dynamic scaling is off, nothing to do".into(),
        Some(Leadership::Leader { term, .. }) => {
            format!("scaler-only role: fleet leader, term {term}")
        }
        Some(Leadership::Follower {
            term: Some(term),
            leader,
        }) => format!(
            "scaler-only role: standing for leader (term {term} held by {})",
            leader.as_deref().unwrap_or("unknown")
        ),
        Some(Leadership::Follower { term: None, .. }) => {
            "scaler-only role: standing for leader".into()
        }
    }
}

fn leading_term(l: &Leadership) -> Option<u64> {
    match l {
        Leadership::Leader { term, .. } => Some(*term),
        Leadership::Follower { .. } => None,
    }
}

fn with_lead(status: &str, lead_term: Option<u64>) -> String {
    match lead_term {
        Some(term) => format!("{status}; fleet leader, term {term}"),
        None => status.to_string(),
    }
}

/// Resolves with the new leadership when it changes; never without leader work.
async fn leadership_changed(leader: &mut Option<LeaderWork>) -> Leadership {
    let Some(l) = leader.as_mut() else {
        return std::future::pending().await;
    };
    if l.leadership.changed().await.is_err() {
        return std::future::pending().await;
    }
    l.leadership.borrow_and_update().clone()
}

/// The boot timing of this instance's first agent run (see [`crate::boot`]).
struct BootReport {
    /// `None` once reported, given up, or reported by an earlier supervisor.
    pending: Option<Pending>,
}

struct Pending {
    start: boot::Start,
    config_read: Instant,
    token_read: Instant,
    timeline: Option<boot::Timeline>,
    /// The launch time from IMDS, fetched in the background.
    launch: Option<AbortOnDrop<Option<SystemTime>>>,
}

impl BootReport {
    fn new(wanted: bool, start: boot::Start, config_read: Instant, token_read: Instant) -> Self {
        if !wanted {
            tracing::debug!("boot timing already reported on this instance");
        }
        let pending = wanted.then(|| Pending {
            start,
            config_read,
            token_read,
            timeline: None,
            // One attempt, quietly: IMDS answered a moment ago, and this is only for a metric.
            launch: Some(AbortOnDrop(tokio::spawn(
                async {
                    match launch_time(&SdkImds::new(), 1, Duration::from_millis(200)).await {
                        Ok(t) => Some(t),
                        Err(e) => {
                            tracing::debug!(error = %e, "launch time unknown: the boot timing leaves out the phases from the launch");
                            None
                        }
                    }
                }
                .in_current_span(),
            ))),
        });
        Self { pending }
    }

    fn spawned(&mut self, at: Instant) {
        if let Some(p) = self.pending.as_mut() {
            p.timeline = Some(boot::Timeline {
                launched: None,
                start: p.start,
                config_read: p.config_read,
                token_read: p.token_read,
                spawned: at,
                registered: None,
                first_job: None,
            });
        }
    }

    /// Only the first agent run counts.
    fn give_up(&mut self) {
        self.pending = None;
    }

    /// Logs and publishes what the agent's progress completes. Never waits on the network.
    async fn progress(
        &mut self,
        progress: &Progress,
        marker: &std::path::Path,
        stack: &str,
        sdk: &aws_config::SdkConfig,
    ) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        let Some(t) = p.timeline.as_mut() else {
            return;
        };
        let mut stages = vec![];
        if t.registered.is_none() {
            if let Some(at) = progress.registered_at {
                t.registered = Some(at);
                stages.push(boot::Stage::Registered);
            }
        }
        if t.registered.is_some() && t.first_job.is_none() {
            if let Some(at) = progress.first_job_at {
                t.first_job = Some(at);
                stages.push(boot::Stage::FirstJob);
            }
        }
        if stages.is_empty() {
            return;
        }
        if t.launched.is_none() {
            // Long done by now (one local IMDS call); if not, do without it.
            if let Some(mut task) = p.launch.take().filter(|task| task.0.is_finished()) {
                t.launched = (&mut task.0).await.ok().flatten();
            }
        }
        let mut data = vec![];
        for stage in stages {
            t.log(stage);
            data.extend(t.data(stage, stack));
        }
        if let Err(e) = std::fs::write(marker, t.summary()) {
            tracing::warn!(path = %marker.display(), error = %e, "cannot write the boot timing marker");
        }
        let finished = t.first_job.is_some();
        let sdk = sdk.clone();
        tokio::spawn(
            async move {
                match QueryCloudWatch::new(&sdk) {
                    Ok(cw) => boot::publish(&cw, data).await,
                    Err(e) => tracing::warn!(error = %e, "could not publish the boot timing to CloudWatch"),
                }
            }
            .in_current_span(),
        );
        if finished {
            self.pending = None;
        }
    }
}

/// How one agent run ended.
enum RunEnd {
    /// The agent exited on its own.
    Exited(crate::agent::AgentExit),
    /// The supervisor stops it for this interruption.
    Drain(Interruption),
}

/// How ending the instance went.
enum Finished {
    /// Auto Scaling took the instance (or it was powered off): the daemon is done.
    Ended,
    /// A decrement was refused at the group's min size: keep serving.
    AtMinSize,
}

/// How a wait between agent runs ended.
enum Waited {
    Elapsed,
    /// A stop signal.
    Stop,
    /// An interruption notice (recorded in [`Ending`]).
    Notice,
}

/// What ends this instance: the interruption notices so far (kept across agent runs), and
/// the calls that end it — `TerminateInstanceInAutoScalingGroup`, or, when Auto Scaling is
/// already terminating it, `CompleteLifecycleAction` — then the wait for the end.
struct Ending<'a> {
    opts: &'a RunOptions,
    asg: &'a SdkAutoScaling,
    instance_id: &'a str,
    shutdown: &'a Shutdown,
    sdk: &'a aws_config::SdkConfig,
    stack: &'a str,
    notices: mpsc::UnboundedReceiver<Notice>,
    /// False once the watcher is done (nothing more to say).
    notices_open: bool,
    /// When IMDS said `Terminated`: Auto Scaling is terminating this instance (with our
    /// lifecycle hook, it waits in `Terminating:Wait` until we complete the action).
    terminating: Option<tokio::time::Instant>,
    /// The lifecycle action was completed (or found not to exist).
    completed: bool,
    /// `RecordLifecycleActionHeartbeat` calls that succeeded.
    heartbeats: u32,
    /// Replace this instance as soon as its agent is idle (rebalance, max uptime, or a
    /// spot notice that came with no agent running).
    replace: Option<Interruption>,
}

impl Ending<'_> {
    /// The next notice; never, once the watcher is done.
    async fn next_notice(&mut self) -> Notice {
        if self.notices_open {
            if let Some(n) = self.notices.recv().await {
                return n;
            }
            self.notices_open = false;
        }
        std::future::pending().await
    }

    /// The interruption that ends the instance before any new agent starts.
    fn pending(&self) -> Option<Interruption> {
        if self.terminating.is_some() {
            Some(Interruption::Lifecycle)
        } else {
            self.replace.clone()
        }
    }

    /// The group's lifecycle hook, from the runtime config.
    fn lifecycle_wait(&self, settings: &Settings) -> Option<interrupt::LifecycleWait> {
        settings
            .lifecycle_hook
            .clone()
            .map(|hook| interrupt::LifecycleWait {
                group: settings.agent_group.clone(),
                hook,
                instance_id: self.instance_id.to_string(),
            })
    }

    /// Records a notice, logs what it means, and says whether to stop the agent now.
    /// `busy`: the agent was handed a job (false: idle, or no agent at all).
    async fn take_notice(
        &mut self,
        n: Notice,
        busy: bool,
        settings: &Settings,
    ) -> Option<Interruption> {
        let hook = self.lifecycle_wait(settings);
        let capacity_rebalancing = match &n {
            Notice::Rebalance { .. } => self.capacity_rebalancing(settings).await,
            _ => false,
        };
        let facts = interrupt::Facts {
            busy,
            lifecycle_hook: hook.is_some(),
            capacity_rebalancing,
            replacement_pending: self.replace.is_some(),
        };
        let verdict = interrupt::judge(&n, facts);
        match &n {
            Notice::Spot(a) => {
                tracing::warn!(
                    interruption = "spot",
                    spot_action = %a.action,
                    spot_time = %a.time_text,
                    busy,
                    "spot interruption notice: EC2 will {} this instance at {}; draining now",
                    a.action,
                    if a.time_text.is_empty() { "an unknown time" } else { a.time_text.as_str() }
                );
                self.publish_spot_metric();
            }
            Notice::Rebalance { notice_time } if capacity_rebalancing => tracing::info!(
                interruption = "rebalance",
                notice_time = %notice_time,
                "spot rebalance recommendation: the group's Capacity Rebalancing replaces this instance (its termination comes through the lifecycle hook)"
            ),
            Notice::Rebalance { notice_time } => tracing::info!(
                interruption = "rebalance",
                notice_time = %notice_time,
                busy,
                "spot rebalance recommendation: replacing this instance{}",
                if busy { " after its job" } else { " now" }
            ),
            Notice::Terminating => {
                self.terminating = Some(tokio::time::Instant::now());
                tracing::info!(
                    interruption = "lifecycle",
                    lifecycle_hook = hook
                        .as_ref()
                        .map(|h| h.hook.name.as_str())
                        .unwrap_or("none"),
                    busy,
                    "Auto Scaling is terminating this instance: {}",
                    if verdict == interrupt::Verdict::HoldForJob {
                        "letting the job finish (lifecycle heartbeats meanwhile)"
                    } else {
                        "draining the agent"
                    }
                );
            }
        }
        match verdict {
            interrupt::Verdict::Drain(kind) => {
                if kind == Interruption::Rebalance {
                    self.replace = Some(Interruption::Rebalance);
                }
                Some(kind)
            }
            interrupt::Verdict::AfterJob(kind) => {
                self.replace = Some(kind);
                None
            }
            interrupt::Verdict::HoldForJob | interrupt::Verdict::Nothing => None,
        }
    }

    /// Whether the group has Capacity Rebalancing on (bounded; unknown counts as off, so
    /// the instance replaces itself).
    async fn capacity_rebalancing(&self, settings: &Settings) -> bool {
        match tokio::time::timeout(
            Duration::from_secs(10),
            self.asg.capacity_rebalance(&settings.agent_group),
        )
        .await
        {
            Ok(Ok(on)) => on.unwrap_or(false),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot tell whether the group has Capacity Rebalancing; replacing this instance ourselves");
                false
            }
            Err(_) => false,
        }
    }

    /// Publishes one `SpotInterruptions` datum in the background (never delays the drain).
    fn publish_spot_metric(&self) {
        let (sdk, stack) = (self.sdk.clone(), self.stack.to_string());
        tokio::spawn(
            async move {
                let sent = match QueryCloudWatch::new(&sdk) {
                    Ok(cw) => cw
                        .put(
                            crate::aws::cloudwatch::NAMESPACE,
                            &[interrupt::spot_datum(&stack)],
                        )
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match sent {
                    Ok(()) => tracing::debug!(metric = interrupt::SPOT_METRIC, "published"),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not publish {}", interrupt::SPOT_METRIC)
                    }
                }
            }
            .in_current_span(),
        );
    }

    /// One lifecycle heartbeat, feeding the watchdog meanwhile and given up after
    /// [`HEARTBEAT_BOUND`] (the next one is a third of the heartbeat timeout away, so one
    /// lost call is survived) so a slow Auto Scaling endpoint cannot stall the main loop.
    async fn heartbeat(&mut self, notify: &mut Notifier, hook: &interrupt::LifecycleWait) {
        let beat = tokio::time::timeout(HEARTBEAT_BOUND, hook.heartbeat(self.asg));
        match notify
            .during("a lifecycle heartbeat", HEARTBEAT_BOUND * 2, beat)
            .await
        {
            Ok(true) => {
                self.heartbeats += 1;
                tracing::debug!(heartbeats = self.heartbeats, "lifecycle heartbeat sent");
            }
            Ok(false) => {}
            Err(_) => tracing::warn!(
                lifecycle_hook = %hook.hook.name,
                bound_secs = HEARTBEAT_BOUND.as_secs(),
                "lifecycle heartbeat did not return in time; trying again at the next one"
            ),
        }
    }

    /// `CompleteLifecycleAction(CONTINUE)`: Auto Scaling terminates the instance now.
    async fn complete(&mut self, notify: &mut Notifier, settings: &Settings) {
        self.completed = true;
        let waited_ms = self
            .terminating
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or_default();
        let Some(hook) = self.lifecycle_wait(settings) else {
            tracing::info!(
                waited_ms,
                "Auto Scaling is terminating this instance; the runtime config names no lifecycle hook, so there is nothing to complete"
            );
            return;
        };
        let done = notify
            .during(
                "completing the lifecycle action",
                AWS_STEP_BOUND,
                hook.complete(self.asg, self.opts.aws_retry_backoff),
            )
            .await;
        match done {
            Ok(attempts) => tracing::info!(
                lifecycle_hook = %hook.hook.name,
                result = "CONTINUE",
                attempts,
                heartbeats = self.heartbeats,
                waited_ms,
                "lifecycle action completed: Auto Scaling terminates this instance now"
            ),
            Err(e) => tracing::error!(
                lifecycle_hook = %hook.hook.name,
                error = %e,
                heartbeats = self.heartbeats,
                waited_ms,
                timeout_secs = hook.hook.heartbeat_timeout.as_secs(),
                "could not complete the lifecycle action; Auto Scaling ends the wait after the heartbeat timeout (DefaultResult)"
            ),
        }
        notify.status("lifecycle action completed: waiting for Auto Scaling to stop this instance");
    }

    /// The agent is gone: ask Auto Scaling to terminate the instance (unless it already
    /// is), hand leadership on, and wait for the end.
    async fn finish(
        &mut self,
        notify: &mut Notifier,
        leader: &mut Option<LeaderWork>,
        settings: &Settings,
        decrement: bool,
        why: &str,
    ) -> Finished {
        if self.terminating.is_none() {
            let (asg, id, opts) = (self.asg, self.instance_id, self.opts);
            let outcome = tokio::select! {
                biased;
                _ = self.shutdown.drain.cancelled() => {
                    notify.stopping("stopping: the instance was being terminated");
                    return Finished::Ended;
                }
                t = notify.during(
                    "terminating the instance",
                    AWS_STEP_BOUND,
                    terminate_self(asg, id, decrement, opts.aws_retry_backoff, || poweroff(&opts.poweroff_command)),
                ) => t,
            };
            if outcome == Termination::AtMinSize {
                return Finished::AtMinSize;
            }
        }
        // The instance is going: hand leadership on now, not at SIGTERM.
        hand_leadership_on(leader, notify).await;
        notify.status(&format!(
            "terminating instance ({why}): waiting for Auto Scaling to stop it"
        ));
        self.wait_for_end(notify, settings).await;
        Finished::Ended
    }

    /// Keeps the instance's last moments quiet: Auto Scaling stops us (SIGTERM) when it
    /// terminates the instance; with a lifecycle hook, once we complete its action (at
    /// once: the agent is gone). If nothing happened after `terminate_timeout`, power off.
    async fn wait_for_end(&mut self, notify: &mut Notifier, settings: &Settings) {
        // No deadline (never power off) if the operator's timeout does not fit an Instant.
        let until = tokio::time::Instant::now().checked_add(self.opts.terminate_timeout);
        let mut powered_off = until.is_none();
        loop {
            if self.terminating.is_some() && !self.completed {
                self.complete(notify, settings).await;
            }
            let shutdown = self.shutdown;
            tokio::select! {
                biased;
                _ = shutdown.drain.cancelled() => break,
                n = self.next_notice() => {
                    match n {
                        Notice::Terminating => self.terminating = Some(tokio::time::Instant::now()),
                        other => tracing::info!(notice = ?other, "notice while the instance is ending: nothing more to do"),
                    }
                }
                _ = tokio::time::sleep_until(until.unwrap_or_else(tokio::time::Instant::now)), if !powered_off => {
                    tracing::error!(
                        timeout_secs = self.opts.terminate_timeout.as_secs(),
                        "instance still running long after its termination was requested"
                    );
                    notify.status("termination requested long ago: powering off");
                    poweroff(&self.opts.poweroff_command).await;
                    powered_off = true;
                }
                _ = notify.watchdog_due() => notify.ping(),
            }
        }
        notify.stopping("stopping: the instance is being terminated");
    }

    /// Sleeps `how_long` between agent runs, feeding the watchdog; a notice (recorded)
    /// or a stop signal cuts it short.
    async fn wait(
        &mut self,
        notify: &mut Notifier,
        how_long: Duration,
        settings: &Settings,
    ) -> Waited {
        let until = tokio::time::Instant::now() + how_long;
        loop {
            let shutdown = self.shutdown;
            tokio::select! {
                biased;
                _ = shutdown.drain.cancelled() => return Waited::Stop,
                n = self.next_notice() => {
                    if let Some(kind) = self.take_notice(n, false, settings).await {
                        if self.replace.is_none() && kind != Interruption::Lifecycle {
                            self.replace = Some(kind);
                        }
                        return Waited::Notice;
                    }
                }
                _ = tokio::time::sleep_until(until) => return Waited::Elapsed,
                _ = notify.watchdog_due() => notify.ping(),
            }
        }
    }
}

/// When this instance launched (the identity document's `pendingTime`), read once; the
/// supervisor's own start if IMDS does not say.
/// Whether this is a spot instance (IMDS `instance-life-cycle`), read once; unknown
/// (IMDS does not answer) counts as on-demand.
async fn spot_of(cache: &mut Option<bool>) -> bool {
    if let Some(s) = *cache {
        return s;
    }
    let imds = SdkImds::new();
    let s = match tokio::time::timeout(Duration::from_secs(5), imds.get(interrupt::LIFE_CYCLE_PATH))
        .await
    {
        Ok(Ok(v)) => v.trim() == "spot",
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "instance-life-cycle unknown: on-demand assumed");
            false
        }
        Err(_) => false,
    };
    *cache = Some(s);
    s
}

async fn launch_of(cache: &mut Option<SystemTime>, fallback: SystemTime) -> SystemTime {
    if let Some(t) = *cache {
        return t;
    }
    let t = match launch_time(&SdkImds::new(), 3, Duration::from_millis(200)).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "launch time unknown: max_uptime_secs counts from the supervisor's start");
            fallback
        }
    };
    *cache = Some(t);
    t
}

/// The status line with what is pending, if anything.
fn with_pending(status: &str, end: &Ending<'_>) -> String {
    if end.terminating.is_some() {
        format!("{status}; Auto Scaling is terminating this instance: the job finishes first")
    } else if let Some(kind) = &end.replace {
        format!("{status}; after the job: {}", kind.why())
    } else {
        status.to_string()
    }
}

/// Whether an interruption that spares a busy agent (Auto Scaling's termination with a
/// lifecycle hook, a rebalance recommendation, max uptime) waits for its job. Only a
/// one-job agent (`disconnect_after_job`) does: it exits after its job. An agent that
/// takes several jobs counts as busy from its first job on and would keep taking jobs,
/// so it is drained at once (see [`crate::interrupt`]).
fn waits_for_job(agent: &RunningAgent, settings: &Settings) -> bool {
    settings.disconnect_after_job && agent.progress().jobs > 0
}

/// Runs `step` while heartbeating `hook` (if any) so Auto Scaling keeps waiting.
async fn with_heartbeats<F: std::future::Future>(
    step: F,
    hook: Option<&interrupt::LifecycleWait>,
    asg: &SdkAutoScaling,
    beats: &mut u32,
) -> F::Output {
    let Some(hook) = hook else {
        return step.await;
    };
    let every = interrupt::heartbeat_every(hook.hook.heartbeat_timeout);
    tokio::pin!(step);
    let mut next = tokio::time::Instant::now() + every;
    loop {
        tokio::select! {
            biased;
            out = &mut step => return out,
            _ = tokio::time::sleep_until(next) => {
                // Bounded: the step (the drain) is not polled meanwhile.
                if let Ok(true) = tokio::time::timeout(HEARTBEAT_BOUND, hook.heartbeat(asg)).await {
                    *beats += 1;
                }
                next = tokio::time::Instant::now() + every;
            }
        }
    }
}

async fn drain(
    agent: &mut RunningAgent,
    agent_name: &str,
    grace: Duration,
    shutdown: &Shutdown,
    reasons: &mut mpsc::UnboundedReceiver<ShutdownReason>,
) -> Result<Option<ShutdownReason>, DaemonError> {
    tracing::info!(
        agent_name,
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
        agent_name,
        exit_reason = reason.map(ShutdownReason::as_str).unwrap_or("none"),
        status = %describe_status(&exit.status),
        "drained"
    );
    Ok(reason)
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
                        if s.ignored_keys != cur.ignored_keys {
                            crate::startup::warn_ignored_keys(&s);
                        }
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

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stops leader work and releases the lease (bounded, with the watchdog fed), if this
/// instance has any.
async fn hand_leadership_on(leader: &mut Option<LeaderWork>, notify: &mut Notifier) {
    if let Some(l) = leader.take() {
        notify
            .during(
                "handing leadership on",
                LEADER_STOP_BOUND,
                l.stop_and_release(),
            )
            .await;
    }
}
