//! # agent-supervisor
//!
//! The on-instance daemon of agent-fleet, baked into the AMI and started by systemd.
//! It learns its stack from IMDS (IMDSv2 only), reads the runtime config and the
//! registration token from SSM, writes the Semaphore agent's `config.yaml`, runs the
//! agent as an unprivileged user in its own process group, and, when the agent is done,
//! ends its own instance through the Auto Scaling group (see [`lifecycle`]).
//!
//! ## Interface
//!
//! - `agent-supervisor run` — the daemon. Exit 0 after a drain; 1 on a runtime failure;
//!   2 on bad input (config, token, user data, IMDS), before any agent starts; 130 when a
//!   second stop signal aborted the drain.
//! - `agent-supervisor hook` — the agent's shutdown hook (see [`shutdown_hook`]).
//! - `agent-supervisor check` — preflight for a person on the instance (see [`check`]).
//!
//! Signals: the first SIGTERM/SIGINT drains (SIGTERM to the agent's group, the
//! interruption grace plus a margin, then SIGKILL to the group); a second aborts.
//!
//! systemd: `Type=notify` — `READY=1` once the agent process runs (scaler-only role: once
//! the election stands), `STOPPING=1` when a stop begins, `STATUS=` lines, and `WATCHDOG=1`
//! every `WATCHDOG_USEC / 2` from the main loop when `WatchdogSec=` is set (see [`notify`]).
//!
//! ## Inputs and outputs
//!
//! - IMDS: instance id, region, user data (`AGENT_FLEET_STACK=…`,
//!   `AGENT_FLEET_CONFIG_PARAMETER=…`), see [`config::StackIdentity`]; at boot the Auto
//!   Scaling target lifecycle state: `Warmed:*` is the warm pool, where the supervisor
//!   warms up without the token and waits (see [`pool`]); every 2 s the spot interruption
//!   notice, the rebalance recommendation and the target lifecycle state (see
//!   [`interrupt`]).
//! - CloudWatch Logs: `CreateLogStream` and `PutLogEvents` to its own stream (see [`logs`]).
//! - Auto Scaling: `TerminateInstanceInAutoScalingGroup` for its own instance (see
//!   [`lifecycle`]), and, with the group's termination lifecycle hook or its warm pool's
//!   launch hook, `RecordLifecycleActionHeartbeat` and `CompleteLifecycleAction`; a pooled
//!   instance also reads its own and its group's launch template
//!   (`DescribeAutoScalingInstances`, `DescribeAutoScalingGroups`) and the image parameter,
//!   to tell whether it is stale.
//! - SSM: the runtime config parameter (JSON, [`config::RuntimeConfig`]), the
//!   registration token (SecureString) and GitHub's SSH host keys (`known_hosts_parameter`,
//!   see [`known_hosts`]), which the leader refreshes from GitHub's meta API
//!   (`github_meta_url`, see [`scaler::host_keys`]).
//! - Files, in `--work-dir` (default `/var/lib/agent-supervisor`): `config.yaml` (0600,
//!   agent user), `shutdown-hook.sh`, `hook.sock`, and the markers `boot-timing`,
//!   `job-taken` and `warmed` (this instance warmed up in the warm pool); GitHub's host keys
//!   added to the agent user's `~/.ssh/known_hosts` (`--known-hosts-file`; read from the
//!   AMI's `--known-hosts-fallback` while the parameter holds none).
//! - Logs: journald with structured fields, stderr when the journal is absent (see
//!   [`telemetry`] for the field names); with the runtime config's `log_group`, the same
//!   records and cloud-init's output (`--cloud-init-log`) also to CloudWatch Logs, a stream
//!   per instance (see [`logs`]; `cloud-init-log.offset` in the work dir); the boot timing
//!   and spot interruptions also as CloudWatch metrics (see [`boot`], [`interrupt`]).

pub mod agent;
pub mod aws;
pub mod boot;
pub mod check;
pub mod config;
pub mod coordinator;
pub mod daemon;
pub mod election;
pub mod firewall;
pub mod interrupt;
pub mod isolation;
pub mod jobcreds;
pub mod known_hosts;
pub mod lifecycle;
pub mod logs;
pub mod notify;
pub mod pool;
pub mod reload;
pub mod retry;
pub mod scaler;
pub mod shutdown_hook;
pub mod startup;
pub mod telemetry;
pub mod tls;

use tokio_util::sync::CancellationToken;

/// The two stop triggers: the first signal cancels `drain`, the second `abort`.
/// Passed in so tests can fire them.
#[derive(Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub abort: CancellationToken,
}

impl Shutdown {
    /// Wires SIGTERM and SIGINT: first → drain, second → abort.
    pub fn from_signals() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let s = Self::default();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let t = s.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                seen += 1;
                if seen == 1 {
                    tracing::info!("stop signal received: draining");
                    t.drain.cancel();
                } else {
                    t.abort.cancel();
                }
            }
        });
        Ok(s)
    }
}

/// A spawned task that is aborted when this is dropped.
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
