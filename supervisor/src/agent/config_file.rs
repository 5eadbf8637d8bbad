//! The agent's `config.yaml`. Written with every scalar JSON-quoted (valid YAML), so no
//! value can change the document's structure, with mode 0600 and owned by the agent user.
//!
//! The registration token is in the file only while the agent needs it: once the agent
//! says it registered, [`remove_token`] rewrites the file without it (a job runs as the
//! agent user and could read it otherwise), and the next agent start writes it again.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// Everything the agent is told. The token is only held here long enough to write it.
pub struct AgentConfig<'a> {
    pub endpoint: &'a str,
    pub token: &'a str,
    pub no_https: bool,
    pub name: &'a str,
    pub disconnect_after_job: bool,
    pub idle_timeout: Duration,
    pub interruption_grace: Duration,
    pub shutdown_hook_path: &'a Path,
    pub env_vars: &'a [String],
}

/// The keys written, all known to the agent (an unknown key is fatal to it).
pub const KEYS: &[&str] = &[
    "endpoint",
    "token",
    "no-https",
    "name",
    "disconnect-after-job",
    "disconnect-after-idle-timeout",
    "interruption-grace-period",
    "shutdown-hook-path",
    "upload-job-logs",
    "env-vars",
];

fn q(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

impl AgentConfig<'_> {
    pub fn render(&self) -> String {
        let env = self
            .env_vars
            .iter()
            .map(|e| q(e))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "# Written by agent-supervisor; rewritten at every agent start.\n\
             endpoint: {}\n\
             token: {}\n\
             no-https: {}\n\
             name: {}\n\
             disconnect-after-job: {}\n\
             disconnect-after-idle-timeout: {}\n\
             interruption-grace-period: {}\n\
             shutdown-hook-path: {}\n\
             upload-job-logs: \"when-trimmed\"\n\
             env-vars: [{}]\n",
            q(self.endpoint),
            q(self.token),
            self.no_https,
            q(self.name),
            self.disconnect_after_job,
            self.idle_timeout.as_secs(),
            self.interruption_grace.as_secs(),
            q(&self.shutdown_hook_path.to_string_lossy()),
            env,
        )
    }
}

/// Writes `contents` to `path` atomically (temp file + rename) with `mode`, owned by
/// `owner` when given. The temp file has the final mode from its creation on, so the
/// secret is never readable by others, not even for a moment.
pub fn write_private(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    replace(path, contents, mode, owner, true)
}

/// The `token:` line's key, as [`AgentConfig::render`] writes it.
const TOKEN_KEY: &str = "token:";

/// What takes the token's place once the agent has registered.
pub const TOKEN_REMOVED: &str =
    "# token: removed once the agent registered; written again at the next agent start";

/// A `name:` line holding a pre-signed STS URL (`SEMAPHORE_AGENT_USE_PRE_SIGNED_URL`): it
/// proves this instance's identity to whoever presents it for 15 minutes, so it goes with
/// the token.
const URL_NAME_KEY: &str = "name: \"http";

/// What takes a pre-signed URL name's place once the agent has registered.
pub const URL_NAME_REMOVED: &str =
    "# name: the pre-signed URL was removed once the agent registered (Semaphore named it)";

/// Rewrites the config at `path` without its `token:` line (nor a pre-signed URL name), atomically (a reader sees
/// the old file or the new one, never a partial one) and with the file's mode and owner
/// kept. Returns whether there was a token to remove.
///
/// Not synced to disk: the point is that no reader finds the token from now on, and the
/// rename does that at once; an fsync would only widen the window in which a job that
/// starts right after registration could still read the old file.
pub fn remove_token(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(path)?;
    if !text.lines().any(|l| l.starts_with(TOKEN_KEY)) {
        return Ok(false);
    }
    let meta = std::fs::metadata(path)?;
    let kept: String = text
        .lines()
        .map(|l| {
            if l.starts_with(TOKEN_KEY) {
                TOKEN_REMOVED
            } else if l.starts_with(URL_NAME_KEY) {
                URL_NAME_REMOVED
            } else {
                l
            }
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    replace(
        path,
        kept.as_bytes(),
        meta.mode() & 0o7777,
        Some((meta.uid(), meta.gid())),
        false,
    )?;
    Ok(true)
}

/// The value of a top-level scalar `key` as [`AgentConfig::render`] wrote it (one line,
/// JSON-quoted), e.g. `shutdown-hook-path`.
pub fn read_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?.trim();
        serde_json::from_str::<String>(v).ok()
    })
}

fn replace(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
    durable: bool,
) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    f.write_all(contents)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn values_cannot_break_the_yaml() {
        let env = vec!["SEMAPHORE_CACHE_BACKEND=s3".to_string()];
        let c = AgentConfig {
            endpoint: "h:1",
            token: "tok\"en\nx: y",
            no_https: true,
            name: "i-1__ab",
            disconnect_after_job: true,
            idle_timeout: Duration::from_secs(300),
            interruption_grace: Duration::from_secs(60),
            shutdown_hook_path: Path::new("/h.sh"),
            env_vars: &env,
        };
        let text = c.render();
        assert!(text.contains(r#"token: "tok\"en\nx: y""#), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("x:")));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let key = line.split(':').next().unwrap_or_default();
            assert!(KEYS.contains(&key), "unexpected key {key}");
        }
    }

    #[test]
    fn written_file_is_private() {
        let dir = std::env::temp_dir().join(format!("cfgtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("config.yaml");
        write_private(&p, b"token: x\n", 0o600, None).expect("write");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        write_private(&p, b"token: y\n", 0o600, None).expect("rewrite");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "token: y\n");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn token_is_removed_and_the_rest_kept() {
        let dir = std::env::temp_dir().join(format!("cfgscrub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("config.yaml");
        let env = vec!["A=b".to_string()];
        let text = AgentConfig {
            endpoint: "h:1",
            token: "s3cr3t-token",
            no_https: true,
            name: "i-1__ab",
            disconnect_after_job: true,
            idle_timeout: Duration::from_secs(300),
            interruption_grace: Duration::from_secs(60),
            shutdown_hook_path: Path::new("/w/hook.sh"),
            env_vars: &env,
        }
        .render();
        write_private(&p, text.as_bytes(), 0o600, None).expect("write");
        assert!(remove_token(&p).expect("scrub"));
        let after = std::fs::read_to_string(&p).expect("read");
        assert!(!after.contains("s3cr3t-token"), "{after}");
        assert!(after.contains(TOKEN_REMOVED), "{after}");
        assert_eq!(
            after.lines().count(),
            text.lines().count(),
            "one line replaced"
        );
        assert_eq!(read_value(&after, "endpoint").as_deref(), Some("h:1"));
        assert_eq!(
            read_value(&after, "shutdown-hook-path").as_deref(),
            Some("/w/hook.sh")
        );
        assert_eq!(read_value(&after, "token"), None);
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode kept");
        assert!(!remove_token(&p).expect("again"), "nothing left to remove");
        assert!(!dir.join("config.tmp").exists(), "no temp file left");
        assert_eq!(
            read_value(&after, "name").as_deref(),
            Some("i-1__ab"),
            "a plain name stays"
        );

        // A pre-signed URL name goes with the token.
        let url =
            "https://sts.us-east-1.amazonaws.com/?Action=GetCallerIdentity&X-Amz-Signature=ab";
        let signed = text.replace("\"i-1__ab\"", &format!("{url:?}"));
        write_private(&p, signed.as_bytes(), 0o600, None).expect("write");
        assert!(remove_token(&p).expect("scrub"));
        let after = std::fs::read_to_string(&p).expect("read");
        assert!(!after.contains("X-Amz-Signature"), "{after}");
        assert!(after.contains(URL_NAME_REMOVED), "{after}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
