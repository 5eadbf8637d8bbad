//! The coordinator with fake tasks (the test plays the agent owner and the interruption
//! watcher on their channels), fake Auto Scaling, IMDS and leader, in paused time: every
//! row of the README's exit and interruption tables, and the orders that matter.

use super::*;
use crate::agent::owner::{AgentCommand, AgentEvent, Started};
use crate::agent::Progress;
use crate::aws::autoscaling::{AsgError, GroupSizes};
use crate::aws::imds::{ImdsError, IDENTITY_DOCUMENT};
use crate::aws::Retry;
use crate::config::LifecycleHook;
use crate::election::Leadership;
use crate::interrupt::SpotAction;
use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// What happened, in order, across the fakes (and the fake agent owner).
#[derive(Clone, Default)]
struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    fn push(&self, what: impl Into<String>) {
        self.0.lock().expect("lock").push(what.into());
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().expect("lock").clone()
    }
    fn count(&self, prefix: &str) -> usize {
        self.all().iter().filter(|e| e.starts_with(prefix)).count()
    }
    fn has(&self, prefix: &str) -> bool {
        self.count(prefix) > 0
    }
    /// Index of the first entry starting with `prefix`.
    fn at(&self, prefix: &str) -> usize {
        self.all()
            .iter()
            .position(|e| e.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {:?}", self.all()))
    }
}

#[derive(Clone, Default)]
struct FakeAsg {
    log: Journal,
    /// Answers to `TerminateInstanceInAutoScalingGroup`, in order (then Ok).
    terminate: Arc<Mutex<VecDeque<Result<(), AsgError>>>>,
    unhealthy_fails: bool,
    capacity_rebalance: bool,
}

fn refused() -> AsgError {
    AsgError::Validation {
        op: "TerminateInstanceInAutoScalingGroup",
        detail: "would violate min size".into(),
    }
}

fn throttled() -> AsgError {
    AsgError::Call {
        op: "TerminateInstanceInAutoScalingGroup",
        retry: Retry::Transient,
        detail: "Throttling".into(),
    }
}

impl AutoScaling for FakeAsg {
    async fn terminate_instance(&self, id: &str, decrement: bool) -> Result<(), AsgError> {
        self.log
            .push(format!("terminate {id} decrement={decrement}"));
        self.terminate
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or(Ok(()))
    }
    async fn set_unhealthy(&self, id: &str) -> Result<(), AsgError> {
        self.log.push(format!("unhealthy {id}"));
        match self.unhealthy_fails {
            true => Err(throttled()),
            false => Ok(()),
        }
    }
    async fn group_of(&self, _: &str) -> Result<Option<String>, AsgError> {
        Ok(Some("g".into()))
    }
    async fn group(&self, _: &str) -> Result<Option<GroupSizes>, AsgError> {
        Ok(None)
    }
    async fn set_desired_capacity(&self, _: &str, desired: i32) -> Result<(), AsgError> {
        self.log.push(format!("set desired {desired}"));
        Ok(())
    }
    async fn suspend_processes(&self, _: &str, _: &[&str]) -> Result<(), AsgError> {
        Ok(())
    }
}

impl LifecycleActions for FakeAsg {
    async fn capacity_rebalance(&self, _: &str) -> Result<Option<bool>, AsgError> {
        self.log.push("describe group");
        Ok(Some(self.capacity_rebalance))
    }
    async fn complete_lifecycle_action(
        &self,
        group: &str,
        hook: &str,
        _: &str,
        result: &str,
    ) -> Result<(), AsgError> {
        self.log.push(format!("complete {group} {hook} {result}"));
        Ok(())
    }
    async fn record_lifecycle_action_heartbeat(
        &self,
        _: &str,
        hook: &str,
        _: &str,
    ) -> Result<(), AsgError> {
        self.log.push(format!("heartbeat {hook}"));
        Ok(())
    }
}

/// IMDS with an identity document that says when the instance launched.
#[derive(Clone)]
struct FakeImds {
    launched: SystemTime,
}

impl Metadata for FakeImds {
    async fn get(&self, path: &str) -> Result<String, ImdsError> {
        use aws_smithy_types::date_time::{DateTime, Format};
        match path {
            IDENTITY_DOCUMENT => {
                let at = DateTime::from(self.launched)
                    .fmt(Format::DateTime)
                    .expect("formats");
                Ok(format!(r#"{{"instanceId":"i-test","pendingTime":"{at}"}}"#))
            }
            _ => Err(ImdsError::NotFound {
                path: path.to_string(),
            }),
        }
    }
}

/// Leader work that leads term 7 until handed on.
struct FakeLeader {
    log: Journal,
    leading: bool,
}

impl Leader for FakeLeader {
    async fn changed(&mut self) -> Leadership {
        std::future::pending().await
    }
    async fn hand_on(&mut self) {
        if std::mem::take(&mut self.leading) {
            self.log.push("leadership handed on");
        }
    }
    fn current(&self) -> Option<Leadership> {
        self.leading.then(|| Leadership::Leader {
            term: 7,
            valid_until: Instant::now(),
        })
    }
}

const ID: &str = "i-test";
const GRACE: Duration = Duration::from_secs(60);
const MARGIN: Duration = Duration::from_secs(14);

fn settings() -> Settings {
    let mut s = Settings::parse(
        "/agent-fleet/t/config",
        r#"{"endpoint":"org.semaphoreci.com","token_parameter":"/t/token","agent_group":"t-agents"}"#,
    )
    .expect("valid");
    s.interruption_grace = GRACE;
    s
}

fn with_hook(mut s: Settings, heartbeat_timeout: Duration) -> Settings {
    s.lifecycle_hook = Some(LifecycleHook {
        name: "agent-fleet-drain".into(),
        heartbeat_timeout,
    });
    s
}

/// A work dir of its own for each test.
fn work_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("coordinator-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work dir");
    dir
}

fn options(poweroff: Vec<String>, work_dir: std::path::PathBuf) -> RunOptions {
    RunOptions {
        role: None,
        agent_binary: "/nonexistent/agent".into(),
        agent_user: "nobody".into(),
        work_dir,
        agent_cgroup: None,
        agent_env: vec![],
        pass_env: vec![],
        poweroff_command: poweroff,
        terminate_timeout: Duration::from_secs(600),
        restart_backoff: Duration::from_secs(1),
        restart_backoff_cap: Duration::from_secs(300),
        drain_margin: MARGIN,
        imds_attempts: 1,
        aws_retry_backoff: Duration::from_millis(100),
        imds_firewall: false,
        nft: "nft".into(),
        isolation_script: "/nonexistent/apply-isolation".into(),
        docker: "/nonexistent/docker".into(),
        warm_docker_wait: Duration::ZERO,
        known_hosts_file: None,
        known_hosts_fallback: "/nonexistent/github_known_hosts".into(),
        cloud_init_log: "/nonexistent/cloud-init-output.log".into(),
    }
}

/// The test's side: the fake agent owner's and watcher's channel ends, the signals.
struct Bed {
    log: Journal,
    shutdown: Shutdown,
    commands: mpsc::UnboundedReceiver<AgentCommand>,
    events: mpsc::UnboundedSender<AgentEvent>,
    notices: mpsc::UnboundedSender<Notice>,
    settings: Settings,
    spot_metrics: Arc<AtomicU32>,
    runs: u64,
}

type Coord = Coordinator<FakeAsg, FakeImds, FakeLeader>;

struct Setup {
    settings: Settings,
    asg: FakeAsg,
    launched: SystemTime,
    poweroff: Vec<String>,
    work_dir: std::path::PathBuf,
}

impl Setup {
    fn new(settings: Settings) -> Self {
        Self {
            settings,
            asg: FakeAsg::default(),
            launched: SystemTime::now(),
            poweroff: vec![],
            work_dir: work_dir(),
        }
    }

    fn build(self) -> (Bed, Coord) {
        let log = self.asg.log.clone();
        let (agent, commands) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (notices_tx, notices) = mpsc::unbounded_channel();
        let (_settings_tx, settings_rx) = watch::channel(self.settings.clone());
        let spot_metrics = Arc::new(AtomicU32::new(0));
        let counted = spot_metrics.clone();
        let shutdown = Shutdown::default();
        let ports = Ports {
            asg: self.asg,
            imds: FakeImds {
                launched: self.launched,
            },
            leader: FakeLeader {
                log: log.clone(),
                leading: true,
            },
            spot_metric: Box::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
            }),
        };
        let ch = Channels {
            agent,
            events,
            notices,
            settings: settings_rx,
        };
        let coordinator = Coordinator::new(
            options(self.poweroff, self.work_dir),
            ID,
            SystemTime::now(),
            ports,
            ch,
            (shutdown.clone(), Notifier::disabled()),
        );
        // Keep the settings channel open for the coordinator's life.
        std::mem::forget(_settings_tx);
        let bed = Bed {
            log,
            shutdown,
            commands,
            events: events_tx,
            notices: notices_tx,
            settings: self.settings,
            spot_metrics,
            runs: 0,
        };
        (bed, coordinator)
    }
}

impl Bed {
    /// The next command to the agent owner (the journal records drains and kills).
    async fn command(&mut self) -> AgentCommand {
        let c = self.commands.recv().await.expect("the coordinator hung up");
        match &c {
            AgentCommand::Drain { within } => self.log.push(format!("drain {}", within.as_secs())),
            AgentCommand::Kill => self.log.push("kill"),
            AgentCommand::Start => self.log.push("start"),
        }
        c
    }

    /// Expects a start command and reports the agent started.
    async fn start(&mut self) {
        assert_eq!(self.command().await, AgentCommand::Start);
        self.runs += 1;
        self.send(AgentEvent::Started(Box::new(Started {
            name: format!("{ID}__{}", self.runs),
            pid: 100 + self.runs as u32,
            run: self.runs,
            grace: self.settings.interruption_grace,
            settings: self.settings.clone(),
        })));
    }

    fn send(&self, e: AgentEvent) {
        self.events.send(e).expect("coordinator listens");
    }

    fn notice(&self, n: Notice) {
        self.notices.send(n).expect("coordinator listens");
    }

    /// The agent registered and was handed a job.
    fn job(&self) {
        let now = std::time::Instant::now();
        self.send(AgentEvent::Progress(Progress {
            registered_at: Some(now),
            first_job_at: Some(now),
            jobs: 1,
            last_job: Some("job-1".into()),
        }));
    }

    fn exit(&self, reason: Option<ShutdownReason>, registered: bool, code: i32) {
        self.send(AgentEvent::Exited {
            exit: AgentExit {
                status: ExitStatus::from_raw(code << 8),
                registered,
                last_error: None,
            },
            reason,
        });
    }

    /// Waits (in paused time) until the journal has `prefix`.
    async fn until(&self, prefix: &str) {
        for _ in 0..10_000 {
            if self.log.has(prefix) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never saw {prefix:?}: {:?}", self.log.all());
    }

    /// Lets the coordinator run for `d` of paused time.
    async fn idle(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    /// Auto Scaling stops the instance: SIGTERM.
    fn sigterm(&self) {
        self.shutdown.drain.cancel();
    }
}

/// Runs the coordinator and the script side by side.
async fn play<F: std::future::Future<Output = ()>>(
    coordinator: Coord,
    script: impl FnOnce(Bed) -> F,
    bed: Bed,
) -> Result<(), DaemonError> {
    // Paused time with nothing left to wait for would hang: a day of it fails the test.
    let both = async { tokio::join!(coordinator.run(), script(bed)) };
    match tokio::time::timeout(Duration::from_secs(24 * 3600), both).await {
        Ok((result, ())) => result,
        Err(_) => panic!("the coordinator or the script stalled"),
    }
}

/// Plays `script` against a coordinator built from `setup`, which must end cleanly (exit
/// 0); returns what happened.
async fn journal_of<F: std::future::Future<Output = ()>>(
    setup: Setup,
    script: impl FnOnce(Bed) -> F,
) -> Journal {
    let (bed, c) = setup.build();
    let log = bed.log.clone();
    play(c, script, bed).await.expect("ends cleanly");
    log
}

fn spot_notice(in_secs: u64) -> Notice {
    use aws_smithy_types::date_time::{DateTime, Format};
    let at = SystemTime::now() + Duration::from_secs(in_secs);
    let text = DateTime::from(at).fmt(Format::DateTime).expect("formats");
    Notice::Spot(SpotAction::parse(&format!(
        r#"{{"action":"terminate","time":"{text}"}}"#
    )))
}

fn rebalance() -> Notice {
    Notice::Rebalance {
        notice_time: "2026-12-04T00:00:00Z".into(),
    }
}

// ---- the exit table ----

#[tokio::test(start_paused = true)]
async fn idle_terminates_with_decrement_then_hands_leadership_on() {
    let log = journal_of(Setup::new(settings()), |mut bed| async move {
        bed.start().await;
        bed.exit(Some(ShutdownReason::Idle), true, 0);
        bed.until("leadership handed on").await;
        bed.sigterm();
    })
    .await;
    assert_eq!(
        log.all(),
        [
            "start",
            "terminate i-test decrement=true",
            "leadership handed on"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn idle_at_min_size_restarts_the_agent_in_place() {
    let setup = Setup::new(settings());
    setup
        .asg
        .terminate
        .lock()
        .expect("lock")
        .push_back(Err(refused()));
    let log = journal_of(setup, |mut bed| async move {
        bed.start().await;
        bed.exit(Some(ShutdownReason::Idle), true, 0);
        // At once, and still the leader: nothing ended.
        bed.start().await;
        bed.sigterm();
        assert!(matches!(bed.command().await, AgentCommand::Drain { .. }));
        bed.exit(Some(ShutdownReason::Interrupted), true, 0);
    })
    .await;
    let all = log.all();
    assert_eq!(log.count("terminate"), 1, "{all:?}");
    assert!(!log.has("unhealthy"), "{all:?}");
    // The leader kept leading until the stop.
    assert!(log.at("start") < log.at("terminate"));
    assert_eq!(all[3], "leadership handed on", "{all:?}");
    assert_eq!(all[4], "drain 74", "{all:?}");
}

#[tokio::test(start_paused = true)]
async fn a_finished_job_a_disconnect_or_an_unknown_reason_replace_without_decrement() {
    for reason in [
        ShutdownReason::JobFinished,
        ShutdownReason::Requested,
        ShutdownReason::Unknown,
        // Not after our own drain: as requested.
        ShutdownReason::Interrupted,
    ] {
        let (bed, c) = Setup::new(settings()).build();
        let log = bed.log.clone();
        play(
            c,
            |mut bed| async move {
                bed.start().await;
                bed.job();
                bed.exit(Some(reason), true, 0);
                bed.until("leadership handed on").await;
                bed.sigterm();
            },
            bed,
        )
        .await
        .expect("ends cleanly");
        assert_eq!(
            log.all(),
            [
                "start",
                "terminate i-test decrement=false",
                "leadership handed on"
            ],
            "{reason:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_stop_signal_drains_and_interrupted_after_our_drain_ends_the_daemon() {
    let (bed, c) = Setup::new(settings()).build();
    let log = bed.log.clone();
    play(
        c,
        |mut bed| async move {
            bed.start().await;
            bed.job();
            bed.sigterm();
            // The grace the agent registered with, then the margin.
            assert_eq!(
                bed.command().await,
                AgentCommand::Drain {
                    within: GRACE + MARGIN
                }
            );
            bed.exit(Some(ShutdownReason::Interrupted), true, 0);
        },
        bed,
    )
    .await
    .expect("exit 0 after a drain");
    // No termination: systemd stopped us (a reboot, an upgrade), not the fleet.
    assert_eq!(log.all(), ["start", "leadership handed on", "drain 74"]);
}

#[tokio::test(start_paused = true)]
async fn a_second_signal_during_a_drain_kills_the_agent_and_aborts() {
    let (bed, c) = Setup::new(settings()).build();
    let log = bed.log.clone();
    let result = play(
        c,
        |mut bed| async move {
            bed.start().await;
            bed.job();
            bed.sigterm();
            assert!(matches!(bed.command().await, AgentCommand::Drain { .. }));
            bed.idle(Duration::from_secs(5)).await;
            bed.shutdown.abort.cancel();
            assert_eq!(bed.command().await, AgentCommand::Kill);
            bed.exit(None, true, 137);
        },
        bed,
    )
    .await;
    assert!(matches!(result, Err(DaemonError::Aborted)), "{result:?}");
    assert_eq!(
        log.all(),
        ["start", "leadership handed on", "drain 74", "kill"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_registration_failure_restarts_with_growing_backoff_and_never_replaces() {
    let log = journal_of(Setup::new(settings()), |mut bed| async move {
        let mut gaps = vec![];
        bed.start().await;
        for _ in 0..4 {
            bed.exit(None, false, 1);
            let t = Instant::now();
            bed.start().await;
            gaps.push(t.elapsed());
        }
        // 1 s doubling, ±20 % jitter.
        for (gap, base) in gaps.iter().zip([1.0, 2.0, 4.0, 8.0]) {
            let s = gap.as_secs_f64();
            assert!(s >= base * 0.79 && s <= base * 1.21, "{gaps:?}");
        }
        bed.sigterm();
        assert!(matches!(bed.command().await, AgentCommand::Drain { .. }));
        bed.exit(None, false, 137);
    })
    .await;
    assert!(!log.has("terminate"), "{:?}", log.all());
}

#[tokio::test(start_paused = true)]
async fn unable_to_sync_restarts_and_never_replaces() {
    let log = journal_of(Setup::new(settings()), |mut bed| async move {
        bed.start().await;
        for _ in 0..3 {
            bed.exit(Some(ShutdownReason::UnableToSync), true, 0);
            bed.start().await;
        }
        bed.sigterm();
        assert!(matches!(bed.command().await, AgentCommand::Drain { .. }));
        bed.exit(None, true, 0);
    })
    .await;
    assert_eq!(log.count("start"), 4);
    assert!(!log.has("terminate"), "{:?}", log.all());
}

#[tokio::test(start_paused = true)]
async fn five_crashes_in_a_row_after_registering_replace_the_instance() {
    let log = journal_of(Setup::new(settings()), |mut bed| async move {
        bed.start().await;
        for _ in 0..4 {
            bed.exit(None, true, 2);
            bed.start().await;
        }
        bed.exit(None, true, 2);
        bed.until("leadership handed on").await;
        bed.sigterm();
    })
    .await;
    assert_eq!(log.count("start"), 5);
    assert_eq!(
        log.all()[5..],
        ["terminate i-test decrement=false", "leadership handed on"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_terminate_that_auto_scaling_never_carries_out_powers_off() {
    let marker = std::env::temp_dir().join(format!("coordinator-poweroff-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let mut setup = Setup::new(settings());
    setup.poweroff = vec!["touch".into(), marker.display().to_string()];
    let (bed, c) = setup.build();
    let seen = marker.clone();
    play(
        c,
        |mut bed| async move {
            bed.start().await;
            bed.exit(Some(ShutdownReason::JobFinished), true, 0);
            bed.until("leadership handed on").await;
            // No SIGTERM within terminate_timeout (600 s).
            bed.idle(Duration::from_secs(590)).await;
            assert!(!seen.exists(), "powered off too early");
            for _ in 0..100 {
                if seen.exists() {
                    break;
                }
                bed.idle(Duration::from_secs(1)).await;
                tokio::task::yield_now().await;
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(seen.exists(), "not powered off after terminate_timeout");
            let _ = std::fs::remove_file(&seen);
            bed.sigterm();
        },
        bed,
    )
    .await
    .expect("ends cleanly");
}

#[tokio::test(start_paused = true)]
async fn a_terminate_that_fails_falls_back_to_unhealthy() {
    let setup = Setup::new(settings());
    for _ in 0..crate::lifecycle::TERMINATE_ATTEMPTS {
        setup
            .asg
            .terminate
            .lock()
            .expect("lock")
            .push_back(Err(throttled()));
    }
    let log = journal_of(setup, |mut bed| async move {
        bed.start().await;
        bed.exit(Some(ShutdownReason::JobFinished), true, 0);
        bed.until("leadership handed on").await;
        bed.sigterm();
    })
    .await;
    assert_eq!(
        log.count("terminate"),
        crate::lifecycle::TERMINATE_ATTEMPTS as usize
    );
    assert_eq!(log.at("unhealthy") + 1, log.at("leadership handed on"));
}

// ---- the interruption table ----

#[tokio::test(start_paused = true)]
async fn a_spot_notice_drains_at_once_within_the_notice_and_replaces_without_decrement() {
    let (bed, c) = Setup::new(settings()).build();
    let log = bed.log.clone();
    let metrics = bed.spot_metrics.clone();
    play(
        c,
        |mut bed| async move {
            bed.start().await;
            bed.job();
            // A notice with 80 s left: the 74 s drain is cut to end 10 s before it.
            bed.notice(spot_notice(80));
            match bed.command().await {
                AgentCommand::Drain { within } => {
                    assert!(within <= Duration::from_secs(70), "{within:?}");
                    assert!(within >= Duration::from_secs(68), "{within:?}");
                }
                other => panic!("{other:?}"),
            }
            bed.exit(Some(ShutdownReason::Interrupted), true, 0);
            bed.until("terminate").await;
            bed.sigterm();
        },
        bed,
    )
    .await
    .expect("ends cleanly");
    assert_eq!(metrics.load(Ordering::SeqCst), 1);
    let all = log.all();
    assert_eq!(all[0], "start");
    assert_eq!(all[1], "leadership handed on");
    assert!(all[2].starts_with("drain "), "{all:?}");
    assert_eq!(all[3..], ["terminate i-test decrement=false"]);
}

#[tokio::test(start_paused = true)]
async fn a_rebalance_recommendation_drains_an_idle_agent_and_replaces_the_instance() {
    let log = journal_of(Setup::new(settings()), |mut bed| async move {
        bed.start().await;
        bed.notice(rebalance());
        assert_eq!(
            bed.command().await,
            AgentCommand::Drain {
                within: GRACE + MARGIN
            }
        );
        bed.exit(Some(ShutdownReason::Interrupted), true, 0);
        bed.until("terminate").await;
        bed.sigterm();
    })
    .await;
    assert_eq!(
        log.all(),
        [
            "start",
            "describe group",
            "leadership handed on",
            "drain 74",
            "terminate i-test decrement=false"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_rebalance_recommendation_waits_for_a_busy_agents_job() {
    let log = journal_of(Setup::new(settings()), |mut bed| async move {
        bed.start().await;
        bed.job();
        bed.notice(rebalance());
        bed.idle(Duration::from_secs(300)).await;
        assert!(bed.commands.try_recv().is_err(), "the job was disturbed");
        // The agent ends in a way that would restart it: it is replaced instead.
        bed.exit(Some(ShutdownReason::UnableToSync), true, 0);
        bed.until("leadership handed on").await;
        bed.sigterm();
    })
    .await;
    assert_eq!(
        log.all(),
        [
            "start",
            "describe group",
            "terminate i-test decrement=false",
            "leadership handed on"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn with_capacity_rebalancing_a_rebalance_is_left_to_auto_scaling() {
    let mut setup = Setup::new(settings());
    setup.asg.capacity_rebalance = true;
    let log = journal_of(setup, |mut bed| async move {
        bed.start().await;
        bed.notice(rebalance());
        bed.idle(Duration::from_secs(120)).await;
        assert!(bed.commands.try_recv().is_err(), "the agent was disturbed");
        // The agent goes on as if nothing happened: idle → decrement.
        bed.exit(Some(ShutdownReason::Idle), true, 0);
        bed.until("leadership handed on").await;
        bed.sigterm();
    })
    .await;
    assert_eq!(
        log.all(),
        [
            "start",
            "describe group",
            "terminate i-test decrement=true",
            "leadership handed on"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn auto_scalings_termination_hands_leadership_on_then_drains_then_completes() {
    let log = journal_of(
        Setup::new(with_hook(settings(), Duration::from_secs(600))),
        |mut bed| async move {
            bed.start().await;
            bed.notice(Notice::Terminating);
            assert!(matches!(bed.command().await, AgentCommand::Drain { .. }));
            bed.exit(Some(ShutdownReason::Interrupted), true, 0);
            bed.until("complete").await;
            bed.sigterm();
        },
    )
    .await;
    // Auto Scaling terminates the instance already: no terminate call of our own.
    assert_eq!(
        log.all(),
        [
            "start",
            "leadership handed on",
            "drain 74",
            "complete t-agents agent-fleet-drain CONTINUE"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn auto_scalings_termination_of_a_busy_instance_holds_it_with_heartbeats() {
    let log = journal_of(
        Setup::new(with_hook(settings(), Duration::from_secs(30))),
        |mut bed| async move {
            bed.start().await;
            bed.job();
            bed.notice(Notice::Terminating);
            // The job runs 35 s more; heartbeats every 10 s (a third of the timeout).
            bed.idle(Duration::from_secs(35)).await;
            assert!(bed.commands.try_recv().is_err(), "the job was disturbed");
            bed.exit(Some(ShutdownReason::JobFinished), true, 0);
            bed.until("complete").await;
            bed.sigterm();
        },
    )
    .await;
    let all = log.all();
    assert_eq!(all[..2], ["start", "leadership handed on"], "{all:?}");
    assert_eq!(log.count("heartbeat agent-fleet-drain"), 3, "{all:?}");
    assert_eq!(
        all.last().map(String::as_str),
        Some("complete t-agents agent-fleet-drain CONTINUE")
    );
    assert!(!log.has("terminate") && !log.has("drain"), "{all:?}");
}

#[tokio::test(start_paused = true)]
async fn a_job_that_would_outlast_the_hooks_global_timeout_is_drained_in_time() {
    // Global timeout: 100 × 4 s = 400 s. The drain (74 s) must end a minute before it.
    let log = journal_of(
        Setup::new(with_hook(settings(), Duration::from_secs(4))),
        |mut bed| async move {
            bed.start().await;
            bed.job();
            bed.notice(Notice::Terminating);
            let held = Instant::now();
            assert_eq!(
                bed.command().await,
                AgentCommand::Drain {
                    within: GRACE + MARGIN
                }
            );
            let after = held.elapsed();
            assert!(
                after + GRACE + MARGIN <= Duration::from_secs(340),
                "{after:?}"
            );
            assert!(
                after >= Duration::from_secs(260),
                "drained too early: {after:?}"
            );
            bed.exit(Some(ShutdownReason::Interrupted), true, 0);
            bed.until("complete").await;
            bed.sigterm();
        },
    )
    .await;
    assert!(log.count("heartbeat") >= 190, "{}", log.count("heartbeat"));
    assert!(!log.has("terminate"));
}

#[tokio::test(start_paused = true)]
async fn a_spot_notice_during_a_lifecycle_hold_drains_and_then_completes() {
    let log = journal_of(
        Setup::new(with_hook(settings(), Duration::from_secs(30))),
        |mut bed| async move {
            bed.start().await;
            bed.job();
            bed.notice(Notice::Terminating);
            bed.idle(Duration::from_secs(15)).await;
            bed.notice(spot_notice(120));
            assert!(matches!(bed.command().await, AgentCommand::Drain { .. }));
            // Heartbeats go on while the job is being stopped.
            bed.idle(Duration::from_secs(25)).await;
            bed.exit(Some(ShutdownReason::Interrupted), true, 0);
            bed.until("complete").await;
            bed.sigterm();
        },
    )
    .await;
    let all = log.all();
    let drain = log.at("drain");
    assert_eq!(all[1], "leadership handed on", "{all:?}");
    assert!(
        all[2..drain].iter().all(|e| e.starts_with("heartbeat")),
        "{all:?}"
    );
    assert!(
        all[drain + 1..all.len() - 1]
            .iter()
            .filter(|e| e.starts_with("heartbeat"))
            .count()
            >= 2,
        "{all:?}"
    );
    assert_eq!(
        all.last().map(String::as_str),
        Some("complete t-agents agent-fleet-drain CONTINUE")
    );
    assert!(!log.has("terminate"), "{all:?}");
}

#[tokio::test(start_paused = true)]
async fn past_max_uptime_at_start_the_instance_is_replaced_without_an_agent() {
    let mut s = settings();
    s.max_uptime = Some(Duration::from_secs(3600));
    let mut setup = Setup::new(s);
    setup.launched = SystemTime::now() - Duration::from_secs(7200);
    let log = journal_of(setup, |bed| async move {
        bed.until("leadership handed on").await;
        bed.sigterm();
    })
    .await;
    assert_eq!(
        log.all(),
        ["terminate i-test decrement=false", "leadership handed on"]
    );
}

#[tokio::test(start_paused = true)]
async fn reaching_max_uptime_replaces_an_idle_instance_at_once() {
    let mut s = settings();
    s.max_uptime = Some(Duration::from_secs(3600));
    let mut setup = Setup::new(s);
    setup.launched = SystemTime::now() - Duration::from_secs(3500);
    let log = journal_of(setup, |mut bed| async move {
        bed.start().await;
        let t = Instant::now();
        assert!(matches!(bed.command().await, AgentCommand::Drain { .. }));
        let after = t.elapsed().as_secs();
        assert!((98..=101).contains(&after), "{after}");
        bed.exit(Some(ShutdownReason::Interrupted), true, 0);
        bed.until("terminate").await;
        bed.sigterm();
    })
    .await;
    assert_eq!(
        log.all()[1..],
        [
            "leadership handed on",
            "drain 74",
            "terminate i-test decrement=false"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn reaching_max_uptime_replaces_a_busy_instance_after_its_job() {
    let mut s = settings();
    s.max_uptime = Some(Duration::from_secs(3600));
    let mut setup = Setup::new(s);
    setup.launched = SystemTime::now() - Duration::from_secs(3500);
    let log = journal_of(setup, |mut bed| async move {
        bed.start().await;
        bed.job();
        bed.idle(Duration::from_secs(300)).await;
        assert!(bed.commands.try_recv().is_err(), "the job was disturbed");
        bed.exit(Some(ShutdownReason::JobFinished), true, 0);
        bed.until("leadership handed on").await;
        bed.sigterm();
    })
    .await;
    assert_eq!(
        log.all(),
        [
            "start",
            "terminate i-test decrement=false",
            "leadership handed on"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_notice_between_restarts_ends_the_instance_instead_of_restarting() {
    let log = journal_of(Setup::new(settings()), |mut bed| async move {
        bed.start().await;
        bed.exit(None, false, 1);
        // During the restart's backoff.
        bed.notice(rebalance());
        bed.until("leadership handed on").await;
        bed.sigterm();
    })
    .await;
    assert_eq!(
        log.all(),
        [
            "start",
            "describe group",
            "terminate i-test decrement=false",
            "leadership handed on"
        ]
    );
}

// ---- one job per VM ----

/// The marker a job leaves, if any (and that it is root's alone).
fn marker(dir: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(USED_MARKER);
    let meta = std::fs::metadata(&path).ok()?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    std::fs::read_to_string(path).ok()
}

#[tokio::test(start_paused = true)]
async fn after_a_job_no_exit_restarts_the_agent_the_instance_is_replaced() {
    use ShutdownReason::*;
    // Each of these restarts the agent in place on an instance that never had a job.
    for (reason, registered, code) in [
        (None, true, 137), // the job killed its agent
        (Some(UnableToSync), true, 0),
        (None, false, 1), // a re-run that cannot register
    ] {
        let setup = Setup::new(settings());
        let dir = setup.work_dir.clone();
        let (bed, c) = setup.build();
        let log = bed.log.clone();
        play(
            c,
            |mut bed| async move {
                bed.start().await;
                bed.job();
                bed.exit(reason, registered, code);
                bed.until("leadership handed on").await;
                bed.sigterm();
            },
            bed,
        )
        .await
        .expect("ends cleanly");
        assert_eq!(
            log.all(),
            [
                "start",
                "terminate i-test decrement=false",
                "leadership handed on"
            ],
            "{reason:?} {code}"
        );
        let text = marker(&dir).expect("the marker was written");
        assert!(text.contains("job-1"), "{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_used_instance_at_min_size_is_replaced_not_given_a_new_agent() {
    let mut s = settings();
    // An agent that takes several jobs, idle after one.
    s.disconnect_after_job = false;
    let setup = Setup::new(s);
    setup
        .asg
        .terminate
        .lock()
        .expect("lock")
        .push_back(Err(refused()));
    let log = journal_of(setup, |mut bed| async move {
        bed.start().await;
        bed.job();
        bed.exit(Some(ShutdownReason::Idle), true, 0);
        bed.until("leadership handed on").await;
        bed.sigterm();
    })
    .await;
    assert_eq!(
        log.all(),
        [
            "start",
            "terminate i-test decrement=true",
            "terminate i-test decrement=false",
            "leadership handed on"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_supervisor_that_finds_the_marker_ends_the_instance_without_an_agent() {
    let setup = Setup::new(settings());
    std::fs::write(setup.work_dir.join(USED_MARKER), "agent a job j\n").expect("marker");
    let log = journal_of(setup, |bed| async move {
        bed.until("leadership handed on").await;
        bed.sigterm();
    })
    .await;
    // No agent (and so no token on disk) on a used VM.
    assert_eq!(
        log.all(),
        ["terminate i-test decrement=false", "leadership handed on"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stop_signal_between_runs_ends_the_daemon_and_hands_leadership_on() {
    let (bed, c) = Setup::new(settings()).build();
    let log = bed.log.clone();
    play(
        c,
        |mut bed| async move {
            bed.start().await;
            bed.exit(None, false, 1);
            // During the restart's backoff: no agent to drain, nothing to terminate.
            bed.sigterm();
        },
        bed,
    )
    .await
    .expect("exit 0");
    assert_eq!(log.all(), ["start", "leadership handed on"]);
}
