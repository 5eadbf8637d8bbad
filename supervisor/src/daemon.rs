//! `agent-supervisor run`: learn the stack, read config and token, start the tasks and
//! hand them to the [coordinator](crate::coordinator), which runs the instance until it
//! ends. Everything that can be wrong with the input is found before any agent starts,
//! and named with its fix.

use crate::agent::owner::AgentOwner;
use crate::aws::autoscaling::SdkAutoScaling;
use crate::aws::cloudwatch::{MetricsSink, QueryCloudWatch};
use crate::aws::imds::SdkImds;
use crate::aws::ssm::SdkParameterStore;
use crate::config::Role;
use crate::coordinator::{Channels, Coordinator, Ports};
use crate::election::LeaderWork;
use crate::interrupt::LifecycleWait;
use crate::jobcreds::JobAws;
use crate::notify::Notifier;
use crate::pool::{self, StartKind, Target};
use crate::reload::Reloader;
use crate::{boot, interrupt, shutdown_hook, AbortOnDrop, Shutdown};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::startup::{prepare, read_token, Prepared};
pub use crate::startup::{DaemonError, RunOptions};

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
    mut start: boot::Start,
    span: tracing::Span,
) -> Result<(), DaemonError> {
    notify.status("starting: reading instance metadata, runtime config and token");
    let Prepared {
        instance_id,
        identity,
        mut settings,
        sdk,
    } = prepare(&opts).await?;
    let mut config_read = Instant::now();
    span.record("instance_id", instance_id.as_str());
    span.record("stack", identity.stack_name.as_str());
    let ssm = SdkParameterStore::new(&sdk);
    let role = opts.role.or(identity.role).unwrap_or_default();
    span.record("role", role.as_str());
    ship_logs(
        &opts,
        &settings,
        &sdk,
        &instance_id,
        &identity.stack_name,
        role,
    );
    let mut start_kind = StartKind::Cold;
    let mut jobs_prepared = false;
    if role == Role::Agent {
        // Before anything runs: a socket path that cannot be bound would stop the agent's
        // start much later.
        shutdown_hook::socket_path(&opts.work_dir).map_err(DaemonError::Input)?;
        let imds = SdkImds::new();
        let target = pool::target(&imds, settings.launch_hook.is_some()).await;
        if let Target::Warmed(state) = &target {
            // Token-free, so done in the pool: off the warm start's path.
            crate::isolation::apply(&opts.isolation_script, settings.job_isolation).await?;
            crate::firewall::close_for(&opts)?;
            jobs_prepared = true;
            let asg = SdkAutoScaling::new(&sdk);
            let warmup = host_warmup(&opts, &settings);
            let stay = pool::Pool {
                asg: &asg,
                imds: &imds,
                warmup: &warmup,
                launch: launch_wait(&settings, &instance_id),
                termination: settings.lifecycle_hook.clone().map(|hook| LifecycleWait {
                    group: settings.agent_group.clone(),
                    hook,
                    instance_id: instance_id.clone(),
                }),
                work_dir: &opts.work_dir,
                aws_retry_backoff: opts.aws_retry_backoff,
            }
            .stay(state, &shutdown, &mut notify)
            .await;
            if stay == pool::Left::Stopped {
                notify.stopping("stopping in the warm pool");
                return Ok(());
            }
            // Taken into service while running (a running pool, or resumed from
            // hibernation): the start counts from now, and the config is read afresh.
            start = boot::Start::now();
            settings = prepare(&opts).await?.settings;
            config_read = Instant::now();
        }
        start_kind = StartKind::of(&opts.work_dir);
        tracing::info!(
            start = start_kind.as_str(),
            target_state = ?target,
            "starting {} (target lifecycle state {target:?})",
            match start_kind {
                StartKind::Warm => "warm: taken from the warm pool",
                StartKind::Cold => "cold",
            }
        );
    }
    // The way into service may hold the instance in Pending:Wait (the launch hook): done
    // in the background, the agent's start does not wait for it.
    let launched = match (role, launch_wait(&settings, &instance_id)) {
        (Role::Agent, Some(wait)) => Some(pool::complete_in_background(
            SdkAutoScaling::new(&sdk),
            wait,
            opts.aws_retry_backoff,
        )),
        _ => None,
    };
    // GitHub's host keys for the agent user: read alongside the token, written before the
    // agent starts (see `crate::known_hosts`).
    let known_hosts = (role == Role::Agent).then(|| {
        AbortOnDrop(tokio::spawn(
            crate::known_hosts::for_agent(
                ssm.clone(),
                settings.known_hosts.parameter.clone(),
                opts.known_hosts_fallback.clone(),
                opts.agent_user.clone(),
                opts.known_hosts_file.clone(),
            )
            .in_current_span(),
        ))
    });
    let token = if start_kind == StartKind::Warm {
        let (asg, imds) = (SdkAutoScaling::new(&sdk), SdkImds::new());
        let (stale, token) = tokio::join!(
            pool::stale(
                &asg,
                &imds,
                &ssm,
                &settings.agent_group,
                &instance_id,
                settings.image_parameter.as_deref(),
            ),
            read_token(&ssm, &settings, opts.aws_retry_backoff)
        );
        if let Some(why) = stale {
            let ending = pool::Ending {
                instance_id: &instance_id,
                launched,
                poweroff: &opts.poweroff_command,
                terminate_timeout: opts.terminate_timeout,
                aws_retry_backoff: opts.aws_retry_backoff,
            };
            return ending.stale(&asg, &why, shutdown, notify).await;
        }
        token?
    } else {
        read_token(&ssm, &settings, opts.aws_retry_backoff).await?
    };
    let token_read = Instant::now();

    let (settings_tx, settings_rx) = watch::channel(settings.clone());
    let settings_tx = Arc::new(settings_tx);
    let reloader = Reloader {
        ssm: ssm.clone(),
        settings: settings_tx.clone(),
        backoff: opts.aws_retry_backoff,
    };
    let _reload = AbortOnDrop(tokio::spawn(reloader.run().in_current_span()));
    // With a scaler group, agents hold no leader powers (their role has none either): a
    // job, root on its VM, must not be able to steer the fleet through its supervisor.
    let stands = role == Role::Scaler || settings.agents_lead;
    let leader = if stands {
        LeaderWork::start(
            &sdk,
            &identity.stack_name,
            &instance_id,
            role == Role::Scaler,
            settings_rx.clone(),
            &token,
        )
        .map_err(DaemonError::Runtime)?
    } else {
        tracing::info!(
            "agents do not lead (agents_lead is false): the scaler group's instance leads"
        );
        None
    };
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
        crate::coordinator::scaler_only(leader, shutdown, notify).await;
        return Ok(());
    }

    // Before the first agent: the job isolation level, and job code never reaches the
    // instance role through IMDS.
    if !jobs_prepared {
        crate::isolation::apply(&opts.isolation_script, settings.job_isolation).await?;
        crate::firewall::close_for(&opts)?;
    }

    if let Some(mut k) = known_hosts {
        let _ = (&mut k.0).await;
    }

    // Boot timing: once per instance (the marker survives a restart of the supervisor).
    let boot = boot::Report::new(
        opts.work_dir.join(boot::MARKER),
        &identity.stack_name,
        &sdk,
        SdkImds::new(),
        (start, config_read, token_read),
    )
    .metrics(settings.agents_lead)
    .start_kind(start_kind);
    let owner = AgentOwner::new(
        &opts,
        &instance_id,
        (ssm, SdkImds::new()),
        settings_tx,
        token,
        boot,
    )?
    .with_job_aws(
        // Before the first agent: the job role's credentials endpoint (`crate::jobcreds`).
        JobAws::start(&sdk, &settings, &instance_id)
            .await
            .map_err(DaemonError::Runtime)?,
    );
    tracing::info!(
        group = %settings.agent_group,
        endpoint = %settings.endpoint,
        "supervisor ready"
    );
    let (command_tx, command_rx) = mpsc::unbounded_channel();
    let (event_tx, event_rx) = mpsc::unbounded_channel();
    let _owner = AbortOnDrop(tokio::spawn(
        owner.run(command_rx, event_tx).in_current_span(),
    ));
    // Interruptions (see `crate::interrupt`): IMDS notices.
    let (notice_tx, notice_rx) = mpsc::unbounded_channel();
    let _watcher = AbortOnDrop(tokio::spawn(
        interrupt::watch(SdkImds::new(), interrupt::POLL_EVERY, notice_tx).in_current_span(),
    ));
    let ports = Ports {
        asg: SdkAutoScaling::new(&sdk),
        imds: SdkImds::new(),
        leader,
        // Publishing needs the leader's cloudwatch:PutMetricData, which the agents' role
        // only has when agents lead.
        spot_metric: if settings.agents_lead {
            spot_metric(&sdk, &identity.stack_name)
        } else {
            Box::new(|| {
                tracing::debug!(
                    metric = interrupt::SPOT_METRIC,
                    "not published: agents do not lead"
                )
            })
        },
    };
    let channels = Channels {
        agent: command_tx,
        events: event_rx,
        notices: notice_rx,
        settings: settings_rx,
    };
    Coordinator::new(
        opts,
        &instance_id,
        start.wall,
        ports,
        channels,
        (shutdown, notify),
    )
    .run()
    .await
}

/// Starts shipping this instance's records (and cloud-init's output) to the stack's log
/// group, or turns the buffering off when the runtime config names none. The tasks are
/// left running to the process's end: the daemon's last records are flushed after `run`
/// returns.
fn ship_logs(
    opts: &RunOptions,
    settings: &crate::config::Settings,
    sdk: &aws_config::SdkConfig,
    instance_id: &str,
    stack: &str,
    role: Role,
) {
    let Some(shared) = crate::logs::global() else {
        return;
    };
    let Some(group) = settings.log_group.as_deref() else {
        shared.turn_off();
        tracing::info!("no log group in the runtime config: logs stay in the journal");
        return;
    };
    let sink = match crate::aws::logs::JsonLogs::new(sdk) {
        Ok(s) => s,
        Err(e) => {
            shared.turn_off();
            tracing::warn!(error = %e, "cannot ship logs to CloudWatch Logs; they stay in the journal");
            return;
        }
    };
    let _shipper = shared.start(crate::logs::Shipper::new(sink, group, instance_id));
    let mut fields = serde_json::Map::new();
    fields.insert("INSTANCE_ID".into(), instance_id.into());
    fields.insert("STACK".into(), stack.into());
    fields.insert("ROLE".into(), role.as_str().into());
    let _tail = tokio::spawn(crate::logs::tail_file(
        shared.clone(),
        opts.cloud_init_log.clone(),
        opts.work_dir.join(CLOUD_INIT_OFFSET),
        "cloud-init",
        fields,
    ));
    tracing::info!(
        log_group = group,
        log_stream = instance_id,
        cloud_init_log = %opts.cloud_init_log.display(),
        "shipping logs to CloudWatch Logs"
    );
}

/// In the work dir: how far cloud-init's output was shipped (a restarted supervisor goes
/// on from there).
pub const CLOUD_INIT_OFFSET: &str = "cloud-init-log.offset";

/// The launch hook's wait for this instance, if the group has a warm pool.
fn launch_wait(settings: &crate::config::Settings, instance_id: &str) -> Option<LifecycleWait> {
    settings.launch_hook.clone().map(|hook| LifecycleWait {
        group: settings.agent_group.clone(),
        hook,
        instance_id: instance_id.to_string(),
    })
}

/// What a pooled instance warms: the Docker daemon and the warm images (the root daemon's:
/// under `strict` jobs use the agent user's rootless one, so none are pulled), the agent's
/// binary and the agent user's toolbox.
fn host_warmup(opts: &RunOptions, settings: &crate::config::Settings) -> pool::HostWarmup {
    let strict = settings.job_isolation == crate::config::JobIsolation::Strict;
    if strict && !settings.warm_images.is_empty() {
        tracing::info!("job isolation strict: jobs use rootless Docker, so the warm images are not pulled into the root daemon");
    }
    let mut files = vec![opts.agent_binary.clone()];
    if let Ok(Some(user)) = nix::unistd::User::from_name(&opts.agent_user) {
        files.push(user.dir.join(".toolbox"));
    }
    pool::HostWarmup {
        docker: opts.docker.clone(),
        docker_wait: opts.warm_docker_wait,
        images: if strict {
            vec![]
        } else {
            settings.warm_images.clone()
        },
        pull_bound: std::time::Duration::from_secs(600),
        files,
        read_budget: pool::READ_BUDGET,
    }
}

/// Publishes one `SpotInterruptions` datum in the background (never delays the drain).
fn spot_metric(sdk: &aws_config::SdkConfig, stack: &str) -> Box<dyn Fn() + Send> {
    let (sdk, stack) = (sdk.clone(), stack.to_string());
    Box::new(move || {
        let (sdk, stack) = (sdk.clone(), stack.clone());
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
    })
}
