//! What to do when the agent exits, and how this instance ends.
//!
//! | reason / exit                        | action                                              |
//! |--------------------------------------|-----------------------------------------------------|
//! | `IDLE`                               | terminate **with** decrement; at min size, restart the agent in place |
//! | `JOB_FINISHED`, `REQUESTED`, `UNKNOWN` | terminate **without** decrement (clean replacement) |
//! | `INTERRUPTED`                        | ours (drain): the drain goes on; else as `REQUESTED` |
//! | registration failure                 | restart with backoff; never replace: a bad or revoked token is fleet-wide |
//! | `UNABLE_TO_SYNC`                     | restart with backoff; never replace (the API or network is down for all) |
//! | crash after registering              | restart with backoff; after [`MAX_LOCAL_FAILURES`] in a row, replace |
//! | any exit once the agent was handed a job | never a restart: terminate without decrement (`IDLE` of a multi-job agent: with decrement, and without at min size) — one job per VM, see [`one_job_per_vm`] |
//!
//! Spot notices, rebalance recommendations, Auto Scaling's own terminations and the age
//! limit are in [`crate::interrupt`]: a replacement they left pending turns a restart into a
//! termination without decrement, and while Auto Scaling is terminating the instance any exit
//! completes its lifecycle action instead.

use crate::agent::{AgentExit, ShutdownReason};
use crate::aws::autoscaling::{AsgError, AutoScaling};
use crate::retry::RetryPolicy;
use std::time::Duration;

/// Crashes in a row (after registering) before the instance is replaced.
pub const MAX_LOCAL_FAILURES: u32 = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Terminate { decrement: bool, why: &'static str },
    Restart { after: Duration, why: String },
}

/// Counts failures in a row and spaces restarts out: base · 2ⁿ, capped, with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
    local_failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: 0,
            local_failures: 0,
        }
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A run that registered and ended with a proper reason resets the count.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.local_failures = 0;
    }

    fn next_delay(&mut self) -> Duration {
        self.failures += 1;
        let exp = self.failures.saturating_sub(1).min(16);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.cap);
        // Jitter so a fleet-wide fault does not make every instance retry in step.
        crate::retry::jitter(raw).min(self.cap)
    }
}

/// Decides what follows an agent's exit. `ours` is true when the supervisor itself
/// asked the agent to stop.
pub fn decide(
    exit: &AgentExit,
    reason: Option<ShutdownReason>,
    ours: bool,
    backoff: &mut Backoff,
    token_parameter: &str,
) -> Action {
    use ShutdownReason::*;
    match reason {
        Some(Idle) => {
            backoff.reset();
            Action::Terminate { decrement: true, why: "agent idle" }
        }
        Some(JobFinished) => {
            backoff.reset();
            Action::Terminate { decrement: false, why: "job finished (one job per instance)" }
        }
        Some(Requested) => {
            backoff.reset();
            Action::Terminate { decrement: false, why: "agent disconnected from Semaphore" }
        }
        Some(Interrupted) if !ours => {
            backoff.reset();
            Action::Terminate { decrement: false, why: "agent interrupted" }
        }
        Some(Unknown) if exit.status.success() => {
            backoff.reset();
            Action::Terminate { decrement: false, why: "agent shut down for an unknown reason" }
        }
        Some(UnableToSync) => Action::Restart {
            after: backoff.next_delay(),
            why: "agent could not reach Semaphore for 10 minutes (UNABLE_TO_SYNC); check the endpoint and the network".into(),
        },
        _ if !exit.registered => {
            let said = exit.last_error.as_deref().unwrap_or("no output");
            Action::Restart {
                after: backoff.next_delay(),
                why: format!(
                    "agent failed to register ({}; it said: {said}); check the registration token in SSM parameter {token_parameter} and the endpoint — not replacing this instance, the fault is likely fleet-wide",
                    describe_status(&exit.status)
                ),
            }
        }
        _ => {
            backoff.local_failures += 1;
            if backoff.local_failures >= MAX_LOCAL_FAILURES {
                Action::Terminate { decrement: false, why: "agent keeps crashing on this instance" }
            } else {
                Action::Restart {
                    after: backoff.next_delay(),
                    why: format!(
                        "agent exited unexpectedly ({}), crash {} of {MAX_LOCAL_FAILURES} before this instance is replaced",
                        describe_status(&exit.status),
                        backoff.local_failures
                    ),
                }
            }
        }
    }
}

/// Why a used instance is replaced rather than given a new agent.
pub const USED_WHY: &str =
    "one job per VM: this instance ran a job, and no agent starts on it again";

/// One job per VM: once the agent was handed a job, the instance is never given another
/// agent — whatever the exit (a crash, `UNABLE_TO_SYNC`, a reason forged on the hook's
/// socket, a registration failure of a re-run), a restart becomes a termination without
/// decrement. Job code may have changed anything on this VM; the next job gets a new one.
pub fn one_job_per_vm(action: Action, used: bool) -> Action {
    match action {
        Action::Restart { .. } if used => Action::Terminate {
            decrement: false,
            why: USED_WHY,
        },
        action => action,
    }
}

pub fn describe_status(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

/// How a termination request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// Auto Scaling took it (terminate or unhealthy): the instance will go.
    Requested,
    /// Decrement refused: the group is at its min size. Keep serving instead.
    AtMinSize,
    /// Auto Scaling could not be made to act; the instance was powered off.
    PoweredOff,
}

/// Retries of a throttled or failing terminate call.
pub const TERMINATE_ATTEMPTS: u32 = 5;

/// The termination chain: `TerminateInstanceInAutoScalingGroup` (retried with backoff
/// on throttling/5xx) → `SetInstanceHealth Unhealthy` → `poweroff` (the launch template
/// makes shutdown terminate the instance). Its log lines name no instance: the daemon's
/// root span carries `instance_id`.
pub async fn terminate_self<A: AutoScaling, F, Fut>(
    asg: &A,
    instance_id: &str,
    decrement: bool,
    first_backoff: Duration,
    poweroff: F,
) -> Termination
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // The last records (why this instance ends) reach CloudWatch Logs before Auto
    // Scaling can stop it; bounded, and a no-op when nothing ships.
    crate::logs::flush(crate::logs::FLUSH_BOUND).await;
    let policy = RetryPolicy {
        attempts: TERMINATE_ATTEMPTS,
        first_delay: first_backoff,
        max_delay: Duration::from_secs(20),
    };
    let (result, attempt) = policy
        .run(
            || asg.terminate_instance(instance_id, decrement),
            AsgError::is_transient,
            |attempt, e, delay| {
                tracing::warn!(attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "terminate call failed; retrying")
            },
        )
        .await;
    match result {
        Ok(()) => {
            tracing::info!(
                decrement,
                attempt,
                "termination requested from Auto Scaling"
            );
            return Termination::Requested;
        }
        Err(AsgError::Validation { detail, .. }) if decrement => {
            tracing::info!(detail = %detail, "Auto Scaling refused to shrink the group (at its min size); keeping this instance");
            return Termination::AtMinSize;
        }
        Err(e) => {
            tracing::error!(attempt, error = %e, "terminate call failed; marking the instance unhealthy instead");
        }
    }
    match asg.set_unhealthy(instance_id).await {
        Ok(()) => {
            tracing::warn!("instance marked Unhealthy; Auto Scaling will replace it");
            Termination::Requested
        }
        Err(e) => {
            tracing::error!(error = %e, "SetInstanceHealth failed too; powering off (shutdown behaviour is terminate)");
            poweroff().await;
            Termination::PoweredOff
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::autoscaling::GroupSizes;
    use crate::aws::Retry;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;
    use std::sync::Mutex;

    fn exit(code: i32, registered: bool) -> AgentExit {
        AgentExit {
            status: ExitStatus::from_raw(code << 8),
            registered,
            last_error: Some("failed to register agent: 404".into()),
        }
    }

    fn b() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(300))
    }

    #[test]
    fn table_of_reasons() {
        use ShutdownReason::*;
        let cases = [
            (Some(Idle), false, Some(true)),
            (Some(JobFinished), false, Some(false)),
            (Some(Requested), false, Some(false)),
            (Some(Interrupted), false, Some(false)),
            (Some(Unknown), false, Some(false)),
        ];
        for (reason, ours, decrement) in cases {
            match decide(&exit(0, true), reason, ours, &mut b(), "/t") {
                Action::Terminate { decrement: d, .. } => {
                    assert_eq!(Some(d), decrement, "{reason:?}")
                }
                other => panic!("{reason:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn registration_failure_backs_off_and_never_replaces() {
        let mut backoff = b();
        let mut last = Duration::ZERO;
        for i in 0..20 {
            match decide(&exit(1, false), None, false, &mut backoff, "/fleet/token") {
                Action::Restart { after, why } => {
                    assert!(why.contains("/fleet/token"), "{why}");
                    if i < 8 {
                        assert!(
                            after > last.mul_f64(1.2),
                            "backoff grows: {after:?} after {last:?}"
                        );
                    }
                    assert!(after <= Duration::from_secs(300));
                    last = after;
                }
                other => panic!("must not replace: {other:?}"),
            }
        }
    }

    #[test]
    fn local_crashes_replace_after_a_few() {
        let mut backoff = b();
        for _ in 1..MAX_LOCAL_FAILURES {
            assert!(matches!(
                decide(&exit(2, true), None, false, &mut backoff, "/t"),
                Action::Restart { .. }
            ));
        }
        assert_eq!(
            decide(&exit(2, true), None, false, &mut backoff, "/t"),
            Action::Terminate {
                decrement: false,
                why: "agent keeps crashing on this instance"
            }
        );
    }

    #[test]
    fn healthy_run_resets_backoff() {
        let mut backoff = b();
        decide(&exit(1, false), None, false, &mut backoff, "/t");
        decide(&exit(1, false), None, false, &mut backoff, "/t");
        assert_eq!(backoff.failures(), 2);
        decide(
            &exit(0, true),
            Some(ShutdownReason::Idle),
            false,
            &mut backoff,
            "/t",
        );
        assert_eq!(backoff.failures(), 0);
    }

    #[test]
    fn a_used_instance_never_restarts_its_agent() {
        use ShutdownReason::*;
        let reasons = [
            None,
            Some(Idle),
            Some(JobFinished),
            Some(Requested),
            Some(Interrupted),
            Some(UnableToSync),
            Some(Unknown),
        ];
        for reason in reasons {
            for (code, registered) in [(0, true), (1, false), (2, true), (137, true)] {
                let action = decide(&exit(code, registered), reason, false, &mut b(), "/t");
                let unused = one_job_per_vm(action.clone(), false);
                assert_eq!(unused, action, "unchanged on an unused VM");
                match one_job_per_vm(action, true) {
                    Action::Terminate { decrement, .. } => {
                        // Only an idle agent shrinks the fleet.
                        assert_eq!(decrement, reason == Some(Idle), "{reason:?} {code}")
                    }
                    other => panic!("{reason:?} {code} {registered}: {other:?}"),
                }
            }
        }
    }

    /// Scripted Auto Scaling: answers terminate calls from a list.
    struct Scripted {
        terminate: Mutex<Vec<Result<(), AsgError>>>,
        unhealthy: Mutex<Vec<Result<(), AsgError>>>,
        calls: Mutex<Vec<String>>,
    }

    fn throttled() -> AsgError {
        AsgError::Call {
            op: "TerminateInstanceInAutoScalingGroup",
            retry: Retry::Transient,
            detail: "Throttling".into(),
        }
    }
    fn denied() -> AsgError {
        AsgError::Call {
            op: "x",
            retry: Retry::Permanent,
            detail: "AccessDenied".into(),
        }
    }

    impl AutoScaling for Scripted {
        async fn terminate_instance(&self, id: &str, d: bool) -> Result<(), AsgError> {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("terminate {id} {d}"));
            self.terminate.lock().expect("lock").remove(0)
        }
        async fn set_unhealthy(&self, id: &str) -> Result<(), AsgError> {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("unhealthy {id}"));
            self.unhealthy.lock().expect("lock").remove(0)
        }
        async fn group_of(&self, _: &str) -> Result<Option<String>, AsgError> {
            Ok(None)
        }
        async fn group(&self, _: &str) -> Result<Option<GroupSizes>, AsgError> {
            Ok(None)
        }
        async fn set_desired_capacity(&self, _: &str, _: i32) -> Result<(), AsgError> {
            Ok(())
        }
        async fn suspend_processes(&self, _: &str, _: &[&str]) -> Result<(), AsgError> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_retried_then_succeeds() {
        let asg = Scripted {
            terminate: Mutex::new(vec![Err(throttled()), Err(throttled()), Ok(())]),
            unhealthy: Mutex::new(vec![]),
            calls: Mutex::new(vec![]),
        };
        let r = terminate_self(&asg, "i-1", true, Duration::from_millis(200), || async {}).await;
        assert_eq!(r, Termination::Requested);
        assert_eq!(asg.calls.lock().expect("lock").len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn validation_on_decrement_means_at_min_size() {
        let asg = Scripted {
            terminate: Mutex::new(vec![Err(AsgError::Validation {
                op: "t",
                detail: "min".into(),
            })]),
            unhealthy: Mutex::new(vec![]),
            calls: Mutex::new(vec![]),
        };
        let r = terminate_self(&asg, "i-1", true, Duration::from_millis(200), || async {}).await;
        assert_eq!(r, Termination::AtMinSize);
    }

    #[tokio::test(start_paused = true)]
    async fn chain_falls_through_to_unhealthy_then_poweroff() {
        let asg = Scripted {
            terminate: Mutex::new((0..TERMINATE_ATTEMPTS).map(|_| Err(throttled())).collect()),
            unhealthy: Mutex::new(vec![Ok(())]),
            calls: Mutex::new(vec![]),
        };
        let r = terminate_self(&asg, "i-1", false, Duration::from_millis(200), || async {}).await;
        assert_eq!(r, Termination::Requested);
        assert_eq!(
            asg.calls.lock().expect("lock").last().map(String::as_str),
            Some("unhealthy i-1")
        );

        let asg = Scripted {
            terminate: Mutex::new(vec![Err(denied())]),
            unhealthy: Mutex::new(vec![Err(denied())]),
            calls: Mutex::new(vec![]),
        };
        let powered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = powered.clone();
        let r = terminate_self(
            &asg,
            "i-1",
            false,
            Duration::from_millis(200),
            || async move { p.store(true, std::sync::atomic::Ordering::SeqCst) },
        )
        .await;
        assert_eq!(r, Termination::PoweredOff);
        assert!(powered.load(std::sync::atomic::Ordering::SeqCst));
    }
}
