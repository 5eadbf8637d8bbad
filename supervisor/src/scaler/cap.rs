//! The hard lifetime cap, enforced from outside the agents' VMs. On a default fleet a job
//! is root on its VM: it can kill the supervisor, and with it every way the instance had of
//! ending itself. The leader therefore ends any agent instance **in service** longer than
//! `scaler.agent_lifetime_cap_secs` (default 26 h, above the longest job Semaphore allows)
//! with `TerminateInstanceInAutoScalingGroup` **without decrement**: the group replaces it
//! with a clean VM, and the termination lifecycle hook still lets a healthy supervisor
//! drain its agent first (a job that outlived the cap is cut at the hook's timeout).
//!
//! Every [`check_every`] while this process validly leads: `DescribeAutoScalingGroups`
//! (the in-service instances), `DescribeInstances` for the launch times it has not seen
//! yet (they never change, so each instance is described once), then one terminate per
//! instance past the cap, after a leadership check. An instance asked to end is asked
//! again only after [`ASK_AGAIN`] (it normally leaves `InService` at once).
//!
//! Instances in `Terminating:Wait`, `Pending` or `Standby` are not in service and are
//! left alone; the scaler-only instance lives in its own group, which is never looked at.

use super::{check, lead_or_stop, Repeats};
use crate::aws::autoscaling::AutoScaling;
use crate::aws::ec2::Ec2;
use crate::config::Settings;
use crate::election::Leadership;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest pause between two checks.
pub const MAX_CHECK_EVERY: Duration = Duration::from_secs(60);
/// An instance asked to end that is still in service is asked again after this long.
pub const ASK_AGAIN: Duration = Duration::from_secs(600);

/// Ten scaler polls, at most a minute: a day-long cap does not need a finer clock, and a
/// minute costs two describe calls a minute at most.
pub fn check_every(poll_interval: Duration) -> Duration {
    poll_interval.saturating_mul(10).min(MAX_CHECK_EVERY)
}

/// The leader's lifetime-cap task. See the module docs.
pub struct LifetimeCap<A, E> {
    settings: watch::Receiver<Settings>,
    asg: A,
    ec2: E,
    /// Launch times learned, by instance id (pruned to the group's current members).
    launched: HashMap<String, SystemTime>,
    /// Instances asked to end, and when.
    asked: HashMap<String, Instant>,
    quiet: Repeats,
}

impl<A: AutoScaling, E: Ec2> LifetimeCap<A, E> {
    pub fn new(settings: watch::Receiver<Settings>, asg: A, ec2: E) -> Self {
        Self {
            settings,
            asg,
            ec2,
            launched: HashMap::new(),
            asked: HashMap::new(),
            quiet: Repeats::default(),
        }
    }

    /// Checks every [`check_every`] while this process validly leads; returns on
    /// `shutdown` or when the election's channel closes.
    pub async fn run(
        mut self,
        mut leadership: watch::Receiver<Leadership>,
        shutdown: CancellationToken,
    ) {
        loop {
            let Some(term) = lead_or_stop(&mut leadership, &shutdown).await else {
                return;
            };
            self.check(&leadership, term, SystemTime::now()).await;
            let every = check_every(self.settings.borrow().scaler.poll_interval);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One check at wall-clock `now`; returns the instances it asked to end.
    pub async fn check(
        &mut self,
        leadership: &watch::Receiver<Leadership>,
        term: u64,
        now: SystemTime,
    ) -> Vec<String> {
        let settings = self.settings.borrow().clone();
        let Some(cap) = settings.scaler.agent_lifetime_cap else {
            return vec![];
        };
        let group = settings.agent_group.as_str();
        let members = match self.asg.group(group).await {
            Ok(Some(sizes)) => sizes.in_service,
            Ok(None) => return vec![],
            Err(e) => {
                let key = e.to_string();
                self.quiet.error(
                    "DescribeAutoScalingGroups",
                    &key,
                    format_args!("lifetime cap: cannot read Auto Scaling group {group}: {e}"),
                );
                return vec![];
            }
        };
        self.launched.retain(|id, _| members.contains(id));
        self.asked.retain(|id, _| members.contains(id));
        let unknown: Vec<String> = members
            .iter()
            .filter(|id| !self.launched.contains_key(*id))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            match self.ec2.describe_instances(&unknown).await {
                Ok(found) => {
                    self.quiet.recovered("DescribeInstances");
                    for i in found {
                        self.launched.insert(i.id, i.launch_time);
                    }
                }
                Err(e) => {
                    // One just-launched instance EC2 does not show yet fails the whole
                    // call (InvalidInstanceID.NotFound): the next check tries again.
                    let key = e.to_string();
                    self.quiet.error("DescribeInstances", &key, format_args!(
                        "lifetime cap: cannot read the launch times of {} instance(s) of {group}: {e}",
                        unknown.len()
                    ));
                }
            }
        }
        let mut ended = vec![];
        for id in &members {
            let Some(age) = self
                .launched
                .get(id)
                .and_then(|t| now.duration_since(*t).ok())
            else {
                continue;
            };
            if age <= cap
                || self
                    .asked
                    .get(id)
                    .is_some_and(|at| at.elapsed() < ASK_AGAIN)
            {
                continue;
            }
            let Some(c) = check(leadership, term) else {
                return ended;
            };
            tracing::info!(
                action = "end_over_lifetime_cap",
                term,
                group,
                instance_id = %id,
                check_mono_ns = c.check_mono_ns,
                valid_until_mono_ns = c.valid_until_mono_ns,
                "leader action"
            );
            match self.asg.terminate_instance(id, false).await {
                Ok(()) => {
                    tracing::warn!(
                        instance_id = %id,
                        age_secs = age.as_secs(),
                        cap_secs = cap.as_secs(),
                        "agent instance in service past the lifetime cap: ended without decrement (a clean one replaces it); its supervisor was not ending it"
                    );
                    self.asked.insert(id.clone(), Instant::now());
                    ended.push(id.clone());
                }
                Err(e) => {
                    let key = e.to_string();
                    self.quiet.error(
                        "TerminateInstanceInAutoScalingGroup",
                        &key,
                        format_args!(
                            "lifetime cap: cannot end {id} (in service {} s, cap {} s): {e}",
                            age.as_secs(),
                            cap.as_secs()
                        ),
                    );
                }
            }
        }
        ended
    }
}
