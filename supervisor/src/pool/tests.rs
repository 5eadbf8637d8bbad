//! The warm pool with fake Auto Scaling, IMDS, SSM and warm-up, in paused time.

use super::*;
use crate::aws::autoscaling::GroupSizes;
use crate::aws::ssm::{Parameter, SsmError};
use crate::config::LifecycleHook;
use std::sync::{Arc, Mutex};

/// What happened, in order, across the fakes.
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
    instance: Option<TemplateRef>,
    group: Option<TemplateRef>,
}

impl AutoScaling for FakeAsg {
    async fn terminate_instance(&self, id: &str, decrement: bool) -> Result<(), AsgError> {
        self.log
            .push(format!("terminate {id} decrement={decrement}"));
        Ok(())
    }
    async fn set_unhealthy(&self, id: &str) -> Result<(), AsgError> {
        self.log.push(format!("unhealthy {id}"));
        Ok(())
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
        Ok(Some(false))
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

impl LaunchTemplates for FakeAsg {
    async fn group_template(&self, _: &str) -> Result<Option<TemplateRef>, AsgError> {
        Ok(self.group.clone())
    }
    async fn instance_template(&self, _: &str) -> Result<Option<TemplateRef>, AsgError> {
        Ok(self.instance.clone())
    }
    async fn warm_pool(
        &self,
        _: &str,
    ) -> Result<Option<crate::aws::autoscaling::WarmPool>, AsgError> {
        Ok(None)
    }
}

/// IMDS whose target lifecycle state the test sets; `ami-id` if given.
#[derive(Clone, Default)]
struct FakeImds {
    target: Arc<Mutex<Option<String>>>,
    ami: Option<String>,
}

impl FakeImds {
    fn at(state: &str) -> Self {
        let f = Self::default();
        f.set(state);
        f
    }
    fn set(&self, state: &str) {
        *self.target.lock().expect("lock") = Some(state.to_string());
    }
}

impl Metadata for FakeImds {
    async fn get(&self, path: &str) -> Result<String, ImdsError> {
        let found = match path {
            TARGET_STATE_PATH => self.target.lock().expect("lock").clone(),
            AMI_PATH => self.ami.clone(),
            _ => None,
        };
        found.ok_or_else(|| ImdsError::NotFound {
            path: path.to_string(),
        })
    }
}

struct FakeSsm(Option<&'static str>);

impl ParameterStore for FakeSsm {
    async fn get(&self, name: &str) -> Result<Parameter, SsmError> {
        match self.0 {
            Some(v) => Ok(Parameter {
                value: v.into(),
                secure: false,
            }),
            None => Err(SsmError::NotFound { name: name.into() }),
        }
    }
}

/// A warm-up that takes `took` and says when it ran.
struct FakeWarmup {
    log: Journal,
    took: Duration,
}

impl Warmup for FakeWarmup {
    async fn warm_up(&self) {
        self.log.push("warm-up begins");
        tokio::time::sleep(self.took).await;
        self.log.push("warm-up done");
    }
}

const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(600);

fn launch_wait() -> Option<LifecycleWait> {
    Some(LifecycleWait {
        group: "s-agents".into(),
        hook: LifecycleHook {
            name: "agent-fleet-warm".into(),
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
        },
        instance_id: "i-pooled".into(),
    })
}

fn work_dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("pool-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work dir");
    dir
}

/// A pooled supervisor's stay, in a task; the test plays Auto Scaling through IMDS.
struct Stay {
    log: Journal,
    imds: FakeImds,
    dir: PathBuf,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Left>,
}

fn stay(state: &'static str, warm_up_takes: Duration) -> Stay {
    let log = Journal::default();
    let imds = FakeImds::at(&format!("Warmed:{state}"));
    // Not there yet on a new instance: the warm-up makes it.
    let dir = work_dir().join("work");
    let shutdown = Shutdown::default();
    let asg = FakeAsg {
        log: log.clone(),
        ..FakeAsg::default()
    };
    let warmup = FakeWarmup {
        log: log.clone(),
        took: warm_up_takes,
    };
    let (i, d, s) = (imds.clone(), dir.clone(), shutdown.clone());
    let task = tokio::spawn(async move {
        let pool = Pool {
            asg: &asg,
            imds: &i,
            warmup: &warmup,
            launch: launch_wait(),
            termination: Some(LifecycleWait {
                group: "s-agents".into(),
                hook: LifecycleHook {
                    name: "agent-fleet-drain".into(),
                    heartbeat_timeout: HEARTBEAT_TIMEOUT,
                },
                instance_id: "i-pooled".into(),
            }),
            work_dir: &d,
            aws_retry_backoff: Duration::from_millis(500),
        };
        pool.stay(state, &s, &mut Notifier::disabled()).await
    });
    Stay {
        log,
        imds,
        dir,
        shutdown,
        task,
    }
}

#[tokio::test(start_paused = true)]
async fn a_pooled_instance_warms_completes_the_launch_action_then_waits_for_service() {
    // The warm-up outlasts a third of the heartbeat timeout: the action is kept alive.
    let s = stay("Running", Duration::from_secs(450));
    tokio::time::sleep(Duration::from_secs(460)).await;
    assert_eq!(
        s.log.all(),
        [
            "warm-up begins",
            "heartbeat agent-fleet-warm",
            "heartbeat agent-fleet-warm",
            "warm-up done",
            "complete s-agents agent-fleet-warm CONTINUE",
        ]
    );
    assert_eq!(
        StartKind::of(&s.dir),
        StartKind::Warm,
        "the marker is written before the action is completed"
    );
    // Hours in a running pool: no call, no end.
    tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
    assert!(!s.task.is_finished());
    assert_eq!(s.log.all().len(), 5, "{:?}", s.log.all());
    s.imds.set("InService");
    tokio::time::sleep(POLL_EVERY + Duration::from_millis(10)).await;
    assert!(s.task.is_finished(), "taken into service within a poll");
    assert_eq!(s.task.await.expect("joins"), Left::InService);
    assert_eq!(s.log.count("terminate"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stop_in_the_pool_never_ends_the_instance() {
    let s = stay("Stopped", Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(s.log.count("complete"), 1);
    // The pool stops the instance: systemd's SIGTERM reaches the supervisor.
    s.shutdown.drain.cancel();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(s.task.await.expect("joins"), Left::Stopped);
    assert_eq!(s.log.count("terminate"), 0, "{:?}", s.log.all());
    assert_eq!(s.log.count("unhealthy"), 0);
    assert_eq!(s.log.count("set desired"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_pooled_instance_auto_scaling_terminates_completes_the_termination_action_once() {
    let s = stay("Stopped", Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(30)).await;
    s.imds.set("Warmed:Terminated");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        s.log.count("complete s-agents agent-fleet-drain CONTINUE"),
        1,
        "{:?}",
        s.log.all()
    );
    assert_eq!(s.log.count("terminate"), 0, "Auto Scaling ends it, not us");
    assert!(!s.task.is_finished(), "waits for the SIGTERM");
    s.shutdown.drain.cancel();
    assert_eq!(s.task.await.expect("joins"), Left::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_warming_leaves_the_action_to_its_default_result() {
    let s = stay("Stopped", Duration::from_secs(300));
    tokio::time::sleep(Duration::from_secs(10)).await;
    s.shutdown.drain.cancel();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(s.task.await.expect("joins"), Left::Stopped);
    assert_eq!(s.log.all(), ["warm-up begins"]);
    assert_eq!(StartKind::of(&s.dir), StartKind::Cold, "not warmed");
}

#[tokio::test(start_paused = true)]
async fn the_way_into_service_completes_the_launch_action_in_the_background() {
    let log = Journal::default();
    let asg = FakeAsg {
        log: log.clone(),
        ..FakeAsg::default()
    };
    let task = complete_in_background(
        asg,
        launch_wait().expect("hook"),
        Duration::from_millis(500),
    );
    task.await.expect("joins");
    assert_eq!(log.all(), ["complete s-agents agent-fleet-warm CONTINUE"]);
}

#[test]
fn target_states_are_read() {
    assert_eq!(
        Target::parse("Warmed:Stopped\n"),
        Target::Warmed("Stopped".into())
    );
    assert_eq!(
        Target::parse("Warmed:Hibernated"),
        Target::Warmed("Hibernated".into())
    );
    assert!(Target::parse("Warmed:Running").is_warmed());
    assert_eq!(Target::parse("InService"), Target::InService);
    assert_eq!(
        Target::parse("Terminated"),
        Target::Other("Terminated".into())
    );
}

#[tokio::test(start_paused = true)]
async fn with_a_pool_an_unanswered_target_is_asked_again_before_anything_starts() {
    let imds = FakeImds::default();
    assert_eq!(
        target(&imds, false).await,
        Target::Unknown,
        "no pool: at once"
    );
    let late = imds.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        late.set("Warmed:Stopped");
    });
    let t0 = tokio::time::Instant::now();
    assert_eq!(target(&imds, true).await, Target::Warmed("Stopped".into()));
    assert!(t0.elapsed() >= Duration::from_secs(3));
    assert_eq!(target(&FakeImds::default(), true).await, Target::Unknown);
}

#[test]
fn a_start_is_warm_only_with_the_marker() {
    let dir = work_dir();
    assert_eq!(StartKind::of(&dir), StartKind::Cold);
    std::fs::write(dir.join(WARMED_MARKER), "x").expect("write");
    assert_eq!(StartKind::of(&dir), StartKind::Warm);
    assert_eq!(
        (StartKind::Warm.as_str(), StartKind::Cold.as_str()),
        ("warm", "cold")
    );
}

fn lt(id: &str, version: &str) -> TemplateRef {
    TemplateRef {
        id: Some(id.into()),
        name: Some("s-agents".into()),
        version: Some(version.into()),
    }
}

#[test]
fn only_numbered_versions_and_ids_are_compared() {
    assert_eq!(template_staleness(&lt("lt-1", "3"), &lt("lt-1", "3")), None);
    assert!(template_staleness(&lt("lt-1", "3"), &lt("lt-1", "4")).is_some());
    assert!(template_staleness(&lt("lt-1", "3"), &lt("lt-2", "3")).is_some());
    assert_eq!(
        template_staleness(&lt("lt-1", "$Latest"), &lt("lt-1", "4")),
        None
    );
    assert_eq!(
        template_staleness(&lt("lt-1", "3"), &TemplateRef::default()),
        None
    );
}

#[tokio::test(start_paused = true)]
async fn a_pooled_instance_is_stale_when_its_template_version_or_ami_is_no_longer_current() {
    let current = FakeAsg {
        instance: Some(lt("lt-1", "3")),
        group: Some(lt("lt-1", "3")),
        ..FakeAsg::default()
    };
    let imds = FakeImds {
        ami: Some("ami-0old".into()),
        ..FakeImds::default()
    };
    let param = "/agent-fleet/ami/ubuntu-noble/x86_64";
    let same = FakeSsm(Some("ami-0old"));
    let newer = FakeSsm(Some("ami-0new"));
    assert_eq!(
        stale(&current, &imds, &same, "g", "i-1", Some(param)).await,
        None
    );
    assert_eq!(
        stale(&current, &imds, &newer, "g", "i-1", None).await,
        None,
        "no image parameter: only the template is compared"
    );
    let by_image = stale(&current, &imds, &newer, "g", "i-1", Some(param))
        .await
        .expect("stale");
    assert_eq!(
        by_image.describe(),
        "booted from ami-0old, /agent-fleet/ami/ubuntu-noble/x86_64 now names ami-0new"
    );
    let older = FakeAsg {
        group: Some(lt("lt-1", "4")),
        ..current.clone()
    };
    let by_version = stale(&older, &imds, &same, "g", "i-1", Some(param))
        .await
        .expect("stale");
    assert!(
        by_version
            .describe()
            .contains("version 3, the group now launches s-agents version 4"),
        "{}",
        by_version.describe()
    );
    // Unreadable answers count as current: never churn the pool on a doubt.
    let unknown = FakeAsg::default();
    let no_ami = FakeImds::default();
    assert_eq!(
        stale(&unknown, &no_ami, &newer, "g", "i-1", Some(param)).await,
        None
    );
    assert_eq!(
        stale(&current, &imds, &FakeSsm(None), "g", "i-1", Some(param)).await,
        None
    );
}

#[tokio::test(start_paused = true)]
async fn a_stale_instance_completes_its_launch_action_then_ends_without_decrement() {
    let log = Journal::default();
    let asg = FakeAsg {
        log: log.clone(),
        ..FakeAsg::default()
    };
    let launched = complete_in_background(
        asg.clone(),
        launch_wait().expect("hook"),
        Duration::from_millis(500),
    );
    let shutdown = Shutdown::default();
    let why = Staleness::Template {
        instance: lt("lt-1", "3"),
        group: lt("lt-1", "4"),
    };
    let (a, s) = (asg.clone(), shutdown.clone());
    let task = tokio::spawn(async move {
        Ending {
            instance_id: "i-pooled",
            launched: Some(launched),
            poweroff: &["/nonexistent/poweroff".to_string()],
            terminate_timeout: Duration::from_secs(600),
            aws_retry_backoff: Duration::from_millis(500),
        }
        .stale(&a, &why, s, Notifier::disabled())
        .await
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        log.at("complete s-agents agent-fleet-warm CONTINUE")
            < log.at("terminate i-pooled decrement=false"),
        "{:?}",
        log.all()
    );
    assert_eq!(log.count("terminate"), 1);
    assert!(!task.is_finished(), "waits for Auto Scaling's stop");
    shutdown.drain.cancel();
    assert!(task.await.expect("joins").is_ok());
}

#[test]
fn files_are_read_within_the_budget_without_following_symlinks() {
    let dir = work_dir();
    std::fs::create_dir_all(dir.join("toolbox/bin")).expect("dirs");
    std::fs::write(dir.join("agent"), vec![1u8; 1000]).expect("write");
    std::fs::write(dir.join("toolbox/bin/cache"), vec![2u8; 500]).expect("write");
    std::os::unix::fs::symlink("/", dir.join("toolbox/root")).expect("symlink");
    let roots = [dir.join("agent"), dir.join("toolbox"), dir.join("missing")];
    assert_eq!(read_all(&roots, u64::MAX), (2, 1500));
    let (_, bytes) = read_all(&roots, 100);
    assert!(bytes < 1500, "{bytes}");
}
