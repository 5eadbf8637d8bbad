//! The EC2 side of the test bed: simulated instances, each a real `agent-supervisor`
//! process with its own fake IMDS, and a launcher that keeps one per in-service instance
//! of the emulated groups, stopping it (like a shutdown: SIGTERM, then SIGKILL) when
//! Auto Scaling terminates the instance. A whole fleet on one machine.
//!
//! While Auto Scaling is terminating an instance (`Terminating`, `Terminating:Wait`,
//! `Terminating:Proceed`: a termination lifecycle hook holds it), the instance keeps
//! running and its IMDS `autoscaling/target-lifecycle-state` says `Terminated`, as EC2's
//! does; the supervisor is stopped when the instance leaves the group.
//!
//! Warm pools (`GET /_bed/warm_pool`, see moto_server.py): an instance launched into a pool
//! boots like any other, its IMDS saying `Warmed:<PoolState>`, while Auto Scaling holds it
//! in `Warmed:Pending(:Wait)`. Then the pool state maps to processes:
//!
//! | Auto Scaling state | the instance here |
//! |---|---|
//! | `Warmed:Pending`, `Warmed:Pending:Wait`, `Warmed:Pending:Proceed`, `Warmed:Running` | its supervisor runs |
//! | `Warmed:Stopped` | powered off: every process of its supervisor's tree and agents SIGKILLed; its directory (disk, work dir) kept |
//! | `Warmed:Hibernated` | its processes SIGSTOPped (memory kept) |
//! | out of the pool (`Pending`, `Pending:Wait`, `Pending:Proceed`, `InService`) | stopped: a new supervisor process on the same directory; hibernated: SIGCONT; IMDS says `InService` either way |
//!
//! EC2's own delays (a cold launch, a start from stopped or hibernated, a stop) are
//! [`Ec2Delays`]: none by default, or published figures ([`Ec2Delays::published`]).

use crate::imds::{FakeImds, InstanceMeta};
use crate::moto::Moto;
use anyhow::{bail, Context};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{broadcast, watch};

/// The directory holding the workspace's built binaries (`agent-supervisor`, `agent`).
/// Found next to the running executable: a test in `target/<profile>/deps/`, a bin in
/// `target/<profile>/`. `AGENT_FLEET_BIN_DIR` overrides.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(d) = std::env::var("AGENT_FLEET_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    for dir in exe.ancestors().skip(1).take(3) {
        if dir.join("agent-supervisor").is_file() && dir.join("agent").is_file() {
            return Ok(dir.to_path_buf());
        }
    }
    bail!(
        "agent-supervisor and agent binaries not found near {}; build them first: cargo build --workspace --bins",
        exe.display()
    )
}

/// Where the real Semaphore agent is built (`make real-agent`, `.ci/run`): beside the
/// profile directories of the target dir, as `semaphore-agent`.
pub const REAL_AGENT_FILE: &str = "semaphore-agent";

/// The real Semaphore agent binary for the real-agent tier of the tests.
///
/// `AGENT_FLEET_REAL_AGENT=PATH` names one; otherwise `<target dir>/semaphore-agent`, which
/// the Makefile builds from `../shared/real-agent` when that folder is there.
/// `Ok(None)` means "skip the real-agent tier" (a user's clone without `../shared`); the
/// caller prints [`real_agent_skip_line`]. Where `../shared/real-agent` exists but the
/// binary was not built, that is an error: the tier must not silently vanish in CI.
pub fn real_agent() -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = std::env::var_os("AGENT_FLEET_REAL_AGENT") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("AGENT_FLEET_REAL_AGENT={} is not a file", p.display());
        }
        return Ok(Some(p));
    }
    let bins = bin_dir()?;
    let target = bins.parent().unwrap_or(&bins);
    let built = target.join(REAL_AGENT_FILE);
    if built.is_file() {
        return Ok(Some(built));
    }
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/real-agent");
    if shared.join("build.sh").is_file() {
        bail!(
            "{} exists but the real agent was not built into {}: run `make real-agent`",
            shared.display(),
            built.display()
        );
    }
    Ok(None)
}

/// The one line a skipped real-agent test prints.
pub fn real_agent_skip_line(test: &str) -> String {
    format!(
        "{test}: real-agent tier skipped: no ../shared/real-agent beside this clone; \
         set AGENT_FLEET_REAL_AGENT=PATH to a built Semaphore agent to run it"
    )
}

/// Which Semaphore agent an instance's supervisor runs: a parameter of the bed, so one
/// scenario runs with both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AgentKind {
    /// The test bed's fake (`tests/src/bin/agent/`): fast, and able to inject faults
    /// (`FAKE_AGENT_*` knobs) the real one cannot.
    #[default]
    Fake,
    /// The real Semaphore agent, built from `../shared/real-agent` ([`real_agent`]).
    Real(PathBuf),
}

impl AgentKind {
    /// The binary the supervisor is given as `--agent-binary`.
    pub fn binary(&self) -> anyhow::Result<PathBuf> {
        match self {
            AgentKind::Fake => Ok(bin_dir()?.join("agent")),
            AgentKind::Real(p) => Ok(p.clone()),
        }
    }

    /// `fake` or `real`, for names and messages.
    pub fn label(&self) -> &'static str {
        match self {
            AgentKind::Fake => "fake",
            AgentKind::Real(_) => "real",
        }
    }

    pub fn is_real(&self) -> bool {
        matches!(self, AgentKind::Real(_))
    }
}

/// The user data a test writes for its own groups (see the supervisor's `config` module);
/// `cfn/agent-fleet.yaml`'s launch templates also add `AGENT_FLEET_ROLE=agent|scaler`
/// (see [`FleetOptions::user_data_from_launch_template`]).
pub fn user_data(stack: &str, config_parameter: &str) -> String {
    format!("AGENT_FLEET_STACK={stack}\nAGENT_FLEET_CONFIG_PARAMETER={config_parameter}\n")
}

/// What a simulated instance's supervisor is started with.
#[derive(Debug, Clone)]
pub struct InstanceOptions {
    pub instance_id: String,
    pub group: String,
    pub user_data: Option<String>,
    pub life_cycle: String,
    /// The emulator's environment (AWS_ENDPOINT_URL, credentials, …).
    pub aws_env: Vec<(String, String)>,
    /// Parent of the instance's own directory.
    pub root: PathBuf,
    /// Extra `run` arguments.
    pub args: Vec<String>,
    /// Extra environment for the fake agent (knobs such as FAKE_AGENT_REGISTER_TRIES).
    pub agent_env: Vec<(String, String)>,
    /// Point IMDS somewhere else (an unreachable-IMDS test).
    pub imds_endpoint_override: Option<String>,
    /// The supervisor's subcommand: `run` (default) or `check`.
    pub command: String,
    /// Extra environment for the supervisor itself (e.g. systemd's `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// A command the supervisor is started through, e.g. `nsenter --mount=… --` (it must
    /// exec the supervisor, so that the pid is the supervisor's).
    pub wrapper: Vec<String>,
    /// The launch time the fake IMDS reports (`pendingTime`), Unix ms; `None`: when the
    /// fake IMDS started, just before the supervisor.
    pub launch_time_unix_ms: Option<u64>,
    /// The agent the supervisor runs.
    pub agent: AgentKind,
    /// What the fake IMDS says at `autoscaling/target-lifecycle-state` from the start
    /// (`None`: `InService`), e.g. `Warmed:Stopped` for an instance launched into a warm pool.
    pub target_lifecycle_state: Option<String>,
    /// Run the agent (and so its jobs) as this unprivileged user, as on an instance;
    /// `None`: as the bed's own user. With a user the supervisor gets
    /// `--no-imds-firewall`: its table would land in this machine's netfilter (the
    /// firewall has its own test in a network namespace) unless `imds_firewall`.
    pub agent_user: Option<String>,
    /// With `agent_user`: let the supervisor load its IMDS firewall into this machine's
    /// netfilter (the benchmark of the boot path; remove the table afterwards).
    pub imds_firewall: bool,
}

impl InstanceOptions {
    pub fn new(instance_id: &str, group: &str, moto: &Moto, root: &Path) -> Self {
        Self {
            instance_id: instance_id.to_string(),
            group: group.to_string(),
            user_data: None,
            life_cycle: "on-demand".into(),
            aws_env: moto.env(),
            root: root.to_path_buf(),
            args: vec![],
            agent_env: vec![],
            imds_endpoint_override: None,
            command: "run".into(),
            env: vec![],
            wrapper: vec![],
            launch_time_unix_ms: None,
            agent: AgentKind::Fake,
            target_lifecycle_state: None,
            agent_user: None,
            imds_firewall: false,
        }
    }
}

/// Something that happened in the simulated fleet, for timelines and tests.
#[derive(Debug, Clone)]
pub enum FleetEvent {
    Launched {
        instance_id: String,
        group: String,
    },
    Log {
        instance_id: String,
        line: String,
    },
    Exited {
        instance_id: String,
        status: Option<i32>,
    },
    Terminated {
        instance_id: String,
    },
    /// Auto Scaling began terminating the instance (its IMDS now says `Terminated`).
    Terminating {
        instance_id: String,
        lifecycle_state: String,
    },
    Desired {
        group: String,
        desired: i32,
    },
    /// A warm pool instance was powered off (`Warmed:Stopped`): its processes are gone, its
    /// directory stays.
    Stopped {
        instance_id: String,
    },
    /// A warm pool instance was hibernated (`Warmed:Hibernated`): its processes are stopped.
    Hibernated {
        instance_id: String,
    },
    /// A warm pool instance left the pool and runs again: a new supervisor process on its
    /// directory (`hibernated: false`), or its processes continued (`true`).
    Resumed {
        instance_id: String,
        hibernated: bool,
    },
}

/// One simulated instance: a fake IMDS and a running `agent-supervisor run`.
pub struct Instance {
    pub id: String,
    pub group: String,
    /// What its IMDS serves at `/latest/user-data`.
    pub user_data: Option<String>,
    pub imds: FakeImds,
    pub pid: i32,
    pub dir: PathBuf,
    pub started: Instant,
    /// CLOCK_MONOTONIC ns just before the supervisor was spawned.
    pub spawned_mono_ns: u64,
    /// The cgroup v2 directory its supervisor puts the agent's cgroup under (`agent/`),
    /// where this machine has a writable one.
    pub cgroup: Option<PathBuf>,
    lines: Arc<Mutex<Vec<String>>>,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl Instance {
    pub async fn start(
        opts: InstanceOptions,
        events: Option<broadcast::Sender<FleetEvent>>,
    ) -> anyhow::Result<Instance> {
        let bins = bin_dir()?;
        let meta = InstanceMeta {
            instance_id: opts.instance_id.clone(),
            user_data: opts.user_data.clone(),
            life_cycle: opts.life_cycle.clone(),
            launch_time_unix_ms: opts.launch_time_unix_ms,
            ..InstanceMeta::default()
        };
        let imds = FakeImds::start(meta).await?;
        if let Some(state) = &opts.target_lifecycle_state {
            imds.set_target_lifecycle_state(state);
        }
        let dir = opts.root.join(&opts.instance_id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let events_path = dir.join("agent-events.jsonl");
        let own_user = || {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| "root".into())
        };
        let user = opts.agent_user.clone().unwrap_or_else(own_user);
        if opts.agent_user.is_some() {
            // The fake agent, now another user, appends its events here.
            std::fs::write(&events_path, "")?;
            std::fs::set_permissions(
                &events_path,
                std::os::unix::fs::PermissionsExt::from_mode(0o666),
            )?;
        }
        let supervisor = bins.join("agent-supervisor");
        let cgroup = bed_cgroup(&opts.instance_id);
        let mut cmd = match opts.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = tokio::process::Command::new(prog);
                c.args(args).arg(&supervisor);
                c
            }
            None => tokio::process::Command::new(&supervisor),
        };
        cmd.arg(&opts.command)
            .arg("--agent-binary")
            .arg(opts.agent.binary()?)
            .arg("--agent-user")
            .arg(&user)
            .arg("--work-dir")
            .arg(dir.join("work"))
            .arg("--poweroff-command")
            .arg(format!("touch {}", dir.join("powered-off").display()))
            .arg("--agent-env")
            .arg(format!("FAKE_AGENT_EVENTS={}", events_path.display()))
            .arg("--agent-env")
            .arg(format!("{BED_INSTANCE_ENV}={}", dir.display()))
            .args(
                opts.agent_env
                    .iter()
                    .flat_map(|(k, v)| ["--agent-env".to_string(), format!("{k}={v}")]),
            )
            .args(&opts.args)
            .args(
                (opts.agent_user.is_some() && !opts.imds_firewall).then_some("--no-imds-firewall"),
            )
            .args(
                cgroup
                    .iter()
                    .flat_map(|c| [std::ffi::OsStr::new("--agent-cgroup"), c.as_os_str()]),
            )
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "HOME",
                std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
            )
            .env("USER", &user)
            .envs(opts.aws_env.iter().map(|(k, v)| (k, v)))
            .env(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                opts.imds_endpoint_override
                    .clone()
                    .unwrap_or_else(|| imds.endpoint()),
            )
            .env(
                "AGENT_SUPERVISOR_LOG",
                std::env::var("AGENT_SUPERVISOR_LOG").unwrap_or_else(|_| "info".into()),
            )
            // glibc's arena count, for memory experiments (the AMI's unit may set it).
            .envs(
                std::env::var("MALLOC_ARENA_MAX")
                    .ok()
                    .map(|v| ("MALLOC_ARENA_MAX", v)),
            )
            // GitHub's host keys go to the instance's directory, never to the bed user's
            // ~/.ssh (root's, on a CI machine); no AMI file unless a test writes one there.
            .env("AGENT_SUPERVISOR_KNOWN_HOSTS_FILE", dir.join("known_hosts"))
            .env(
                "AGENT_SUPERVISOR_KNOWN_HOSTS_FALLBACK",
                dir.join("github_known_hosts"),
            )
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let spawned_mono_ns = crate::moto::monotonic_ns();
        let started = Instant::now();
        let mut child = cmd.spawn().context("spawning agent-supervisor")?;
        let pid = child.id().map(|p| p as i32).unwrap_or_default();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            let events = events.clone();
            let id = opts.instance_id.clone();
            let log = dir.join("supervisor.log");
            readers.push(tokio::spawn(async move {
                let mut r = BufReader::new(stream).lines();
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .ok();
                while let Ok(Some(line)) = r.next_line().await {
                    if let Some(f) = file.as_mut() {
                        use std::io::Write;
                        let _ = writeln!(f, "{line}");
                    }
                    if let Some(tx) = &events {
                        let _ = tx.send(FleetEvent::Log {
                            instance_id: id.clone(),
                            line: line.clone(),
                        });
                    }
                    if let Ok(mut l) = lines.lock() {
                        l.push(line);
                    }
                }
            }));
        }
        let (exit_tx, exit) = watch::channel(None);
        let id = opts.instance_id.clone();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            // The exit is reported once the supervisor's last lines are in (EOF on its
            // pipes), or after 2 s if something it left behind still holds them.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            for r in readers {
                let _ = tokio::time::timeout_at(deadline, r).await;
            }
            if let Some(tx) = &events {
                let _ = tx.send(FleetEvent::Exited {
                    instance_id: id,
                    status: status.and_then(|s| s.code()),
                });
            }
            let _ = exit_tx.send(status);
        });
        Ok(Instance {
            id: opts.instance_id,
            group: opts.group,
            user_data: opts.user_data,
            imds,
            pid,
            dir,
            started,
            spawned_mono_ns,
            cgroup,
            lines,
            exit,
        })
    }

    /// Everything the supervisor printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Waits for a supervisor output line containing `needle`.
    pub async fn wait_for_line(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .ok()
                .and_then(|l| l.iter().find(|l| l.contains(needle)).cloned())
            {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!(
                    "instance {}: no line containing {needle:?} within {timeout:?}; output:\n{}",
                    self.id,
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Lines the fake agent wrote to its events file (`start`, `registered`, `exit`, …).
    pub fn agent_events(&self) -> Vec<serde_json::Value> {
        agent_events(&self.dir.join("agent-events.jsonl"))
    }

    /// Waits until a fake agent event satisfies `f`.
    pub async fn wait_for_event(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&[serde_json::Value]) -> bool,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let ev = self.agent_events();
            if f(&ev) {
                return Ok(ev);
            }
            if Instant::now() > deadline {
                bail!("instance {}: {what} did not happen within {timeout:?}; agent events: {ev:?}\nsupervisor output:\n{}", self.id, self.output());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid), sig);
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits for the supervisor to exit.
    pub async fn wait_exit(&self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut rx = self.exit.clone();
        let status = match tokio::time::timeout(timeout, rx.wait_for(|s| s.is_some())).await {
            Ok(Ok(s)) => *s,
            Ok(Err(_)) => bail!("supervisor status channel closed"),
            Err(_) => None,
        };
        match status {
            Some(s) => Ok(s),
            None => bail!(
                "instance {}: supervisor still running after {timeout:?}; output:\n{}",
                self.id,
                self.output()
            ),
        }
    }

    /// Process groups of every agent this instance started (the wrapper's pid).
    pub fn agent_groups(&self) -> Vec<i32> {
        self.agent_events()
            .iter()
            .filter(|e| {
                e["event"] == "start"
                    && e.get("child").is_none_or(|c| !c.as_bool().unwrap_or(false))
            })
            .filter_map(|e| e["pid"].as_i64().map(|p| p as i32))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect()
    }

    /// Live processes the instance's agents left or still run — the agent, its wrapper,
    /// its jobs' shells —, whichever agent it is: each carries [`BED_INSTANCE_ENV`] in its
    /// environment (the supervisor passes it to the agent, the agent to its jobs).
    /// `(pid, process group, command)`.
    pub fn agent_processes(&self) -> Vec<(i32, i32, String)> {
        processes_with_env(&format!("{BED_INSTANCE_ENV}={}", self.dir.display()))
    }

    /// Every live process of this instance: its supervisor, the supervisor's descendants and
    /// the processes its agents started (see [`Instance::agent_processes`]).
    pub fn processes(&self) -> Vec<i32> {
        let mut pids = descendants(self.pid);
        pids.insert(0, self.pid);
        for (pid, _, _) in self.agent_processes() {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Powers the instance off, as EC2 stops it: SIGKILL to every process (no shutdown
    /// sequence runs), its directory untouched.
    pub fn power_off(&self) {
        // Twice: a process forked while the first pass ran is caught by the second.
        for _ in 0..2 {
            for pid in self.processes() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        self.kill_all();
    }

    /// Hibernates the instance: SIGSTOP to every process, memory kept.
    pub fn freeze(&self) {
        for _ in 0..2 {
            for pid in self.processes() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
            }
        }
    }

    /// Resumes a hibernated instance: SIGCONT to every process.
    pub fn thaw(&self) {
        for pid in self.processes() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }

    /// Kills the supervisor and any agent group it left (test teardown).
    pub fn kill_all(&self) {
        self.signal(Signal::SIGKILL);
        let groups = self
            .agent_groups()
            .into_iter()
            .chain(self.agent_processes().into_iter().map(|(_, g, _)| g));
        for g in groups.collect::<HashSet<_>>() {
            if g > 1 {
                let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill_all();
        if let Some(base) = &self.cgroup {
            let agent = base.join("agent");
            let _ = std::fs::write(agent.join("cgroup.kill"), "1");
            for _ in 0..50 {
                let _ = std::fs::remove_dir(&agent);
                if std::fs::remove_dir(base).is_ok() || !base.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// This machine's cgroup v2 hierarchy, if it has one (the unified one of a hybrid system).
pub fn cgroup_root() -> Option<&'static Path> {
    [
        Path::new("/sys/fs/cgroup"),
        Path::new("/sys/fs/cgroup/unified"),
    ]
    .into_iter()
    .find(|r| r.join("cgroup.procs").exists() && r.join("cgroup.subtree_control").exists())
}

/// A cgroup v2 directory for one instance's supervisor, under the machine's unified
/// hierarchy if it has a writable one (`None`: the supervisor runs the agent without).
pub fn bed_cgroup(instance_id: &str) -> Option<PathBuf> {
    let base = cgroup_root()?
        .join("agent-fleet-bed")
        .join(format!("{}-{instance_id}", std::process::id()));
    std::fs::create_dir_all(&base).ok()?;
    Some(base)
}

/// Reads a fake agent's JSON-lines events file.
pub fn agent_events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The variable that marks every process an instance's agent started (see
/// [`Instance::agent_processes`]); its value is the instance's directory.
pub const BED_INSTANCE_ENV: &str = "AGENT_FLEET_BED_INSTANCE";

/// Live (non-zombie) processes whose environment holds `entry` (`NAME=VALUE`):
/// `(pid, process group, command)`.
pub fn processes_with_env(entry: &str) -> Vec<(i32, i32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let me = std::process::id() as i32;
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            env.split(|b| *b == 0)
                .any(|v| v == entry.as_bytes())
                .then_some(pid)?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
            let mut f = rest.split_whitespace();
            let state = f.next()?;
            let pgrp = f.nth(1)?.parse::<i32>().ok()?;
            (state != "Z").then(|| (pid, pgrp, comm.to_string()))
        })
        .collect()
}

/// Live (non-zombie) descendants of `root`, parents before children.
pub fn descendants(root: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let parents: Vec<(i32, i32)> = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            let mut f = rest.split_whitespace();
            let state = f.next()?;
            let ppid = f.next()?.parse::<i32>().ok()?;
            (state != "Z").then_some((pid, ppid))
        })
        .collect();
    let mut out = vec![];
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, _) in parents.iter().filter(|(_, pp)| *pp == parent) {
            if !out.contains(pid) {
                out.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    out
}

/// Whether any live (non-zombie) process is left in a process group. Zombies are
/// ignored: an orphan reparented to a PID 1 that is slow to reap is already dead.
pub fn group_alive(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .any(|stat| {
            // pid (comm) state ppid pgrp …; comm may hold spaces, so split after the last ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut f = rest.split_whitespace();
            let state = f.next().unwrap_or("Z");
            let pgrp = f.nth(1).and_then(|p| p.parse::<i32>().ok());
            state != "Z" && pgrp == Some(pgid)
        })
}

/// EC2's state-transition delays, as the launcher plays them: how long after Auto Scaling
/// launches, starts or stops an instance its processes start, continue or die. A model, not
/// a measurement of this machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ec2Delays {
    /// A new instance: EC2 `pending` → `running`.
    pub pending_to_running: Duration,
    /// A stopped instance started again: `pending` → `running`.
    pub stopped_to_running: Duration,
    /// A hibernated instance started again: `pending` → `running`, and its RAM restored
    /// until its processes run on (there is no boot).
    pub hibernated_to_running: Duration,
    /// `running` → `stopped` (or hibernated): how long a warmed instance's processes keep
    /// running once Auto Scaling says `Warmed:Stopped` / `Warmed:Hibernated`.
    pub running_to_stopped: Duration,
    /// The operating system's boot until the supervisor's unit starts, after `running`, for a
    /// new or a stopped instance.
    pub boot: Duration,
}

impl Ec2Delays {
    /// No delays: the tests' default (a process starts as soon as its instance appears).
    pub const NONE: Ec2Delays = Ec2Delays {
        pending_to_running: Duration::ZERO,
        stopped_to_running: Duration::ZERO,
        hibernated_to_running: Duration::ZERO,
        running_to_stopped: Duration::ZERO,
        boot: Duration::ZERO,
    };

    /// Published figures, for the benchmark's model of a wave on EC2 (m7i.large, Amazon Linux
    /// 2023, us-east-1, three runs each, January 2026: brevdev/ec2-coldboot-research,
    /// `docs/cold-baseline-results.md`, `docs/start-stopped-results.md`,
    /// `docs/hibernate-results.md`):
    ///
    /// - `pending_to_running` 17.8 s: a cold RunInstances, pending → running 17 811 ms on
    ///   average (the API call itself, 4.8 s there, is Auto Scaling's and not counted);
    /// - `stopped_to_running` 16.4 s: StartInstances on a stopped instance, 16 372 ms;
    /// - `hibernated_to_running` 18.7 s: a hibernated one, 16 311 ms to running plus 2 381 ms
    ///   until it answered (RAM restore and network), there being no boot;
    /// - `boot` 3.2 s: running → sshd answering after a cold launch, 3 217 ms (3 042 ms after
    ///   a start from stopped): the kernel, systemd and cloud-init before a unit starts.
    ///   Colin Percival's ec2-boot-bench (daemonology.net, "EC2 boot time benchmarking",
    ///   2021) saw pending → running in about 5 s on c5.xlarge but a longer boot, so the
    ///   total is of the same order.
    /// - `running_to_stopped` 0: no published measurement of StopInstances' duration was
    ///   found (AWS documents none); it only delays the pool's refill, never a job's start.
    pub fn published() -> Ec2Delays {
        Ec2Delays {
            pending_to_running: Duration::from_millis(17_811),
            stopped_to_running: Duration::from_millis(16_372),
            hibernated_to_running: Duration::from_millis(16_311 + 2_381),
            running_to_stopped: Duration::ZERO,
            boot: Duration::from_millis(3_217),
        }
    }
}

/// What the launcher is told.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub groups: Vec<String>,
    /// Every instance's user data, unless [`FleetOptions::user_data_from_launch_template`].
    pub user_data: String,
    /// Give each new instance the user data of the launch template its group launches from
    /// ([`Moto::group_user_data`], fetched when the launcher first sees the instance), as EC2
    /// does, instead of [`FleetOptions::user_data`]: for groups made by `cfn/agent-fleet.yaml`,
    /// whose user data names the stack, the config parameter and the role. In this mode
    /// [`FleetOptions::group_args`] is not used, so the role comes from the user data's
    /// `AGENT_FLEET_ROLE` alone. An instance whose user data cannot be fetched is not started
    /// (a `FleetEvent::Log` line `launch failed: …` says why), like a failed start. An
    /// instance started again from a warm pool keeps the user data it was launched with.
    pub user_data_from_launch_template: bool,
    pub root: PathBuf,
    pub args: Vec<String>,
    pub agent_env: Vec<(String, String)>,
    /// Extra `run` arguments for the instances of one group (e.g. `--role scaler`). Not used
    /// with [`FleetOptions::user_data_from_launch_template`].
    pub group_args: BTreeMap<String, Vec<String>>,
    /// What the fake IMDS of a group's instances says at `instance-life-cycle` (`spot`);
    /// groups not named here: `on-demand`.
    pub group_life_cycle: BTreeMap<String, String>,
    pub poll: Duration,
    /// How long a terminated instance's supervisor gets after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// The agent every instance runs.
    pub agent: AgentKind,
    /// EC2's state-transition delays ([`Ec2Delays::NONE`] for tests).
    pub ec2: Ec2Delays,
}

/// Where a warm pool instance is, for the launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolPhase {
    /// Its supervisor runs (or is being started).
    Running,
    /// Powered off: no process, its directory kept.
    Stopped,
    /// Its processes are stopped (SIGSTOP).
    Hibernated,
}

/// A warm pool instance the launcher has seen.
#[derive(Debug, Clone)]
struct Pooled {
    phase: PoolPhase,
    /// A transition (with its EC2 delay) is under way; the next one waits for it.
    busy: bool,
}

/// What the launcher does next for a warm pool instance ([`FleetState::pool_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolStep {
    /// First seen, and running in Auto Scaling's eyes: boot it.
    Boot,
    /// Move it from this phase to the wanted one.
    Transition(PoolPhase),
    /// Running as wanted: keep its IMDS saying where it is.
    SetImds,
    /// Nothing now (a transition is under way, or it is where it should be).
    Wait,
}

/// The launcher: one supervisor per in-service instance of `groups`.
pub struct Fleet {
    events: broadcast::Sender<FleetEvent>,
    state: Arc<Mutex<FleetState>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct FleetState {
    running: BTreeMap<String, Instance>,
    /// Instances whose supervisor was stopped (terminated or powered off), kept for their
    /// output; an instance started again from a warm pool may appear more than once.
    retired: Vec<Instance>,
    launched: Vec<String>,
    terminated: Vec<String>,
    /// Instances seen in a `Terminating*` state, with when the launcher first saw that.
    terminating: BTreeMap<String, Instant>,
    /// Instances seen in a warm pool, by id.
    pooled: BTreeMap<String, Pooled>,
}

impl FleetState {
    /// The next step for warm pool instance `id`, which Auto Scaling wants in phase `want`;
    /// records what it decides (first sight, a transition begun).
    fn pool_step(&mut self, id: &str, want: PoolPhase) -> PoolStep {
        let running = self.running.contains_key(id);
        match self.pooled.get(id).cloned() {
            None if !self.launched.iter().any(|l| l == id) => {
                // First seen in the pool: it boots, or it was stopped before we looked (no
                // launch hook held it).
                self.launched.push(id.to_string());
                let boot = want == PoolPhase::Running;
                let phase = if boot {
                    PoolPhase::Running
                } else {
                    PoolPhase::Stopped
                };
                self.pooled
                    .insert(id.to_string(), Pooled { phase, busy: boot });
                if boot {
                    PoolStep::Boot
                } else {
                    PoolStep::Wait
                }
            }
            // Launched into the group, now in the pool (ReuseOnScaleIn).
            None => {
                let phase = if running {
                    PoolPhase::Running
                } else {
                    PoolPhase::Stopped
                };
                self.pooled
                    .insert(id.to_string(), Pooled { phase, busy: false });
                PoolStep::Wait
            }
            Some(p) if p.busy => PoolStep::Wait,
            Some(p) if p.phase == want && want == PoolPhase::Running => PoolStep::SetImds,
            // Stopped and hibernated are both off: nothing to do between them.
            Some(p)
                if p.phase == want
                    || (p.phase != PoolPhase::Running && want != PoolPhase::Running) =>
            {
                PoolStep::Wait
            }
            Some(p) => {
                if let Some(entry) = self.pooled.get_mut(id) {
                    entry.busy = true;
                }
                PoolStep::Transition(p.phase)
            }
        }
    }
}

impl Fleet {
    pub fn start(moto: Arc<Moto>, opts: FleetOptions) -> Fleet {
        let (events, _) = broadcast::channel(4096);
        let state = Arc::new(Mutex::new(FleetState::default()));
        let task = tokio::spawn(launcher(moto, opts, state.clone(), events.clone()));
        Fleet {
            events,
            state,
            task,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<FleetEvent> {
        self.events.subscribe()
    }

    /// Instance ids in launch order.
    pub fn launched(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.launched.clone())
            .unwrap_or_default()
    }

    /// Instance ids whose termination the launcher carried out, in order.
    pub fn terminated(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.terminated.clone())
            .unwrap_or_default()
    }

    /// Instance ids Auto Scaling began terminating (lifecycle hook wait), with when the
    /// launcher saw it first.
    pub fn terminating(&self) -> BTreeMap<String, Instant> {
        self.state
            .lock()
            .map(|s| s.terminating.clone())
            .unwrap_or_default()
    }

    /// Where a warm pool instance is (`None`: never seen in a pool, or a transition is
    /// under way).
    pub fn pool_phase(&self, id: &str) -> Option<PoolPhase> {
        let s = self.state.lock().ok()?;
        s.pooled.get(id).filter(|p| !p.busy).map(|p| p.phase)
    }

    /// Ids of the instances the launcher has seen in a warm pool.
    pub fn pooled(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.pooled.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Runs `f` on an instance: its running supervisor, else the last one that ran.
    pub fn with_instance<T>(&self, id: &str, f: impl FnOnce(&Instance) -> T) -> Option<T> {
        let s = self.state.lock().ok()?;
        s.running
            .get(id)
            .or_else(|| s.retired.iter().rev().find(|i| i.id == id))
            .map(f)
    }

    /// All supervisor output of every instance, running and retired.
    pub fn all_output(&self) -> String {
        let Ok(s) = self.state.lock() else {
            return String::new();
        };
        s.running
            .values()
            .chain(s.retired.iter())
            .map(|i| format!("== {}\n{}\n", i.id, i.output()))
            .collect()
    }

    /// Stops the launcher and every supervisor (SIGTERM, then SIGKILL and agent groups).
    pub async fn shutdown(self) {
        self.task.abort();
        let instances: Vec<Instance> = match self.state.lock() {
            Ok(mut s) => {
                let mut all: Vec<Instance> = std::mem::take(&mut s.running).into_values().collect();
                all.append(&mut s.retired);
                all
            }
            Err(_) => vec![],
        };
        for i in &instances {
            // A hibernated instance must run to hear SIGTERM.
            i.thaw();
            i.signal(Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && instances.iter().any(|i| i.exit_status().is_none()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(instances);
    }
}

/// Starts instance `id`'s supervisor (its user data: `user_data`, else the group's).
async fn boot(
    moto: &Moto,
    opts: &FleetOptions,
    id: &str,
    group: &str,
    user_data: Option<String>,
    target_lifecycle_state: Option<String>,
    events: &broadcast::Sender<FleetEvent>,
) -> anyhow::Result<Instance> {
    let mut args = opts.args.clone();
    let user_data = match user_data {
        Some(u) => u,
        None if opts.user_data_from_launch_template => moto
            .group_user_data(group)
            .await
            .with_context(|| format!("user data of group {group}"))?,
        None => opts.user_data.clone(),
    };
    if !opts.user_data_from_launch_template {
        args.extend(opts.group_args.get(group).cloned().unwrap_or_default());
    }
    let o = InstanceOptions {
        user_data: Some(user_data),
        args,
        agent_env: opts.agent_env.clone(),
        agent: opts.agent.clone(),
        life_cycle: opts
            .group_life_cycle
            .get(group)
            .cloned()
            .unwrap_or_else(|| "on-demand".into()),
        target_lifecycle_state,
        ..InstanceOptions::new(id, group, moto, &opts.root)
    };
    Instance::start(o, Some(events.clone())).await
}

/// What the launcher's tasks share: the emulator, the options, the fleet and its events.
#[derive(Clone)]
struct Launcher {
    moto: Arc<Moto>,
    opts: FleetOptions,
    state: Arc<Mutex<FleetState>>,
    events: broadcast::Sender<FleetEvent>,
}

impl Launcher {
    /// Boots a new instance after EC2's launch delay and records it running; false if it
    /// could not start.
    async fn launch(
        self,
        id: String,
        group: String,
        target_lifecycle_state: Option<String>,
    ) -> bool {
        let Launcher {
            moto,
            opts,
            state,
            events,
        } = self;
        let delay = opts.ec2.pending_to_running + opts.ec2.boot;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match boot(
            &moto,
            &opts,
            &id,
            &group,
            None,
            target_lifecycle_state,
            &events,
        )
        .await
        {
            Ok(inst) => {
                let _ = events.send(FleetEvent::Launched {
                    instance_id: id.clone(),
                    group,
                });
                if let Ok(mut s) = state.lock() {
                    s.running.insert(id, inst);
                }
                true
            }
            Err(e) => {
                let _ = events.send(FleetEvent::Log {
                    instance_id: id,
                    line: format!("launch failed: {e:#}"),
                });
                false
            }
        }
    }

    /// One warm pool transition of instance `id` towards `to`, after EC2's delay for it.
    async fn transition(
        self,
        id: String,
        group: String,
        from: PoolPhase,
        to: PoolPhase,
        imds_state: String,
    ) {
        let Launcher {
            moto,
            opts,
            state,
            events,
        } = self;
        let delays = opts.ec2;
        let reached = match (from, to) {
            (PoolPhase::Running, PoolPhase::Stopped | PoolPhase::Hibernated) => {
                tokio::time::sleep(delays.running_to_stopped).await;
                // Whether it was still running to be powered off; the guard is dropped
                // before `finish`, which takes the lock again (a std mutex held twice by
                // one thread never returns: the whole launcher, and every test reading the
                // fleet, would hang).
                let off = {
                    let Ok(mut s) = state.lock() else { return };
                    if to == PoolPhase::Stopped {
                        s.running.remove(&id).map(|inst| {
                            inst.power_off();
                            s.retired.push(inst);
                        })
                    } else {
                        s.running.get(&id).map(Instance::freeze)
                    }
                    .is_some()
                };
                if !off {
                    return finish(&state, &id, from);
                }
                let _ = events.send(if to == PoolPhase::Stopped {
                    FleetEvent::Stopped {
                        instance_id: id.clone(),
                    }
                } else {
                    FleetEvent::Hibernated {
                        instance_id: id.clone(),
                    }
                });
                to
            }
            (PoolPhase::Stopped, PoolPhase::Running) => {
                tokio::time::sleep(delays.stopped_to_running + delays.boot).await;
                // The disk keeps what it was launched with.
                let user_data = state.lock().ok().and_then(|s| {
                    s.retired
                        .iter()
                        .rev()
                        .find(|i| i.id == id)
                        .and_then(|i| i.user_data.clone())
                });
                let first_boot = user_data.is_none();
                match boot(
                    &moto,
                    &opts,
                    &id,
                    &group,
                    user_data,
                    Some(imds_state),
                    &events,
                )
                .await
                {
                    Ok(inst) => {
                        if let Ok(mut s) = state.lock() {
                            s.running.insert(id.clone(), inst);
                        }
                        let _ = events.send(if first_boot {
                            FleetEvent::Launched {
                                instance_id: id.clone(),
                                group,
                            }
                        } else {
                            FleetEvent::Resumed {
                                instance_id: id.clone(),
                                hibernated: false,
                            }
                        });
                        to
                    }
                    Err(e) => {
                        let _ = events.send(FleetEvent::Log {
                            instance_id: id.clone(),
                            line: format!("start failed: {e:#}"),
                        });
                        from
                    }
                }
            }
            (PoolPhase::Hibernated, PoolPhase::Running) => {
                tokio::time::sleep(delays.hibernated_to_running).await;
                if let Ok(s) = state.lock() {
                    if let Some(inst) = s.running.get(&id) {
                        inst.imds.set_target_lifecycle_state(&imds_state);
                        inst.thaw();
                    }
                }
                let _ = events.send(FleetEvent::Resumed {
                    instance_id: id.clone(),
                    hibernated: true,
                });
                to
            }
            // Stopped ↔ Hibernated: both are off; nothing runs.
            _ => from,
        };
        finish(&state, &id, reached);
    }
}

fn finish(state: &Mutex<FleetState>, id: &str, phase: PoolPhase) {
    if let Ok(mut s) = state.lock() {
        if let Some(p) = s.pooled.get_mut(id) {
            p.phase = phase;
            p.busy = false;
        }
    }
}

/// What Auto Scaling wants of a warm pool instance: the phase, and what its IMDS says.
fn pool_target(lifecycle: &str, pool_state: &str) -> (PoolPhase, String) {
    let phase = match lifecycle {
        "Warmed:Stopped" => PoolPhase::Stopped,
        "Warmed:Hibernated" => PoolPhase::Hibernated,
        _ => PoolPhase::Running,
    };
    (phase, format!("Warmed:{pool_state}"))
}

async fn launcher(
    moto: Arc<Moto>,
    opts: FleetOptions,
    state: Arc<Mutex<FleetState>>,
    events: broadcast::Sender<FleetEvent>,
) {
    let tasks = Launcher {
        moto: moto.clone(),
        opts: opts.clone(),
        state: state.clone(),
        events: events.clone(),
    };
    let mut desired: BTreeMap<String, i32> = BTreeMap::new();
    loop {
        let mut live = HashSet::new();
        let mut to_launch = vec![];
        // (id, group, phase wanted, what its IMDS says)
        let mut pool_targets: Vec<(String, String, PoolPhase, String)> = vec![];
        let mut ok = true;
        for g in &opts.groups {
            // The pool first, then the group: an instance that Auto Scaling moves from
            // the pool into service between the two reads is then seen in both, never in
            // neither (read the other way round, it looked terminated for one poll and
            // was never booted again).
            let Ok(pool) = moto.warm_pool(g).await else {
                ok = false;
                continue;
            };
            let Ok(group) = moto.group(g).await else {
                ok = false;
                continue;
            };
            if desired.get(g) != Some(&group.desired) {
                desired.insert(g.clone(), group.desired);
                let _ = events.send(FleetEvent::Desired {
                    group: g.clone(),
                    desired: group.desired,
                });
            }
            let pool_state = pool.pool_state.clone().unwrap_or_else(|| "Stopped".into());
            for i in &pool.instances {
                live.insert(i.instance_id.clone());
                let (phase, imds) = pool_target(&i.lifecycle_state, &pool_state);
                pool_targets.push((i.instance_id.clone(), g.clone(), phase, imds));
            }
            for (id, lifecycle, _) in &group.instances {
                if matches!(
                    lifecycle.as_str(),
                    "InService" | "Pending" | "Pending:Wait" | "Pending:Proceed"
                ) {
                    live.insert(id.clone());
                    let from_pool = state
                        .lock()
                        .map(|s| s.pooled.contains_key(id))
                        .unwrap_or(false);
                    if from_pool {
                        pool_targets.push((
                            id.clone(),
                            g.clone(),
                            PoolPhase::Running,
                            "InService".into(),
                        ));
                    } else {
                        to_launch.push((id.clone(), g.clone()));
                    }
                } else if lifecycle.starts_with("Terminating") {
                    // Still running until it leaves the group; its IMDS says where it goes.
                    live.insert(id.clone());
                    let first = state.lock().ok().and_then(|mut s| {
                        let inst = s.running.get(id)?;
                        inst.imds.set_target_lifecycle_state("Terminated");
                        let new = !s.terminating.contains_key(id);
                        s.terminating.entry(id.clone()).or_insert_with(Instant::now);
                        Some(new)
                    });
                    if first == Some(true) {
                        let _ = events.send(FleetEvent::Terminating {
                            instance_id: id.clone(),
                            lifecycle_state: lifecycle.clone(),
                        });
                    }
                }
            }
        }
        if ok {
            // Powered-off pool instances that Auto Scaling terminated: nothing runs.
            let gone_off: Vec<String> = match state.lock() {
                Ok(mut s) => {
                    let ids: Vec<String> = s
                        .pooled
                        .iter()
                        .filter(|(id, p)| {
                            !p.busy && p.phase == PoolPhase::Stopped && !live.contains(*id)
                        })
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in &ids {
                        s.pooled.remove(id);
                        s.terminated.push(id.clone());
                    }
                    ids
                }
                Err(_) => vec![],
            };
            for id in gone_off {
                let _ = events.send(FleetEvent::Terminated { instance_id: id });
            }
            // Terminated: stop like a shutdown would.
            let gone: Vec<(Instance, bool)> = match state.lock() {
                Ok(mut s) => {
                    let ids: Vec<String> = s
                        .running
                        .keys()
                        .filter(|id| !live.contains(*id))
                        .filter(|id| !s.pooled.get(*id).is_some_and(|p| p.busy))
                        .cloned()
                        .collect();
                    let mut gone = vec![];
                    for id in &ids {
                        let hibernated = s
                            .pooled
                            .remove(id)
                            .is_some_and(|p| p.phase == PoolPhase::Hibernated);
                        if let Some(inst) = s.running.remove(id) {
                            gone.push((inst, hibernated));
                        }
                    }
                    gone
                }
                Err(_) => vec![],
            };
            for (inst, hibernated) in gone {
                if hibernated {
                    // Terminating a hibernated instance runs nothing on it.
                    inst.power_off();
                } else {
                    inst.signal(Signal::SIGTERM);
                }
                let id = inst.id.clone();
                let _ = events.send(FleetEvent::Terminated {
                    instance_id: id.clone(),
                });
                // Retired at once, so its output stays visible while it shuts down.
                if let Ok(mut s) = state.lock() {
                    s.retired.push(inst);
                }
                let state = state.clone();
                let stop_timeout = opts.stop_timeout;
                tokio::spawn(async move {
                    let deadline = Instant::now() + stop_timeout;
                    let exited = || {
                        state
                            .lock()
                            .ok()
                            .and_then(|s| {
                                s.retired
                                    .iter()
                                    .rev()
                                    .find(|i| i.id == id)
                                    .map(|i| i.exit_status().is_some())
                            })
                            .unwrap_or(true)
                    };
                    while !exited() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    if let Ok(mut s) = state.lock() {
                        if let Some(i) = s.retired.iter().rev().find(|i| i.id == id) {
                            i.kill_all();
                        }
                        s.terminated.push(id);
                    }
                });
            }
        }
        for (id, group, want, imds) in pool_targets {
            // Decided under the lock, carried out outside it.
            let step = state.lock().ok().map(|mut s| {
                let step = s.pool_step(&id, want);
                if step == PoolStep::SetImds {
                    if let Some(inst) = s.running.get(&id) {
                        inst.imds.set_target_lifecycle_state(&imds);
                    }
                }
                step
            });
            match step {
                Some(PoolStep::Boot) => {
                    // Its boot is a transition; one that failed leaves it off.
                    let tasks = tasks.clone();
                    let state = state.clone();
                    tokio::spawn(async move {
                        let started = tasks.launch(id.clone(), group, Some(imds)).await;
                        let phase = if started {
                            PoolPhase::Running
                        } else {
                            PoolPhase::Stopped
                        };
                        finish(&state, &id, phase);
                    });
                }
                Some(PoolStep::Transition(from)) => {
                    tokio::spawn(tasks.clone().transition(id, group, from, want, imds));
                }
                Some(PoolStep::SetImds | PoolStep::Wait) | None => {}
            }
        }
        for (id, group) in to_launch {
            let known = state
                .lock()
                .map(|s| s.launched.contains(&id))
                .unwrap_or(true);
            if known {
                continue;
            }
            if let Ok(mut s) = state.lock() {
                s.launched.push(id.clone());
            }
            let task = tasks.clone().launch(id, group, None);
            if (opts.ec2.pending_to_running + opts.ec2.boot).is_zero() {
                // As before EC2 delays existed: started before the next poll.
                task.await;
            } else {
                tokio::spawn(task);
            }
        }
        tokio::time::sleep(opts.poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launcher's warm pool policy, without processes: a pool instance boots once when
    /// first seen running, one transition at a time, stopped and hibernated are both off.
    #[test]
    fn pool_steps() {
        use PoolPhase::*;
        let mut s = FleetState::default();
        assert_eq!(s.pool_step("i-1", Running), PoolStep::Boot);
        assert_eq!(s.launched, ["i-1"]);
        // Booting: nothing else starts until it is done.
        assert_eq!(s.pool_step("i-1", Stopped), PoolStep::Wait);
        finish_in(&mut s, "i-1", Running);
        assert_eq!(s.pool_step("i-1", Running), PoolStep::SetImds);
        assert_eq!(s.pool_step("i-1", Stopped), PoolStep::Transition(Running));
        assert_eq!(s.pool_step("i-1", Stopped), PoolStep::Wait, "one at a time");
        finish_in(&mut s, "i-1", Stopped);
        assert_eq!(s.pool_step("i-1", Hibernated), PoolStep::Wait);
        assert_eq!(s.pool_step("i-1", Running), PoolStep::Transition(Stopped));
        // Stopped before the launcher saw it: off, booted when it leaves the pool.
        assert_eq!(s.pool_step("i-2", Stopped), PoolStep::Wait);
        assert_eq!(s.pool_step("i-2", Running), PoolStep::Transition(Stopped));
        // An instance launched into the group that went to the pool (reuse): no new boot.
        s.launched.push("i-3".into());
        assert_eq!(s.pool_step("i-3", Stopped), PoolStep::Wait);
        assert_eq!(s.pool_step("i-3", Running), PoolStep::Transition(Stopped));
    }

    fn finish_in(s: &mut FleetState, id: &str, phase: PoolPhase) {
        if let Some(p) = s.pooled.get_mut(id) {
            p.phase = phase;
            p.busy = false;
        }
    }
}
