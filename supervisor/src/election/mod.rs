//! Leader election over SSM Parameter Store, without compare-and-swap.
//!
//! SSM's one atomic primitive is `PutParameter` with `Overwrite=false`, which fails with
//! `ParameterAlreadyExists`. So every leadership *term* is its own parameter,
//! `<prefix>/<term zero-padded to 10>`, and whoever creates term N+1 leads term N+1. The
//! value is a JSON [`Record`].
//!
//! - **Renew**: every `retry` the leader overwrites its term (seq + 1), then reads term
//!   N+1; if that exists it steps down. A renew counts only if both calls answered within
//!   `retry / 2` each and the check found nothing. Leadership is valid until *start of
//!   the last counted renew + `renew_deadline`*, on this machine's monotonic clock;
//!   passing that instant is fail-stop (publish `Follower`, never write the term again).
//! - **Observe**: a candidate remembers term N, the version it last saw and the local
//!   instant it first saw it. Clocks are never compared across machines.
//! - **Take over**: when N's version stood still for the holder's advertised lease (or the
//!   record says `released`), create N+1. Preferred candidates (the scaler-only role) try
//!   as soon as that happens; the others one `retry` later, so a live preferred one wins.
//!   The winner publishes `Leader` only `renew_deadline` after its create returned,
//!   renewing meanwhile: an older leader's validity ended by then, because its last
//!   counted renew checked for N+1 before N+1 was created. Losers follow N+1. The winner
//!   of N deletes N-2 once leading.
//! - **Cost**: the leader names up to [`STANDBYS`] standbys (the first instance ids of the
//!   fleet list it is fed); they and preferred candidates poll every `retry`, everyone
//!   else at the `follower_poll_ms` the leader computes from the fleet size
//!   ([`FOLLOWER_READS_PER_SEC`] shared, capped at [`MAX_FOLLOWER_POLL`]). Fleet total in
//!   steady state: leader 2 calls + standbys 1 call per `retry`, plus that budget —
//!   ≈ 1.35 calls/s at the default timings whatever the size up to ≈ 1,080 members
//!   (≤ 1.5 up to ≈ 2,700). Each start-up adds two calls (list + read).
//! - **Failover** after a crash: ≈ lease + renew_deadline + retry (one more retry when no
//!   preferred candidate is alive); after a release: ≈ retry + renew_deadline.
//! - **Bounds** on what is read from SSM, so a bad parameter cannot stall or crash the
//!   fleet: a term is 1-10 digits, at most [`MAX_TERM`], and term arithmetic is checked
//!   ([`next_term`]); an advertised lease is waited at most
//!   [`MAX_ELECTION_TIMING`](crate::config::MAX_ELECTION_TIMING), the longest a holder can
//!   be configured with; the start-up listing reads at most [`MAX_LIST_PAGES`] pages.
//! - **What validity cannot fence.** Auto Scaling takes no fencing token, so a leader's
//!   call can land after its term ended: a process paused between its validity check and
//!   the send, or a request re-sent by a retry. The window is narrowed, not closed: the
//!   leader's Auto Scaling client checks validity again just before each request is
//!   transmitted and drops it otherwise, and makes no SDK retries (a retry is a new
//!   decision, taken by the next poll after a fresh check); see
//!   [`SdkAutoScaling::for_leader`](crate::aws::autoscaling::SdkAutoScaling::for_leader).
//!   What remains is a pause after the request left, or inside the SDK after that last
//!   check: a raise computed before it may land after a successor acted. The leader never
//!   lowers desired capacity, so the cost is instances that idle out and shrink the group
//!   again; nothing running is ever stopped by it.
//!
//! ## Use
//!
//! ```ignore
//! let (tx, leadership) = watch::channel(Leadership::default());
//! let elector = Elector::new(SsmLeaseStore::new(&sdk), settings.election, &instance_id,
//!                            scaler_only, fleet_ids)
//!     .with_decisions(decision_rx);  // the scaler's latest Decision, copied into records
//! let task = tokio::spawn(elector.run(election_stop.clone(), tx));
//! // … leader work watches `leadership` and checks `valid_term(now)` before each effect …
//! election_stop.cancel();            // run publishes Follower and returns the elector
//! let mut elector = task.await?;
//! scaler.await;                      // leader work has stopped
//! elector.release().await?;          // successor takes over without waiting the lease
//! ```
//!
//! Transitions are logged with `term`, `holder` and `reason` fields (`won term`,
//! `leading`, `stepped down`, `following`, `released the lease`); `leading`,
//! `stepped down` and (at debug) `lease renewed` carry `valid_until_mono_ns`, the end of
//! validity on CLOCK_MONOTONIC (see [`mono_ns`]).

mod elector;
mod leadership;
// The in-memory store and the whole-fleet simulation are for tests and benchmarks, not
// the daemon: built for this crate's tests and with the `sim` feature (the test crate's).
#[cfg(any(test, feature = "sim"))]
mod memory;
mod record;
#[cfg(any(test, feature = "sim"))]
mod sim;
mod ssm;
mod store;
mod work;

pub use elector::{
    Elector, FOLLOWER_READS_PER_SEC, MAX_FOLLOWER_POLL, UNKNOWN_FLEET_FOLLOWER_POLL,
};
pub use leadership::Leadership;
#[cfg(any(test, feature = "sim"))]
pub use memory::{Calls, Freeze, MemoryStore};
pub use record::Record;
#[cfg(any(test, feature = "sim"))]
pub use sim::{simulate, SimReport};
pub use ssm::SsmLeaseStore;
pub use store::{
    next_term, term_name, term_of, Created, LeaseStore, StoreError, MAX_LIST_PAGES, MAX_TERM,
};
pub use work::LeaderWork;

/// How many standbys the leader names in its record.
pub const STANDBYS: usize = 3;

/// `i` as CLOCK_MONOTONIC nanoseconds, comparable with other processes on this machine.
///
/// tokio's `Instant` wraps `std::time::Instant`, which is CLOCK_MONOTONIC on Linux; the
/// conversion goes through the offset from now. Under a paused tokio clock the result is
/// only meaningful relative to other values from the same process.
pub fn mono_ns(i: tokio::time::Instant) -> u64 {
    let now = tokio::time::Instant::now();
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would mark a value as unusable.
    let Ok(ts) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) else {
        return 0;
    };
    let now_ns = i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec());
    let delta = if i >= now {
        i128::try_from((i - now).as_nanos()).unwrap_or(i128::MAX / 2)
    } else {
        -i128::try_from((now - i).as_nanos()).unwrap_or(i128::MAX / 2)
    };
    u64::try_from((now_ns + delta).max(0)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
