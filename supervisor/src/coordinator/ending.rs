//! How the instance ends: the one ending path, interruption notices, the lifecycle
//! hook's heartbeats and completion, the one-job marker.

use super::*;

impl<A, M, L> Coordinator<A, M, L>
where
    A: AutoScaling + LifecycleActions,
    M: Metadata,
    L: Leader,
{
    /// The one ending path, once the agent is gone: `TerminateInstanceInAutoScalingGroup`
    /// (unless Auto Scaling already terminates the instance), leadership handed on, the
    /// lifecycle action completed, then the wait for the end. A decrement refused at the
    /// group's min size keeps the instance serving.
    pub(super) async fn end(&mut self, mut decrement: bool, why: &str) -> Flow {
        while self.end.terminating.is_none() {
            let opts = &self.opts;
            let terminate = terminate_self(
                &self.ports.asg,
                &self.instance_id,
                decrement,
                opts.aws_retry_backoff,
                || poweroff(&opts.poweroff_command),
            );
            let outcome = tokio::select! {
                biased;
                _ = self.shutdown.drain.cancelled() => {
                    self.notify.stopping("stopping: the instance was being terminated");
                    return Ok(None);
                }
                t = self.notify.during("terminating the instance", AWS_STEP_BOUND, terminate) => t,
            };
            if outcome != Termination::AtMinSize {
                break;
            }
            if self.used {
                // No agent starts here again: a replacement keeps the group at its size.
                tracing::info!(
                    why = USED_WHY,
                    "the group is at its min size, but this instance ran a job: replacing it instead"
                );
                decrement = false;
                continue;
            }
            if self.end.replace.is_none() {
                let group = self.ch.settings.borrow().agent_group.clone();
                tracing::info!(group = %group, "group at its min size: restarting the agent in place (no churn)");
                self.show("group at its min size: restarting the agent in place");
            }
            // With a replacement pending, the next start ends the instance without
            // decrement.
            return Ok(Some(Phase::Idle { at: Instant::now() }));
        }
        self.hand_leadership_on().await;
        self.notify.status(&format!(
            "terminating instance ({why}): waiting for Auto Scaling to stop it"
        ));
        self.complete_if_held().await;
        // No deadline (never power off) if the operator's timeout does not fit an Instant.
        let power_off_at = Instant::now().checked_add(self.opts.terminate_timeout);
        Ok(Some(Phase::Ending { power_off_at }))
    }

    /// The agent was handed a job: from now on this instance serves no other. The marker
    /// keeps a restarted supervisor from starting an agent here again.
    pub(super) fn mark_used(&mut self, agent_name: &str, job: Option<&str>) {
        self.used = true;
        let text = format!("agent {agent_name} job {}\n", job.unwrap_or("unknown"));
        let written = crate::agent::config_file::write_private(
            &self.used_marker,
            text.as_bytes(),
            0o600,
            None,
        );
        match written {
            Ok(()) => tracing::info!(
                agent_name,
                marker = %self.used_marker.display(),
                "the agent was handed a job: this instance serves no other (one job per VM)"
            ),
            Err(e) => tracing::error!(
                marker = %self.used_marker.display(),
                error = %e,
                "cannot write the one-job marker: this supervisor still ends the instance after the job, a restarted one would not know"
            ),
        }
    }

    /// Stops leader work and releases the lease (bounded, the watchdog fed meanwhile).
    pub(super) async fn hand_leadership_on(&mut self) {
        hand_on(&mut self.ports.leader, &mut self.notify).await;
        self.lead_term = None;
    }

    /// Records a notice, logs what it means, and says whether to stop the agent now.
    /// `busy`: the agent waits for its job (false: idle, or no agent at all).
    pub(super) async fn take_notice(&mut self, n: Notice, busy: bool) -> Option<Interruption> {
        let settings = self.ch.settings.borrow().clone();
        let hook = self.lifecycle_wait(&settings);
        let capacity_rebalancing = match &n {
            Notice::Rebalance { .. } => self.capacity_rebalancing(&settings.agent_group).await,
            _ => false,
        };
        let facts = interrupt::Facts {
            busy,
            lifecycle_hook: hook.is_some(),
            capacity_rebalancing,
            replacement_pending: self.end.replace.is_some(),
        };
        let verdict = interrupt::judge(&n, facts);
        log_notice(&n, busy, capacity_rebalancing, hook.as_ref(), &verdict);
        match &n {
            Notice::Spot(_) => (self.ports.spot_metric)(),
            Notice::Terminating => self.end.terminating = Some(Instant::now()),
            Notice::Rebalance { .. } => {}
        }
        match verdict {
            Verdict::Drain(kind) => {
                if kind == Interruption::Rebalance {
                    self.end.replace = Some(Interruption::Rebalance);
                }
                Some(kind)
            }
            Verdict::AfterJob(kind) => {
                self.end.replace = Some(kind);
                None
            }
            Verdict::HoldForJob | Verdict::Nothing => None,
        }
    }

    /// Whether the group has Capacity Rebalancing on (bounded; unknown counts as off, so
    /// the instance replaces itself).
    pub(super) async fn capacity_rebalancing(&self, group: &str) -> bool {
        let asked = self.ports.asg.capacity_rebalance(group);
        match tokio::time::timeout(Duration::from_secs(10), asked).await {
            Ok(Ok(on)) => on.unwrap_or(false),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot tell whether the group has Capacity Rebalancing; replacing this instance ourselves");
                false
            }
            Err(_) => false,
        }
    }

    /// The group's lifecycle hook, from the runtime config.
    pub(super) fn lifecycle_wait(&self, settings: &Settings) -> Option<LifecycleWait> {
        settings.lifecycle_hook.clone().map(|hook| LifecycleWait {
            group: settings.agent_group.clone(),
            hook,
            instance_id: self.instance_id.clone(),
        })
    }

    /// One lifecycle heartbeat, given up after [`HEARTBEAT_BOUND`] (the next one is a third
    /// of the heartbeat timeout away, so one lost call is survived).
    pub(super) async fn heartbeat(&mut self, wait: &LifecycleWait) {
        let beat = tokio::time::timeout(HEARTBEAT_BOUND, wait.heartbeat(&self.ports.asg));
        match self
            .notify
            .during("a lifecycle heartbeat", HEARTBEAT_BOUND * 2, beat)
            .await
        {
            Ok(true) => {
                self.end.heartbeats += 1;
                tracing::debug!(heartbeats = self.end.heartbeats, "lifecycle heartbeat sent");
            }
            Ok(false) => {}
            Err(_) => tracing::warn!(
                lifecycle_hook = %wait.hook.name,
                bound_secs = HEARTBEAT_BOUND.as_secs(),
                "lifecycle heartbeat did not return in time; trying again at the next one"
            ),
        }
    }

    /// `CompleteLifecycleAction(CONTINUE)` if Auto Scaling holds the instance for us: it
    /// terminates the instance then.
    pub(super) async fn complete_if_held(&mut self) {
        let Some(since) = self.end.terminating.filter(|_| !self.end.completed) else {
            return;
        };
        self.end.completed = true;
        let waited_ms = since.elapsed().as_millis() as u64;
        let settings = self.ch.settings.borrow().clone();
        let Some(wait) = self.lifecycle_wait(&settings) else {
            tracing::info!(
                waited_ms,
                "Auto Scaling is terminating this instance; the runtime config names no lifecycle hook, so there is nothing to complete"
            );
            return;
        };
        crate::logs::flush(crate::logs::FLUSH_BOUND).await;
        let done = self
            .notify
            .during(
                "completing the lifecycle action",
                AWS_STEP_BOUND,
                wait.complete(&self.ports.asg, self.opts.aws_retry_backoff),
            )
            .await;
        let heartbeats = self.end.heartbeats;
        match done {
            Ok(attempts) => tracing::info!(
                lifecycle_hook = %wait.hook.name,
                result = "CONTINUE",
                attempts,
                heartbeats,
                waited_ms,
                "lifecycle action completed: Auto Scaling terminates this instance now"
            ),
            Err(e) => tracing::error!(
                lifecycle_hook = %wait.hook.name,
                error = %e,
                heartbeats,
                waited_ms,
                timeout_secs = wait.hook.heartbeat_timeout.as_secs(),
                "could not complete the lifecycle action; Auto Scaling ends the wait after the heartbeat timeout (DefaultResult)"
            ),
        }
        self.notify
            .status("lifecycle action completed: waiting for Auto Scaling to stop this instance");
    }
}

/// Logs what a notice means for this instance.
fn log_notice(
    n: &Notice,
    busy: bool,
    capacity_rebalancing: bool,
    hook: Option<&LifecycleWait>,
    verdict: &Verdict,
) {
    match n {
        Notice::Spot(a) => tracing::warn!(
            interruption = "spot",
            spot_action = %a.action,
            spot_time = %a.time_text,
            busy,
            "spot interruption notice: EC2 will {} this instance at {}; draining now",
            a.action,
            if a.time_text.is_empty() { "an unknown time" } else { a.time_text.as_str() }
        ),
        Notice::Rebalance { notice_time } if capacity_rebalancing => tracing::info!(
            interruption = "rebalance",
            notice_time = %notice_time,
            "spot rebalance recommendation: the group's Capacity Rebalancing replaces this instance (its termination comes through the lifecycle hook)"
        ),
        Notice::Rebalance { notice_time } => tracing::info!(
            interruption = "rebalance",
            notice_time = %notice_time,
            busy,
            "spot rebalance recommendation: replacing this instance{}",
            if busy { " after its job" } else { " now" }
        ),
        Notice::Terminating => tracing::info!(
            interruption = "lifecycle",
            lifecycle_hook = hook.map(|h| h.hook.name.as_str()).unwrap_or("none"),
            busy,
            "Auto Scaling is terminating this instance: {}",
            if *verdict == Verdict::HoldForJob {
                "letting the job finish (lifecycle heartbeats meanwhile)"
            } else {
                "draining the agent"
            }
        ),
    }
}

pub(crate) async fn poweroff(cmd: &[String]) {
    let Some((prog, args)) = cmd.split_first() else {
        tracing::error!("no poweroff command configured; the instance stays up");
        return;
    };
    tracing::warn!(command = %cmd.join(" "), "powering off");
    crate::logs::flush(crate::logs::FLUSH_BOUND).await;
    match tokio::process::Command::new(prog).args(args).status().await {
        Ok(s) if s.success() => {}
        Ok(s) => tracing::error!(status = %describe_status(&s), "poweroff command failed"),
        Err(e) => tracing::error!(error = %e, "poweroff command could not run"),
    }
}
