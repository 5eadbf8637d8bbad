//! Faults the drills inject from outside the processes under test: a switchable front
//! for an instance's fake IMDS, and libfaketime for wall-clock jumps.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the front of a fake IMDS does with a connection: close it at once,
pub const REFUSE: u8 = 0;
/// answer 500,
pub const ERROR_500: u8 = 1;
/// or forward it (see [`ImdsFront::forward_to`]).
pub const FORWARD: u8 = 2;

/// A TCP front for an instance's fake IMDS that the drill switches between closing
/// connections at once, answering 500, and forwarding.
pub struct ImdsFront {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    target: Arc<Mutex<Option<SocketAddr>>>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ImdsFront {
    pub async fn start(mode: u8) -> anyhow::Result<ImdsFront> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(AtomicU8::new(mode));
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let connections = Arc::new(AtomicU64::new(0));
        let (m, t, n) = (mode.clone(), target.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                n.fetch_add(1, Ordering::Relaxed);
                let mode = m.load(Ordering::SeqCst);
                let target = t.lock().ok().and_then(|g| *g);
                tokio::spawn(async move {
                    match (mode, target) {
                        (FORWARD, Some(target)) => {
                            if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                            }
                        }
                        (ERROR_500, _) => {
                            let mut buf = vec![0u8; 4096];
                            let mut seen = Vec::new();
                            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                                match conn.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                                }
                            }
                            let _ = conn
                                .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                .await;
                        }
                        _ => drop(conn),
                    }
                });
            }
        });
        Ok(ImdsFront {
            addr,
            mode,
            target,
            connections,
            task,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Forwards connections from now on to the fake IMDS at `endpoint`.
    pub fn forward_to(&self, endpoint: &str) {
        let addr = endpoint
            .trim_start_matches("http://")
            .parse::<SocketAddr>()
            .ok();
        if let Ok(mut g) = self.target.lock() {
            *g = addr;
        }
        self.mode.store(FORWARD, Ordering::SeqCst);
    }

    /// Connections accepted so far, whatever was done with them.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for ImdsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// libfaketime's preload library, installing Debian's `faketime` package if it is
/// missing (the tests run as root; `.ci/run` installs it too). Err: why not.
pub fn libfaketime() -> Result<PathBuf, String> {
    let find = || -> Option<PathBuf> {
        for dir in [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
        ] {
            let p = Path::new(dir).join("faketime/libfaketime.so.1");
            if p.is_file() {
                return Some(p);
            }
        }
        None
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "libfaketime is not installed and this is not root (apt-get install faketime)".into(),
        );
    }
    println!("DRILL wall_clock installing faketime with apt-get");
    let ok = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !ok(&["install", "-y", "-qq", "faketime"]) {
        let _ = ok(&["update", "-qq"]);
        if !ok(&["install", "-y", "-qq", "faketime"]) {
            return Err("apt-get install faketime failed".into());
        }
    }
    find().ok_or_else(|| "faketime installed, but libfaketime.so.1 was not found".into())
}
