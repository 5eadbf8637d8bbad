//! systemd's service notification protocol (`sd_notify(3)`) for a `Type=notify` unit:
//! `READY=1`, `STOPPING=1`, `STATUS=…` and `WATCHDOG=1` datagrams to `$NOTIFY_SOCKET`.
//!
//! - Without `NOTIFY_SOCKET` (not under systemd, or a unit of another type) every call is
//!   a no-op.
//! - The watchdog is on when `WATCHDOG_USEC` is set (systemd sets it from `WatchdogSec=`)
//!   and `WATCHDOG_PID` is unset or our pid. Pings go out every `WATCHDOG_USEC / 2`, and
//!   only from the daemon's main loop: [`Notifier::watchdog_due`] is a branch of each of
//!   its waits, and [`Notifier::during`] covers a step that should end within a known
//!   bound. A main loop that stops turning — a blocked thread, or a step stuck past its
//!   bound — stops the pings, and systemd restarts the daemon.
//! - [`Notifier::from_env`] removes the three variables from the process environment, so
//!   no child (the poweroff command, …) inherits them; the agent's environment is built
//!   from scratch anyway (see `agent::owner`).
//!
//! Why not the `sd-notify` crate: it reads `NOTIFY_SOCKET` again on every call, so
//! unsetting the variable (which its `*_and_unset_env` variants do, as `unsafe fn`s)
//! would silence later notifications; here the address is read once, at the one point
//! where the process is surely single-threaded, and the sending is a few lines of std.

use std::future::Future;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// The variables systemd passes to a notify service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// One assignment of a notification datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State<'a> {
    /// Start-up finished (for us: the agent process runs, or the scaler-only role stands).
    Ready,
    /// Shutting down (a drain began).
    Stopping,
    /// Keep-alive for the watchdog.
    Watchdog,
    /// Free text that `systemctl status` shows.
    Status(&'a str),
}

/// The datagram for `states`: one `KEY=VALUE` per line. A status is kept to one line.
pub fn message(states: &[State<'_>]) -> String {
    states
        .iter()
        .map(|s| match s {
            State::Ready => "READY=1".to_string(),
            State::Stopping => "STOPPING=1".to_string(),
            State::Watchdog => "WATCHDOG=1".to_string(),
            State::Status(text) => format!("STATUS={}", text.replace(['\n', '\r'], " ")),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `NOTIFY_SOCKET` as an address: an absolute path, or `@name` for the abstract namespace.
/// Anything else is not a notification socket (sd_notify ignores it too).
pub fn socket_addr(value: &str) -> Option<SocketAddr> {
    if let Some(name) = value.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes()).ok()
    } else if value.starts_with('/') {
        SocketAddr::from_pathname(value).ok()
    } else {
        None
    }
}

/// The ping interval, half of `WATCHDOG_USEC`, if the watchdog is meant for `own_pid`
/// (`sd_watchdog_enabled(3)`: a `WATCHDOG_PID` naming another process means not us).
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec) / 2)
}

/// Talks to systemd, or does nothing when not run by it. Owned by the main loop.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Ping every this long; `None`: no watchdog.
    watchdog: Option<Duration>,
    next_ping: Instant,
    /// A failed send is logged once at warn, then at debug.
    warned: AtomicBool,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Self {
            target: None,
            watchdog: None,
            next_ping: Instant::now(),
            warned: AtomicBool::new(false),
        }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, and removes them from the
    /// environment. Call it from `main` before any thread exists (changing the environment
    /// while another thread may read it is unsound).
    pub fn from_env() -> Self {
        let socket = std::env::var(NOTIFY_SOCKET).ok();
        let usec = std::env::var(WATCHDOG_USEC).ok();
        let pid = std::env::var(WATCHDOG_PID).ok();
        for name in [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID] {
            std::env::remove_var(name);
        }
        let Some(addr) = socket.as_deref().and_then(socket_addr) else {
            return Self::disabled();
        };
        let watchdog = watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id());
        Self::new(addr, watchdog).unwrap_or_else(|e| {
            eprintln!("agent-supervisor: cannot open a socket for systemd notifications: {e}");
            Self::disabled()
        })
    }

    /// Sends to `addr`; pings every `watchdog` if given. The first ping is due at once.
    pub fn new(addr: SocketAddr, watchdog: Option<Duration>) -> std::io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        // systemd drains its queue quickly; never hold the main loop for long if it does not.
        socket.set_write_timeout(Some(Duration::from_secs(1)))?;
        Ok(Self {
            target: Some((socket, addr)),
            watchdog,
            next_ping: Instant::now(),
            warned: AtomicBool::new(false),
        })
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog's ping interval, if it is on.
    pub fn watchdog(&self) -> Option<Duration> {
        self.target.as_ref().and(self.watchdog)
    }

    /// Sends one datagram; failures are logged, never returned (notifications are a
    /// courtesy to systemd, not a reason to stop supervising the agent).
    pub fn send(&self, states: &[State<'_>]) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        let msg = message(states);
        if let Err(e) = socket.send_to_addr(msg.as_bytes(), addr) {
            if self.warned.swap(true, Ordering::Relaxed) {
                tracing::debug!(error = %e, "systemd notification not delivered");
            } else {
                tracing::warn!(error = %e, "systemd notification not delivered (NOTIFY_SOCKET set, nobody listening?)");
            }
        }
    }

    /// `READY=1` with a status.
    pub fn ready(&self, status: &str) {
        self.send(&[State::Ready, State::Status(status)]);
    }

    /// `STOPPING=1` with a status.
    pub fn stopping(&self, status: &str) {
        self.send(&[State::Stopping, State::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[State::Status(status)]);
    }

    /// Resolves when a watchdog ping is due; never, without a watchdog. A `select!`
    /// branch of the main loop's waits, whose handler calls [`Notifier::ping`].
    pub async fn watchdog_due(&self) {
        match self.watchdog() {
            Some(_) => tokio::time::sleep_until(self.next_ping).await,
            None => std::future::pending().await,
        }
    }

    /// `WATCHDOG=1`, and the next ping is due one interval from now.
    pub fn ping(&mut self) {
        if let Some(every) = self.watchdog() {
            self.send(&[State::Watchdog]);
            self.next_ping = Instant::now() + every;
        }
    }

    /// Runs `step`, a piece of the main loop that should end within `bound`, feeding the
    /// watchdog meanwhile — but not past `bound`: a step stuck longer is a wedged daemon,
    /// and systemd should restart it.
    pub async fn during<F: Future>(&mut self, what: &str, bound: Duration, step: F) -> F::Output {
        tokio::pin!(step);
        let give_up = Instant::now() + bound;
        let mut overdue = false;
        loop {
            tokio::select! {
                biased;
                out = &mut step => return out,
                _ = self.watchdog_due(), if !overdue => self.ping(),
                _ = tokio::time::sleep_until(give_up), if !overdue => {
                    overdue = true;
                    if self.watchdog().is_some() {
                        tracing::error!(
                            step = what,
                            bound_secs = bound.as_secs(),
                            "step still not finished after its bound: no longer feeding the systemd watchdog, so systemd restarts the supervisor"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_key_value_lines() {
        assert_eq!(message(&[State::Ready]), "READY=1");
        assert_eq!(
            message(&[
                State::Ready,
                State::Status("agent running (agent name i-1__ab)")
            ]),
            "READY=1\nSTATUS=agent running (agent name i-1__ab)"
        );
        assert_eq!(
            message(&[State::Stopping, State::Status("draining")]),
            "STOPPING=1\nSTATUS=draining"
        );
        assert_eq!(message(&[State::Watchdog]), "WATCHDOG=1");
        // A status cannot smuggle in another assignment.
        assert_eq!(message(&[State::Status("a\nREADY=1")]), "STATUS=a READY=1");
    }

    #[test]
    fn socket_values() {
        let p = socket_addr("/run/systemd/notify").expect("path");
        assert_eq!(
            p.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let a = socket_addr("@/org/freedesktop/systemd1/notify/1").expect("abstract");
        assert_eq!(
            a.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify/1"[..])
        );
        assert!(socket_addr("relative/path").is_none());
        assert!(socket_addr("").is_none());
    }

    #[test]
    fn watchdog_values() {
        let me = 4242;
        assert_eq!(
            watchdog_interval(Some("30000000"), None, me),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("1000000"), Some("4242"), me),
            Some(Duration::from_millis(500))
        );
        // Meant for another process, malformed, zero or absent: off.
        assert_eq!(watchdog_interval(Some("1000000"), Some("1"), me), None);
        assert_eq!(watchdog_interval(Some("1000000"), Some("x"), me), None);
        assert_eq!(watchdog_interval(Some("soon"), None, me), None);
        assert_eq!(watchdog_interval(Some("0"), None, me), None);
        assert_eq!(watchdog_interval(None, Some("4242"), me), None);
    }

    fn listener(name: &str) -> (std::path::PathBuf, tokio::net::UnixDatagram) {
        let dir = std::env::temp_dir().join(format!(
            "notify-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify.sock");
        let sock = tokio::net::UnixDatagram::bind(&path).expect("bind");
        (path, sock)
    }

    fn drain(sock: &tokio::net::UnixDatagram) -> Vec<String> {
        let mut out = vec![];
        let mut buf = [0u8; 512];
        while let Ok(n) = sock.try_recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[tokio::test]
    async fn datagrams_arrive_and_disabled_is_silent() {
        let (path, sock) = listener("send");
        let n =
            Notifier::new(SocketAddr::from_pathname(&path).expect("addr"), None).expect("notifier");
        n.ready("agent running (agent name i-1__ab)");
        n.status("draining");
        n.stopping("draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            drain(&sock),
            [
                "READY=1\nSTATUS=agent running (agent name i-1__ab)",
                "STATUS=draining",
                "STOPPING=1\nSTATUS=draining"
            ]
        );
        let off = Notifier::disabled();
        off.ready("x");
        assert!(!off.enabled() && off.watchdog().is_none());
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    /// A step within its bound is fed every interval; one stuck past its bound is not,
    /// so systemd's watchdog fires.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_step_stops_the_pings() {
        let (path, sock) = listener("stuck");
        let mut n = Notifier::new(
            SocketAddr::from_pathname(&path).expect("addr"),
            Some(Duration::from_secs(5)),
        )
        .expect("notifier");
        let out = n
            .during("quick", Duration::from_secs(60), async {
                tokio::time::sleep(Duration::from_secs(12)).await;
                7
            })
            .await;
        assert_eq!(out, 7);
        // Due at 0, 5 and 10 s.
        assert_eq!(drain(&sock), ["WATCHDOG=1"; 3]);

        let stuck = n.during(
            "stuck",
            Duration::from_secs(20),
            std::future::pending::<()>(),
        );
        assert!(tokio::time::timeout(Duration::from_secs(120), stuck)
            .await
            .is_err());
        // The stuck step runs from 12 s with its bound at 32 s: pings at 15, 20, 25 and
        // 30 s, none after.
        assert_eq!(drain(&sock), ["WATCHDOG=1"; 4]);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(drain(&sock).is_empty());
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }
}
