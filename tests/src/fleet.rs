//! The EC2 side of the test bed: simulated instances, each a real `agent-supervisor`
//! process with its own fake IMDS, and a launcher that keeps one per in-service instance
//! of the emulated groups, stopping it (like a shutdown: SIGTERM, then SIGKILL) when
//! Auto Scaling terminates the instance. A whole fleet on one machine.
//!
//! While Auto Scaling is terminating an instance (`Terminating`, `Terminating:Wait`,
//! `Terminating:Proceed`: a termination lifecycle hook holds it), the instance keeps
//! running and its IMDS `autoscaling/target-lifecycle-state` says `Terminated`, as EC2's
//! does; the supervisor is stopped when the instance leaves the group.

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
    /// (a `FleetEvent::Log` line `launch failed: …` says why), like a failed start.
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
    /// Instances whose supervisor was stopped, kept for their output.
    retired: Vec<Instance>,
    launched: Vec<String>,
    terminated: Vec<String>,
    /// Instances seen in a `Terminating*` state, with when the launcher first saw that.
    terminating: BTreeMap<String, Instant>,
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

    /// Runs `f` on an instance (running or retired).
    pub fn with_instance<T>(&self, id: &str, f: impl FnOnce(&Instance) -> T) -> Option<T> {
        let s = self.state.lock().ok()?;
        s.running
            .get(id)
            .or_else(|| s.retired.iter().find(|i| i.id == id))
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
            i.signal(Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && instances.iter().any(|i| i.exit_status().is_none()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(instances);
    }
}

async fn launcher(
    moto: Arc<Moto>,
    opts: FleetOptions,
    state: Arc<Mutex<FleetState>>,
    events: broadcast::Sender<FleetEvent>,
) {
    let mut desired: BTreeMap<String, i32> = BTreeMap::new();
    loop {
        let mut live = HashSet::new();
        let mut to_launch = vec![];
        let mut ok = true;
        for g in &opts.groups {
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
            for (id, lifecycle, _) in &group.instances {
                if matches!(lifecycle.as_str(), "InService" | "Pending") {
                    live.insert(id.clone());
                    to_launch.push((id.clone(), g.clone()));
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
            // Terminated: stop like a shutdown would.
            let gone: Vec<Instance> = match state.lock() {
                Ok(mut s) => {
                    let ids: Vec<String> = s
                        .running
                        .keys()
                        .filter(|id| !live.contains(*id))
                        .cloned()
                        .collect();
                    ids.iter().filter_map(|id| s.running.remove(id)).collect()
                }
                Err(_) => vec![],
            };
            for inst in gone {
                inst.signal(Signal::SIGTERM);
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
                                    .find(|i| i.id == id)
                                    .map(|i| i.exit_status().is_some())
                            })
                            .unwrap_or(true)
                    };
                    while !exited() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    if let Ok(mut s) = state.lock() {
                        if let Some(i) = s.retired.iter().find(|i| i.id == id) {
                            i.kill_all();
                        }
                        s.terminated.push(id);
                    }
                });
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
            let mut args = opts.args.clone();
            let user_data = if opts.user_data_from_launch_template {
                match moto.group_user_data(&group).await {
                    Ok(user_data) => user_data,
                    Err(e) => {
                        let _ = events.send(FleetEvent::Log {
                            instance_id: id,
                            line: format!("launch failed: user data of group {group}: {e:#}"),
                        });
                        continue;
                    }
                }
            } else {
                args.extend(opts.group_args.get(&group).cloned().unwrap_or_default());
                opts.user_data.clone()
            };
            let o = InstanceOptions {
                user_data: Some(user_data),
                args,
                agent_env: opts.agent_env.clone(),
                agent: opts.agent.clone(),
                life_cycle: opts
                    .group_life_cycle
                    .get(&group)
                    .cloned()
                    .unwrap_or_else(|| "on-demand".into()),
                ..InstanceOptions::new(&id, &group, &moto, &opts.root)
            };
            match Instance::start(o, Some(events.clone())).await {
                Ok(inst) => {
                    let _ = events.send(FleetEvent::Launched {
                        instance_id: id.clone(),
                        group,
                    });
                    if let Ok(mut s) = state.lock() {
                        s.running.insert(id, inst);
                    }
                }
                Err(e) => {
                    let _ = events.send(FleetEvent::Log {
                        instance_id: id,
                        line: format!("launch failed: {e:#}"),
                    });
                }
            }
        }
        tokio::time::sleep(opts.poll).await;
    }
}
