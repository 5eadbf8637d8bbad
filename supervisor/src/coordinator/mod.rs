//! The coordinator: the one place that decides how this instance lives and ends.
//!
//! The long-running parts are tasks that report events: the agent owner
//! ([`crate::agent::owner`]: started, progress, exited with its shutdown reason), the
//! interruption watcher ([`crate::interrupt::watch`]: IMDS notices), leader work
//! ([`Leader`]), the config reloader ([`crate::reload`]) and the stop signals. The
//! coordinator selects over them, asks the pure policies what an event means —
//! [`crate::lifecycle::decide`] for an agent's exit (the README's exit table),
//! [`crate::interrupt::judge`] for a notice (its interruption table) — and carries the
//! answer out. Every end of the instance goes through one path ([`Coordinator::end`]):
//! leadership handed on, the agent drained, then `TerminateInstanceInAutoScalingGroup` —
//! or, when Auto Scaling is already terminating the instance, `CompleteLifecycleAction` —
//! and the wait for Auto Scaling's SIGTERM. It alone feeds the systemd watchdog.
//!
//! Its effects go through traits (Auto Scaling: [`AutoScaling`] + [`LifecycleActions`];
//! IMDS: [`Metadata`]; [`Leader`]) and channels, so it is tested with fakes and paused
//! time (`coordinator/tests.rs`).

mod ending;
mod leader;
mod state;
#[cfg(test)]
mod tests;

pub(crate) use ending::poweroff;
use leader::hand_on;
pub use leader::{leading_term, scaler_only, scaler_status, Leader};
use state::{Drain, EndState, Event, Phase, Run, Timer};

use crate::agent::owner::{AgentCommand, AgentEvent};
use crate::agent::{AgentExit, ShutdownReason};
use crate::aws::autoscaling::{AutoScaling, LifecycleActions};
use crate::aws::imds::{launch_time, Metadata};
use crate::config::Settings;
use crate::interrupt::{self, Interruption, LifecycleWait, Notice, Verdict};
use crate::lifecycle::{
    decide, describe_status, one_job_per_vm, terminate_self, Action, Backoff, Termination, USED_WHY,
};
use crate::notify::Notifier;
use crate::startup::{DaemonError, RunOptions};
use crate::Shutdown;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Longest a step that talks to AWS may take before the systemd watchdog is left to fire
/// (see [`Notifier::during`]): the SDK's 30 s operation timeout times the retries.
const AWS_STEP_BOUND: Duration = Duration::from_secs(600);
/// Longest one lifecycle heartbeat may hold the coordinator.
const HEARTBEAT_BOUND: Duration = Duration::from_secs(10);
/// How long past its kill deadline a drain may go unreported before the watchdog is left
/// to fire (the agent owner is wedged).
const DRAIN_SLACK: Duration = Duration::from_secs(30);
/// The marker in the work dir (root only): this instance's agent was handed a job, so
/// the instance serves no other (see [`crate::lifecycle::one_job_per_vm`]). A supervisor
/// that starts and finds it ends the instance.
pub const USED_MARKER: &str = "job-taken";
/// How long a second stop signal waits for the killed agent to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The tasks' ends of the channels the coordinator listens and talks on.
pub struct Channels {
    pub agent: mpsc::UnboundedSender<AgentCommand>,
    pub events: mpsc::UnboundedReceiver<AgentEvent>,
    pub notices: mpsc::UnboundedReceiver<Notice>,
    pub settings: watch::Receiver<Settings>,
}

/// What the coordinator acts through.
pub struct Ports<A, M, L> {
    pub asg: A,
    pub imds: M,
    pub leader: L,
    /// Publishes one `SpotInterruptions` datum (in the background: never delays a drain).
    pub spot_metric: Box<dyn Fn() + Send>,
}

type Flow = Result<Option<Phase>, DaemonError>;

pub struct Coordinator<A, M, L> {
    opts: RunOptions,
    instance_id: String,
    /// When the supervisor started (the instance's age if IMDS does not say).
    started_wall: SystemTime,
    ports: Ports<A, M, L>,
    ch: Channels,
    shutdown: Shutdown,
    notify: Notifier,
    notices_open: bool,
    end: EndState,
    launched: Option<SystemTime>,
    backoff: Backoff,
    lead_term: Option<u64>,
    /// The first stop signal was seen.
    stopping: bool,
    /// An agent on this instance was handed a job (this run, or a supervisor before us:
    /// [`USED_MARKER`]).
    used: bool,
    used_marker: std::path::PathBuf,
    /// False once a step overran its bound: systemd's watchdog then restarts us.
    feeding: bool,
}

impl<A, M, L> Coordinator<A, M, L>
where
    A: AutoScaling + LifecycleActions,
    M: Metadata,
    L: Leader,
{
    pub fn new(
        opts: RunOptions,
        instance_id: &str,
        started_wall: SystemTime,
        ports: Ports<A, M, L>,
        ch: Channels,
        (shutdown, notify): (Shutdown, Notifier),
    ) -> Self {
        let lead_term = ports.leader.current().as_ref().and_then(leading_term);
        let used_marker = opts.work_dir.join(USED_MARKER);
        Self {
            used: used_marker.exists(),
            used_marker,
            backoff: Backoff::new(opts.restart_backoff, opts.restart_backoff_cap),
            opts,
            instance_id: instance_id.to_string(),
            started_wall,
            ports,
            ch,
            shutdown,
            notify,
            notices_open: true,
            end: EndState::default(),
            launched: None,
            lead_term,
            stopping: false,
            feeding: true,
        }
    }

    /// Runs until the instance ends (Ok), a second signal aborts, or a fatal error.
    /// However it ends (but for a second signal: at once), leadership is handed on, so a
    /// successor need not wait the lease out.
    pub async fn run(mut self) -> Result<(), DaemonError> {
        let mut phase = Phase::Idle { at: Instant::now() };
        let result = loop {
            let event = self.next_event(&phase).await;
            phase = match self.on(event, phase).await {
                Ok(Some(next)) => next,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
        };
        if !matches!(result, Err(DaemonError::Aborted)) {
            self.hand_leadership_on().await;
        }
        result
    }

    async fn next_event(&mut self, phase: &Phase) -> Event {
        let timer = phase.next_timer();
        let (at, kind) = timer.unwrap_or((Instant::now(), Timer::Start));
        let running = matches!(phase, Phase::Running(_));
        tokio::select! {
            biased;
            _ = self.shutdown.abort.cancelled(), if self.stopping && running => Event::Abort,
            _ = self.shutdown.drain.cancelled(), if !self.stopping => Event::Stop,
            e = self.ch.events.recv() => Event::Agent(e),
            n = next_notice(&mut self.ch.notices, &mut self.notices_open) => Event::Notice(n),
            _ = tokio::time::sleep_until(at), if timer.is_some() => Event::Timer(kind),
            l = self.ports.leader.changed() => Event::Leadership(l),
            _ = self.notify.watchdog_due(), if self.feeding => Event::Watchdog,
        }
    }

    async fn on(&mut self, event: Event, phase: Phase) -> Flow {
        match (phase, event) {
            (phase, Event::Watchdog) => {
                self.notify.ping();
                Ok(Some(phase))
            }
            (phase, Event::Leadership(l)) => {
                let term = leading_term(&l);
                if term != self.lead_term {
                    self.lead_term = term;
                    if let Phase::Running(run) = &phase {
                        self.show(&run.status);
                    }
                }
                Ok(Some(phase))
            }
            (Phase::Running(run), event) => self.on_running(*run, event).await,
            (Phase::Idle { .. }, Event::Timer(Timer::Start)) => self.start_or_end().await,
            (Phase::Idle { .. }, Event::Stop) => {
                self.stopping = true;
                self.notify.stopping("stopping: no agent running");
                self.complete_if_held().await;
                Ok(None)
            }
            (Phase::Idle { at }, Event::Notice(n)) => {
                let Some(kind) = self.take_notice(n, false).await else {
                    return Ok(Some(Phase::Idle { at }));
                };
                if self.end.replace.is_none() && kind != Interruption::Lifecycle {
                    self.end.replace = Some(kind);
                }
                self.start_or_end().await
            }
            (Phase::Ending { .. }, Event::Stop) => {
                self.stopping = true;
                self.notify
                    .stopping("stopping: the instance is being terminated");
                Ok(None)
            }
            (Phase::Ending { power_off_at }, Event::Notice(n)) => {
                match n {
                    Notice::Terminating => self.end.terminating = Some(Instant::now()),
                    other => {
                        tracing::info!(notice = ?other, "notice while the instance is ending: nothing more to do")
                    }
                }
                self.complete_if_held().await;
                Ok(Some(Phase::Ending { power_off_at }))
            }
            (Phase::Ending { .. }, Event::Timer(Timer::PowerOff)) => {
                tracing::error!(
                    timeout_secs = self.opts.terminate_timeout.as_secs(),
                    "instance still running long after its termination was requested"
                );
                self.notify
                    .status("termination requested long ago: powering off");
                poweroff(&self.opts.poweroff_command).await;
                Ok(Some(Phase::Ending { power_off_at: None }))
            }
            (_, Event::Agent(None)) => Err(DaemonError::Runtime(
                "the agent owner task ended unexpectedly".into(),
            )),
            // A stray event (an agent event with no agent running, a timer that no
            // longer applies).
            (phase, _) => Ok(Some(phase)),
        }
    }

    async fn on_running(&mut self, mut run: Run, event: Event) -> Flow {
        let settings = self.ch.settings.borrow().clone();
        match event {
            Event::Stop => {
                self.stopping = true;
                if run.drain.is_none() {
                    let grace = run.drain_budget(&settings, self.opts.drain_margin);
                    self.notify.stopping(&format!(
                        "draining: the agent {} has up to {} s to stop",
                        run.name(),
                        grace.as_secs()
                    ));
                    self.hand_leadership_on().await;
                    self.drain(&mut run, None, grace);
                }
                // An interruption's drain goes on; the instance ends when it is done.
            }
            Event::Abort => {
                tracing::warn!("second stop signal: killing the agent's process group now");
                let _ = self.ch.agent.send(AgentCommand::Kill);
                let reaped = async {
                    while let Some(e) = self.ch.events.recv().await {
                        if matches!(e, AgentEvent::Exited { .. } | AgentEvent::Failed(_)) {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout(KILL_WAIT, reaped).await;
                return Err(DaemonError::Aborted);
            }
            Event::Agent(Some(AgentEvent::Started(s))) => {
                run.status = format!("agent running (agent name {}), registering", s.name);
                if s.run == 1 {
                    self.notify.ready(&with_lead(&run.status, self.lead_term));
                } else {
                    self.show(&run.status);
                }
                if self.end.replace.is_none() {
                    if let Some(max) = s.settings.max_uptime {
                        let launched = self.launched().await;
                        let left = interrupt::uptime_left(launched, max, SystemTime::now());
                        run.uptime_at = Instant::now().checked_add(left);
                    }
                }
                run.started = Some(s);
            }
            Event::Agent(Some(AgentEvent::Progress(p))) => {
                if p.jobs > 0 && !self.used {
                    self.mark_used(run.name(), p.last_job.as_deref());
                }
                run.status = match &p.last_job {
                    Some(job) => format!("agent running (agent name {}), job {job}", run.name()),
                    None => format!(
                        "agent running (agent name {}), waiting for jobs",
                        run.name()
                    ),
                };
                run.progress = p;
                self.show(&run.status);
            }
            Event::Agent(Some(AgentEvent::Failed(e))) => return Err(e),
            Event::Agent(None) => {
                return Err(DaemonError::Runtime(
                    "the agent owner task ended unexpectedly".into(),
                ))
            }
            Event::Agent(Some(AgentEvent::Exited { exit, reason })) => {
                return self.on_exit(run, exit, reason).await;
            }
            Event::Notice(n) => {
                let busy = run.waits_for_job(&settings);
                let was_terminating = self.end.terminating.is_some();
                let drain = self.take_notice(n, busy).await;
                if self.end.terminating.is_some() && !was_terminating {
                    // The instance is going: hand leadership on now, not at the end.
                    self.hand_leadership_on().await;
                    self.hold(&mut run, &settings);
                }
                match drain {
                    Some(kind) if run.drain.is_none() => {
                        self.drain_for(&mut run, kind, &settings).await;
                    }
                    _ => self.show(&run.status),
                }
            }
            Event::Timer(Timer::Uptime) => {
                run.uptime_at = None;
                if self.end.replace.is_none() {
                    let busy = run.waits_for_job(&settings);
                    tracing::info!(
                        max_uptime_secs =
                            settings.max_uptime.map(|m| m.as_secs()).unwrap_or_default(),
                        busy,
                        interruption = "max_uptime",
                        "older than max_uptime_secs: replacing this instance{}",
                        if busy { " after its job" } else { "" }
                    );
                    self.end.replace = Some(Interruption::MaxUptime);
                    if busy {
                        self.show(&run.status);
                    } else {
                        self.drain_for(&mut run, Interruption::MaxUptime, &settings)
                            .await;
                    }
                }
            }
            Event::Timer(Timer::Beat) => {
                run.beat_at = None;
                if let Some(wait) = self.lifecycle_wait(&settings) {
                    self.heartbeat(&wait).await;
                    let every = interrupt::heartbeat_every(wait.hook.heartbeat_timeout);
                    run.beat_at = Instant::now().checked_add(every);
                }
            }
            Event::Timer(Timer::Force) => {
                run.force_at = None;
                tracing::warn!(
                    agent_name = %run.name(),
                    interruption = "lifecycle",
                    "the lifecycle hook's wait is nearly over and the job still runs: draining the agent so the job is stopped cleanly"
                );
                self.drain_for(&mut run, Interruption::Lifecycle, &settings)
                    .await;
            }
            Event::Timer(Timer::DrainOverdue) => {
                if let Some(d) = run.drain.as_mut() {
                    d.overdue_at = None;
                }
                if self.notify.watchdog().is_some() {
                    tracing::error!(
                        step = "the drain",
                        "step still not finished after its bound: no longer feeding the systemd watchdog, so systemd restarts the supervisor"
                    );
                }
                self.feeding = false;
            }
            _ => {}
        }
        Ok(Some(Phase::Running(Box::new(run))))
    }

    /// Auto Scaling holds the instance for its agent: heartbeat it (during a drain too),
    /// and drain a busy agent in time to beat the hook's global timeout.
    fn hold(&mut self, run: &mut Run, settings: &Settings) {
        let Some(wait) = self.lifecycle_wait(settings) else {
            return;
        };
        let now = Instant::now();
        let timeout = wait.hook.heartbeat_timeout;
        run.beat_at = now.checked_add(interrupt::heartbeat_every(timeout));
        let budget = run.drain_budget(settings, self.opts.drain_margin);
        run.force_at = now.checked_add(interrupt::force_drain_after(timeout, budget));
    }

    /// Asks the agent owner to drain within `within`.
    fn drain(&mut self, run: &mut Run, kind: Option<Interruption>, within: Duration) {
        let _ = self.ch.agent.send(AgentCommand::Drain { within });
        run.drain = Some(Drain {
            kind,
            overdue_at: Instant::now().checked_add(within + DRAIN_SLACK),
        });
    }

    /// The supervisor stops the agent itself for an interruption: spot notice, Auto
    /// Scaling's termination, or a replacement of an idle agent's instance.
    async fn drain_for(&mut self, run: &mut Run, kind: Interruption, settings: &Settings) {
        self.hand_leadership_on().await;
        let grace = run.drain_budget(settings, self.opts.drain_margin);
        let kill_after = match &kind {
            Interruption::Spot(a) => interrupt::spot_kill_after(grace, a.time, SystemTime::now()),
            _ => grace,
        };
        if kill_after < grace {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                kill_after_secs = kill_after.as_secs(),
                "the interruption grace does not fit before the spot interruption: the agent's group is killed sooner (keep interruption_grace_secs under ~100 s on spot)"
            );
        }
        self.notify.status(&format!(
            "{}: draining the agent {}, up to {} s",
            kind.why(),
            run.name(),
            kill_after.as_secs()
        ));
        if run.progress.jobs > 0 && !run.waits_for_job(settings) {
            tracing::info!(
                agent_name = %run.name(),
                jobs = run.progress.jobs,
                interruption = kind.as_str(),
                "the agent takes several jobs (disconnect_after_job off): draining it now, so it takes no more; a running job has the interruption grace"
            );
        }
        self.drain(run, Some(kind), kill_after);
    }

    /// The agent exited: on its own (the exit table), or after a drain.
    async fn on_exit(&mut self, run: Run, exit: AgentExit, reason: Option<ShutdownReason>) -> Flow {
        let exit_reason = reason.map(ShutdownReason::as_str).unwrap_or("none");
        let agent_name = run.name().to_string();
        match run.drain {
            Some(Drain { kind: None, .. }) => {
                self.complete_if_held().await;
                return Ok(None);
            }
            Some(Drain {
                kind: Some(kind), ..
            }) => {
                tracing::info!(
                    agent_name = %agent_name,
                    exit_reason,
                    interruption = kind.as_str(),
                    decrement = false,
                    why = kind.why(),
                    "terminating this instance"
                );
                if self.stopping {
                    self.complete_if_held().await;
                    self.notify
                        .stopping("stopping: the instance was being terminated");
                    return Ok(None);
                }
                return self.end(false, kind.why()).await;
            }
            None => {}
        }
        let settings = self.ch.settings.borrow().clone();
        let action = decide(
            &exit,
            reason,
            false,
            &mut self.backoff,
            &settings.token_parameter,
        );
        tracing::info!(
            agent_name = %agent_name,
            exit_reason,
            status = %describe_status(&exit.status),
            registered = exit.registered,
            "agent exited"
        );
        let (action, interruption) = if self.end.terminating.is_some() {
            // Auto Scaling is terminating this instance and waited for the agent.
            let why = Interruption::Lifecycle.why();
            (
                Action::Terminate {
                    decrement: false,
                    why,
                },
                Some(Interruption::Lifecycle),
            )
        } else {
            match (action, &self.end.replace) {
                // A replacement was waiting for the job: a restart becomes that replacement
                // (not after a registration failure: a new instance would fail the same way).
                (Action::Restart { .. }, Some(kind)) if exit.registered => (
                    Action::Terminate {
                        decrement: false,
                        why: kind.why(),
                    },
                    Some(kind.clone()),
                ),
                (action, replace) => (action, replace.clone()),
            }
        };
        let action = one_job_per_vm(action, self.used);
        match action {
            Action::Restart { after, why } => {
                if exit.registered {
                    tracing::warn!(
                        restart_in_ms = after.as_millis() as u64,
                        failures = self.backoff.failures(),
                        "{why}"
                    );
                } else {
                    tracing::error!(
                        restart_in_ms = after.as_millis() as u64,
                        failures = self.backoff.failures(),
                        "{why}"
                    );
                }
                self.show(&format!(
                    "agent exited ({exit_reason}, {}); restarting it in {} s",
                    describe_status(&exit.status),
                    after.as_secs()
                ));
                Ok(Some(Phase::Idle {
                    at: Instant::now() + after,
                }))
            }
            Action::Terminate { decrement, why } => {
                tracing::info!(
                    agent_name = %agent_name,
                    exit_reason,
                    interruption = interruption.as_ref().map(Interruption::as_str).unwrap_or("none"),
                    decrement,
                    why,
                    "terminating this instance"
                );
                self.notify.status(&format!(
                    "terminating instance ({why}, agent exit reason {exit_reason})"
                ));
                self.end(decrement, why).await
            }
        }
    }

    /// Before an agent starts: the instance ends instead if it is past its age, at risk or
    /// being terminated.
    async fn start_or_end(&mut self) -> Flow {
        let settings = self.ch.settings.borrow().clone();
        if let (None, Some(max)) = (&self.end.replace, settings.max_uptime) {
            let launched = self.launched().await;
            let now = SystemTime::now();
            if interrupt::uptime_left(launched, max, now).is_zero() {
                tracing::info!(
                    max_uptime_secs = max.as_secs(),
                    age_secs = now.duration_since(launched).unwrap_or_default().as_secs(),
                    interruption = "max_uptime",
                    "older than max_uptime_secs: replacing this instance"
                );
                self.end.replace = Some(Interruption::MaxUptime);
            }
        }
        let ending = match self.end.pending() {
            Some(kind) => Some((kind.as_str(), kind.why())),
            None if self.used => Some(("none", USED_WHY)),
            None => None,
        };
        if let Some((interruption, why)) = ending {
            tracing::info!(
                exit_reason = "none",
                interruption,
                decrement = false,
                why,
                "terminating this instance"
            );
            self.notify.status(&format!("terminating instance ({why})"));
            return self.end(false, why).await;
        }
        let _ = self.ch.agent.send(AgentCommand::Start);
        Ok(Some(Phase::Running(Box::default())))
    }

    /// When this instance launched (the identity document's `pendingTime`), read once; the
    /// supervisor's own start if IMDS does not say.
    async fn launched(&mut self) -> SystemTime {
        if let Some(t) = self.launched {
            return t;
        }
        let t = match launch_time(&self.ports.imds, 3, Duration::from_millis(200)).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "launch time unknown: max_uptime_secs counts from the supervisor's start");
                self.started_wall
            }
        };
        self.launched = Some(t);
        t
    }

    /// The status line, with the leader's term and what is pending.
    fn show(&self, status: &str) {
        let status = with_lead(status, self.lead_term);
        let status = if self.end.terminating.is_some() {
            format!("{status}; Auto Scaling is terminating this instance: the job finishes first")
        } else if let Some(kind) = &self.end.replace {
            format!("{status}; after the job: {}", kind.why())
        } else {
            status
        };
        self.notify.status(&status);
    }
}

/// The next notice; never, once the watcher is done.
async fn next_notice(notices: &mut mpsc::UnboundedReceiver<Notice>, open: &mut bool) -> Notice {
    if *open {
        if let Some(n) = notices.recv().await {
            return n;
        }
        *open = false;
    }
    std::future::pending().await
}

fn with_lead(status: &str, lead_term: Option<u64>) -> String {
    match lead_term {
        Some(term) => format!("{status}; fleet leader, term {term}"),
        None => status.to_string(),
    }
}
