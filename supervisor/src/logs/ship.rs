//! The shipper task (queue → `PutLogEvents`) and the tail of cloud-init's output file.

use super::{Shared, SHIP_EVERY};
use crate::aws::logs::{LogSink, LogsError};
use crate::retry::{jitter, RetryPolicy};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Backoff of a failing shipper: 1 s doubling to 60 s (±20 % jitter).
pub const BACKOFF: RetryPolicy = RetryPolicy {
    attempts: u32::MAX,
    first_delay: Duration::from_secs(1),
    max_delay: Duration::from_secs(60),
};
/// While shipping fails, the dropped count is logged this often.
const OUTAGE_REPORT_EVERY: Duration = Duration::from_secs(300);

/// Ships one instance's queue to its stream.
pub struct Shipper<S> {
    pub sink: S,
    pub group: String,
    /// The instance id.
    pub stream: String,
    /// How often to ship when nothing hurries it ([`SHIP_EVERY`]).
    pub every: Duration,
    pub backoff: RetryPolicy,
}

impl<S: LogSink> Shipper<S> {
    pub fn new(sink: S, group: &str, stream: &str) -> Self {
        Self {
            sink,
            group: group.to_string(),
            stream: stream.to_string(),
            every: SHIP_EVERY,
            backoff: BACKOFF,
        }
    }
}

/// A run of failed calls.
struct Outage {
    since: Instant,
    failures: u32,
    last_report: Instant,
}

impl<S: LogSink> Shipper<S> {
    /// Runs until aborted: creates the stream, then ships whatever is queued every
    /// [`Shipper::every`], at once when half a batch is queued or a flush asks.
    pub async fn run(self, shared: Arc<Shared>) {
        let mut stream_ready = false;
        let mut outage: Option<Outage> = None;
        // The dropped count last logged.
        let mut reported = 0;
        loop {
            if !stream_ready {
                match self.sink.create_stream(&self.group, &self.stream).await {
                    Ok(()) => stream_ready = true,
                    Err(e) => {
                        self.failed(&shared, &mut outage, &e).await;
                        continue;
                    }
                }
            }
            let batch = match shared.state.lock() {
                Ok(mut st) => {
                    let b = st.queue.take_batch();
                    st.in_flight = (!b.is_empty()).then_some(b.first_seq);
                    b
                }
                Err(_) => return,
            };
            if batch.is_empty() {
                shared.publish_done();
                tokio::select! {
                    _ = tokio::time::sleep(self.every) => {}
                    _ = shared.more.notified() => {}
                    _ = shared.flush.notified() => {}
                }
                continue;
            }
            let sent = self
                .sink
                .put_events(&self.group, &self.stream, &batch.events)
                .await;
            let count = batch.events.len();
            let failure = match sent {
                Ok(()) => None,
                // The stream is gone (deleted by hand): made again, the batch retried.
                Err(e) if e.code() == Some("ResourceNotFoundException") => {
                    stream_ready = false;
                    Some((e, true))
                }
                Err(e) => {
                    let keep = e.is_transient();
                    Some((e, keep))
                }
            };
            if let Ok(mut st) = shared.state.lock() {
                st.in_flight = None;
                match &failure {
                    Some((_, true)) => st.queue.put_back(batch),
                    Some((_, false)) => st.queue.count_dropped(count),
                    None => {}
                }
            }
            shared.publish_done();
            match failure {
                None => {
                    let dropped = shared.dropped();
                    report_drops(outage.take(), dropped - reported, dropped);
                    reported = dropped;
                }
                Some((e, _)) if !stream_ready => {
                    tracing::info!(error = %e, "log stream {} is gone; creating it again", self.stream);
                }
                Some((e, _)) => self.failed(&shared, &mut outage, &e).await,
            }
        }
    }

    /// Logs a failure (the first of an outage, then every [`OUTAGE_REPORT_EVERY`]) and
    /// waits the backoff (a flush cuts it short: one more try before the instance ends).
    async fn failed(&self, shared: &Shared, outage: &mut Option<Outage>, e: &LogsError) {
        let now = Instant::now();
        let o = outage.get_or_insert_with(|| {
            tracing::warn!(
                error = %e,
                log_group = %self.group,
                "cannot ship logs to CloudWatch Logs; retrying with backoff, keeping the newest entries (the oldest are dropped beyond the queue's cap)"
            );
            Outage {
                since: now,
                failures: 0,
                last_report: now,
            }
        });
        o.failures += 1;
        if now.duration_since(o.last_report) >= OUTAGE_REPORT_EVERY {
            o.last_report = now;
            tracing::warn!(
                error = %e,
                dropped_total = shared.dropped(),
                outage_ms = now.duration_since(o.since).as_millis() as u64,
                "still cannot ship logs to CloudWatch Logs"
            );
        }
        let delay = jitter(self.backoff.delay_after(o.failures));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.flush.notified() => {}
        }
    }
}

/// After a batch went: logs the end of an outage, and entries dropped since the last
/// report (the queue's cap: an outage, or a burst faster than shipping), so the count is
/// shipped and in the journal.
fn report_drops(outage: Option<Outage>, dropped: u64, dropped_total: u64) {
    match outage {
        Some(o) if dropped > 0 => tracing::warn!(
            dropped_entries = dropped,
            dropped_total,
            outage_ms = o.since.elapsed().as_millis() as u64,
            failures = o.failures,
            "shipping logs to CloudWatch Logs again; {dropped} entries were dropped meanwhile (the queue's cap)"
        ),
        Some(o) => tracing::info!(
            dropped_entries = 0u64,
            outage_ms = o.since.elapsed().as_millis() as u64,
            failures = o.failures,
            "shipping logs to CloudWatch Logs again; nothing was lost"
        ),
        None if dropped > 0 => tracing::warn!(
            dropped_entries = dropped,
            dropped_total,
            "{dropped} log entries were dropped before they could ship (the queue's cap)"
        ),
        None => {}
    }
}

/// How often the tailed file is looked at.
const TAIL_EVERY: Duration = Duration::from_secs(2);

/// Tails `path` (cloud-init's output) into the queue, one entry per complete line, with
/// `fields` (instance, stack, role) and `SYSLOG_IDENTIFIER` = `identifier`. Starts where
/// `offset_file` says a previous supervisor on this instance stopped, and keeps the
/// offset there. A file that shrank was replaced: read from its start. Runs until aborted.
pub async fn tail_file(
    shared: Arc<Shared>,
    path: PathBuf,
    offset_file: PathBuf,
    identifier: &'static str,
    fields: Map<String, Value>,
) {
    let mut offset: u64 = std::fs::read_to_string(&offset_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    loop {
        if let Some(next) = read_lines(&path, offset, |line| {
            let mut map = fields.clone();
            map.insert("SYSLOG_IDENTIFIER".into(), identifier.into());
            map.insert("PRIORITY".into(), "6".into());
            map.insert("MESSAGE".into(), line.into());
            shared.push(map);
        }) {
            if next != offset {
                offset = next;
                if let Err(e) = std::fs::write(&offset_file, format!("{offset}\n")) {
                    tracing::debug!(file = %offset_file.display(), error = %e, "cannot keep the tail's offset");
                }
            }
        }
        tokio::time::sleep(TAIL_EVERY).await;
    }
}

/// Calls `each` for every complete line of `path` after byte `offset`; the offset after
/// the last one. `None` if the file cannot be read (not there yet).
pub(super) fn read_lines(
    path: &std::path::Path,
    offset: u64,
    mut each: impl FnMut(String),
) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let offset = if len < offset { 0 } else { offset };
    if len == offset {
        return Some(offset);
    }
    file.seek(SeekFrom::Start(offset)).ok()?;
    let mut buf = vec![];
    file.take(len - offset).read_to_end(&mut buf).ok()?;
    let complete = match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None => return Some(offset),
    };
    for line in buf[..complete].split(|b| *b == b'\n') {
        if !line.is_empty() {
            each(
                String::from_utf8_lossy(line)
                    .trim_end_matches('\r')
                    .to_string(),
            );
        }
    }
    Some(offset + complete as u64)
}
