//! A whole fleet's election in one process, on [`MemoryStore`]: what it costs in SSM
//! calls, and how long a failover takes.

use super::{Calls, Elector, MemoryStore};
use crate::config::ElectionSettings;
use crate::election::Leadership;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    pub candidates: usize,
    /// Steady state, fleet-wide, over the measured window.
    pub ssm_calls_per_sec: f64,
    /// The calls in the measured window, by kind.
    pub calls: Calls,
    /// From killing the leader until another candidate publishes `Leader`. If none did
    /// within 10 × (lease + renew_deadline + retry), that bound.
    pub failover: Duration,
}

/// Runs `candidates` electors (none preferred, the fleet list fed to all) on one
/// [`MemoryStore`]: warms up, counts calls over `duration`, then kills the leader's task
/// and times the failover.
///
/// Meant for a paused clock (a current-thread runtime with `start_paused(true)`, tokio's
/// `test-util` feature): then 1,000 candidates and 10 minutes take well under a second.
/// On a real clock it takes the simulated time.
pub async fn simulate(candidates: usize, duration: Duration, cfg: ElectionSettings) -> SimReport {
    let store = MemoryStore::new();
    let ids: Vec<String> = (0..candidates).map(|i| format!("i-{i:017x}")).collect();
    let (_fleet_tx, fleet) = watch::channel(ids.clone());
    let (events_tx, mut events) = mpsc::unbounded_channel::<(usize, Leadership, Instant)>();
    let stop = CancellationToken::new();
    let mut tasks = Vec::with_capacity(candidates);
    for (i, id) in ids.iter().enumerate() {
        let (tx, mut rx) = watch::channel(Leadership::default());
        let elector = Elector::new(
            store.handle(),
            cfg.clone(),
            id.clone(),
            false,
            fleet.clone(),
        )
        .with_seed(((candidates as u64) << 32) + i as u64);
        tasks.push(tokio::spawn(elector.run(stop.child_token(), tx)));
        let events_tx = events_tx.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let now = rx.borrow_and_update().clone();
                if events_tx.send((i, now, Instant::now())).is_err() {
                    break;
                }
            }
        });
    }
    drop(events_tx);

    let warm_up = cfg.lease + cfg.renew_deadline + cfg.retry * 4;
    tokio::time::sleep(warm_up).await;
    let (before, t0) = (store.calls(), Instant::now());
    tokio::time::sleep(duration).await;
    let (after, elapsed) = (store.calls(), t0.elapsed());
    let calls = Calls {
        create: after.create - before.create,
        overwrite: after.overwrite - before.overwrite,
        get: after.get - before.get,
        delete: after.delete - before.delete,
        list: after.list - before.list,
    };
    let ssm_calls_per_sec = calls.total() as f64 / elapsed.as_secs_f64().max(f64::EPSILON);

    let mut latest = vec![Leadership::default(); candidates];
    while let Ok((i, l, _)) = events.try_recv() {
        latest[i] = l;
    }
    let now = Instant::now();
    let leader = latest.iter().position(|l| l.valid_term(now).is_some());
    let bound = (cfg.lease + cfg.renew_deadline + cfg.retry) * 10;
    let mut failover = bound;
    if let Some(leader) = leader {
        tasks[leader].abort();
        let killed = Instant::now();
        let deadline = tokio::time::sleep_until(killed + bound);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                ev = events.recv() => match ev {
                    Some((i, Leadership::Leader { .. }, at)) if i != leader => {
                        failover = at - killed;
                        break;
                    }
                    Some(_) => {}
                    None => break,
                },
            }
        }
    }
    stop.cancel();
    for t in &tasks {
        t.abort();
    }
    SimReport {
        candidates,
        ssm_calls_per_sec,
        calls,
        failover,
    }
}
