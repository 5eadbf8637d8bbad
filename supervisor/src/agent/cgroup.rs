//! The agent's own cgroup (v2). The agent joins it between fork and exec, so every
//! process it and its jobs start — in another session, double-forked, reparented to init —
//! is in it, and `cgroup.kill` ends them all at once. The process group alone misses
//! whatever a job moved out of it (`setsid`, a daemonizing service).
//!
//! The cgroup is `<base>/agent`, where `<base>` is a cgroup v2 directory this supervisor
//! may manage: `--agent-cgroup`, or by default its own cgroup (systemd's `Delegate=yes` on
//! the AMI's unit hands it over). No controllers are enabled: the cgroup only groups. On a
//! machine without cgroup v2 the agent runs without one, and the supervisor says so.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where cgroup v2 is mounted on a unified-hierarchy system.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Clone)]
pub struct AgentCgroup {
    dir: PathBuf,
}

impl AgentCgroup {
    /// Creates (or reuses) `<base>/agent`. `base` must be a cgroup v2 directory.
    pub fn create(base: &Path) -> Result<Self, String> {
        if !base.join("cgroup.procs").exists() {
            return Err(format!(
                "{} is not a cgroup v2 directory (no cgroup.procs)",
                base.display()
            ));
        }
        let dir = base.join("agent");
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create cgroup {}: {e}", dir.display())),
        }
        if !dir.join("cgroup.kill").exists() {
            return Err(format!(
                "{} has no cgroup.kill (Linux 5.14 or later needed)",
                dir.display()
            ));
        }
        Ok(Self { dir })
    }

    /// This process's own cgroup v2 directory, when the system has the unified hierarchy.
    pub fn own_base() -> Option<PathBuf> {
        let root = Path::new(CGROUP_ROOT);
        if !root.join("cgroup.controllers").exists() {
            return None;
        }
        let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(root.join(path.trim_start_matches('/')))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `cgroup.procs`, opened for a child to join between fork and exec ([`Joiner`]).
    pub fn joiner(&self) -> std::io::Result<Joiner> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))?;
        Ok(Joiner(Arc::new(file)))
    }

    /// The processes in it now.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILL to every process in it (`cgroup.kill`), then waits (at most 2 s) until it
    /// is empty. Returns how many processes it held.
    pub async fn kill(&self) -> std::io::Result<usize> {
        let found = self.pids().len();
        if found == 0 {
            return Ok(0);
        }
        std::fs::write(self.dir.join("cgroup.kill"), "1")?;
        for _ in 0..200 {
            if self.pids().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(found)
    }
}

/// The agent cgroup's `cgroup.procs`, open, for the child to write "0" to (moving itself)
/// before it execs. Opened close-on-exec, so the agent never holds it.
#[derive(Clone)]
pub struct Joiner(Arc<std::fs::File>);

impl Joiner {
    /// Makes `cmd`'s child join the cgroup before exec (and before it drops privileges:
    /// register this first).
    #[allow(unsafe_code)]
    pub fn join_on_spawn(&self, cmd: &mut tokio::process::Command) {
        let file = self.0.clone();
        // SAFETY: the closure runs in the forked child before exec and makes one write(2)
        // to a descriptor opened before the fork: no allocation, no locks.
        unsafe {
            cmd.pre_exec(move || {
                let fd = std::os::fd::BorrowedFd::borrow_raw(file.as_raw_fd());
                nix::unistd::write(fd, b"0").map_err(std::io::Error::from)?;
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup v2 directory for the test, where this machine has one.
    fn test_base(name: &str) -> Option<PathBuf> {
        let roots = [Path::new(CGROUP_ROOT), Path::new("/sys/fs/cgroup/unified")];
        let root = roots.into_iter().find(|r| {
            r.join("cgroup.procs").exists() && r.join("cgroup.subtree_control").exists()
        })?;
        let base = root.join(format!("agent-fleet-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&base).ok()?;
        Some(base)
    }

    #[tokio::test]
    async fn the_cgroup_kills_what_left_the_process_group() {
        let Some(base) = test_base("kill") else {
            println!("no writable cgroup v2 here: skipped");
            return;
        };
        let cg = AgentCgroup::create(&base).expect("cgroup");
        let mut cmd = tokio::process::Command::new("sh");
        // A child in a session of its own, and the shell's own sleep.
        cmd.args(["-c", "setsid sleep 300 & sleep 300"])
            .process_group(0);
        cg.joiner().expect("joiner").join_on_spawn(&mut cmd);
        let mut child = cmd.spawn().expect("spawn");
        let pgid = child.id().expect("pid") as i32;
        // Until the background sleep has a session of its own (and the shell's sleep runs).
        let on_its_own = |pid: &i32| {
            let pid = nix::unistd::Pid::from_raw(*pid);
            nix::unistd::getsid(Some(pid)) == Ok(pid)
        };
        for _ in 0..500 {
            let pids = cg.pids();
            if pids.len() >= 3 && pids.iter().any(on_its_own) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pids = cg.pids();
        assert!(pids.iter().any(on_its_own), "{pids:?}");
        // The process group's kill leaves the setsid'd sleep alive...
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let left = cg.pids();
        assert_eq!(left.len(), 1, "{left:?}");
        // ...the cgroup's does not.
        assert_eq!(cg.kill().await.expect("kill"), 1);
        assert!(cg.pids().is_empty());
        assert!(
            !Path::new(&format!("/proc/{}", left[0])).exists() || {
                // A zombie until init reaps it: its state says so.
                std::fs::read_to_string(format!("/proc/{}/stat", left[0]))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true)
            }
        );
        std::fs::remove_dir(cg.dir()).expect("rmdir agent");
        std::fs::remove_dir(&base).expect("rmdir base");
    }

    #[test]
    fn a_directory_that_is_not_a_cgroup_is_refused() {
        let e = AgentCgroup::create(Path::new("/tmp")).expect_err("not a cgroup");
        assert!(e.contains("not a cgroup v2 directory"), "{e}");
    }
}
