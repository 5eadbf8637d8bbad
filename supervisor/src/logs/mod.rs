//! Logs in CloudWatch Logs: the supervisor's and the agent's records, and cloud-init's
//! output, shipped to the stack's log group (runtime config `log_group`), one stream per
//! instance (its id). An operator reads a dead instance's last minutes there.
//!
//! Why in the supervisor and not a baked CloudWatch agent: the records are already in
//! hand as `tracing` events with their structured fields, which a [`ShipLayer`] keeps
//! (a journal reader would have to parse them back), the supervisor knows when the
//! instance is about to end and flushes then, and nothing else needs to run, be patched
//! or be given memory on every instance.
//!
//! ## What ships, and how it looks
//!
//! Every record the journal gets (the same filter: `AGENT_SUPERVISOR_LOG`, INFO by
//! default — the agent's banner and sync chatter stay at DEBUG and do not ship), as one
//! JSON object per event with the journal's field names: `MESSAGE`, `PRIORITY` (3 error,
//! 4 warn, 5 info, 6 debug, 7 trace), `SYSLOG_IDENTIFIER` (`agent-supervisor`,
//! `semaphore-agent` or `cloud-init`), `TARGET`, the root span's `INSTANCE_ID`, `STACK`
//! and `ROLE`, and the event's own fields uppercased (`EXIT_REASON`, `AGENT_NAME`, …; see
//! [`crate::telemetry`]). cloud-init's output file (`--cloud-init-log`) is tailed, one
//! event per line, from where the last supervisor on this instance left it.
//!
//! ## Bounds
//!
//! - Memory: entries wait in a queue capped at `--log-queue-kib` (2 MiB by default);
//!   beyond it the **oldest** are dropped (the newest are what tells why an instance
//!   ended), plus at most one batch in flight. Dropped entries are counted: the
//!   count is logged (so shipped, and in the journal) when shipping works again, and
//!   every 5 minutes while it does not.
//! - Nothing waits on the shipper: a record is queued under a short lock and the layer
//!   returns. Only the ending path waits, for [`flush`] and at most [`FLUSH_BOUND`],
//!   before the terminate call, the lifecycle completion and the poweroff, and when the
//!   daemon exits.
//! - Batches every [`SHIP_EVERY`] (or once half a batch is queued), within
//!   `PutLogEvents`' limits ([`batch`]). Throttling, 5xx and network failures back off
//!   from 1 s doubling to 60 s, ±20 % jitter; the batch stays queued.
//! - The registration token never ships: every string field is scrubbed of the secrets
//!   [`redact`] was given (the token, each time it is read) before it is queued.

pub mod batch;
mod layer;
mod ship;
#[cfg(test)]
mod tests;

pub use layer::ShipLayer;
pub use ship::{tail_file, Shipper};

use crate::aws::logs::LogSink;
use batch::Queue;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify};

/// How long the ending path waits for the queue to reach CloudWatch Logs.
pub const FLUSH_BOUND: Duration = Duration::from_secs(2);
/// How often queued entries are shipped when nothing hurries them.
pub const SHIP_EVERY: Duration = Duration::from_secs(5);
/// The default queue cap (`--log-queue-kib`).
pub const DEFAULT_QUEUE_KIB: usize = 2048;
/// The queue wakes the shipper early at this many bytes (half a batch), or at half its
/// cap if that is less.
const WAKE_BYTES: usize = batch::MAX_BATCH_BYTES / 2;
/// Secrets shorter than this are not scrubbed (they would mangle ordinary words).
const MIN_SECRET_LEN: usize = 8;
/// What a secret is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Whether records are kept for shipping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Before the runtime config says: kept (so the boot's records ship too).
    Buffering = 0,
    /// A shipper runs.
    Shipping = 1,
    /// The stack ships no logs: nothing kept.
    Off = 2,
}

/// What the layer, the shipper and [`flush`] share.
pub struct Shared {
    mode: AtomicU8,
    state: Mutex<State>,
    secrets: RwLock<Vec<String>>,
    /// Many entries queued: ship now.
    more: Notify,
    /// A flush wants everything shipped now (it also cuts a backoff short).
    flush: Notify,
    /// Every entry up to this seq was shipped or dropped (the shipper's progress).
    done: watch::Sender<u64>,
}

struct State {
    queue: Queue,
    /// The first seq of the batch being sent, if one is.
    in_flight: Option<u64>,
}

impl State {
    fn done(&self) -> u64 {
        self.in_flight
            .map_or(self.queue.gone_upto(), |first| first - 1)
    }
}

static GLOBAL: OnceLock<Arc<Shared>> = OnceLock::new();

impl Shared {
    /// A queue of at most `cap_bytes`, buffering until [`Shared::start`] or
    /// [`Shared::turn_off`].
    pub fn new(cap_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            mode: AtomicU8::new(Mode::Buffering as u8),
            state: Mutex::new(State {
                queue: Queue::new(cap_bytes),
                in_flight: None,
            }),
            secrets: RwLock::new(vec![]),
            more: Notify::new(),
            flush: Notify::new(),
            done: watch::Sender::new(0),
        })
    }

    /// Makes `shared` the daemon's (what [`flush`], [`redact`] and [`global`] reach).
    /// Once per process; a second call is ignored.
    pub fn install(shared: &Arc<Self>) {
        let _ = GLOBAL.set(shared.clone());
    }

    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Relaxed) {
            0 => Mode::Buffering,
            1 => Mode::Shipping,
            _ => Mode::Off,
        }
    }

    /// Whether the layer should build records at all.
    pub fn keeps_records(&self) -> bool {
        self.mode() != Mode::Off
    }

    /// The stack ships no logs: the queue is emptied and nothing is kept from now on.
    pub fn turn_off(&self) {
        self.mode.store(Mode::Off as u8, Ordering::Relaxed);
        if let Ok(mut st) = self.state.lock() {
            st.queue.clear();
        }
    }

    /// Starts shipping: `shipper` runs in a task of the current runtime (the caller keeps
    /// the handle; dropping an [`crate::AbortOnDrop`] of it stops shipping).
    pub fn start<S: LogSink>(self: &Arc<Self>, shipper: Shipper<S>) -> tokio::task::JoinHandle<()> {
        self.mode.store(Mode::Shipping as u8, Ordering::Relaxed);
        tokio::spawn(shipper.run(self.clone()))
    }

    /// Scrubs `secret` from every record queued from now on.
    pub fn redact(&self, secret: &str) {
        let secret = secret.trim();
        if secret.len() < MIN_SECRET_LEN {
            return;
        }
        if let Ok(mut s) = self.secrets.write() {
            if !s.iter().any(|known| known == secret) {
                s.push(secret.to_string());
            }
        }
    }

    /// Queues one record (its fields by journal name), scrubbed of the secrets.
    pub fn push(&self, mut fields: Map<String, Value>) {
        if !self.keeps_records() {
            return;
        }
        if let Ok(secrets) = self.secrets.read() {
            if !secrets.is_empty() {
                for v in fields.values_mut() {
                    if let Value::String(s) = v {
                        for secret in secrets.iter() {
                            if s.contains(secret.as_str()) {
                                *s = s.replace(secret.as_str(), REDACTED);
                            }
                        }
                    }
                }
            }
        }
        let message = Value::Object(fields).to_string();
        let wake = match self.state.lock() {
            Ok(mut st) => {
                st.queue.push(now_ms(), message);
                st.queue.bytes() >= WAKE_BYTES.min(st.queue.cap_bytes() / 2)
            }
            Err(_) => false,
        };
        if wake {
            self.more.notify_one();
        }
    }

    /// Entries dropped so far (queue cap, or refused by the service).
    pub fn dropped(&self) -> u64 {
        self.state.lock().map_or(0, |st| st.queue.dropped())
    }

    /// Entries waiting (not counting a batch in flight).
    pub fn queued(&self) -> usize {
        self.state.lock().map_or(0, |st| st.queue.len())
    }

    /// Waits until every record queued before the call was shipped (or dropped), at most
    /// `bound`. Returns at once unless a shipper runs. Whether everything went.
    pub async fn flush(&self, bound: Duration) -> bool {
        if self.mode() != Mode::Shipping {
            return false;
        }
        let Ok(target) = self.state.lock().map(|st| st.queue.pushed()) else {
            return false;
        };
        let mut done = self.done.subscribe();
        if *done.borrow() >= target {
            return true;
        }
        self.flush.notify_one();
        let shipped = tokio::time::timeout(bound, done.wait_for(|d| *d >= target))
            .await
            .is_ok_and(|r| r.is_ok());
        shipped
    }

    fn publish_done(&self) {
        if let Ok(st) = self.state.lock() {
            let done = st.done();
            self.done.send_if_modified(|d| {
                let moved = done > *d;
                *d = (*d).max(done);
                moved
            });
        }
    }
}

/// The daemon's shared queue, once installed.
pub fn global() -> Option<&'static Arc<Shared>> {
    GLOBAL.get()
}

/// [`Shared::flush`] of the daemon's queue (nothing to do without one).
pub async fn flush(bound: Duration) -> bool {
    match global() {
        Some(shared) => {
            let started = tokio::time::Instant::now();
            let all = shared.flush(bound).await;
            let waited_ms = started.elapsed().as_millis() as u64;
            if all || shared.mode() != Mode::Shipping {
                tracing::debug!(all_shipped = all, waited_ms, "log flush");
            } else {
                // For the journal: what CloudWatch Logs will not have of this instance.
                tracing::warn!(
                    waited_ms,
                    unshipped = shared.queued(),
                    dropped_total = shared.dropped(),
                    "not every log entry reached CloudWatch Logs in time; the journal has them all"
                );
            }
            all
        }
        None => false,
    }
}

/// [`Shared::redact`] on the daemon's queue.
pub fn redact(secret: &str) {
    if let Some(shared) = global() {
        shared.redact(secret);
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
