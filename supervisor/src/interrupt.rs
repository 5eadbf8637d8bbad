//! Interruptions: what, besides its own agent, tells an instance to go — and the policy
//! the daemon follows for each (the flows themselves are in [`crate::daemon`]).
//!
//! | signal | where it shows | the supervisor |
//! |---|---|---|
//! | spot interruption notice | IMDS `meta-data/spot/instance-action` (spot instances; 404 = none) | drains at once (SIGTERM to the agent's group; the job gets the interruption grace, cut to fit before the notice's time), publishes `SpotInterruptions`, then ends the instance without decrement |
//! | rebalance recommendation | IMDS `meta-data/events/recommendations/rebalance` (spot instances) | idle (or multi-job, see below) agent: drains and ends the instance without decrement (Auto Scaling launches a replacement); busy one-job agent: after its job. Nothing when the group has Capacity Rebalancing on: Auto Scaling then replaces the instance itself, through the lifecycle hook |
//! | Auto Scaling terminates the instance | IMDS `meta-data/autoscaling/target-lifecycle-state` = `Terminated` | idle (or multi-job) agent: drains; busy one-job agent: lets the job finish, heartbeating the hook; then `CompleteLifecycleAction(CONTINUE)` |
//! | `max_uptime_secs` passed | the instance's launch time (IMDS identity document) | as a rebalance recommendation |
//!
//! "Busy" is "the running agent was handed a job" ([`crate::agent::Progress::jobs`]), and
//! only a one-job agent (`disconnect_after_job`) is ever let finish its job: it exits
//! after it. An agent that takes several jobs (`disconnect_after_job` off) is always
//! treated as idle here — drained at once — because its output as the supervisor reads it
//! does not say when a job ends, and left alone it would keep taking jobs (through a whole
//! lifecycle wait, and max uptime or a rebalance would never take effect under load). The
//! drain's SIGTERM stops it taking jobs; a job it is running gets the interruption grace.
//!
//! AWS: "We recommend that you check for these interruption notices every 5 seconds"
//! (EC2 User Guide, Spot Instance interruption notices); the notice comes two minutes
//! before the interruption. Auto Scaling "updates the value of the instance metadata item
//! `autoscaling/target-lifecycle-state`" when an instance prepares to move to a steady
//! state such as `Terminated` (Auto Scaling User Guide, Retrieve the target lifecycle
//! state through instance metadata). A heartbeat restarts "the timeout period"; the
//! wait lasts at most the hook's global timeout, 48 hours or 100 × the heartbeat timeout,
//! whichever is smaller; then the hook's `DefaultResult` applies.

use crate::aws::autoscaling::{AsgError, LifecycleActions};
use crate::aws::cloudwatch::{Datum, Unit};
use crate::aws::imds::{ImdsError, Metadata};
use crate::config::LifecycleHook;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// How often IMDS is asked (every 2 s: well inside AWS's recommended 5 s, and a local call).
pub const POLL_EVERY: Duration = Duration::from_secs(2);

pub const LIFE_CYCLE_PATH: &str = "/latest/meta-data/instance-life-cycle";
pub const SPOT_ACTION_PATH: &str = "/latest/meta-data/spot/instance-action";
pub const REBALANCE_PATH: &str = "/latest/meta-data/events/recommendations/rebalance";
pub const TARGET_STATE_PATH: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";

/// The CloudWatch metric published once per spot interruption notice (namespace
/// `Semaphore`, dimension `StackName`).
pub const SPOT_METRIC: &str = "SpotInterruptions";

/// What IMDS said. Each is sent once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Spot(SpotAction),
    /// `noticeTime` as IMDS gave it.
    Rebalance {
        notice_time: String,
    },
    /// `target-lifecycle-state` is `Terminated`: Auto Scaling is terminating the instance.
    Terminating,
}

/// `spot/instance-action`: `{"action": "terminate", "time": "2017-09-18T08:22:00Z"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpotAction {
    /// `terminate`, `stop` or `hibernate`; `unknown` if the body did not say.
    pub action: String,
    /// The `time` field as given (empty if missing).
    pub time_text: String,
    /// `time`, parsed.
    pub time: Option<SystemTime>,
}

impl SpotAction {
    /// Never fails: a notice whose body cannot be read is still a notice.
    pub fn parse(body: &str) -> Self {
        let doc: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let field = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let time_text = field("time").unwrap_or_default();
        Self {
            action: field("action").unwrap_or_else(|| "unknown".into()),
            time: parse_time(&time_text),
            time_text,
        }
    }
}

/// `{"noticeTime": "2020-11-05T08:22:00Z"}` → the time text (the body itself if malformed).
pub fn rebalance_time(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|d| d.get("noticeTime")?.as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().chars().take(80).collect())
}

fn parse_time(text: &str) -> Option<SystemTime> {
    use aws_smithy_types::date_time::{DateTime, Format};
    let t = DateTime::from_str(text, Format::DateTimeWithOffset).ok()?;
    SystemTime::try_from(t).ok()
}

/// Polls IMDS every `every` and sends each [`Notice`] once. Spot paths only on spot
/// instances (`instance-life-cycle`, read until it answers). Ends when the receiver is
/// gone or everything was sent.
pub async fn watch<M: Metadata>(imds: M, every: Duration, tx: mpsc::UnboundedSender<Notice>) {
    let mut spot: Option<bool> = None;
    let (mut sent_spot, mut sent_rebalance, mut sent_terminating) = (false, false, false);
    let mut failures = 0u32;
    loop {
        let mut failed = false;
        if spot.is_none() {
            match imds.get(LIFE_CYCLE_PATH).await {
                Ok(v) => {
                    let is_spot = v.trim() == "spot";
                    if is_spot {
                        tracing::info!(
                            poll_ms = every.as_millis() as u64,
                            "spot instance: watching for interruption notices and rebalance recommendations"
                        );
                    }
                    spot = Some(is_spot);
                }
                Err(ImdsError::NotFound { .. }) => spot = Some(false),
                Err(e) => {
                    tracing::debug!(error = %e, "IMDS poll failed");
                    failed = true;
                }
            }
        }
        let mut ask = |r: Result<String, ImdsError>| -> Option<String> {
            match r {
                Ok(v) => Some(v),
                Err(ImdsError::NotFound { .. }) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "IMDS poll failed");
                    failed = true;
                    None
                }
            }
        };
        if spot == Some(true) {
            if !sent_spot {
                if let Some(body) = ask(imds.get(SPOT_ACTION_PATH).await) {
                    sent_spot = true;
                    if tx.send(Notice::Spot(SpotAction::parse(&body))).is_err() {
                        return;
                    }
                }
            }
            if !sent_rebalance {
                if let Some(body) = ask(imds.get(REBALANCE_PATH).await) {
                    sent_rebalance = true;
                    let notice_time = rebalance_time(&body);
                    if tx.send(Notice::Rebalance { notice_time }).is_err() {
                        return;
                    }
                }
            }
        }
        if !sent_terminating {
            if let Some(state) = ask(imds.get(TARGET_STATE_PATH).await) {
                if state.trim() == "Terminated" {
                    sent_terminating = true;
                    if tx.send(Notice::Terminating).is_err() {
                        return;
                    }
                }
            }
        }
        if failed {
            failures += 1;
            if failures == 5 {
                tracing::warn!(
                    "IMDS has not answered the interruption polls 5 times in a row; still trying"
                );
            }
        } else {
            if failures >= 5 {
                tracing::info!("IMDS answers the interruption polls again");
            }
            failures = 0;
        }
        let done = sent_terminating && (spot == Some(false) || (sent_spot && sent_rebalance));
        if done || tx.is_closed() {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

/// Why the supervisor itself stops the agent and ends the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interruption {
    Spot(SpotAction),
    /// Auto Scaling is terminating the instance (target lifecycle state `Terminated`).
    Lifecycle,
    Rebalance,
    MaxUptime,
}

impl Interruption {
    /// The `INTERRUPTION` journal field.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Spot(_) => "spot",
            Self::Lifecycle => "lifecycle",
            Self::Rebalance => "rebalance",
            Self::MaxUptime => "max_uptime",
        }
    }

    /// The `WHY` of the final log line.
    pub fn why(&self) -> &'static str {
        match self {
            Self::Spot(_) => "spot interruption notice",
            Self::Lifecycle => "Auto Scaling is terminating this instance",
            Self::Rebalance => "spot rebalance recommendation: replacing this instance",
            Self::MaxUptime => "older than max_uptime_secs: replacing this instance",
        }
    }
}

/// How long a spot drain may last before SIGKILL: the usual `grace_and_margin`, but done
/// [`SPOT_SLACK`] before the notice's time so the agent still reports the stopped job.
pub fn spot_kill_after(
    grace_and_margin: Duration,
    notice_time: Option<SystemTime>,
    now: SystemTime,
) -> Duration {
    match notice_time {
        Some(t) => {
            let left = t.duration_since(now).unwrap_or_default();
            grace_and_margin.min(left.saturating_sub(SPOT_SLACK))
        }
        None => grace_and_margin.min(Duration::from_secs(120).saturating_sub(SPOT_SLACK)),
    }
}

/// Kept free before a spot interruption's time.
pub const SPOT_SLACK: Duration = Duration::from_secs(10);

/// The shortest warning EC2 gives before it reclaims a spot instance.
pub const SPOT_NOTICE: Duration = Duration::from_secs(120);

/// What the agent needs after a drain's SIGTERM beyond the interruption grace, before its
/// group may be killed, from what the real agent was seen and coded to do: Semaphore
/// decides `stop-job` once the grace has passed, but the agent hears it only at its next
/// sync — up to one sync interval later (the server answers `next_sync_after` of 4–6 s);
/// it then stops the job, flushes the job's log and reports the job finished (1.0–3.0 s
/// seen, about 4.5 s by its code); that report is answered with the shutdown, after which
/// it disconnects and runs its shutdown hook.
pub const AGENT_SYNC_INTERVAL_MAX: Duration = Duration::from_secs(6);
/// See [`AGENT_SYNC_INTERVAL_MAX`]: stop-job → job stopped, log flushed, finish reported.
pub const AGENT_STOP_REPORT_MAX: Duration = Duration::from_secs(5);
/// See [`AGENT_SYNC_INTERVAL_MAX`]: the shutdown answer, the disconnect and the hook.
pub const AGENT_SHUTDOWN_MAX: Duration = Duration::from_secs(3);

/// The default drain margin: the grace plus this is when a drained agent's group is
/// killed (14 s).
pub const DRAIN_MARGIN: Duration = Duration::from_secs(
    AGENT_SYNC_INTERVAL_MAX.as_secs()
        + AGENT_STOP_REPORT_MAX.as_secs()
        + AGENT_SHUTDOWN_MAX.as_secs(),
);

/// The interruption grace the agent registers with. On a spot instance it is cut so that a
/// drain started by the shortest notice — grace, then `drain_margin` — still ends
/// [`SPOT_SLACK`] before the reclaim: the job is then stopped by Semaphore and its result
/// reported, instead of the agent being killed mid-report. Semaphore's server holds the
/// grace from registration on, so it must be cut here, not when the notice comes.
pub fn registered_grace(grace: Duration, spot: bool, drain_margin: Duration) -> Duration {
    if spot {
        grace.min(
            SPOT_NOTICE
                .saturating_sub(SPOT_SLACK)
                .saturating_sub(drain_margin),
        )
    } else {
        grace
    }
}

/// Heartbeats go out at a third of the hook's heartbeat timeout, so one lost call is
/// survived.
pub fn heartbeat_every(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout / 3).max(Duration::from_millis(500))
}

/// The longest Auto Scaling keeps an instance in `Terminating:Wait`, heartbeats or not:
/// 48 hours or 100 × the heartbeat timeout, whichever is smaller.
pub fn global_timeout(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout * 100).min(Duration::from_secs(48 * 3600))
}

/// When a busy agent is drained anyway during a lifecycle wait: early enough that the
/// drain (`grace_and_margin`) ends a minute before the hook's global timeout would.
pub fn force_drain_after(heartbeat_timeout: Duration, grace_and_margin: Duration) -> Duration {
    global_timeout(heartbeat_timeout)
        .saturating_sub(grace_and_margin)
        .saturating_sub(Duration::from_secs(60))
}

/// Time left before an instance launched at `launched` reaches `max_uptime`.
pub fn uptime_left(launched: SystemTime, max_uptime: Duration, now: SystemTime) -> Duration {
    let age = now.duration_since(launched).unwrap_or_default();
    max_uptime.saturating_sub(age)
}

/// The datum published per spot interruption notice.
pub fn spot_datum(stack: &str) -> Datum {
    Datum {
        metric: SPOT_METRIC,
        dimensions: vec![("StackName", stack.to_string())],
        value: 1.0,
        unit: Unit::Count,
    }
}

/// This instance's termination held by its group's lifecycle hook (Auto Scaling's
/// `Terminating:Wait`): what heartbeats and completes it. Not the agent's shutdown hook
/// ([`crate::shutdown_hook`]).
#[derive(Debug, Clone)]
pub struct LifecycleWait {
    pub group: String,
    pub hook: LifecycleHook,
    pub instance_id: String,
}

/// Tries of a `CompleteLifecycleAction` that Auto Scaling answers ValidationError: IMDS
/// may say `Terminated` a moment before the lifecycle action exists.
pub const COMPLETE_ATTEMPTS: u32 = 6;

impl LifecycleWait {
    /// `CompleteLifecycleAction(CONTINUE)`, retried on throttling, 5xx and (briefly) on
    /// "no active lifecycle action". Returns the attempts it took.
    pub async fn complete<A: LifecycleActions>(
        &self,
        asg: &A,
        first_backoff: Duration,
    ) -> Result<u32, AsgError> {
        let policy = crate::retry::RetryPolicy {
            attempts: COMPLETE_ATTEMPTS,
            first_delay: first_backoff,
            max_delay: Duration::from_secs(5),
        };
        let (result, attempts) = policy
            .run(
                || {
                    asg.complete_lifecycle_action(
                        &self.group,
                        &self.hook.name,
                        &self.instance_id,
                        "CONTINUE",
                    )
                },
                |e: &AsgError| e.is_transient() || matches!(e, AsgError::Validation { .. }),
                |attempt, e, _| {
                    tracing::debug!(attempt, error = %e, "CompleteLifecycleAction failed; retrying")
                },
            )
            .await;
        result.map(|()| attempts)
    }

    /// One `RecordLifecycleActionHeartbeat`; false (logged) if it failed.
    pub async fn heartbeat<A: LifecycleActions>(&self, asg: &A) -> bool {
        match asg
            .record_lifecycle_action_heartbeat(&self.group, &self.hook.name, &self.instance_id)
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(lifecycle_hook = %self.hook.name, error = %e, "lifecycle heartbeat failed");
                false
            }
        }
    }
}

/// What a notice means for this instance: the interruption table of the README, decided
/// without I/O. The daemon gathers the facts (is the agent busy, does the group have a
/// lifecycle hook and Capacity Rebalancing, is a replacement already pending), logs, and
/// carries the verdict out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Drain the agent now, then end the instance without decrement.
    Drain(Interruption),
    /// Replace the instance once its job is done (an idle agent is drained at once).
    AfterJob(Interruption),
    /// Auto Scaling is terminating a busy instance and the lifecycle hook holds it: let
    /// the job finish, heartbeating, then complete the lifecycle action.
    HoldForJob,
    /// Nothing to do: Capacity Rebalancing replaces the instance, and its termination
    /// comes through the lifecycle hook; or a replacement is already pending.
    Nothing,
}

/// The facts a notice is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Facts {
    /// A job was handed to the running agent.
    pub busy: bool,
    /// The runtime config names the group's termination lifecycle hook.
    pub lifecycle_hook: bool,
    /// The group has Capacity Rebalancing on.
    pub capacity_rebalancing: bool,
    /// A replacement after the job is already decided (rebalance, max uptime).
    pub replacement_pending: bool,
}

/// Judges one notice (pure; see [`Verdict`]).
pub fn judge(notice: &Notice, facts: Facts) -> Verdict {
    match notice {
        Notice::Spot(a) => Verdict::Drain(Interruption::Spot(a.clone())),
        Notice::Rebalance { .. } if facts.capacity_rebalancing => Verdict::Nothing,
        Notice::Rebalance { .. } if facts.replacement_pending => Verdict::Nothing,
        Notice::Rebalance { .. } if facts.busy => Verdict::AfterJob(Interruption::Rebalance),
        Notice::Rebalance { .. } => Verdict::Drain(Interruption::Rebalance),
        Notice::Terminating if facts.busy && facts.lifecycle_hook => Verdict::HoldForJob,
        Notice::Terminating => Verdict::Drain(Interruption::Lifecycle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::UNIX_EPOCH;

    #[test]
    fn spot_actions_parse() {
        let a = SpotAction::parse(r#"{"action": "terminate", "time": "2017-09-18T08:22:00Z"}"#);
        assert_eq!(a.action, "terminate");
        assert_eq!(a.time_text, "2017-09-18T08:22:00Z");
        assert_eq!(
            a.time,
            Some(UNIX_EPOCH + Duration::from_secs(1_505_722_920))
        );
        let a = SpotAction::parse("<html>oops");
        assert_eq!((a.action.as_str(), a.time), ("unknown", None));
        assert_eq!(
            rebalance_time(r#"{"noticeTime": "2020-11-05T08:22:00Z"}"#),
            "2020-11-05T08:22:00Z"
        );
        assert_eq!(rebalance_time("garbage"), "garbage");
    }

    #[test]
    fn spot_drain_fits_before_the_notice_time() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = Duration::from_secs;
        // Two minutes ahead: the usual 70 s fits.
        assert_eq!(spot_kill_after(s(70), Some(now + s(120)), now), s(70));
        // A long grace is cut to end 10 s before the interruption.
        assert_eq!(spot_kill_after(s(310), Some(now + s(120)), now), s(110));
        // Past or unreadable times.
        assert_eq!(spot_kill_after(s(70), Some(now - s(5)), now), s(0));
        assert_eq!(spot_kill_after(s(310), None, now), s(110));
    }

    #[test]
    fn hook_timings() {
        let s = Duration::from_secs;
        assert_eq!(heartbeat_every(s(600)), s(200));
        assert_eq!(heartbeat_every(s(1)), Duration::from_millis(500));
        assert_eq!(global_timeout(s(600)), s(60_000));
        assert_eq!(global_timeout(s(7200)), s(172_800));
        assert_eq!(force_drain_after(s(600), s(70)), s(60_000 - 130));
        assert_eq!(force_drain_after(s(1), s(70)), s(0));
        let t0 = UNIX_EPOCH + s(5_000);
        assert_eq!(uptime_left(t0, s(3600), t0 + s(600)), s(3000));
        assert_eq!(uptime_left(t0, s(3600), t0 + s(7200)), s(0));
        assert_eq!(uptime_left(t0 + s(10), s(60), t0), s(60));
    }

    /// IMDS from a table the test changes.
    #[derive(Clone, Default)]
    struct Table(std::sync::Arc<Mutex<HashMap<&'static str, String>>>);

    impl Table {
        fn set(&self, path: &'static str, v: &str) {
            self.0.lock().expect("lock").insert(path, v.to_string());
        }
    }

    impl Metadata for Table {
        async fn get(&self, path: &str) -> Result<String, ImdsError> {
            self.0
                .lock()
                .expect("lock")
                .get(path)
                .cloned()
                .ok_or_else(|| ImdsError::NotFound {
                    path: path.to_string(),
                })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn notices_are_sent_once_each() {
        let imds = Table::default();
        imds.set(LIFE_CYCLE_PATH, "spot");
        imds.set(TARGET_STATE_PATH, "InService");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(watch(imds.clone(), POLL_EVERY, tx));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(rx.try_recv().is_err());
        imds.set(REBALANCE_PATH, r#"{"noticeTime": "2020-11-05T08:22:00Z"}"#);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            rx.try_recv().ok(),
            Some(Notice::Rebalance {
                notice_time: "2020-11-05T08:22:00Z".into()
            })
        );
        imds.set(
            SPOT_ACTION_PATH,
            r#"{"action": "terminate", "time": "2017-09-18T08:22:00Z"}"#,
        );
        imds.set(TARGET_STATE_PATH, "Terminated");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(matches!(rx.try_recv(), Ok(Notice::Spot(a)) if a.action == "terminate"));
        assert_eq!(rx.try_recv().ok(), Some(Notice::Terminating));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(rx.try_recv().is_err(), "each notice once");
        assert!(task.is_finished(), "nothing left to watch");
    }

    #[tokio::test(start_paused = true)]
    async fn on_demand_instances_watch_only_the_lifecycle_state() {
        let imds = Table::default();
        imds.set(LIFE_CYCLE_PATH, "on-demand");
        imds.set(SPOT_ACTION_PATH, r#"{"action": "terminate"}"#);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _task = tokio::spawn(watch(imds.clone(), POLL_EVERY, tx));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(rx.try_recv().is_err(), "no spot paths on on-demand");
        imds.set(TARGET_STATE_PATH, "Terminated");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(rx.try_recv().ok(), Some(Notice::Terminating));
    }

    /// Scripted lifecycle calls.
    #[derive(Default)]
    struct Calls {
        complete: Mutex<Vec<Result<(), AsgError>>>,
        log: Mutex<Vec<String>>,
    }

    impl LifecycleActions for Calls {
        async fn capacity_rebalance(&self, _group: &str) -> Result<Option<bool>, AsgError> {
            Ok(Some(false))
        }
        async fn complete_lifecycle_action(
            &self,
            group: &str,
            hook: &str,
            id: &str,
            result: &str,
        ) -> Result<(), AsgError> {
            self.log
                .lock()
                .expect("lock")
                .push(format!("complete {group} {hook} {id} {result}"));
            self.complete.lock().expect("lock").remove(0)
        }
        async fn record_lifecycle_action_heartbeat(
            &self,
            group: &str,
            hook: &str,
            id: &str,
        ) -> Result<(), AsgError> {
            self.log
                .lock()
                .expect("lock")
                .push(format!("heartbeat {group} {hook} {id}"));
            Ok(())
        }
    }

    fn hook() -> LifecycleWait {
        LifecycleWait {
            group: "g".into(),
            hook: LifecycleHook {
                name: "drain".into(),
                heartbeat_timeout: Duration::from_secs(60),
            },
            instance_id: "i-1".into(),
        }
    }

    fn no_action() -> AsgError {
        AsgError::Validation {
            op: "CompleteLifecycleAction",
            detail: "No active Lifecycle Action found".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn completion_waits_briefly_for_the_action_to_exist() {
        let calls = Calls::default();
        *calls.complete.lock().expect("lock") = vec![Err(no_action()), Err(no_action()), Ok(())];
        let attempts = hook()
            .complete(&calls, Duration::from_millis(500))
            .await
            .expect("completes");
        assert_eq!(attempts, 3);
        assert_eq!(
            calls.log.lock().expect("lock")[0],
            "complete g drain i-1 CONTINUE"
        );
        // Never there: gives up after COMPLETE_ATTEMPTS.
        let calls = Calls::default();
        *calls.complete.lock().expect("lock") =
            (0..COMPLETE_ATTEMPTS).map(|_| Err(no_action())).collect();
        assert!(hook()
            .complete(&calls, Duration::from_millis(500))
            .await
            .is_err());
        assert!(hook().heartbeat(&calls).await);
        assert_eq!(
            calls.log.lock().expect("lock").last().map(String::as_str),
            Some("heartbeat g drain i-1")
        );
    }

    #[test]
    fn a_spot_drain_fits_before_the_reclaim_with_the_grace_the_agent_registered() {
        assert_eq!(DRAIN_MARGIN, Duration::from_secs(14));
        let grace = Duration::from_secs(300);
        let on_spot = registered_grace(grace, true, DRAIN_MARGIN);
        assert_eq!(on_spot, Duration::from_secs(96));
        assert_eq!(registered_grace(grace, false, DRAIN_MARGIN), grace);
        assert_eq!(
            registered_grace(Duration::from_secs(30), true, DRAIN_MARGIN),
            Duration::from_secs(30)
        );
        // The drain a two-minute notice starts is never cut short of grace + margin.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let kill_after = spot_kill_after(on_spot + DRAIN_MARGIN, Some(now + SPOT_NOTICE), now);
        assert_eq!(kill_after, on_spot + DRAIN_MARGIN);
        assert!(kill_after + SPOT_SLACK <= SPOT_NOTICE);
    }

    #[test]
    fn every_row_of_the_interruption_table() {
        let spot = SpotAction::parse(r#"{"action":"terminate","time":"2030-01-01T00:00:00Z"}"#);
        let rebalance = Notice::Rebalance {
            notice_time: "2030-01-01T00:00:00Z".into(),
        };
        let f = |busy, lifecycle_hook, capacity_rebalancing, replacement_pending| Facts {
            busy,
            lifecycle_hook,
            capacity_rebalancing,
            replacement_pending,
        };
        // Spot: drained at once, busy or not, hook or not.
        for facts in [f(false, false, false, false), f(true, true, true, true)] {
            assert_eq!(
                judge(&Notice::Spot(spot.clone()), facts),
                Verdict::Drain(Interruption::Spot(spot.clone()))
            );
        }
        // Rebalance: idle → now; busy → after its job; Capacity Rebalancing → left to
        // Auto Scaling; already pending → nothing new.
        assert_eq!(
            judge(&rebalance, f(false, false, false, false)),
            Verdict::Drain(Interruption::Rebalance)
        );
        assert_eq!(
            judge(&rebalance, f(true, false, false, false)),
            Verdict::AfterJob(Interruption::Rebalance)
        );
        assert_eq!(
            judge(&rebalance, f(true, true, true, false)),
            Verdict::Nothing
        );
        assert_eq!(
            judge(&rebalance, f(false, false, true, false)),
            Verdict::Nothing
        );
        assert_eq!(
            judge(&rebalance, f(false, false, false, true)),
            Verdict::Nothing
        );
        // Auto Scaling terminating: busy with the hook → held for the job; idle, or no hook
        // to hold it → drained.
        assert_eq!(
            judge(&Notice::Terminating, f(true, true, false, false)),
            Verdict::HoldForJob
        );
        assert_eq!(
            judge(&Notice::Terminating, f(false, true, false, false)),
            Verdict::Drain(Interruption::Lifecycle)
        );
        assert_eq!(
            judge(&Notice::Terminating, f(true, false, false, false)),
            Verdict::Drain(Interruption::Lifecycle)
        );
    }
}
