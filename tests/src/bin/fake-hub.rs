//! Runs the fake Semaphore hub on 127.0.0.1 until SIGTERM/SIGINT, for manual
//! use. Prints `LISTENING 127.0.0.1:PORT` on stdout once ready; hub events go
//! to stderr as JSON lines (`--quiet` turns that off). Drive it with the
//! control API (`POST /control/jobs`, `GET /control/state`, `POST /control/logs`, …;
//! see `hub/mod.rs`). `--real-sync` answers the real server's random 4–6 s sync interval.

use agent_fleet_tests::hub::{Hub, HubEvent, HubOptions, REAL_SYNC_MS};
use clap::Parser;
use std::io::Write;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(name = "fake-hub", about = "Fake Semaphore hub on 127.0.0.1")]
struct Args {
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// `next_sync_after` sent to agents, in ms (the low end with --next-sync-after-max-ms).
    #[arg(long, default_value_t = 200)]
    next_sync_after_ms: u64,
    /// Pick `next_sync_after` at random in [--next-sync-after-ms, this] for each answer
    /// (the real server: 4000..6000; see --real-sync). 0 = fixed.
    #[arg(long, default_value_t = 0)]
    next_sync_after_max_ms: u64,
    /// The real server's sync interval: a random 4–6 s per answer (overrides the two
    /// options above).
    #[arg(long)]
    real_sync: bool,
    /// Log space per job, in events: further log pushes get 422 (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    max_log_events: u64,
    /// Registration token.
    #[arg(long, default_value = "reg-token")]
    token: String,
    /// Drop agents that have not synced for this long (0 = never).
    #[arg(long, default_value_t = 180_000)]
    stale_agent_after_ms: u64,
    /// Do not print hub events on stderr.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (min, max) = if args.real_sync {
        REAL_SYNC_MS
    } else {
        (args.next_sync_after_ms, args.next_sync_after_max_ms)
    };
    let hub = Hub::start(HubOptions {
        next_sync_after_ms: min,
        next_sync_after_max_ms: max,
        registration_token: args.token,
        stale_agent_after_ms: args.stale_agent_after_ms,
        port: args.port,
        max_log_events_per_job: args.max_log_events,
    })
    .await?;
    let mut events = hub.subscribe();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "LISTENING {}", hub.endpoint())?;
        out.flush()?;
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            ev = events.recv() => match ev {
                Ok(HubEvent::MetricsPolled) => {}
                Ok(ev) if !args.quiet => {
                    eprintln!("{}", serde_json::to_string(&ev)?);
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    hub.stop().await;
    Ok(())
}
