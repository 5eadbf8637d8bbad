//! The coordinator's view of leader work (the election and the scaler, see
//! [`crate::election`]): what the leadership is, and handing it on.

use crate::election::{LeaderWork, Leadership};
use crate::notify::Notifier;
use crate::Shutdown;
use std::future::Future;
use std::time::Duration;

pub trait Leader {
    /// Resolves with the new leadership when it changes; never without leader work (or
    /// once it was handed on).
    fn changed(&mut self) -> impl Future<Output = Leadership>;
    /// Stops leader work and releases the lease so a successor need not wait it out. At
    /// most once: afterwards, and without leader work, it does nothing.
    fn hand_on(&mut self) -> impl Future<Output = ()>;
    /// The leadership now; `None` without leader work.
    fn current(&self) -> Option<Leadership>;
}

impl Leader for Option<LeaderWork> {
    async fn changed(&mut self) -> Leadership {
        let Some(l) = self.as_mut() else {
            return std::future::pending().await;
        };
        if l.leadership.changed().await.is_err() {
            return std::future::pending().await;
        }
        l.leadership.borrow_and_update().clone()
    }

    async fn hand_on(&mut self) {
        if let Some(l) = self.take() {
            l.stop_and_release().await;
        }
    }

    fn current(&self) -> Option<Leadership> {
        self.as_ref().map(|l| l.leadership.borrow().clone())
    }
}

/// The term this instance leads, if it does.
pub fn leading_term(l: &Leadership) -> Option<u64> {
    match l {
        Leadership::Leader { term, .. } => Some(*term),
        Leadership::Follower { .. } => None,
    }
}

/// What `systemctl status` says of a scaler-only instance.
pub fn scaler_status(leadership: Option<Leadership>) -> String {
    match leadership {
        None => "scaler-only role: dynamic scaling is off, nothing to do".into(),
        Some(Leadership::Leader { term, .. }) => {
            format!("scaler-only role: fleet leader, term {term}")
        }
        Some(Leadership::Follower {
            term: Some(term),
            leader,
        }) => format!(
            "scaler-only role: standing for leader (term {term} held by {})",
            leader.as_deref().unwrap_or("unknown")
        ),
        Some(Leadership::Follower { term: None, .. }) => {
            "scaler-only role: standing for leader".into()
        }
    }
}

/// Longest stopping the election and scaler and releasing the lease may take.
const LEADER_STOP_BOUND: Duration = Duration::from_secs(120);

/// Hands leadership on (bounded, the watchdog fed meanwhile): the one place it is done.
pub(super) async fn hand_on<L: Leader>(leader: &mut L, notify: &mut Notifier) {
    notify
        .during("handing leadership on", LEADER_STOP_BOUND, leader.hand_on())
        .await;
}

/// The scaler-only role: no agent; stand for leader until stopped, then hand leadership on.
pub async fn scaler_only<L: Leader>(mut leader: L, shutdown: Shutdown, mut notify: Notifier) {
    let mut shown = scaler_status(leader.current());
    notify.ready(&shown);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.drain.cancelled() => break,
            _ = shutdown.abort.cancelled() => break,
            l = leader.changed() => {
                // Every renew moves the lease's deadline; say only what changed.
                let status = scaler_status(Some(l));
                if status != shown {
                    notify.status(&status);
                    shown = status;
                }
            }
            _ = notify.watchdog_due() => notify.ping(),
        }
    }
    notify.stopping("stopping: handing leadership on");
    hand_on(&mut leader, &mut notify).await;
}
