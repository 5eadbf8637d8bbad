//! The network namespace the agent joins under `strict`: rootless Docker's. Rootless
//! dockerd runs in a network namespace of its own (rootlesskit's), where `--net=host`
//! containers live too; `sem-service` starts its databases that way and waits for them
//! on `0.0.0.0:<port>` from the job. So the agent — and with it every job shell — starts
//! in that namespace: joined as root just before the privilege drop, network only (the
//! user and mount namespaces stay the host's, so the agent user's files are the same).
//! Traffic out of it goes through `slirp4netns`, a process of the agent user, which the
//! IMDS firewall's owner match covers ([`crate::firewall`]).
//!
//! The namespace is looked up at every agent start: a job can kill rootless dockerd, and
//! the restarted one has a new namespace.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open `/proc/<pid>/ns/net`.
#[derive(Clone, Debug)]
pub struct NetNs(Arc<File>);

impl NetNs {
    /// The network namespace of process `pid`.
    pub fn of_pid(pid: u32) -> std::io::Result<Self> {
        File::open(format!("/proc/{pid}/ns/net")).map(|f| Self(Arc::new(f)))
    }

    /// Rootless Docker's, for the agent user `uid`: the pid rootlesskit's child wrote.
    pub fn rootless_docker(uid: u32) -> Result<Self, String> {
        Self::from_pid_file(&child_pid_file(uid))
    }

    fn from_pid_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read {}: {e}; rootless Docker is not running for the agent user (apply-isolation strict starts it)",
                path.display()
            )
        })?;
        let pid: u32 = text
            .trim()
            .parse()
            .map_err(|_| format!("{} holds {:?}, not a pid", path.display(), text.trim()))?;
        Self::of_pid(pid).map_err(|e| {
            format!(
                "cannot open the network namespace of rootless Docker (pid {pid} from {}): {e}",
                path.display()
            )
        })
    }

    /// Makes the spawned process join this namespace before anything after it in the
    /// `pre_exec` order (the privilege drop must come after: joining needs root).
    #[allow(unsafe_code)]
    pub fn join_on_spawn(&self, cmd: &mut tokio::process::Command) {
        let file = self.0.clone();
        // SAFETY: the closure runs in the forked child before exec and makes one setns(2)
        // on a descriptor opened before the fork: no allocation, no locks.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
    }

    /// Moves the calling thread (only it) into this namespace: for a thread that then
    /// binds a socket there and ends.
    pub fn join_this_thread(&self) -> std::io::Result<()> {
        nix::sched::setns(self.0.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)
    }

    /// The namespace's inode: equal inodes, same namespace.
    pub fn inode(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.0.metadata()?.ino())
    }
}

/// Where rootlesskit's child (whose namespaces rootless dockerd uses) leaves its pid.
pub fn child_pid_file(uid: u32) -> PathBuf {
    PathBuf::from(format!("/run/user/{uid}/dockerd-rootless/child_pid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process in a fresh network namespace (`unshare -n`), where this machine allows it.
    fn holder() -> Option<std::process::Child> {
        let child = std::process::Command::new("unshare")
            .args(["-n", "sleep", "30"])
            .spawn()
            .ok()?;
        std::thread::sleep(std::time::Duration::from_millis(200));
        Some(child)
    }

    #[tokio::test]
    async fn a_spawned_process_joins_the_namespace_of_the_pid_file() {
        let Some(mut holder) = holder() else {
            eprintln!("SKIP: unshare -n is not available");
            return;
        };
        let dir = std::env::temp_dir().join(format!("netns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pid_file = dir.join("child_pid");
        std::fs::write(&pid_file, format!("{}\n", holder.id())).expect("pid file");
        let ns = NetNs::from_pid_file(&pid_file).expect("namespace");
        let mut cmd = tokio::process::Command::new("readlink");
        cmd.arg("/proc/self/ns/net");
        ns.join_on_spawn(&mut cmd);
        let joined = cmd.output().await.expect("readlink");
        let theirs = std::fs::read_link(format!("/proc/{}/ns/net", holder.id())).expect("theirs");
        let ours = std::fs::read_link("/proc/self/ns/net").expect("ours");
        let _ = holder.kill();
        let _ = holder.wait();
        let joined = String::from_utf8_lossy(&joined.stdout).trim().to_string();
        assert_eq!(joined, theirs.display().to_string());
        assert_ne!(theirs, ours, "the holder's namespace is not ours");

        std::fs::write(&pid_file, "nonsense").expect("pid file");
        let e = NetNs::from_pid_file(&pid_file).expect_err("refused");
        assert!(e.contains("not a pid"), "{e}");
        let e = NetNs::from_pid_file(&dir.join("absent")).expect_err("refused");
        assert!(e.contains("rootless Docker is not running"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
