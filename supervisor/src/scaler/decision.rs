//! What one poll of the scaler decided: published to the election, which copies the latest
//! into the lease record, where `agent-fleet status` reads it.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The scaler's decision at one poll, as the leader last published it.
///
/// `action` is one of:
/// - `raised`: `SetDesiredCapacity(target)` succeeded; `desired_before` < `desired_after`.
/// - `held`: the group is big enough (`target` ≤ desired), or this term already asked for
///   `target` and the group has not caught up yet (`reason` says so).
/// - `failed`: raising was refused or did not answer; `reason` has the error.
/// - `skipped`: nothing to decide on this poll (Semaphore or the group could not be read,
///   scaling is off, leadership lapsed); `reason` says why. Numbers that were not learned
///   are absent, never a false zero.
///
/// A reader should show unknown actions as they are: newer supervisors may add some.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// When the poll decided: the leader's wall clock, Unix milliseconds.
    pub at_unix_ms: u64,
    pub action: String,
    /// Jobs waiting and running, as Semaphore counted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<u64>,
    /// The group size those jobs need (after overprovision, min and max).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<i32>,
    /// The group's desired capacity before and after this poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_before: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_after: Option<i32>,
    /// Why, for `held` (when not plain), `failed` and `skipped`; at most
    /// [`Decision::MAX_REASON_CHARS`] characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Decision {
    /// The record is written on every renew and an SSM standard parameter holds 4 KB:
    /// reasons are cut to this many characters.
    pub const MAX_REASON_CHARS: usize = 200;

    /// A decision of `action` at `at`, numbers unknown. Fill in what the poll learned.
    pub fn new(at: std::time::SystemTime, action: impl Into<String>) -> Self {
        let at_unix_ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            at_unix_ms,
            action: action.into(),
            queued: None,
            running: None,
            target: None,
            desired_before: None,
            desired_after: None,
            reason: None,
        }
    }

    /// Sets `reason`, cut to [`Decision::MAX_REASON_CHARS`] characters.
    pub fn set_reason(&mut self, reason: impl AsRef<str>) {
        let reason = reason.as_ref();
        self.reason = Some(match reason.char_indices().nth(Self::MAX_REASON_CHARS) {
            Some((cut, _)) => format!("{}…", &reason[..cut]),
            None => reason.to_string(),
        });
    }

    /// When the poll decided.
    pub fn at(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_millis(self.at_unix_ms)
    }
}
