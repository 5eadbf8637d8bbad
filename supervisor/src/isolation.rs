//! The job isolation level (`SEMAPHORE_AGENT_JOB_ISOLATION`), applied before the first
//! agent. The AMI carries everything both levels need; the level itself is the runtime
//! config's, so the AMI's `apply-isolation` script (bootstrap/isolation/) puts the instance
//! at it on every boot: `vm` grants the agent user passwordless sudo and the `docker` group
//! (the reference's compatibility: the VM is the boundary), `strict` takes both away and
//! sets up rootless Docker, the directories `sem-service` would make with sudo, Yama's
//! `ptrace_scope` and the rootlesskit AppArmor profile.
//!
//! A script that fails stops the start: no agent runs at a level that was not applied.
//! Without the script (a development host, the test bed) `vm` is logged and goes on — it
//! grants, it does not protect — while `strict` refuses to start.

use crate::config::JobIsolation;
use crate::startup::DaemonError;
use std::path::Path;
use std::time::Instant;

/// Where the AMI installs the script.
pub const DEFAULT_SCRIPT: &str = "/usr/local/lib/agent-fleet/apply-isolation";

/// Runs `script <level>`; see the module docs.
pub async fn apply(script: &Path, level: JobIsolation) -> Result<(), DaemonError> {
    if !script.exists() {
        return match level {
            JobIsolation::Vm => {
                tracing::warn!(
                    script = %script.display(),
                    "job isolation vm: no apply-isolation script on this host, so jobs get whatever sudo and Docker access the agent user already has"
                );
                Ok(())
            }
            JobIsolation::Strict => Err(DaemonError::Input(format!(
                "job isolation strict: {} does not exist, so the level cannot be applied and no agent starts; fix: use an agent-fleet AMI (it installs the script) or pass --isolation-script",
                script.display()
            ))),
        };
    }
    let started = Instant::now();
    let out = tokio::process::Command::new(script)
        .arg(level.as_str())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| DaemonError::Input(format!("cannot run {}: {e}", script.display())))?;
    let said = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    if !out.status.success() {
        return Err(DaemonError::Input(format!(
            "job isolation {}: {} failed ({}): {}; no agent starts at a level that was not applied",
            level.as_str(),
            script.display(),
            out.status,
            said(&out.stderr)
        )));
    }
    tracing::info!(
        level = level.as_str(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "job isolation applied: {}",
        said(&out.stdout)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, body: &str) -> std::path::PathBuf {
        let p = dir.join("apply-isolation");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        p
    }

    #[tokio::test]
    async fn the_level_is_applied_or_the_start_refused() {
        let dir = std::env::temp_dir().join(format!("isolation-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let ok = script(
            &dir,
            "echo \"level $1\" > \"$(dirname \"$0\")/applied\"; echo applied",
        );
        apply(&ok, JobIsolation::Strict).await.expect("applied");
        assert_eq!(
            std::fs::read_to_string(dir.join("applied")).expect("ran"),
            "level strict\n"
        );

        let bad = script(
            &dir,
            "echo 'rootless docker did not start; fix: journalctl' >&2; exit 1",
        );
        let e = apply(&bad, JobIsolation::Vm)
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("job isolation vm") && e.contains("rootless docker did not start"),
            "{e}"
        );

        let missing = dir.join("absent");
        apply(&missing, JobIsolation::Vm)
            .await
            .expect("vm goes on without the script");
        let e = apply(&missing, JobIsolation::Strict)
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("no agent starts") && e.contains("--isolation-script"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
