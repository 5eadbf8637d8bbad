//! Containers a run of the agent left behind. They live in Docker's cgroups, not the
//! agent's, so emptying the agent's cgroup does not reach them: before an agent restarts in
//! place (only ever one that had no job, see `lifecycle::one_job_per_vm`), every container
//! of the Docker daemons its user can reach is removed — the rootful one (`vm`: the agent
//! user is in the `docker` group) and the user's rootless one (`strict`). An agent VM runs
//! no containers of its own, so "every container" is exactly the jobs'.
//!
//! A daemon whose socket does not exist is skipped without a call; a failing `docker` is
//! logged and never stops the restart (the cgroup is already empty).

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

/// The rootful daemon's socket.
pub const ROOTFUL_SOCKET: &str = "/var/run/docker.sock";
/// How long one `docker` call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Where to look for containers.
#[derive(Debug, Clone)]
pub struct Containers {
    pub docker: PathBuf,
    pub sockets: Vec<PathBuf>,
}

impl Containers {
    /// The `docker` CLI in `PATH`; the rootful socket and the rootless one of `uid`
    /// (`/run/user/<uid>/docker.sock`).
    pub fn for_agent_uid(uid: Option<u32>) -> Self {
        let mut sockets = vec![PathBuf::from(ROOTFUL_SOCKET)];
        if let Some(uid) = uid {
            sockets.push(PathBuf::from(format!("/run/user/{uid}/docker.sock")));
        }
        Self {
            docker: "docker".into(),
            sockets,
        }
    }

    /// Removes every container of every daemon whose socket exists; returns how many.
    pub async fn remove_all(&self) -> usize {
        let mut removed = 0;
        for socket in self.sockets.iter().filter(|s| s.exists()) {
            match self.remove_at(socket).await {
                Ok(n) => removed += n,
                Err(e) => tracing::warn!(
                    socket = %socket.display(),
                    error = %e,
                    "cannot remove the containers an earlier agent run left"
                ),
            }
        }
        removed
    }

    async fn remove_at(&self, socket: &Path) -> Result<usize, String> {
        let host = format!("unix://{}", socket.display());
        let listed = self.docker_call(&host, &["ps", "--all", "--quiet"]).await?;
        let ids: Vec<&str> = listed.split_whitespace().collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let mut args = vec!["rm", "--force", "--volumes"];
        args.extend(&ids);
        self.docker_call(&host, &args).await?;
        tracing::warn!(
            socket = %socket.display(),
            containers = ids.len(),
            "containers of an earlier agent run were still there before the restart: removed them"
        );
        Ok(ids.len())
    }

    async fn docker_call(&self, host: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.docker);
        cmd.args(args)
            .env("DOCKER_HOST", host)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(CALL_TIMEOUT, cmd.output())
            .await
            .map_err(|_| format!("docker {} took over {CALL_TIMEOUT:?}", args[0]))?
            .map_err(|e| format!("cannot run {}: {e}", self.docker.display()))?;
        if !out.status.success() {
            return Err(format!(
                "docker {} failed ({}): {}",
                args[0],
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `docker` that lists two containers at the socket it is given and logs its calls.
    fn fake(dir: &Path) -> (Containers, PathBuf) {
        let log = dir.join("calls");
        let docker = dir.join("docker");
        std::fs::write(
            &docker,
            format!(
                "#!/bin/sh\necho \"$DOCKER_HOST $*\" >> {}\ncase \"$1\" in ps) printf 'c1\\nc2\\n';; esac\n",
                log.display()
            ),
        )
        .expect("fake docker");
        std::fs::set_permissions(&docker, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let present = dir.join("docker.sock");
        std::fs::write(&present, "").expect("socket stand-in");
        let c = Containers {
            docker,
            sockets: vec![present, dir.join("absent.sock")],
        };
        (c, log)
    }

    #[tokio::test]
    async fn every_container_of_each_reachable_daemon_is_removed() {
        let dir = std::env::temp_dir().join(format!("containers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let (c, log) = fake(&dir);
        assert_eq!(c.remove_all().await, 2);
        let calls = std::fs::read_to_string(&log).expect("calls");
        let sock = dir.join("docker.sock");
        assert_eq!(
            calls,
            format!(
                "unix://{0} ps --all --quiet\nunix://{0} rm --force --volumes c1 c2\n",
                sock.display()
            ),
            "the absent daemon is never called"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_rootless_daemon_of_the_agent_user_is_looked_at_too() {
        let c = Containers::for_agent_uid(Some(1001));
        assert_eq!(
            c.sockets,
            [
                PathBuf::from("/var/run/docker.sock"),
                PathBuf::from("/run/user/1001/docker.sock")
            ]
        );
    }
}
