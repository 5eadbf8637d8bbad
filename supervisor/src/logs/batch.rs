//! The bounded queue of log entries and the batches cut from it, within `PutLogEvents`'
//! limits. Pure: no clock, no I/O (the timestamps come in with the entries).
//!
//! - A batch: at most [`MAX_BATCH_BYTES`] (the UTF-8 bytes of its messages plus
//!   [`EVENT_OVERHEAD`] per event), [`MAX_BATCH_EVENTS`] events, spanning less than
//!   [`MAX_BATCH_SPAN_MS`]; events in the order they were logged, which is chronological
//!   (see [`Queue::push`]).
//! - An event: at most [`MAX_EVENT_BYTES`] with its overhead; a longer message is cut at
//!   a character boundary and ends with [`TRUNCATED`].
//! - The queue: at most `cap_bytes` (counted as a batch is), the oldest entries dropped
//!   beyond it and counted — after an outage, the last minutes before an instance ended
//!   are what an operator reads, so those are the ones kept.

use crate::aws::logs::LogEvent;
use std::collections::VecDeque;

/// `PutLogEvents`: the largest batch, messages' UTF-8 bytes plus 26 per event.
pub const MAX_BATCH_BYTES: usize = 1_048_576;
/// What CloudWatch Logs counts per event beside its message.
pub const EVENT_OVERHEAD: usize = 26;
/// `PutLogEvents`: the most events in a batch.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// `PutLogEvents`: a batch spans less than 24 hours.
pub const MAX_BATCH_SPAN_MS: i64 = 24 * 3600 * 1000;
/// The largest event, overhead included (256 KiB).
pub const MAX_EVENT_BYTES: usize = 256 * 1024;
/// The end of a message that was cut to fit [`MAX_EVENT_BYTES`].
pub const TRUNCATED: &str = "…[truncated]";

/// One queued entry: its place in the order of pushes and the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1, 2, … in push order (a flush waits for every entry up to one of these).
    pub seq: u64,
    pub event: LogEvent,
}

impl Entry {
    /// What the entry counts toward a batch's size.
    pub fn size(&self) -> usize {
        self.event.message.len() + EVENT_OVERHEAD
    }
}

/// Entries taken from the queue together: their seqs are consecutive (the queue drops
/// only at its front and appends only at its back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub first_seq: u64,
    pub events: Vec<LogEvent>,
    /// What CloudWatch Logs counts: the messages' bytes plus the per-event overhead.
    pub bytes: usize,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The seq of the last event (`first_seq - 1` when empty).
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64 - 1
    }
}

/// `message` cut to fit one event (at a character boundary, marked with [`TRUNCATED`]).
pub fn truncate(mut message: String) -> String {
    let max = MAX_EVENT_BYTES - EVENT_OVERHEAD;
    if message.len() <= max {
        return message;
    }
    let mut cut = max - TRUNCATED.len();
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push_str(TRUNCATED);
    message
}

/// The entries waiting to be shipped, oldest first, within a byte cap.
#[derive(Debug)]
pub struct Queue {
    entries: VecDeque<Entry>,
    /// Sum of [`Entry::size`] over `entries`.
    bytes: usize,
    cap_bytes: usize,
    /// The last seq handed out.
    pushed: u64,
    /// The newest timestamp so far: later entries never get an older one.
    last_timestamp: i64,
    /// Entries dropped for the cap (or refused by the service), since the start.
    dropped: u64,
}

impl Queue {
    /// A queue keeping at most `cap_bytes` (at least one largest event's worth).
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            cap_bytes: cap_bytes.max(MAX_EVENT_BYTES),
            pushed: 0,
            last_timestamp: 0,
            dropped: 0,
        }
    }

    /// Appends one message logged at `timestamp_ms` (truncated to fit an event). The
    /// timestamp is raised to the newest seen so far: a wall clock stepped back must not
    /// put events out of order, which `PutLogEvents` refuses. Drops the oldest entries
    /// beyond the cap; returns the new entry's seq.
    pub fn push(&mut self, timestamp_ms: i64, message: String) -> u64 {
        self.pushed += 1;
        self.last_timestamp = self.last_timestamp.max(timestamp_ms);
        let entry = Entry {
            seq: self.pushed,
            event: LogEvent {
                timestamp: self.last_timestamp,
                message: truncate(message),
            },
        };
        self.bytes += entry.size();
        self.entries.push_back(entry);
        self.enforce_cap();
        self.pushed
    }

    /// Drops the oldest entries until the queue fits its cap.
    fn enforce_cap(&mut self) {
        while self.bytes > self.cap_bytes {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.size();
            self.dropped += 1;
        }
    }

    /// The next batch, oldest first, within `PutLogEvents`' limits; empty when the queue
    /// is.
    pub fn take_batch(&mut self) -> Batch {
        let first_seq = self.entries.front().map_or(self.pushed + 1, |e| e.seq);
        let mut events: Vec<LogEvent> = vec![];
        let mut bytes = 0;
        while let Some(next) = self.entries.front() {
            let first = events.first().map_or(next.event.timestamp, |e| e.timestamp);
            let fits = events.len() < MAX_BATCH_EVENTS
                && bytes + next.size() <= MAX_BATCH_BYTES
                && next.event.timestamp - first < MAX_BATCH_SPAN_MS;
            if !fits {
                break;
            }
            bytes += next.size();
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.size();
                events.push(e.event);
            }
        }
        Batch {
            first_seq,
            events,
            bytes,
        }
    }

    /// A batch that could not be shipped goes back to the front, in order; the cap then
    /// drops the oldest, so a long outage keeps the newest entries.
    pub fn put_back(&mut self, batch: Batch) {
        for (i, event) in batch.events.into_iter().enumerate().rev() {
            let e = Entry {
                seq: batch.first_seq + i as u64,
                event,
            };
            self.bytes += e.size();
            self.entries.push_front(e);
        }
        self.enforce_cap();
    }

    /// Counts entries lost otherwise (a batch the service refused for good).
    pub fn count_dropped(&mut self, n: usize) {
        self.dropped += n as u64;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of the entries' sizes (what a batch of them would count).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn cap_bytes(&self) -> usize {
        self.cap_bytes
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The last seq handed out.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Every entry up to this seq is gone from the queue (shipped, in flight or dropped).
    pub fn gone_upto(&self) -> u64 {
        self.entries.front().map_or(self.pushed, |e| e.seq - 1)
    }

    /// Empties the queue (shipping turned off).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}
