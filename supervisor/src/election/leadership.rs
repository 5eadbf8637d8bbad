//! What the election tells the rest of the daemon, on a `watch` channel.
//!
//! Leadership is only ever judged on this machine's monotonic clock: `valid_until` is
//! `start of the last counted renew + renew_deadline`. Leader work checks
//! [`Leadership::valid_term`] right before every side effect.

use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// Not leading. `term`/`leader` are what this candidate last observed, if anything.
    Follower {
        term: Option<u64>,
        leader: Option<String>,
    },
    /// Leading `term` until `valid_until` unless a renew extends it.
    Leader { term: u64, valid_until: Instant },
}

impl Default for Leadership {
    fn default() -> Self {
        Self::Follower {
            term: None,
            leader: None,
        }
    }
}

impl Leadership {
    /// The term, if this process is a leader whose lease is still valid at `now`.
    pub fn valid_term(&self, now: Instant) -> Option<u64> {
        match self {
            Self::Leader { term, valid_until } if now < *valid_until => Some(*term),
            _ => None,
        }
    }

    pub fn term(&self) -> Option<u64> {
        match self {
            Self::Leader { term, .. } => Some(*term),
            Self::Follower { term, .. } => *term,
        }
    }
}
