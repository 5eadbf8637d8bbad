//! The demand-driven scaler. It runs on the leader only: every poll it asks Semaphore
//! how many jobs wait and run for the agent type, computes the group size those jobs
//! need, and raises the agents' Auto Scaling group's desired capacity when it is lower.
//! It **never lowers** desired: instances end themselves when their agent is done (see
//! [`crate::lifecycle`]), so nothing remote ever kills a running job.
//!
//! One poll (every `scaler.poll_interval_ms`, default 5 s; the first one as soon as this
//! process becomes a valid leader):
//!
//! 1. `GET <endpoint>/api/v1/self_hosted_agents/metrics` ([`semaphore`]). On 401 the token
//!    is read again from SSM ([`TokenSource`]) and the request retried once (rotation).
//!    429, 5xx and network errors back off exponentially with jitter (capped at
//!    [`MAX_BACKOFF`] or the poll interval, whichever is longer), never sooner than
//!    `Retry-After`. A malformed or partial answer means no scaling action this poll.
//! 2. `DescribeAutoScalingGroups` → min, max, desired.
//! 3. Target: [`determine_target`] (the reference stack's rule).
//! 4. `SetDesiredCapacity(target, HonorCooldown=false)` only if `target > desired`, and
//!    at most once per change of the computed target within a term (the describe right
//!    after a raise may still show the old desired; we don't ask twice).
//! 5. `SuspendProcesses AZRebalance` once per term (after the scale-up, so the first
//!    reaction is not delayed): rebalancing would terminate instances mid-job.
//! 6. `PutMetricData` (one call, table below) on a term's first poll, on every scale-up,
//!    and otherwise once a minute ([`METRICS_EVERY`]): CloudWatch's standard resolution
//!    is a minute, and a call per 5 s poll would cost more than the scaler's instance.
//!
//! With `scaler.enabled` false the leader skips steps 1–4 (no Semaphore polls) but still
//! keeps AZRebalance suspended and publishes `LeaderTerm`.
//!
//! Leadership is checked ([`Leadership::valid_term`] on the local monotonic clock) right
//! before every side effect; when it is not valid nothing is done, and the scaler goes
//! back to waiting for leadership. Each side effect logs one `leader action` event with
//! `action`, `term`, `group`, `desired`/`target`, `check_mono_ns` and
//! `valid_until_mono_ns` (CLOCK_MONOTONIC nanoseconds: the instant of the check and the
//! lease's end), so a test can prove that two leaders' actions never overlap. Each
//! change of (jobs, target, desired, action) logs one `scaling decision` line. Repeated
//! failures log one error line per distinct error (again after ten minutes), and a
//! `recovered` line when they stop.
//!
//! Every completed poll also publishes its [`Decision`] (`raised`, `held`, `failed` or
//! `skipped`, with the numbers it learned) on the channel given to
//! [`Scaler::with_decisions`]; the election copies the latest one into the lease record,
//! where `agent-fleet status` reads it.
//!
//! ## Metrics (namespace `Semaphore`, one `PutMetricData` a minute and per scale-up)
//!
//! | metric            | dimensions                                      | value |
//! |-------------------|-------------------------------------------------|-------|
//! | `JobCount`        | `StackName`, `JobState` = `queued` \| `running` | jobs, as Semaphore counts them (same as the reference stack) |
//! | `AgentCount`      | `StackName`, `AgentState` = `idle` \| `occupied` | agents (same as the reference stack) |
//! | `LeaderTerm`      | `StackName`                                     | the leader's term; a step means a failover |
//! | `ScalingTarget`   | `StackName`                                     | the size the demand asks for (after overprovision, min and max) |
//! | `DesiredCapacity` | `StackName`                                     | the group's desired capacity after this poll |
//! | `ScaleUps`        | `StackName`                                     | `SetDesiredCapacity` calls this poll (0 or 1; `Sum` counts them) |
//! | `WarmPoolSize`    | `StackName`                                     | instances in the warm pool (`DescribeWarmPool`), with a warm pool only |
//!
//! Desired capacity counts only instances in service, never the warm pool's, so the
//! scaling rule is the same with a pool: a raise takes pooled instances first.
//!
//! `JobCount`/`AgentCount` are left out of a poll whose Semaphore answer failed (a gap,
//! not a false zero); `ScalingTarget`/`DesiredCapacity` when the group could not be
//! read. Metrics failures are logged and never stop scaling.
//!
//! ## Wiring (the daemon)
//!
//! ```text
//! let (settings_tx, settings_rx) = watch::channel(settings);   // send_replace on reload
//! let scaler = Scaler::new(
//!     identity.stack_name.clone(),
//!     settings_rx.clone(),
//!     HttpDemand::new()?,
//!     SdkAutoScaling::new(&sdk),
//!     SsmTokenSource::new(SdkParameterStore::new(&sdk), settings_rx),
//!     QueryCloudWatch::new(&sdk)?,
//! )
//! .with_token(Token::new(token.clone()))                       // skip one SSM read
//! .with_decisions(decision_tx);                                // → Elector::with_decisions
//! tokio::spawn(scaler.run(leadership_rx, shutdown.drain.clone()));
//! ```
//!
//! [`HttpDemand::new`] and [`crate::aws::cloudwatch::QueryCloudWatch::new`] install the
//! rustls crypto provider themselves ([`crate::tls::install_crypto_provider`]): reqwest
//! is built without one and would panic.

pub mod cap;
pub mod decision;
pub mod host_keys;
pub mod semaphore;
pub mod target;
pub mod token;

#[cfg(test)]
mod tests;

pub use decision::Decision;
pub use semaphore::{Demand, DemandError, DemandMetrics, HttpDemand, Token};
pub use target::determine_target;
pub use token::{SsmTokenSource, TokenError, TokenSource};

use crate::aws::autoscaling::{AutoScaling, GroupSizes, LaunchTemplates};
use crate::aws::cloudwatch::{CloudWatchError, Datum, MetricsSink, Unit};
use crate::config::Settings;
use crate::election::Leadership;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Processes kept suspended on the agents' group.
pub const SUSPENDED_PROCESSES: &[&str] = &["AZRebalance"];
/// Longest pause between polls after failures (unless the poll interval or
/// `Retry-After` is longer).
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Metrics are published at most this often (plus on every scale-up).
pub const METRICS_EVERY: Duration = Duration::from_secs(60);
/// A failure that keeps repeating is logged again after this long.
const REPEAT_ERROR_AFTER: Duration = Duration::from_secs(600);

/// The leader's scaler. See the module docs.
pub struct Scaler<D, A, T, M> {
    stack_name: String,
    /// Live settings: the scaler knobs, endpoint, group and token parameter are read
    /// at every poll, so a config reload applies at the next one.
    settings: watch::Receiver<Settings>,
    demand: D,
    asg: A,
    tokens: T,
    sink: M,
    /// The registration token last read; replaced after a 401.
    token: Option<Token>,
    /// Failed polls in a row, for the backoff.
    failures: u32,
    quiet: Quiet,
    /// Where each poll's decision goes (the election's record), if anywhere.
    decisions: Option<watch::Sender<Option<Decision>>>,
    /// Where the group's in-service instances go (the election names standbys from
    /// them), if anywhere: learned from the poll's own `DescribeAutoScalingGroups`.
    members: Option<watch::Sender<Vec<String>>>,
}

/// What one poll asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Next poll one interval after this one started.
    Poll,
    /// Back off; not before `Retry-After` if given.
    Backoff(Option<Duration>),
}

enum End {
    Shutdown,
    NotLeader,
    Closed,
}

/// What the scaler remembers within one leadership term. A new term starts afresh.
#[derive(Debug)]
struct TermState {
    term: u64,
    /// The target computed at the last poll.
    last_target: Option<i32>,
    /// Whether `SetDesiredCapacity(last_target)` already succeeded in this term: the
    /// "at most one call per change of target" rule.
    raised_for_target: bool,
    /// The group whose AZRebalance this term has suspended.
    suspended: Option<String>,
    /// Last `scaling decision` logged: (jobs, target, desired, action).
    last_decision: Option<(u64, i32, i32, &'static str)>,
    /// When this term last published metrics (see [`METRICS_EVERY`]).
    last_metrics: Option<Instant>,
}

impl TermState {
    fn new(term: u64) -> Self {
        Self {
            term,
            last_target: None,
            raised_for_target: false,
            suspended: None,
            last_decision: None,
            last_metrics: None,
        }
    }
}

/// What one poll learned, for the metrics and the published [`Decision`].
#[derive(Debug, Default)]
struct Report {
    demand: Option<DemandMetrics>,
    target: Option<i32>,
    /// Desired capacity as the group was read, and after this poll.
    desired_before: Option<i32>,
    desired: Option<i32>,
    scale_ups: u32,
    /// What [`Scaler::scale`] did (its `scaling decision` action), if it ran.
    action: Option<&'static str>,
    /// Why `SetDesiredCapacity` failed.
    failure: Option<String>,
    /// Why the poll could not decide (Semaphore, the token or the group unreadable,
    /// scaling off).
    skipped: Option<String>,
    /// Instances in the warm pool, read only when metrics are published and the group
    /// has a pool.
    warm_pool: Option<usize>,
}

impl<D, A, T, M> Scaler<D, A, T, M>
where
    D: Demand,
    A: AutoScaling + LaunchTemplates,
    T: TokenSource,
    M: MetricsSink,
{
    /// `stack_name` is the `StackName` metric dimension. Everything else the scaler
    /// needs (endpoint, group, knobs, token parameter) comes from `settings`.
    pub fn new(
        stack_name: impl Into<String>,
        settings: watch::Receiver<Settings>,
        demand: D,
        asg: A,
        tokens: T,
        sink: M,
    ) -> Self {
        Self {
            stack_name: stack_name.into(),
            settings,
            demand,
            asg,
            tokens,
            sink,
            token: None,
            failures: 0,
            quiet: Quiet::default(),
            decisions: None,
            members: None,
        }
    }

    /// Publishes the agents' group's in-service instances on `tx` whenever a poll read
    /// the group and the list changed (give the receiver to
    /// [`crate::election::Elector::new`]). No call of its own: an earlier feed described
    /// the group again on every renew of the lease, ≈ 15 calls a minute.
    pub fn with_members(mut self, tx: watch::Sender<Vec<String>>) -> Self {
        self.members = Some(tx);
        self
    }

    /// Publishes each completed poll's [`Decision`] on `tx` (the latest replaces the
    /// previous; give the receiver to [`crate::election::Elector::with_decisions`]).
    pub fn with_decisions(mut self, tx: watch::Sender<Option<Decision>>) -> Self {
        self.decisions = Some(tx);
        self
    }

    /// Starts with a token already read (the daemon has one); without it the first
    /// poll reads it from the [`TokenSource`].
    pub fn with_token(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    /// Runs until `shutdown` fires or the election's channel closes: waits to be a
    /// valid leader, scales while it is one, stops acting the moment it is not.
    pub async fn run(
        mut self,
        mut leadership: watch::Receiver<Leadership>,
        shutdown: CancellationToken,
    ) {
        let mut memo: Option<TermState> = None;
        loop {
            let term = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                t = next_term(&mut leadership) => match t {
                    Some(t) => t,
                    None => {
                        tracing::warn!("the election's channel closed; the scaler stops");
                        return;
                    }
                },
            };
            // A lapse and return within the same term keeps what the term has done.
            let state = match memo.take() {
                Some(s) if s.term == term => s,
                _ => TermState::new(term),
            };
            tracing::info!(term, "leading: the scaler starts");
            let (end, state) = self.lead(state, &mut leadership, &shutdown).await;
            memo = Some(state);
            match end {
                End::Shutdown => return,
                End::Closed => {
                    tracing::warn!("the election's channel closed; the scaler stops");
                    return;
                }
                End::NotLeader => {
                    tracing::info!(term, "no longer a valid leader: the scaler stops acting")
                }
            }
        }
    }

    /// Polls while this process leads `st.term`.
    async fn lead(
        &mut self,
        mut st: TermState,
        leadership: &mut watch::Receiver<Leadership>,
        shutdown: &CancellationToken,
    ) -> (End, TermState) {
        let term = st.term;
        let mut watcher = leadership.clone();
        let mut last_start: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        let mut settings_open = true;
        loop {
            // Wait for the next poll; the first is immediate. Renewals and config
            // reloads wake this up and the due time is recomputed.
            loop {
                let due = retry_at
                    .or_else(|| last_start.map(|t| t + self.settings.borrow().scaler.poll_interval))
                    .unwrap_or_else(Instant::now);
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return (End::Shutdown, st),
                    r = leadership.changed() => {
                        if r.is_err() {
                            return (End::Closed, st);
                        }
                        if !leads(&leadership.borrow_and_update(), term) {
                            return (End::NotLeader, st);
                        }
                    }
                    r = self.settings.changed(), if settings_open => {
                        settings_open = r.is_ok();
                    }
                    _ = tokio::time::sleep_until(due) => break,
                }
            }
            if leadership.borrow().valid_term(Instant::now()) != Some(term) {
                return (End::NotLeader, st);
            }
            let started = Instant::now();
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return (End::Shutdown, st),
                _ = stepped_down(&mut watcher, term) => return (End::NotLeader, st),
                n = self.tick(&mut st, leadership) => n,
            };
            last_start = Some(started);
            retry_at = match next {
                Next::Poll => {
                    self.failures = 0;
                    None
                }
                Next::Backoff(retry_after) => {
                    let poll = self.settings.borrow().scaler.poll_interval;
                    let delay = self.backoff(poll, retry_after);
                    tracing::debug!(
                        delay_ms = delay.as_millis() as u64,
                        failures = self.failures,
                        "scaler backing off"
                    );
                    Some(Instant::now() + delay)
                }
            };
        }
    }

    /// base · 2ⁿ from the poll interval, ±20 % jitter, capped; never before
    /// `retry_after`.
    fn backoff(&mut self, poll: Duration, retry_after: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(10);
        let cap = MAX_BACKOFF.max(poll);
        let raw = poll.saturating_mul(1u32 << exp).min(cap);
        let jittered = crate::retry::jitter(raw).min(cap);
        jittered.max(retry_after.unwrap_or_default())
    }

    /// One poll. Never fails: errors are logged and turned into a backoff.
    async fn tick(&mut self, st: &mut TermState, leadership: &watch::Receiver<Leadership>) -> Next {
        let settings = self.settings.borrow().clone();
        let group = settings.agent_group.as_str();
        let mut report = Report::default();
        let mut next = Next::Poll;
        let at = SystemTime::now();
        if settings.scaler.enabled {
            match self.poll_demand(&settings).await {
                Ok(m) => {
                    report.demand = Some(m);
                    match self.asg.group(group).await {
                        Ok(Some(sizes)) => {
                            self.quiet.group.recovered("DescribeAutoScalingGroups");
                            if let Some(tx) = &self.members {
                                tx.send_if_modified(|cur| {
                                    let changed = *cur != sizes.in_service;
                                    if changed {
                                        cur.clone_from(&sizes.in_service);
                                    }
                                    changed
                                });
                            }
                            if !self
                                .scale(st, leadership, &settings, &m, &sizes, &mut report)
                                .await
                            {
                                next = Next::Backoff(None);
                            }
                        }
                        Ok(None) => {
                            report.skipped =
                                Some(format!("Auto Scaling group {group} does not exist"));
                            self.quiet.group.error(
                                "DescribeAutoScalingGroups",
                                "not found",
                                format_args!(
                                    "Auto Scaling group {group} does not exist; fix: agent_group in {} must name the agents' group",
                                    settings.config_parameter
                                ),
                            );
                            next = Next::Backoff(None);
                        }
                        Err(e) => {
                            self.quiet.group.error(
                                "DescribeAutoScalingGroups",
                                &e.to_string(),
                                format_args!("cannot read Auto Scaling group {group}: {e}"),
                            );
                            report.skipped =
                                Some(format!("cannot read Auto Scaling group {group}: {e}"));
                            next = Next::Backoff(None);
                        }
                    }
                }
                Err((n, reason)) => {
                    report.skipped = Some(reason);
                    next = n;
                }
            }
        } else {
            report.skipped = Some("dynamic scaling is off (scaler.enabled is false)".into());
        }
        if let Some(tx) = &self.decisions {
            tx.send_replace(Some(report.decision(at)));
        }
        self.keep_suspended(st, leadership, group).await;
        // Publish on a term's first poll, on every scale-up, and otherwise once per
        // METRICS_EVERY: CloudWatch's standard resolution is a minute, and one
        // PutMetricData per 5 s poll would cost more than the scaler's instance.
        let due = st.last_metrics.is_none_or(|t| t.elapsed() >= METRICS_EVERY);
        if due || report.scale_ups > 0 {
            st.last_metrics = Some(Instant::now());
            if settings.launch_hook.is_some() {
                report.warm_pool = self.warm_pool_size(group).await;
            }
            self.publish(st.term, leadership, group, &report).await;
        }
        next
    }

    /// The Semaphore half of a poll, with the 401 → re-read → retry-once rule. The error
    /// is the loop's next step and a short reason for the decision.
    async fn poll_demand(&mut self, s: &Settings) -> Result<DemandMetrics, (Next, String)> {
        let https = !s.no_https;
        let (token, fresh) = match &self.token {
            Some(t) => (t.clone(), false),
            None => (self.fetch_token(s).await?, true),
        };
        let mut result = self.demand.metrics(&s.endpoint, https, &token).await;
        if !fresh
            && matches!(
                result,
                Err(DemandError::Unauthorized | DemandError::InvalidToken)
            )
        {
            tracing::info!(
                parameter = %s.token_parameter,
                "Semaphore refused the registration token; reading it again (it may have been rotated)"
            );
            let again = self.fetch_token(s).await?;
            if again != token {
                result = self.demand.metrics(&s.endpoint, https, &again).await;
            }
        }
        match result {
            Ok(m) => {
                self.quiet.demand.recovered("Semaphore metrics");
                Ok(m)
            }
            Err(e) => {
                let (next, key) = match &e {
                    DemandError::RateLimited { retry_after } => {
                        (Next::Backoff(*retry_after), "rate limited".to_string())
                    }
                    // A garbled answer is not a reason to poll less; it is a reason
                    // not to act on it.
                    DemandError::Malformed(detail) => (
                        Next::Poll,
                        format!(
                            "malformed: {}",
                            detail.split(" at line ").next().unwrap_or(detail)
                        ),
                    ),
                    other => (Next::Backoff(None), other.to_string()),
                };
                let endpoint = &s.endpoint;
                match &e {
                    DemandError::Unauthorized | DemandError::InvalidToken => self.quiet.demand.error(
                        "Semaphore metrics",
                        &key,
                        format_args!(
                            "{e} from {endpoint} with the token in SSM parameter {}; no scaling until it is fixed: store the agent type's registration token with `agent-fleet token set`",
                            s.token_parameter
                        ),
                    ),
                    _ => self.quiet.demand.error(
                        "Semaphore metrics",
                        &key,
                        format_args!("{e} (endpoint {endpoint}); no scaling action this poll"),
                    ),
                }
                Err((next, e.to_string()))
            }
        }
    }

    async fn fetch_token(&mut self, s: &Settings) -> Result<Token, (Next, String)> {
        match self.tokens.fetch().await {
            Ok(t) => {
                self.quiet.token.recovered("registration token");
                self.token = Some(t.clone());
                Ok(t)
            }
            Err(e) => {
                self.quiet.token.error(
                    "registration token",
                    &e.to_string(),
                    format_args!(
                        "{e}; no scaling until the scaler can read it (parameter {})",
                        s.token_parameter
                    ),
                );
                Err((Next::Backoff(None), e.to_string()))
            }
        }
    }

    /// Target and, if higher than desired, one `SetDesiredCapacity`. False when the
    /// call failed.
    async fn scale(
        &mut self,
        st: &mut TermState,
        leadership: &watch::Receiver<Leadership>,
        settings: &Settings,
        m: &DemandMetrics,
        g: &GroupSizes,
        report: &mut Report,
    ) -> bool {
        let group = g.name.as_str();
        let target = determine_target(m.jobs(), g.min, g.max, settings.scaler.overprovision);
        report.target = Some(target);
        report.desired_before = Some(g.desired);
        report.desired = Some(g.desired);
        if st.last_target != Some(target) {
            st.last_target = Some(target);
            st.raised_for_target = false;
        }
        let mut ok = true;
        let action = if target <= g.desired {
            "none"
        } else if st.raised_for_target {
            "already_requested"
        } else {
            match check(leadership, st.term) {
                None => "skipped_not_leader",
                Some(c) => {
                    tracing::info!(
                        action = "set_desired_capacity",
                        term = st.term,
                        group,
                        desired = target,
                        target,
                        check_mono_ns = c.check_mono_ns,
                        valid_until_mono_ns = c.valid_until_mono_ns,
                        "leader action"
                    );
                    match self.asg.set_desired_capacity(group, target).await {
                        Ok(()) => {
                            self.quiet.scale.recovered("SetDesiredCapacity");
                            st.raised_for_target = true;
                            report.desired = Some(target);
                            report.scale_ups += 1;
                            "set_desired_capacity"
                        }
                        Err(e) => {
                            self.quiet.scale.error(
                                "SetDesiredCapacity",
                                &e.to_string(),
                                format_args!("cannot raise {group} to {target}: {e}"),
                            );
                            report.failure = Some(format!("SetDesiredCapacity {target}: {e}"));
                            ok = false;
                            "failed"
                        }
                    }
                }
            }
        };
        report.action = Some(action);
        let logged = (m.jobs(), target, g.desired, action);
        if st.last_decision != Some(logged) {
            st.last_decision = Some(logged);
            tracing::info!(
                term = st.term,
                group,
                jobs = m.jobs(),
                queued = m.jobs.queued,
                running = m.jobs.running,
                min = g.min,
                max = g.max,
                target,
                desired = g.desired,
                action,
                "scaling decision"
            );
        }
        ok
    }

    /// `SuspendProcesses AZRebalance`, once per term (and again if the group changes).
    async fn keep_suspended(
        &mut self,
        st: &mut TermState,
        leadership: &watch::Receiver<Leadership>,
        group: &str,
    ) {
        if st.suspended.as_deref() == Some(group) {
            return;
        }
        let Some(c) = check(leadership, st.term) else {
            return;
        };
        tracing::info!(
            action = "suspend_processes",
            term = st.term,
            group,
            processes = %SUSPENDED_PROCESSES.join(","),
            check_mono_ns = c.check_mono_ns,
            valid_until_mono_ns = c.valid_until_mono_ns,
            "leader action"
        );
        match self.asg.suspend_processes(group, SUSPENDED_PROCESSES).await {
            Ok(()) => {
                self.quiet.suspend.recovered("SuspendProcesses");
                st.suspended = Some(group.to_string());
            }
            Err(e) => self.quiet.suspend.error(
                "SuspendProcesses",
                &e.to_string(),
                format_args!("cannot suspend AZRebalance on {group} (it would terminate instances mid-job to balance zones): {e}"),
            ),
        }
    }

    /// The warm pool's size for the metric (a read: no lease check needed); `None`, logged
    /// once, when it cannot be read.
    async fn warm_pool_size(&mut self, group: &str) -> Option<usize> {
        match self.asg.warm_pool(group).await {
            Ok(pool) => {
                self.quiet.warm_pool.recovered("DescribeWarmPool");
                let pool = pool?;
                tracing::debug!(
                    group,
                    size = pool.instances.len(),
                    pool_state = pool.pool_state.as_deref().unwrap_or("unknown"),
                    "warm pool"
                );
                Some(pool.instances.len())
            }
            Err(e) => {
                self.quiet.warm_pool.error(
                    "DescribeWarmPool",
                    &e.to_string(),
                    format_args!("cannot read the warm pool of {group} (scaling goes on): {e}"),
                );
                None
            }
        }
    }

    async fn publish(
        &mut self,
        term: u64,
        leadership: &watch::Receiver<Leadership>,
        group: &str,
        report: &Report,
    ) {
        let data = report.data(&self.stack_name, term);
        let Some(c) = check(leadership, term) else {
            return;
        };
        tracing::info!(
            action = "put_metric_data",
            term,
            group,
            target = report.target,
            desired = report.desired,
            check_mono_ns = c.check_mono_ns,
            valid_until_mono_ns = c.valid_until_mono_ns,
            "leader action"
        );
        match self
            .sink
            .put(crate::aws::cloudwatch::NAMESPACE, &data)
            .await
        {
            Ok(()) => self.quiet.metrics.recovered("PutMetricData"),
            Err(e) => {
                let key = match &e {
                    CloudWatchError::Service { status, code, .. } => format!("{status} {code}"),
                    other => other.to_string(),
                };
                self.quiet.metrics.error(
                    "PutMetricData",
                    &key,
                    format_args!("cannot publish the scaler's metrics (scaling goes on): {e}"),
                );
            }
        }
    }
}

impl Report {
    /// The poll's outcome for operators (see [`Decision`] for the actions).
    fn decision(&self, at: SystemTime) -> Decision {
        let (action, reason) = match (&self.skipped, self.action) {
            (Some(why), _) => ("skipped", Some(why.clone())),
            (None, Some("set_desired_capacity")) => ("raised", None),
            (None, Some("none")) => ("held", None),
            (None, Some("already_requested")) => (
                "held",
                Some(format!(
                    "already asked for {} this term; the group has not caught up",
                    self.target.unwrap_or_default()
                )),
            ),
            (None, Some("skipped_not_leader")) => {
                ("skipped", Some("leadership lapsed before the raise".into()))
            }
            (None, Some(_)) => ("failed", self.failure.clone()),
            (None, None) => ("skipped", None),
        };
        let mut d = Decision {
            queued: self.demand.map(|m| u64::from(m.jobs.queued)),
            running: self.demand.map(|m| u64::from(m.jobs.running)),
            target: self.target,
            desired_before: self.desired_before,
            desired_after: self.desired,
            ..Decision::new(at, action)
        };
        if let Some(reason) = reason {
            d.set_reason(reason);
        }
        d
    }

    fn data(&self, stack: &str, term: u64) -> Vec<Datum> {
        let datum = |metric, dims: &[(&'static str, &str)], value: f64, unit| Datum {
            metric,
            dimensions: std::iter::once(("StackName", stack.to_string()))
                .chain(dims.iter().map(|(k, v)| (*k, v.to_string())))
                .collect(),
            value,
            unit,
        };
        let mut data = Vec::with_capacity(8);
        if let Some(m) = &self.demand {
            for (state, n) in [("queued", m.jobs.queued), ("running", m.jobs.running)] {
                data.push(datum(
                    "JobCount",
                    &[("JobState", state)],
                    f64::from(n),
                    Unit::Count,
                ));
            }
            for (state, n) in [("idle", m.agents.idle), ("occupied", m.agents.occupied)] {
                data.push(datum(
                    "AgentCount",
                    &[("AgentState", state)],
                    f64::from(n),
                    Unit::Count,
                ));
            }
        }
        // Terms are small integers; f64 holds them exactly far beyond any fleet's life.
        data.push(datum("LeaderTerm", &[], term as f64, Unit::None));
        if let Some(t) = self.target {
            data.push(datum("ScalingTarget", &[], f64::from(t), Unit::Count));
        }
        if let Some(d) = self.desired {
            data.push(datum("DesiredCapacity", &[], f64::from(d), Unit::Count));
        }
        data.push(datum(
            "ScaleUps",
            &[],
            f64::from(self.scale_ups),
            Unit::Count,
        ));
        if let Some(n) = self.warm_pool {
            data.push(datum("WarmPoolSize", &[], n as f64, Unit::Count));
        }
        data
    }
}

/// Whether `l` names this process leader of `term` (validity aside).
fn leads(l: &Leadership, term: u64) -> bool {
    matches!(l, Leadership::Leader { term: t, .. } if *t == term)
}

/// The next term this process validly leads; `None` when the channel closed.
async fn next_term(rx: &mut watch::Receiver<Leadership>) -> Option<u64> {
    loop {
        let valid = rx.borrow_and_update().valid_term(Instant::now());
        if let Some(term) = valid {
            return Some(term);
        }
        rx.changed().await.ok()?;
    }
}

/// [`next_term`] for the leader's side tasks (the cap, the host keys): `None` on
/// `shutdown` too.
async fn lead_or_stop(
    rx: &mut watch::Receiver<Leadership>,
    shutdown: &CancellationToken,
) -> Option<u64> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        t = next_term(rx) => t,
    }
}

/// Resolves when the watched leadership is no longer `term` (or the channel closed).
async fn stepped_down(rx: &mut watch::Receiver<Leadership>, term: u64) {
    loop {
        let still = leads(&rx.borrow_and_update(), term);
        if !still || rx.changed().await.is_err() {
            return;
        }
    }
}

/// A passed validity check, on CLOCK_MONOTONIC.
#[derive(Debug, Clone, Copy)]
struct Check {
    check_mono_ns: u64,
    valid_until_mono_ns: u64,
}

/// The check before every side effect: leader of `term`, lease not yet expired.
fn check(leadership: &watch::Receiver<Leadership>, term: u64) -> Option<Check> {
    let now = Instant::now();
    let l = leadership.borrow();
    if l.valid_term(now) != Some(term) {
        return None;
    }
    let Leadership::Leader { valid_until, .. } = &*l else {
        return None;
    };
    Some(Check {
        check_mono_ns: crate::election::mono_ns(now),
        valid_until_mono_ns: crate::election::mono_ns(*valid_until),
    })
}

/// One error line per distinct failure, per kind of call.
#[derive(Debug, Default)]
struct Quiet {
    demand: Repeats,
    token: Repeats,
    group: Repeats,
    scale: Repeats,
    suspend: Repeats,
    metrics: Repeats,
    warm_pool: Repeats,
}

#[derive(Debug, Default)]
struct Repeats {
    /// The failure last logged, and when.
    last: Option<(String, Instant)>,
    /// Occurrences since that line.
    suppressed: u64,
}

impl Repeats {
    /// Logs at error level if `key` differs from the last failure or that line is
    /// [`REPEAT_ERROR_AFTER`] old; otherwise only counts it (and logs at debug).
    fn error(&mut self, call: &'static str, key: &str, message: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        let repeat = matches!(&self.last, Some((k, at)) if k == key && now.duration_since(*at) < REPEAT_ERROR_AFTER);
        if repeat {
            self.suppressed += 1;
            tracing::debug!(call, "{message}");
            return;
        }
        if self.suppressed > 0 {
            tracing::error!(call, repeats = self.suppressed + 1, "{message}");
        } else {
            tracing::error!(call, "{message}");
        }
        self.last = Some((key.to_string(), now));
        self.suppressed = 0;
    }

    fn recovered(&mut self, call: &'static str) {
        if self.last.take().is_some() {
            tracing::info!(call, "{call} works again");
            self.suppressed = 0;
        }
    }
}
