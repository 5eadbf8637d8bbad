//! The wrapper process, as the real agent's panicwrap: runs the agent as its child,
//! forwards signals, and runs the agent again in its own process when the child dies
//! from a signal (see the crate docs).

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::log::event;
use crate::CHILD_ENV;

/// The wrapper: re-executes itself as the child and forwards signals. When the child
/// dies from a signal, it becomes the agent itself (an `exec` with
/// `FAKE_AGENT_CHILD=rerun`).
pub(crate) async fn wrapper_main(args: Vec<String>) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot find own executable: {e}");
            return 1;
        }
    };
    let kinds = [
        (SignalKind::terminate(), nix::sys::signal::Signal::SIGTERM),
        (SignalKind::interrupt(), nix::sys::signal::Signal::SIGINT),
        (SignalKind::hangup(), nix::sys::signal::Signal::SIGHUP),
        (SignalKind::quit(), nix::sys::signal::Signal::SIGQUIT),
        (
            SignalKind::user_defined1(),
            nix::sys::signal::Signal::SIGUSR1,
        ),
        (
            SignalKind::user_defined2(),
            nix::sys::signal::Signal::SIGUSR2,
        ),
    ];
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel();
    let mut listeners = Vec::new();
    for (kind, sig) in kinds {
        match signal(kind) {
            Ok(mut s) => {
                let tx = sig_tx.clone();
                listeners.push(tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        if tx.send(sig).is_err() {
                            break;
                        }
                    }
                }));
            }
            Err(e) => {
                eprintln!("error: could not install signal handler: {e}");
                return 1;
            }
        }
    }
    drop(sig_tx);
    let mut child = match tokio::process::Command::new(&exe)
        .args(&args)
        .env(CHILD_ENV, "1")
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: could not start the agent process: {e}");
            return 1;
        }
    };
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(nix::unistd::Pid::from_raw);
    let status = loop {
        tokio::select! {
            st = child.wait() => break st,
            Some(sig) = sig_rx.recv() => {
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::kill(pid, sig);
                }
            }
        }
    };
    for l in listeners {
        l.abort();
    }
    match status {
        Ok(st) => {
            use std::os::unix::process::CommandExt;
            use std::os::unix::process::ExitStatusExt;
            if let Some(code) = st.code() {
                return code;
            }
            let sig = st.signal().unwrap_or(0);
            eprintln!("agent: agent process died from signal {sig}; running the agent again");
            event("rerun", serde_json::json!({ "signal": sig }));
            // exec: same pid, caught signals back to their defaults.
            let err = std::process::Command::new(&exe)
                .args(&args)
                .env(CHILD_ENV, "rerun")
                .exec();
            eprintln!("error: could not run the agent again: {err}");
            1
        }
        Err(e) => {
            eprintln!("error: waiting for the agent process: {e}");
            1
        }
    }
}
