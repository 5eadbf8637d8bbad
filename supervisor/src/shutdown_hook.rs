//! The agent's shutdown hook and the daemon's end of it.
//!
//! The agent runs `bash <shutdown-hook-path>` synchronously, with no timeout, before it
//! exits, with `SEMAPHORE_AGENT_SHUTDOWN_REASON` set. Our hook script execs
//! `agent-supervisor hook`, which hands the reason to the daemon over a Unix socket and
//! returns at once: the daemon, not the hook, acts on it once the agent has exited.

use crate::agent::ShutdownReason;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

pub const REASON_ENV: &str = "SEMAPHORE_AGENT_SHUTDOWN_REASON";

/// The socket's file name in the work directory.
pub const SOCKET_FILE: &str = "hook.sock";

/// The longest path a Unix socket may have: `sun_path` is 108 bytes, NUL included.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// The hook socket's path in `work_dir`, or why there can be none: a path longer than
/// [`MAX_SOCKET_PATH_BYTES`] cannot be bound, so a long `--work-dir` is refused at start
/// (and by `check`) rather than when the first agent should start.
pub fn socket_path(work_dir: &Path) -> Result<PathBuf, String> {
    let socket = work_dir.join(SOCKET_FILE);
    let len = socket.as_os_str().len();
    if len > MAX_SOCKET_PATH_BYTES {
        return Err(format!(
            "the shutdown-hook socket {} would be {len} bytes long; a Unix socket path may have at most {MAX_SOCKET_PATH_BYTES}; fix: a --work-dir of at most {} bytes",
            socket.display(),
            MAX_SOCKET_PATH_BYTES - SOCKET_FILE.len() - 1
        ));
    }
    Ok(socket)
}

/// The hook script the agent runs.
pub fn script(supervisor_exe: &Path, socket: &Path) -> Result<String, String> {
    for p in [supervisor_exe, socket] {
        let s = p.to_string_lossy();
        if s.contains('\'') || s.contains('\n') {
            return Err(format!(
                "path {s:?} cannot be used in the hook script (quote or newline)"
            ));
        }
    }
    Ok(format!(
        "#!/bin/bash\n\
         # Written by agent-supervisor: hands the agent's shutdown reason to the daemon.\n\
         exec '{}' hook --socket '{}'\n",
        supervisor_exe.display(),
        socket.display()
    ))
}

/// `agent-supervisor hook`: never fails the agent's shutdown; problems go to stderr,
/// which the agent logs.
pub fn client(socket: &Path) -> i32 {
    let reason = std::env::var(REASON_ENV).unwrap_or_default();
    let reason = ShutdownReason::parse(&reason);
    match send(socket, reason) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!(
                "agent-supervisor hook: could not hand reason {reason} to the daemon at {}: {e}",
                socket.display()
            );
            0
        }
    }
}

fn send(socket: &Path, reason: ShutdownReason) -> std::io::Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("{reason}\n").as_bytes())?;
    let mut ack = [0u8; 3];
    s.read_exact(&mut ack)?;
    Ok(())
}

/// The daemon's listener. Each reason received is sent on the channel.
pub struct HookServer {
    pub socket: PathBuf,
}

impl HookServer {
    /// Binds the socket (replacing a stale one), readable and writable only by the agent
    /// user (`owner`) and root.
    pub fn bind(
        socket: &Path,
        owner: Option<(u32, u32)>,
    ) -> std::io::Result<(tokio::net::UnixListener, Self)> {
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = tokio::net::UnixListener::bind(socket)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(socket, Some(uid), Some(gid))?;
        }
        Ok((
            listener,
            Self {
                socket: socket.to_path_buf(),
            },
        ))
    }
}

/// The last reason the hook handed over: one slot, so a flood of connections cannot grow
/// the daemon's memory. The agent owner empties it before each run and takes it after.
#[derive(Clone, Default)]
pub struct ReasonSlot(Arc<Mutex<Option<ShutdownReason>>>);

impl ReasonSlot {
    fn put(&self, reason: ShutdownReason) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(reason);
        }
    }

    /// Empties the slot.
    pub fn take(&self) -> Option<ShutdownReason> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// Connections served at once; more are closed unread.
pub const MAX_CONNECTIONS: usize = 4;

/// Whether a peer may hand over a reason: root, or the agent's user (`agent_uid`; the
/// daemon's own user when the agent runs as it).
pub fn peer_allowed(peer_uid: u32, agent_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == agent_uid
}

/// Serves hook connections until the listener task is dropped: peers checked by their
/// credentials, at most [`MAX_CONNECTIONS`] at once, each read bounded to 2 s and 64
/// bytes, the reason kept in `slot`; accept errors (e.g. out of file descriptors) are
/// backed off rather than spun on.
///
/// The agent user owns the socket, so job code can send a reason of its choosing. That
/// changes nothing a job could use: once the agent was handed a job, every exit ends the
/// instance ([`crate::lifecycle::one_job_per_vm`]), and before any job no job code ran.
pub async fn serve(listener: tokio::net::UnixListener, slot: ReasonSlot, agent_uid: u32) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => {
                backoff = Duration::from_millis(50);
                conn
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "shutdown-hook socket: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let uid = conn.peer_cred().map(|c| c.uid()).ok();
        if !uid.is_some_and(|uid| peer_allowed(uid, agent_uid)) {
            tracing::warn!(peer_uid = ?uid, "shutdown-hook socket: refused a connection from another user");
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("shutdown-hook socket: too many connections; closing one unread");
            continue;
        };
        let slot = slot.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let mut buf = [0u8; 64];
                let read = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await;
                if let Ok(Ok(n)) = read {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let reason = ShutdownReason::parse(text.lines().next().unwrap_or_default());
                    tracing::info!(exit_reason = %reason, "agent shutdown hook ran");
                    slot.put(reason);
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), conn.write_all(b"ok\n")).await;
                }
            }
            .in_current_span(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hook server on a socket in a fresh directory named `name`, serving this user:
    /// the directory, the socket, the reason slot and the serving task.
    fn served(name: &str) -> (PathBuf, PathBuf, ReasonSlot, tokio::task::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let sock = dir.join("hook.sock");
        let (listener, _server) = HookServer::bind(&sock, None).expect("bind");
        let slot = ReasonSlot::default();
        let uid = nix::unistd::geteuid().as_raw();
        let task = tokio::spawn(serve(listener, slot.clone(), uid));
        (dir, sock, slot, task)
    }

    #[tokio::test]
    async fn reason_reaches_the_daemon() {
        let (dir, sock, slot, task) = served("hooktest");
        for reason in [ShutdownReason::Idle, ShutdownReason::JobFinished] {
            let s = sock.clone();
            tokio::task::spawn_blocking(move || send(&s, reason))
                .await
                .expect("join")
                .expect("send");
        }
        // One slot: the last reason, once.
        assert_eq!(slot.take(), Some(ShutdownReason::JobFinished));
        assert_eq!(slot.take(), None);
        task.abort();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn only_root_and_the_agents_user_may_hand_over_a_reason() {
        assert!(peer_allowed(0, 1001));
        assert!(peer_allowed(1001, 1001));
        assert!(!peer_allowed(1002, 1001));
        assert!(!peer_allowed(65534, 1001));
    }

    /// A flood of silent connections (a job holding them open) neither grows the daemon
    /// nor keeps the agent's own hook from getting through for long.
    #[tokio::test]
    async fn a_flood_of_silent_connections_is_bounded() {
        let (dir, sock, slot, task) = served("hookflood");
        let mut silent = vec![];
        for _ in 0..200 {
            silent.push(
                tokio::net::UnixStream::connect(&sock)
                    .await
                    .expect("connect"),
            );
        }
        // The hook retries as the agent would not: its one attempt may be closed unread
        // while the flood holds every permit, but the permits free within the read bound.
        let s = sock.clone();
        let sent = tokio::task::spawn_blocking(move || {
            let until = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                match send(&s, ShutdownReason::Idle) {
                    Ok(()) => return true,
                    Err(_) if std::time::Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    Err(_) => return false,
                }
            }
        })
        .await
        .expect("join");
        assert!(sent, "the hook never got through");
        assert_eq!(slot.take(), Some(ShutdownReason::Idle));
        drop(silent);
        task.abort();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn hook_returns_at_once_without_a_daemon() {
        let start = std::time::Instant::now();
        assert_eq!(client(Path::new("/nonexistent/hook.sock")), 0);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn socket_paths_must_fit_a_sockaddr() {
        let fits = format!(
            "/{}",
            "w".repeat(MAX_SOCKET_PATH_BYTES - SOCKET_FILE.len() - 2)
        );
        let socket = socket_path(Path::new(&fits)).expect("fits");
        assert_eq!(socket.as_os_str().len(), MAX_SOCKET_PATH_BYTES);
        let long = format!("{fits}x");
        let e = socket_path(Path::new(&long)).expect_err("one byte too long");
        assert!(
            e.contains(&long) && e.contains("--work-dir of at most 97 bytes"),
            "{e}"
        );
        // And the longest accepted path really binds.
        let dir = std::env::temp_dir().join(format!("hooklen-{}", std::process::id()));
        let room = MAX_SOCKET_PATH_BYTES - SOCKET_FILE.len() - 1 - dir.as_os_str().len() - 1;
        let deep = dir.join("d".repeat(room));
        std::fs::create_dir_all(&deep).expect("mkdir");
        let socket = socket_path(&deep).expect("fits");
        assert_eq!(socket.as_os_str().len(), MAX_SOCKET_PATH_BYTES);
        let bound = std::os::unix::net::UnixListener::bind(&socket);
        let _ = std::fs::remove_dir_all(&dir);
        bound.expect("the longest accepted socket path binds");
    }

    #[test]
    fn script_refuses_unquotable_paths() {
        assert!(script(Path::new("/a'b"), Path::new("/s")).is_err());
        let s = script(
            Path::new("/usr/bin/agent-supervisor"),
            Path::new("/run/x.sock"),
        )
        .expect("ok");
        assert!(s.contains("exec '/usr/bin/agent-supervisor' hook --socket '/run/x.sock'"));
    }
}
