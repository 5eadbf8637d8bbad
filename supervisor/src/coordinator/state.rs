//! The coordinator's state: where the instance is ([`Phase`]), the agent run in progress
//! ([`Run`]), what ends the instance ([`EndState`]), and the events it selects over.

use crate::agent::owner::{AgentEvent, Started};
use crate::agent::Progress;
use crate::config::Settings;
use crate::interrupt::{Interruption, Notice};
use std::time::Duration;
use tokio::time::Instant;

/// What ends this instance, kept across agent runs.
#[derive(Debug, Default)]
pub(super) struct EndState {
    /// When IMDS said `Terminated`: Auto Scaling is terminating this instance (with our
    /// lifecycle hook, it waits in `Terminating:Wait` until we complete the action).
    pub(super) terminating: Option<Instant>,
    /// The lifecycle action was completed (or found not to exist).
    pub(super) completed: bool,
    /// `RecordLifecycleActionHeartbeat` calls that succeeded.
    pub(super) heartbeats: u32,
    /// Replace this instance as soon as its agent is idle (rebalance, max uptime, or a
    /// notice that came with no agent running).
    pub(super) replace: Option<Interruption>,
}

impl EndState {
    /// The interruption that ends the instance before any new agent starts.
    pub(super) fn pending(&self) -> Option<Interruption> {
        if self.terminating.is_some() {
            Some(Interruption::Lifecycle)
        } else {
            self.replace.clone()
        }
    }
}

/// Where the instance is.
pub(super) enum Phase {
    /// No agent runs; the next starts at `at`, unless the instance ends first.
    Idle {
        at: Instant,
    },
    Running(Box<Run>),
    /// The instance is ending: waiting for Auto Scaling's SIGTERM (or to power off).
    Ending {
        power_off_at: Option<Instant>,
    },
}

/// One agent run, from the start command to its exit.
#[derive(Default)]
pub(super) struct Run {
    pub(super) started: Option<Box<Started>>,
    pub(super) progress: Progress,
    pub(super) status: String,
    /// When the instance reaches `max_uptime_secs`.
    pub(super) uptime_at: Option<Instant>,
    /// While Auto Scaling's lifecycle hook holds the instance for the agent: the next
    /// heartbeat, and when the job must be drained to beat the hook's global timeout.
    pub(super) beat_at: Option<Instant>,
    pub(super) force_at: Option<Instant>,
    pub(super) drain: Option<Drain>,
}

/// A drain the coordinator asked for.
pub(super) struct Drain {
    /// `None`: a stop signal; otherwise the interruption.
    pub(super) kind: Option<Interruption>,
    /// When an unreported drain counts as wedged.
    pub(super) overdue_at: Option<Instant>,
}

impl Run {
    pub(super) fn name(&self) -> &str {
        self.started
            .as_ref()
            .map(|s| s.name.as_str())
            .unwrap_or("starting")
    }

    /// How long a drain waits before the agent's group is killed: the registered grace,
    /// then what the agent needs to hear the stop, report and shut down.
    pub(super) fn drain_budget(&self, settings: &Settings, margin: Duration) -> Duration {
        let grace = self
            .started
            .as_ref()
            .map(|s| s.grace)
            .unwrap_or(settings.interruption_grace);
        grace + margin
    }

    /// Whether an interruption that spares a busy agent waits for its job (see
    /// [`crate::interrupt`]): only a one-job agent that was handed a job. An agent that
    /// takes several jobs would keep taking them, so it is drained at once.
    pub(super) fn waits_for_job(&self, settings: &Settings) -> bool {
        let one_job = self
            .started
            .as_ref()
            .map(|s| s.settings.disconnect_after_job)
            .unwrap_or(settings.disconnect_after_job);
        one_job && self.progress.jobs > 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    Start,
    Uptime,
    Beat,
    Force,
    DrainOverdue,
    PowerOff,
}

pub(super) enum Event {
    Stop,
    Abort,
    Agent(Option<AgentEvent>),
    Notice(Notice),
    Timer(Timer),
    Leadership(crate::election::Leadership),
    Watchdog,
}

impl Phase {
    /// The earliest timer of this phase.
    pub(super) fn next_timer(&self) -> Option<(Instant, Timer)> {
        match self {
            Phase::Idle { at } => Some((*at, Timer::Start)),
            Phase::Ending { power_off_at } => power_off_at.map(|at| (at, Timer::PowerOff)),
            Phase::Running(run) => {
                let draining = run.drain.is_some();
                [
                    run.uptime_at
                        .filter(|_| !draining)
                        .map(|at| (at, Timer::Uptime)),
                    run.beat_at.map(|at| (at, Timer::Beat)),
                    run.force_at
                        .filter(|_| !draining)
                        .map(|at| (at, Timer::Force)),
                    run.drain
                        .as_ref()
                        .and_then(|d| d.overdue_at)
                        .map(|at| (at, Timer::DrainOverdue)),
                ]
                .into_iter()
                .flatten()
                .min_by_key(|(at, _)| *at)
            }
        }
    }
}
