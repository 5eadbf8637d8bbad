//! `agent-supervisor` — see the crate documentation of `agent_supervisor`.

use agent_supervisor::daemon::{self, RunOptions};
use agent_supervisor::notify::Notifier;
use agent_supervisor::{boot, check, logs, shutdown_hook, telemetry, Shutdown};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "agent-supervisor",
    version,
    about = "Supervises the Semaphore agent on an agent-fleet EC2 instance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (what systemd starts).
    Run(RunArgs),
    /// The agent's shutdown hook: hand SEMAPHORE_AGENT_SHUTDOWN_REASON to the daemon.
    Hook {
        #[arg(long, default_value = "/var/lib/agent-supervisor/hook.sock")]
        socket: PathBuf,
    },
    /// Preflight: IMDS, config and token parameters, the group, the cache bucket.
    Check(RunArgs),
    /// Close IMDS to the agent user now (what `run` does before the first agent), or with
    /// --check only say whether it is closed.
    ImdsFirewall {
        #[arg(long, env = "AGENT_SUPERVISOR_AGENT_USER", default_value = "semaphore")]
        agent_user: String,
        #[arg(long, env = "AGENT_SUPERVISOR_NFT", default_value = "nft")]
        nft: PathBuf,
        #[arg(long)]
        check: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// `agent`, or `scaler` (no agent; election and scaling only). Default: the user
    /// data's AGENT_FLEET_ROLE, else agent.
    #[arg(long, env = "AGENT_SUPERVISOR_ROLE")]
    role: Option<agent_supervisor::config::Role>,
    /// The Semaphore agent binary.
    #[arg(
        long,
        env = "AGENT_SUPERVISOR_AGENT_BINARY",
        default_value = "/opt/semaphore/agent/agent"
    )]
    agent_binary: PathBuf,
    /// Unprivileged user the agent runs as.
    #[arg(long, env = "AGENT_SUPERVISOR_AGENT_USER", default_value = "semaphore")]
    agent_user: String,
    /// Where config.yaml, the hook script and the hook socket live.
    #[arg(
        long,
        env = "AGENT_SUPERVISOR_WORK_DIR",
        default_value = "/var/lib/agent-supervisor"
    )]
    work_dir: PathBuf,
    /// A cgroup v2 directory under which the agent gets a cgroup of its own (`<dir>/agent`);
    /// default: the supervisor's own cgroup (systemd's Delegate=yes).
    #[arg(long, env = "AGENT_SUPERVISOR_AGENT_CGROUP")]
    agent_cgroup: Option<PathBuf>,
    /// Extra NAME=VALUE for the agent's environment (repeatable).
    #[arg(long = "agent-env", value_parser = parse_env)]
    agent_env: Vec<(String, String)>,
    /// Variables passed from the daemon's environment to the agent's, e.g. HTTPS_PROXY (comma list).
    #[arg(long, env = "AGENT_SUPERVISOR_PASS_ENV", value_delimiter = ',')]
    pass_env: Vec<String>,
    /// Command that powers the instance off, the termination chain's last resort.
    #[arg(
        long,
        env = "AGENT_SUPERVISOR_POWEROFF_COMMAND",
        default_value = "systemctl poweroff",
        value_delimiter = ' '
    )]
    poweroff_command: Vec<String>,
    /// Seconds to wait for Auto Scaling to stop us after termination was requested, before powering off.
    #[arg(
        long,
        env = "AGENT_SUPERVISOR_TERMINATE_TIMEOUT_SECS",
        default_value_t = 600
    )]
    terminate_timeout_secs: u64,
    /// First delay before restarting a failed agent; doubles per failure.
    #[arg(
        long,
        env = "AGENT_SUPERVISOR_RESTART_BACKOFF_MS",
        default_value_t = 1000
    )]
    restart_backoff_ms: u64,
    /// Longest delay between agent restarts.
    #[arg(
        long,
        env = "AGENT_SUPERVISOR_RESTART_BACKOFF_CAP_SECS",
        default_value_t = 300
    )]
    restart_backoff_cap_secs: u64,
    /// Seconds added to the interruption grace before the agent's group is killed on drain:
    /// by default one sync interval (6 s), stopping and reporting the job (5 s) and the
    /// agent's shutdown (3 s) — see `interrupt::DRAIN_MARGIN`.
    #[arg(long, env = "AGENT_SUPERVISOR_DRAIN_MARGIN_SECS", default_value_t = agent_supervisor::interrupt::DRAIN_MARGIN.as_secs())]
    drain_margin_secs: u64,
    /// IMDS attempts per item at boot (backoff from 200 ms).
    #[arg(long, env = "AGENT_SUPERVISOR_IMDS_ATTEMPTS", default_value_t = 6)]
    imds_attempts: u32,
    /// First delay when retrying a throttled or failed AWS call.
    #[arg(long, env = "AGENT_SUPERVISOR_AWS_RETRY_MS", default_value_t = 500)]
    aws_retry_ms: u64,
    /// Leave IMDS open to the agent user (job code can then read the instance role's
    /// credentials). For machines without nftables; never on a fleet.
    #[arg(long, env = "AGENT_SUPERVISOR_NO_IMDS_FIREWALL")]
    no_imds_firewall: bool,
    /// The nft binary that closes IMDS to the agent user.
    #[arg(long, env = "AGENT_SUPERVISOR_NFT", default_value = "nft")]
    nft: PathBuf,
    /// The script that applies the job isolation level (vm or strict) before the first agent.
    #[arg(long, env = "AGENT_SUPERVISOR_ISOLATION_SCRIPT", default_value = agent_supervisor::isolation::DEFAULT_SCRIPT)]
    isolation_script: PathBuf,
    /// The docker CLI a pooled instance warms the daemon and the warm images with.
    #[arg(long, env = "AGENT_SUPERVISOR_DOCKER", default_value = "docker")]
    docker: PathBuf,
    /// Seconds a pooled instance waits for the Docker daemon to answer while warming (0: no wait).
    #[arg(
        long,
        env = "AGENT_SUPERVISOR_WARM_DOCKER_WAIT_SECS",
        default_value_t = 120
    )]
    warm_docker_wait_secs: u64,
    /// Where GitHub's SSH host keys are added for the agent user before the agent starts
    /// (default: the agent user's ~/.ssh/known_hosts).
    #[arg(long, env = "AGENT_SUPERVISOR_KNOWN_HOSTS_FILE")]
    known_hosts_file: Option<PathBuf>,
    /// The AMI's GitHub host keys (written at build time), used while the stack's parameter holds none.
    #[arg(long, env = "AGENT_SUPERVISOR_KNOWN_HOSTS_FALLBACK", default_value = agent_supervisor::known_hosts::DEFAULT_FALLBACK)]
    known_hosts_fallback: PathBuf,
    /// cloud-init's output file, shipped to CloudWatch Logs with the supervisor's records
    /// when the runtime config names a log group.
    #[arg(
        long,
        env = "AGENT_SUPERVISOR_CLOUD_INIT_LOG",
        default_value = "/var/log/cloud-init-output.log"
    )]
    cloud_init_log: PathBuf,
    /// KiB of log entries kept for CloudWatch Logs while it cannot be reached; beyond it
    /// the oldest are dropped (and counted).
    #[arg(long, env = "AGENT_SUPERVISOR_LOG_QUEUE_KIB", default_value_t = agent_supervisor::logs::DEFAULT_QUEUE_KIB)]
    log_queue_kib: usize,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("{k:?} is not a valid variable name"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// The largest operator-given timeout taken as is (a day); larger ones are cut to it.
const MAX_SECS: u64 = 24 * 3600;

impl RunArgs {
    fn options(self) -> RunOptions {
        RunOptions {
            role: self.role,
            agent_binary: self.agent_binary,
            agent_user: self.agent_user,
            work_dir: self.work_dir,
            agent_cgroup: self.agent_cgroup,
            agent_env: self.agent_env,
            pass_env: self
                .pass_env
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            poweroff_command: self
                .poweroff_command
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            // At most a day: a larger value means "never" and could overflow a deadline.
            terminate_timeout: Duration::from_secs(self.terminate_timeout_secs.min(MAX_SECS)),
            restart_backoff: Duration::from_millis(self.restart_backoff_ms.max(1)),
            restart_backoff_cap: Duration::from_secs(self.restart_backoff_cap_secs.max(1)),
            drain_margin: Duration::from_secs(self.drain_margin_secs.min(MAX_SECS)),
            imds_attempts: self.imds_attempts.max(1),
            aws_retry_backoff: Duration::from_millis(self.aws_retry_ms.max(1)),
            imds_firewall: !self.no_imds_firewall,
            nft: self.nft,
            isolation_script: self.isolation_script,
            docker: self.docker,
            warm_docker_wait: Duration::from_secs(self.warm_docker_wait_secs.min(MAX_SECS)),
            known_hosts_file: self.known_hosts_file,
            known_hosts_fallback: self.known_hosts_fallback,
            cloud_init_log: self.cloud_init_log,
        }
    }
}

/// `agent-supervisor imds-firewall`: apply (or with `check`, verify) the table that closes
/// IMDS to the agent user. Exit 0 when it is in place, 1 otherwise, 2 on a bad user.
fn imds_firewall(agent_user: &str, nft: &std::path::Path, check: bool) -> i32 {
    let uid = match agent_supervisor::agent::RunAs::lookup(agent_user) {
        Ok(Some(r)) => r.uid.as_raw(),
        Ok(None) => {
            eprintln!("agent-supervisor: the agent user {agent_user} is this process's own user: there is nobody to close IMDS to; fix: --agent-user names the unprivileged user");
            return 2;
        }
        Err(e) => {
            eprintln!("agent-supervisor: {e}");
            return 2;
        }
    };
    let done = if check {
        agent_supervisor::firewall::verify(nft, uid)
    } else {
        agent_supervisor::firewall::apply(nft, uid)
    };
    match done {
        Ok(()) => {
            println!(
                "IMDS closed to {agent_user} (uid {uid}): {} and {} rejected",
                agent_supervisor::firewall::IMDS_V4,
                agent_supervisor::firewall::IMDS_V6
            );
            0
        }
        Err(e) => {
            eprintln!("agent-supervisor: {e}");
            1
        }
    }
}

fn main() {
    let started = boot::Start::now();
    let cli = Cli::parse();
    agent_supervisor::tls::install_crypto_provider();
    let code = match cli.command {
        // The hook must return at once and never touch the runtime or the journal.
        Command::Hook { socket } => shutdown_hook::client(&socket),
        Command::Run(args) => {
            // Still single-threaded: the one safe moment to take systemd's variables
            // out of the environment (see `notify`).
            let notifier = Notifier::from_env();
            // Records are kept from the first one; the runtime config then says whether
            // they ship (see `logs`).
            let shipping = logs::Shared::new(args.log_queue_kib.saturating_mul(1024));
            logs::Shared::install(&shipping);
            telemetry::init(false, Some(shipping));
            runtime(|| async move {
                let shutdown = match Shutdown::from_signals() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot install signal handlers");
                        return 1;
                    }
                };
                let code = match daemon::run(args.options(), shutdown, notifier, started).await {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::error!(exit_code = e.exit_code(), "{e}");
                        e.exit_code()
                    }
                };
                // The last records (a drain's, a fatal error's) before the process ends.
                logs::flush(logs::FLUSH_BOUND).await;
                code
            })
        }
        Command::Check(args) => {
            telemetry::init(true, None);
            runtime(|| async move { check::run(&args.options()).await })
        }
        Command::ImdsFirewall {
            agent_user,
            nft,
            check,
        } => imds_firewall(&agent_user, &nft, check),
    };
    std::process::exit(code);
}

/// A single-threaded runtime: the daemon mostly waits, and one thread keeps it small.
fn runtime<F, Fut>(f: F) -> i32
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = i32>,
{
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f()),
        Err(e) => {
            eprintln!("agent-supervisor: cannot start the async runtime: {e}");
            1
        }
    }
}
