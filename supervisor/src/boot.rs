//! Boot timing, once per instance: how long each step from the instance's launch to its
//! agent's first job took, as a log line and as CloudWatch metrics.
//!
//! | phase (`Phase` dimension, log field `<phase>_ms`) | from → to |
//! |---|---|
//! | `launch_to_start` | instance launch (IMDS identity document `pendingTime`, whole seconds) → supervisor process start |
//! | `start_to_config` | supervisor start → runtime config read (IMDS + SSM) |
//! | `config_to_token` | config read → registration token read (SSM) |
//! | `token_to_spawn` | token read → agent process spawned (`config.yaml` written) |
//! | `spawn_to_registered` | spawned → agent registered (its "Starting to poll for jobs" line) |
//! | `registered_to_job` | registered → first job handed to the agent (its "SYNC response (action: run-job" line) |
//! | `launch_to_registered`, `launch_to_job` | totals from the launch |
//!
//! Every line and datum also says how the instance started (log field `start`, dimension
//! `Start`): `warm` when it was taken from the warm pool, `cold` otherwise (see
//! [`crate::pool`]). For an instance that waited in a running pool the supervisor's start
//! is when it was taken into service.
//!
//! The line `boot timing` is logged twice: with `boot_stage=registered` when the agent
//! registered (what is known then; an agent may never get a job), and with
//! `boot_stage=first_job` with every phase. Each phase is published once, as metric
//! `BootPhaseMs` (namespace `Semaphore`, dimensions `StackName` and `Phase`, unit
//! Milliseconds) — best effort, in the background. Only the instance's first agent run
//! counts, and a file `boot-timing` in the work dir keeps a restarted supervisor from
//! reporting the same instance again.
//!
//! `launch_to_start` compares the instance's wall clock with EC2's; it is left out when
//! the launch time is unknown or after the start (clock skew).

use crate::aws::cloudwatch::{Datum, MetricsSink, Unit};
use crate::pool::StartKind;
use std::time::{Duration, Instant, SystemTime};

/// The CloudWatch metric.
pub const METRIC: &str = "BootPhaseMs";
/// The marker in the work dir: boot timing was reported on this instance.
pub const MARKER: &str = "boot-timing";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    LaunchToStart,
    StartToConfig,
    ConfigToToken,
    TokenToSpawn,
    SpawnToRegistered,
    RegisteredToJob,
    LaunchToRegistered,
    LaunchToJob,
}

impl Phase {
    /// The `Phase` dimension value; the log field is this plus `_ms`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LaunchToStart => "launch_to_start",
            Self::StartToConfig => "start_to_config",
            Self::ConfigToToken => "config_to_token",
            Self::TokenToSpawn => "token_to_spawn",
            Self::SpawnToRegistered => "spawn_to_registered",
            Self::RegisteredToJob => "registered_to_job",
            Self::LaunchToRegistered => "launch_to_registered",
            Self::LaunchToJob => "launch_to_job",
        }
    }
}

/// How far the boot got when it is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Registered,
    FirstJob,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::FirstJob => "first_job",
        }
    }

    /// The phases first known at this stage (each is published once, at its stage).
    fn new_phases(self) -> &'static [Phase] {
        use Phase::*;
        match self {
            Self::Registered => &[
                LaunchToStart,
                StartToConfig,
                ConfigToToken,
                TokenToSpawn,
                SpawnToRegistered,
                LaunchToRegistered,
            ],
            Self::FirstJob => &[RegisteredToJob, LaunchToJob],
        }
    }
}

/// The supervisor's start, taken first thing in `main`.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    pub at: Instant,
    pub wall: SystemTime,
}

impl Start {
    pub fn now() -> Self {
        Self {
            at: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

/// The milestones of one instance's boot. All but the launch are on the monotonic clock.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// EC2's `pendingTime`, if IMDS told it.
    pub launched: Option<SystemTime>,
    pub start: Start,
    pub config_read: Instant,
    pub token_read: Instant,
    pub spawned: Instant,
    pub registered: Option<Instant>,
    pub first_job: Option<Instant>,
    /// Warm (from the pool) or cold.
    pub kind: StartKind,
}

impl Timeline {
    fn launch_to_start(&self) -> Option<Duration> {
        self.start.wall.duration_since(self.launched?).ok()
    }

    fn since_launch(&self, t: Instant) -> Option<Duration> {
        Some(self.launch_to_start()? + t.saturating_duration_since(self.start.at))
    }

    /// One phase's length, if both of its ends are known.
    pub fn phase(&self, p: Phase) -> Option<Duration> {
        use Phase::*;
        match p {
            LaunchToStart => self.launch_to_start(),
            StartToConfig => Some(self.config_read.saturating_duration_since(self.start.at)),
            ConfigToToken => Some(self.token_read.saturating_duration_since(self.config_read)),
            TokenToSpawn => Some(self.spawned.saturating_duration_since(self.token_read)),
            SpawnToRegistered => Some(self.registered?.saturating_duration_since(self.spawned)),
            RegisteredToJob => Some(self.first_job?.saturating_duration_since(self.registered?)),
            LaunchToRegistered => self.since_launch(self.registered?),
            LaunchToJob => self.since_launch(self.first_job?),
        }
    }

    fn ms(&self, p: Phase) -> Option<u64> {
        self.phase(p).map(|d| d.as_millis() as u64)
    }

    /// The `boot timing` line for `stage`: every phase known, in milliseconds.
    pub fn log(&self, stage: Stage) {
        use Phase::*;
        tracing::info!(
            boot_stage = stage.as_str(),
            start = self.kind.as_str(),
            launch_to_start_ms = self.ms(LaunchToStart),
            start_to_config_ms = self.ms(StartToConfig),
            config_to_token_ms = self.ms(ConfigToToken),
            token_to_spawn_ms = self.ms(TokenToSpawn),
            spawn_to_registered_ms = self.ms(SpawnToRegistered),
            registered_to_job_ms = self.ms(RegisteredToJob),
            launch_to_registered_ms = self.ms(LaunchToRegistered),
            launch_to_job_ms = self.ms(LaunchToJob),
            "boot timing"
        );
    }

    /// The metrics first known at `stage`.
    pub fn data(&self, stage: Stage, stack: &str) -> Vec<Datum> {
        stage
            .new_phases()
            .iter()
            .filter_map(|p| {
                Some(Datum {
                    metric: METRIC,
                    dimensions: vec![
                        ("StackName", stack.to_string()),
                        ("Phase", p.as_str().to_string()),
                        ("Start", self.kind.as_str().to_string()),
                    ],
                    value: self.ms(*p)? as f64,
                    unit: Unit::Milliseconds,
                })
            })
            .collect()
    }

    /// `name=ms` lines, for the marker file.
    pub fn summary(&self) -> String {
        use Phase::*;
        [
            LaunchToStart,
            StartToConfig,
            ConfigToToken,
            TokenToSpawn,
            SpawnToRegistered,
            RegisteredToJob,
            LaunchToRegistered,
            LaunchToJob,
        ]
        .iter()
        .filter_map(|p| Some(format!("{}_ms={}\n", p.as_str(), self.ms(*p)?)))
        .collect()
    }
}

/// Publishes `data` once; failures are logged. Never awaited by the agent's path.
pub async fn publish<M: MetricsSink>(sink: &M, data: Vec<Datum>) {
    if data.is_empty() {
        return;
    }
    match sink.put(crate::aws::cloudwatch::NAMESPACE, &data).await {
        Ok(()) => tracing::debug!(metrics = data.len(), "boot timing published"),
        Err(e) => tracing::warn!(error = %e, "could not publish the boot timing to CloudWatch"),
    }
}

/// The boot timing of this instance's first agent run, as the agent owner sees it
/// progress (see [`crate::agent::owner`]).
pub struct Report {
    /// `None` once reported, given up, or reported by an earlier supervisor.
    pending: Option<Pending>,
}

struct Pending {
    start: Start,
    config_read: Instant,
    token_read: Instant,
    timeline: Option<Timeline>,
    /// The launch time from IMDS, fetched in the background.
    launch: Option<crate::AbortOnDrop<Option<SystemTime>>>,
    marker: std::path::PathBuf,
    stack: String,
    sdk: aws_config::SdkConfig,
    /// Publish `BootPhaseMs` (else the journal alone has the figures).
    publish: bool,
    kind: StartKind,
}

impl Report {
    /// Nothing to report: the marker says an earlier supervisor did (or, in tests, no
    /// report is wanted).
    pub fn none() -> Self {
        Self { pending: None }
    }

    /// Reports unless `marker` exists (an earlier supervisor on this instance reported).
    pub fn new<M: crate::aws::imds::Metadata + 'static>(
        marker: std::path::PathBuf,
        stack: &str,
        sdk: &aws_config::SdkConfig,
        imds: M,
        (start, config_read, token_read): (Start, Instant, Instant),
    ) -> Self {
        if marker.exists() {
            tracing::debug!("boot timing already reported on this instance");
            return Self::none();
        }
        use tracing::Instrument;
        // One attempt, quietly: IMDS answered a moment ago, and this is only for a metric.
        let launch = tokio::spawn(
            async move {
                match crate::aws::imds::launch_time(&imds, 1, Duration::from_millis(200)).await {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::debug!(error = %e, "launch time unknown: the boot timing leaves out the phases from the launch");
                        None
                    }
                }
            }
            .in_current_span(),
        );
        Self {
            pending: Some(Pending {
                start,
                config_read,
                token_read,
                timeline: None,
                launch: Some(crate::AbortOnDrop(launch)),
                marker,
                stack: stack.to_string(),
                sdk: sdk.clone(),
                publish: true,
                kind: StartKind::Cold,
            }),
        }
    }

    /// Whether to publish the metric: an agent instance of a fleet its scaler instance
    /// leads has no `cloudwatch:PutMetricData` (a job, root on its VM, could use it), so
    /// its boot timing stays in the journal.
    pub fn metrics(mut self, publish: bool) -> Self {
        if let Some(p) = self.pending.as_mut() {
            p.publish = publish;
        }
        self
    }

    /// How the instance started (default cold).
    pub fn start_kind(mut self, kind: StartKind) -> Self {
        if let Some(p) = self.pending.as_mut() {
            p.kind = kind;
        }
        self
    }

    /// The first agent was spawned at `at`.
    pub fn spawned(&mut self, at: Instant) {
        if let Some(p) = self.pending.as_mut() {
            p.timeline = Some(Timeline {
                launched: None,
                start: p.start,
                config_read: p.config_read,
                token_read: p.token_read,
                spawned: at,
                registered: None,
                first_job: None,
                kind: p.kind,
            });
        }
    }

    /// Only the first agent run counts.
    pub fn give_up(&mut self) {
        self.pending = None;
    }

    /// Logs and publishes what the agent's progress completes. Never waits on the network.
    pub async fn progress(&mut self, progress: &crate::agent::Progress) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        let Some(t) = p.timeline.as_mut() else {
            return;
        };
        let mut stages = vec![];
        if t.registered.is_none() {
            if let Some(at) = progress.registered_at {
                t.registered = Some(at);
                stages.push(Stage::Registered);
            }
        }
        if t.registered.is_some() && t.first_job.is_none() {
            if let Some(at) = progress.first_job_at {
                t.first_job = Some(at);
                stages.push(Stage::FirstJob);
            }
        }
        if stages.is_empty() {
            return;
        }
        if t.launched.is_none() {
            // Long done by now (one local IMDS call); if not, do without it.
            if let Some(mut task) = p.launch.take().filter(|task| task.0.is_finished()) {
                t.launched = (&mut task.0).await.ok().flatten();
            }
        }
        let mut data = vec![];
        for stage in stages {
            t.log(stage);
            data.extend(t.data(stage, &p.stack));
        }
        if let Err(e) = std::fs::write(&p.marker, t.summary()) {
            tracing::warn!(path = %p.marker.display(), error = %e, "cannot write the boot timing marker");
        }
        let finished = t.first_job.is_some();
        let sdk = p.sdk.clone();
        use tracing::Instrument;
        if !p.publish {
            tracing::debug!("boot timing not published: this agent's role has no PutMetricData (the scaler instance leads)");
        } else {
            tokio::spawn(
            async move {
                match crate::aws::cloudwatch::QueryCloudWatch::new(&sdk) {
                    Ok(cw) => publish(&cw, data).await,
                    Err(e) => tracing::warn!(error = %e, "could not publish the boot timing to CloudWatch"),
                }
            }
            .in_current_span(),
        );
        }
        if finished {
            self.pending = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::cloudwatch::CloudWatchError;
    use std::sync::Mutex;

    fn timeline() -> Timeline {
        let at = Instant::now();
        let wall = SystemTime::now();
        let ms = Duration::from_millis;
        Timeline {
            launched: Some(wall - Duration::from_secs(31)),
            start: Start { at, wall },
            config_read: at + ms(40),
            token_read: at + ms(55),
            spawned: at + ms(60),
            registered: Some(at + ms(1_060)),
            first_job: None,
            kind: StartKind::Cold,
        }
    }

    #[test]
    fn phases_are_differences_of_neighbouring_milestones() {
        let mut t = timeline();
        let ms = |p| t.phase(p).map(|d: Duration| d.as_millis());
        assert_eq!(ms(Phase::LaunchToStart), Some(31_000));
        assert_eq!(ms(Phase::StartToConfig), Some(40));
        assert_eq!(ms(Phase::ConfigToToken), Some(15));
        assert_eq!(ms(Phase::TokenToSpawn), Some(5));
        assert_eq!(ms(Phase::SpawnToRegistered), Some(1_000));
        assert_eq!(ms(Phase::LaunchToRegistered), Some(32_060));
        assert_eq!(ms(Phase::RegisteredToJob), None);
        assert_eq!(ms(Phase::LaunchToJob), None);

        t.first_job = t.registered.map(|r| r + Duration::from_millis(2_500));
        assert_eq!(
            t.phase(Phase::RegisteredToJob),
            Some(Duration::from_millis(2_500))
        );
        assert_eq!(
            t.phase(Phase::LaunchToJob),
            Some(Duration::from_millis(34_560))
        );
        // The phases add up to the total.
        let sum: Duration = [
            Phase::LaunchToStart,
            Phase::StartToConfig,
            Phase::ConfigToToken,
            Phase::TokenToSpawn,
            Phase::SpawnToRegistered,
            Phase::RegisteredToJob,
        ]
        .iter()
        .filter_map(|p| t.phase(*p))
        .sum();
        assert_eq!(Some(sum), t.phase(Phase::LaunchToJob));
    }

    #[test]
    fn unknown_or_skewed_launch_leaves_out_only_what_depends_on_it() {
        let mut t = timeline();
        t.launched = None;
        assert_eq!(t.phase(Phase::LaunchToStart), None);
        assert_eq!(t.phase(Phase::LaunchToRegistered), None);
        assert_eq!(
            t.phase(Phase::SpawnToRegistered),
            Some(Duration::from_secs(1))
        );
        // EC2 says the launch came after our start: the clocks disagree, no figure.
        t.launched = Some(t.start.wall + Duration::from_secs(2));
        assert_eq!(t.phase(Phase::LaunchToStart), None);
        assert!(!t.summary().contains("launch_to"));
        assert!(t.summary().contains("spawn_to_registered_ms=1000\n"));
    }

    #[test]
    fn each_phase_is_published_at_one_stage() {
        let mut t = timeline();
        t.first_job = t.registered.map(|r| r + Duration::from_millis(2_500));
        let names = |stage| {
            t.data(stage, "ci")
                .iter()
                .map(|d| {
                    assert_eq!(d.metric, METRIC);
                    assert_eq!(d.unit, Unit::Milliseconds);
                    assert_eq!(d.dimensions[0], ("StackName", "ci".to_string()));
                    d.dimensions[1].1.clone()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(Stage::Registered),
            [
                "launch_to_start",
                "start_to_config",
                "config_to_token",
                "token_to_spawn",
                "spawn_to_registered",
                "launch_to_registered"
            ]
        );
        assert_eq!(
            names(Stage::FirstJob),
            ["registered_to_job", "launch_to_job"]
        );
        let job = t.data(Stage::FirstJob, "ci");
        assert_eq!(job[0].value, 2_500.0);
    }

    #[test]
    fn every_datum_says_how_the_instance_started() {
        let mut t = timeline();
        let starts = |t: &Timeline| {
            t.data(Stage::Registered, "ci")
                .iter()
                .map(|d| d.dimensions[2].clone())
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(
            starts(&t).into_iter().collect::<Vec<_>>(),
            [("Start", "cold".to_string())]
        );
        t.kind = StartKind::Warm;
        assert_eq!(
            starts(&t).into_iter().collect::<Vec<_>>(),
            [("Start", "warm".to_string())]
        );
    }

    struct Sink(Mutex<Vec<(String, usize)>>);

    impl MetricsSink for Sink {
        async fn put(&self, namespace: &str, data: &[Datum]) -> Result<(), CloudWatchError> {
            self.0
                .lock()
                .expect("lock")
                .push((namespace.to_string(), data.len()));
            Ok(())
        }
    }

    #[tokio::test]
    async fn publishes_in_the_semaphore_namespace_and_skips_nothing_to_say() {
        let sink = Sink(Mutex::new(vec![]));
        let t = timeline();
        publish(&sink, t.data(Stage::Registered, "ci")).await;
        publish(&sink, t.data(Stage::FirstJob, "ci")).await; // no job yet: nothing
        assert_eq!(
            *sink.0.lock().expect("lock"),
            [("Semaphore".to_string(), 6)]
        );
    }
}
