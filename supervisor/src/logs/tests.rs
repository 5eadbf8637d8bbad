use super::batch::*;
use super::*;
use crate::aws::logs::{LogEvent, LogSink, LogsError};
use std::sync::Mutex as StdMutex;
use tracing_subscriber::prelude::*;

fn msg(n: usize) -> String {
    "x".repeat(n)
}

#[test]
fn batches_keep_the_byte_limit_counting_26_per_event() {
    let mut q = Queue::new(8 * MAX_BATCH_BYTES);
    // 5 events of 300 000 bytes: three fit in 1 048 576 with their overhead, four do not.
    for _ in 0..5 {
        q.push(1, msg(200_000));
    }
    let b = q.take_batch();
    assert_eq!(b.events.len(), 5, "5 × 200 026 = 1 000 130 fits");
    let mut q = Queue::new(8 * MAX_BATCH_BYTES);
    for _ in 0..6 {
        q.push(1, msg(200_000));
    }
    let b = q.take_batch();
    assert_eq!(b.events.len(), 5);
    assert_eq!(b.bytes, 5 * 200_026);
    assert!(b.bytes <= MAX_BATCH_BYTES);
    assert_eq!(q.take_batch().events.len(), 1);
    // Exactly at the limit fits.
    let mut q = Queue::new(8 * MAX_BATCH_BYTES);
    let exact = MAX_BATCH_BYTES / 4 - EVENT_OVERHEAD;
    for _ in 0..5 {
        q.push(1, msg(exact));
    }
    assert_eq!(q.take_batch().bytes, MAX_BATCH_BYTES);
}

#[test]
fn batches_keep_the_event_count_and_the_order() {
    let mut q = Queue::new(64 * MAX_BATCH_BYTES);
    for i in 0..25_000 {
        q.push(i, format!("line {i}"));
    }
    let mut seen = vec![];
    loop {
        let b = q.take_batch();
        if b.is_empty() {
            break;
        }
        assert!(b.events.len() <= MAX_BATCH_EVENTS);
        assert!(b
            .events
            .windows(2)
            .all(|w| w[0].timestamp <= w[1].timestamp));
        seen.extend(b.events.into_iter().map(|e| e.message));
    }
    assert_eq!(seen.len(), 25_000);
    assert!(seen
        .iter()
        .enumerate()
        .all(|(i, m)| *m == format!("line {i}")));
}

#[test]
fn a_batch_spans_less_than_a_day() {
    let mut q = Queue::new(MAX_BATCH_BYTES);
    q.push(0, "a".into());
    q.push(MAX_BATCH_SPAN_MS - 1, "b".into());
    q.push(MAX_BATCH_SPAN_MS, "c".into());
    let b = q.take_batch();
    assert_eq!(
        b.events
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(q.take_batch().events[0].message, "c");
}

#[test]
fn a_clock_stepped_back_keeps_events_in_order() {
    let mut q = Queue::new(MAX_BATCH_BYTES);
    q.push(5_000, "before".into());
    q.push(1_000, "after the step".into());
    let b = q.take_batch();
    assert_eq!(b.events[0].timestamp, 5_000);
    assert_eq!(b.events[1].timestamp, 5_000);
}

#[test]
fn long_messages_are_truncated_at_a_character_boundary() {
    let long = "é".repeat(MAX_EVENT_BYTES); // 2 bytes each
    let t = truncate(long);
    assert!(t.len() + EVENT_OVERHEAD <= MAX_EVENT_BYTES, "{}", t.len());
    assert!(t.ends_with(TRUNCATED));
    assert!(t.len() > MAX_EVENT_BYTES - EVENT_OVERHEAD - TRUNCATED.len() - 2);
    assert_eq!(truncate("short".into()), "short");
    let mut q = Queue::new(MAX_BATCH_BYTES);
    q.push(1, msg(1_000_000));
    assert!(q.take_batch().bytes <= MAX_EVENT_BYTES);
}

#[test]
fn the_queue_drops_the_oldest_beyond_its_cap_and_counts_them() {
    let mut q = Queue::new(MAX_EVENT_BYTES); // the smallest cap
    let size = 1000;
    let fit = MAX_EVENT_BYTES / (size + EVENT_OVERHEAD);
    for i in 0..fit + 10 {
        q.push(i as i64, format!("{i:0size$}"));
    }
    assert_eq!(q.dropped(), 10);
    assert!(q.bytes() <= MAX_EVENT_BYTES);
    let b = q.take_batch();
    assert_eq!(b.first_seq, 11, "the oldest ten went");
    assert!(b.events[0].message.ends_with("10"));
    // A failed batch goes back in front; the cap then drops from the oldest again.
    q.push(99_999, format!("{:0size$}", 1));
    q.put_back(b);
    assert_eq!(q.dropped(), 11);
    assert_eq!(q.take_batch().first_seq, 12);
}

#[test]
fn gone_upto_follows_the_front() {
    let mut q = Queue::new(MAX_BATCH_BYTES);
    assert_eq!(q.gone_upto(), 0);
    q.push(1, "a".into());
    q.push(1, "b".into());
    assert_eq!(q.gone_upto(), 0);
    let b = q.take_batch();
    assert_eq!((b.first_seq, b.last_seq()), (1, 2));
    assert_eq!(q.gone_upto(), 2);
}

/// One `PutLogEvents` the fake saw: when, and the batch.
type Put = (tokio::time::Instant, Vec<LogEvent>);

/// A scripted CloudWatch Logs: answers from a list (then Ok), records what it was sent.
#[derive(Clone, Default)]
struct FakeLogs {
    answers: Arc<StdMutex<Vec<Result<(), LogsError>>>>,
    puts: Arc<StdMutex<Vec<Put>>>,
    creates: Arc<StdMutex<u32>>,
}

fn throttled() -> LogsError {
    LogsError::Service {
        service: "CloudWatch Logs",
        action: "PutLogEvents",
        status: 400,
        code: "ThrottlingException".into(),
        message: "Rate exceeded".into(),
    }
}

impl FakeLogs {
    fn failing(n: usize) -> Self {
        let f = Self::default();
        *f.answers.lock().expect("lock") = (0..n).map(|_| Err(throttled())).collect();
        f
    }
    fn messages(&self) -> Vec<String> {
        self.puts
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|(_, b)| b.iter().map(|e| e.message.clone()))
            .collect()
    }
}

impl LogSink for FakeLogs {
    async fn create_stream(&self, _: &str, _: &str) -> Result<(), LogsError> {
        *self.creates.lock().expect("lock") += 1;
        Ok(())
    }
    async fn put_events(&self, _: &str, _: &str, events: &[LogEvent]) -> Result<(), LogsError> {
        self.puts
            .lock()
            .expect("lock")
            .push((tokio::time::Instant::now(), events.to_vec()));
        let mut a = self.answers.lock().expect("lock");
        if a.is_empty() {
            Ok(())
        } else {
            a.remove(0)
        }
    }
}

fn fields(message: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("MESSAGE".into(), message.into());
    m
}

#[tokio::test(start_paused = true)]
async fn ships_in_order_every_interval_and_flushes_at_once() {
    let shared = Shared::new(DEFAULT_QUEUE_KIB * 1024);
    let logs = FakeLogs::default();
    shared.push(fields("boot, before the config said where"));
    let _task =
        crate::AbortOnDrop(shared.start(Shipper::new(logs.clone(), "/agent-fleet/s", "i-1")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        logs.messages().len(),
        1,
        "the buffered boot record ships first"
    );
    shared.push(fields("one"));
    shared.push(fields("two"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(logs.messages().len(), 1, "waits for the interval");
    tokio::time::sleep(SHIP_EVERY).await;
    assert_eq!(logs.messages().len(), 3);
    shared.push(fields("last words"));
    let t0 = tokio::time::Instant::now();
    assert!(shared.flush(FLUSH_BOUND).await);
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "a flush does not wait for the interval"
    );
    let m = logs.messages();
    assert!(
        m[0].contains("boot")
            && m[1].contains("one")
            && m[2].contains("two")
            && m[3].contains("last words"),
        "{m:?}"
    );
    assert_eq!(*logs.creates.lock().expect("lock"), 1);
}

#[tokio::test(start_paused = true)]
async fn throttling_backs_off_with_jitter_and_loses_nothing_that_fits() {
    let shared = Shared::new(DEFAULT_QUEUE_KIB * 1024);
    let logs = FakeLogs::failing(6);
    for i in 0..100 {
        shared.push(fields(&format!("line {i}")));
    }
    let _task = crate::AbortOnDrop(shared.start(Shipper::new(logs.clone(), "g", "i-1")));
    tokio::time::sleep(Duration::from_secs(120)).await;
    let puts = logs.puts.lock().expect("lock").clone();
    assert_eq!(puts.len(), 7, "six refusals, then it went");
    let gaps: Vec<f64> = puts
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_secs_f64())
        .collect();
    // 1, 2, 4, 8, 16, 32 s, each ±20 %.
    for (i, gap) in gaps.iter().enumerate() {
        let base = f64::from(1u32 << i);
        assert!(
            (base * 0.8..=base * 1.2 + 0.01).contains(gap),
            "gap {i}: {gap} ({gaps:?})"
        );
    }
    let shipped = &puts[6].1;
    assert_eq!(shipped.len(), 100);
    assert!(shipped
        .iter()
        .enumerate()
        .all(|(i, e)| e.message.contains(&format!("\"line {i}\""))));
    assert_eq!(shared.dropped(), 0);
}

#[tokio::test(start_paused = true)]
async fn backoff_is_capped_at_a_minute() {
    let shared = Shared::new(DEFAULT_QUEUE_KIB * 1024);
    let logs = FakeLogs::failing(1000);
    shared.push(fields("x"));
    let _task = crate::AbortOnDrop(shared.start(Shipper::new(logs.clone(), "g", "i-1")));
    tokio::time::sleep(Duration::from_secs(1800)).await;
    let puts = logs.puts.lock().expect("lock").clone();
    let last_gap = (puts[puts.len() - 1].0 - puts[puts.len() - 2].0).as_secs_f64();
    assert!((48.0..=72.01).contains(&last_gap), "{last_gap}");
    // About 1+2+…+32 = 63 s, then a minute each: ≈ 30 calls in half an hour, not 1800.
    assert!((25..=40).contains(&puts.len()), "{}", puts.len());
}

#[tokio::test(start_paused = true)]
async fn an_outage_keeps_memory_bounded_never_blocks_and_counts_what_it_dropped() {
    // The shipper's own lines go through a layer into the same queue: its report of the
    // drops ships once CloudWatch Logs answers again.
    let shared = Shared::new(MAX_EVENT_BYTES);
    let subscriber = tracing_subscriber::registry().with(ShipLayer::new(shared.clone()));
    let _guard = tracing::subscriber::set_default(subscriber);
    let logs = FakeLogs::failing(5);
    let _task = crate::AbortOnDrop(shared.start(Shipper::new(logs.clone(), "g", "i-1")));
    let t0 = std::time::Instant::now();
    for i in 0..2_000 {
        tracing::info!(n = i, "{}", "y".repeat(500));
    }
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "logging never waits on the shipper"
    );
    assert!(shared.dropped() > 1_000, "{}", shared.dropped());
    // A flush in an outage returns within its bound.
    let t = tokio::time::Instant::now();
    let all = shared.flush(FLUSH_BOUND).await;
    assert!(t.elapsed() <= FLUSH_BOUND + Duration::from_millis(10));
    let _ = all;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(shared.flush(FLUSH_BOUND).await);
    let shipped = logs.messages();
    let report = shipped
        .iter()
        .find(|m| m.contains("shipping logs to CloudWatch Logs again"))
        .unwrap_or_else(|| panic!("no recovery line among {} shipped", shipped.len()));
    let doc: Value = serde_json::from_str(report).expect("json");
    assert_eq!(doc["DROPPED_ENTRIES"], shared.dropped(), "{report}");
    assert_eq!(doc["PRIORITY"], "4");
    // The newest survived: the last line logged is there.
    assert!(
        shipped.iter().any(|m| m.contains("\"N\":1999")),
        "the newest entries are kept"
    );
    assert!(
        !shipped.iter().any(|m| m.contains("\"N\":0,")),
        "the oldest were dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn records_carry_span_and_event_fields_and_never_the_token() {
    let shared = Shared::new(DEFAULT_QUEUE_KIB * 1024);
    let subscriber = tracing_subscriber::registry().with(ShipLayer::new(shared.clone()));
    let _guard = tracing::subscriber::set_default(subscriber);
    let token = "reg-token-unit-SECRET-42";
    shared.redact(token);
    let span = tracing::info_span!(
        "supervisor",
        instance_id = tracing::field::Empty,
        stack = "s1",
        role = "agent"
    );
    span.record("instance_id", "i-0abc");
    {
        let _e = span.enter();
        tracing::info!(
            exit_reason = "IDLE",
            decrement = true,
            "terminating this instance"
        );
        tracing::warn!(
            target: crate::telemetry::AGENT_TARGET,
            agent_name = "i-0abc__1",
            "registering with token {token} at {}",
            "host"
        );
        tracing::error!(detail = %format!("bad {token}"), "oops");
    }
    let logs = FakeLogs::default();
    let _task = crate::AbortOnDrop(shared.start(Shipper::new(logs.clone(), "g", "i-0abc")));
    assert!(shared.flush(FLUSH_BOUND).await);
    let m = logs.messages();
    assert_eq!(m.len(), 3, "{m:?}");
    let first: Value = serde_json::from_str(&m[0]).expect("json");
    assert_eq!(first["MESSAGE"], "terminating this instance");
    assert_eq!(first["INSTANCE_ID"], "i-0abc");
    assert_eq!(first["STACK"], "s1");
    assert_eq!(first["ROLE"], "agent");
    assert_eq!(first["EXIT_REASON"], "IDLE");
    assert_eq!(first["DECREMENT"], true);
    assert_eq!(first["PRIORITY"], "5");
    assert_eq!(first["SYSLOG_IDENTIFIER"], "agent-supervisor");
    let agent: Value = serde_json::from_str(&m[1]).expect("json");
    assert_eq!(agent["SYSLOG_IDENTIFIER"], "semaphore-agent");
    assert_eq!(agent["AGENT_NAME"], "i-0abc__1");
    assert_eq!(
        agent["MESSAGE"],
        format!("registering with token {REDACTED} at host")
    );
    assert!(m.iter().all(|line| !line.contains(token)), "{m:?}");
}

#[tokio::test(start_paused = true)]
async fn off_keeps_nothing() {
    let shared = Shared::new(DEFAULT_QUEUE_KIB * 1024);
    shared.push(fields("buffered"));
    assert_eq!(shared.queued(), 1);
    shared.turn_off();
    shared.push(fields("after"));
    assert_eq!(shared.queued(), 0);
    assert!(!shared.flush(FLUSH_BOUND).await, "nothing to flush");
}

#[test]
fn the_tail_reads_complete_lines_from_its_offset() {
    let dir = std::env::temp_dir().join(format!("logs-tail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("cloud-init-output.log");
    std::fs::write(&file, "one\ntwo\nthr").expect("write");
    let mut got = vec![];
    let next = ship::read_lines(&file, 0, |l| got.push(l)).expect("read");
    assert_eq!(got, ["one", "two"]);
    assert_eq!(next, 8);
    std::fs::write(&file, "one\ntwo\nthree\n").expect("write");
    got.clear();
    let next = ship::read_lines(&file, next, |l| got.push(l)).expect("read");
    assert_eq!((got.as_slice(), next), (&["three".to_string()][..], 14));
    // Replaced by a shorter file: from its start.
    std::fs::write(&file, "new\n").expect("write");
    got.clear();
    ship::read_lines(&file, next, |l| got.push(l)).expect("read");
    assert_eq!(got, ["new"]);
    assert!(ship::read_lines(&dir.join("absent"), 0, |_| {}).is_none());
    let _ = std::fs::remove_dir_all(&dir);
}
