//! The scaler's loop against fakes, on paused tokio time.

use super::*;
use crate::aws::autoscaling::{AsgError, TemplateRef, WarmPool};
use crate::config::{ElectionSettings, Overprovision, ScalerSettings};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use tracing_subscriber::layer::SubscriberExt;

const POLL: Duration = Duration::from_secs(5);
const LONG: Duration = Duration::from_secs(3600);

fn settings(overprovision: Overprovision) -> Settings {
    Settings {
        ignored_keys: vec![],
        config_parameter: "/agent-fleet/s1/config".into(),
        endpoint: "hub.test:8080".into(),
        token_parameter: "/agent-fleet/s1/token".into(),
        agent_group: "s1-agents".into(),
        disconnect_after_job: true,
        idle_timeout: Duration::from_secs(300),
        interruption_grace: Duration::from_secs(60),
        cache_bucket: None,
        no_https: true,
        scaler: ScalerSettings {
            enabled: true,
            poll_interval: POLL,
            overprovision,
            agent_lifetime_cap: None,
        },
        election: ElectionSettings {
            lease: Duration::from_secs(20),
            renew_deadline: Duration::from_secs(12),
            retry: Duration::from_secs(4),
            prefix: "/agent-fleet/s1/leader".into(),
        },
        lifecycle_hook: None,
        max_uptime: None,
        agents_lead: true,
        job_isolation: Default::default(),
        job_role_arn: None,
        use_pre_signed_url: false,
        launch_hook: None,
        warm_images: vec![],
        image_parameter: None,
        known_hosts: Default::default(),
        log_group: None,
    }
}

fn body(queued: u32, running: u32) -> String {
    format!(
        r#"{{"jobs":{{"queued":{queued},"running":{running}}},"agents":{{"idle":0,"occupied":{running}}}}}"#
    )
}

// ---------------------------------------------------------------------------- fakes

#[derive(Clone)]
enum Answer {
    /// A 200 body, parsed by the real parser.
    Body(String),
    Fail(DemandError),
}

struct DemandState {
    answer: Answer,
    /// Answers used before `answer`, one per request.
    script: VecDeque<Answer>,
    valid_token: String,
    /// When each request came, and with which token.
    calls: Vec<(Instant, String)>,
    endpoints: Vec<(String, bool)>,
}

#[derive(Clone)]
struct FakeDemand(Arc<Mutex<DemandState>>);

impl FakeDemand {
    fn new(body: String) -> Self {
        Self(Arc::new(Mutex::new(DemandState {
            answer: Answer::Body(body),
            script: VecDeque::new(),
            valid_token: "tok-1".into(),
            calls: vec![],
            endpoints: vec![],
        })))
    }
    fn set(&self, answer: Answer) {
        self.0.lock().expect("lock").answer = answer;
    }
    fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.0.lock().expect("lock").script.extend(answers);
    }
    fn calls(&self) -> Vec<(Instant, String)> {
        self.0.lock().expect("lock").calls.clone()
    }
}

impl Demand for FakeDemand {
    async fn metrics(
        &self,
        endpoint: &str,
        https: bool,
        token: &Token,
    ) -> Result<DemandMetrics, DemandError> {
        let mut s = self.0.lock().expect("lock");
        s.calls.push((Instant::now(), token.expose().to_string()));
        s.endpoints.push((endpoint.to_string(), https));
        if token.expose() != s.valid_token {
            return Err(DemandError::Unauthorized);
        }
        let answer = s.script.pop_front().unwrap_or_else(|| s.answer.clone());
        match answer {
            Answer::Body(b) => semaphore::parse_metrics(b.as_bytes()),
            Answer::Fail(e) => Err(e),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AsgCall {
    Describe,
    SetDesired(i32),
    Suspend(String, Vec<String>),
    /// Only the lifetime cap terminates: (instance, decrement).
    Terminate(String, bool),
}

struct AsgState {
    sizes: GroupSizes,
    /// Describe keeps answering the old desired after a raise (eventual consistency).
    stale: bool,
    calls: Vec<(Instant, AsgCall)>,
    /// The warm pool's instances (`None`: no pool).
    warm_pool: Option<Vec<(String, String)>>,
}

#[derive(Clone)]
struct FakeAsg(Arc<Mutex<AsgState>>);

impl FakeAsg {
    fn new(min: i32, max: i32, desired: i32) -> Self {
        Self(Arc::new(Mutex::new(AsgState {
            sizes: GroupSizes {
                name: "s1-agents".into(),
                min,
                max,
                desired,
                in_service: vec![],
            },
            stale: false,
            calls: vec![],
            warm_pool: None,
        })))
    }
    fn desired(&self) -> i32 {
        self.0.lock().expect("lock").sizes.desired
    }
    fn set_desired_externally(&self, d: i32) {
        self.0.lock().expect("lock").sizes.desired = d;
    }
    fn sets(&self) -> Vec<i32> {
        self.calls_where(|c| match c {
            AsgCall::SetDesired(n) => Some(*n),
            _ => None,
        })
    }
    fn suspends(&self) -> usize {
        self.calls_where(|c| match c {
            AsgCall::Suspend(g, p) => {
                assert_eq!(
                    (g.as_str(), p.as_slice()),
                    ("s1-agents", &["AZRebalance".to_string()][..])
                );
                Some(())
            }
            _ => None,
        })
        .len()
    }
    fn calls_where<T>(&self, f: impl Fn(&AsgCall) -> Option<T>) -> Vec<T> {
        self.0
            .lock()
            .expect("lock")
            .calls
            .iter()
            .filter_map(|(_, c)| f(c))
            .collect()
    }
    fn all_calls(&self) -> Vec<(Instant, AsgCall)> {
        self.0.lock().expect("lock").calls.clone()
    }
}

impl AutoScaling for FakeAsg {
    async fn terminate_instance(&self, id: &str, decrement: bool) -> Result<(), AsgError> {
        let mut s = self.0.lock().expect("lock");
        s.calls.push((
            Instant::now(),
            AsgCall::Terminate(id.to_string(), decrement),
        ));
        s.sizes.in_service.retain(|i| i != id);
        Ok(())
    }
    async fn set_unhealthy(&self, _: &str) -> Result<(), AsgError> {
        unreachable!("the scaler never marks instances")
    }
    async fn group_of(&self, _: &str) -> Result<Option<String>, AsgError> {
        unreachable!("the scaler knows its group")
    }
    async fn group(&self, name: &str) -> Result<Option<GroupSizes>, AsgError> {
        let mut s = self.0.lock().expect("lock");
        s.calls.push((Instant::now(), AsgCall::Describe));
        Ok((name == s.sizes.name).then(|| s.sizes.clone()))
    }
    async fn set_desired_capacity(&self, group: &str, desired: i32) -> Result<(), AsgError> {
        let mut s = self.0.lock().expect("lock");
        assert_eq!(group, s.sizes.name);
        s.calls.push((Instant::now(), AsgCall::SetDesired(desired)));
        if desired < s.sizes.min || desired > s.sizes.max {
            return Err(AsgError::Validation {
                op: "SetDesiredCapacity",
                detail: "outside [min, max]".into(),
            });
        }
        if !s.stale {
            s.sizes.desired = desired;
        }
        Ok(())
    }
    async fn suspend_processes(&self, group: &str, processes: &[&str]) -> Result<(), AsgError> {
        self.0.lock().expect("lock").calls.push((
            Instant::now(),
            AsgCall::Suspend(
                group.to_string(),
                processes.iter().map(|p| p.to_string()).collect(),
            ),
        ));
        Ok(())
    }
}

impl LaunchTemplates for FakeAsg {
    async fn group_template(&self, _: &str) -> Result<Option<TemplateRef>, AsgError> {
        unreachable!("the scaler reads no launch template")
    }
    async fn instance_template(&self, _: &str) -> Result<Option<TemplateRef>, AsgError> {
        unreachable!("the scaler reads no launch template")
    }
    async fn warm_pool(&self, group: &str) -> Result<Option<WarmPool>, AsgError> {
        let s = self.0.lock().expect("lock");
        assert_eq!(group, s.sizes.name);
        Ok(s.warm_pool.clone().map(|instances| WarmPool {
            pool_state: Some("Stopped".into()),
            instances,
            ..WarmPool::default()
        }))
    }
}

#[derive(Clone)]
struct FakeTokens(Arc<Mutex<(String, u32)>>);

impl FakeTokens {
    fn new(value: &str) -> Self {
        Self(Arc::new(Mutex::new((value.to_string(), 0))))
    }
    fn fetches(&self) -> u32 {
        self.0.lock().expect("lock").1
    }
}

impl TokenSource for FakeTokens {
    async fn fetch(&self) -> Result<Token, TokenError> {
        let mut s = self.0.lock().expect("lock");
        s.1 += 1;
        Ok(Token::new(s.0.clone()))
    }
}

/// Each `PutMetricData` (namespace, data); whether to fail.
type SinkState = (Vec<(String, Vec<Datum>)>, bool);

#[derive(Clone, Default)]
struct FakeSink(Arc<Mutex<SinkState>>);

impl FakeSink {
    fn puts(&self) -> Vec<(String, Vec<Datum>)> {
        self.0.lock().expect("lock").0.clone()
    }
    fn fail(&self, fail: bool) {
        self.0.lock().expect("lock").1 = fail;
    }
}

impl MetricsSink for FakeSink {
    async fn put(&self, namespace: &str, data: &[Datum]) -> Result<(), CloudWatchError> {
        let mut s = self.0.lock().expect("lock");
        if s.1 {
            return Err(CloudWatchError::Service {
                service: "CloudWatch",
                action: "PutMetricData",
                status: 400,
                code: "Throttling".into(),
                message: "Rate exceeded".into(),
            });
        }
        s.0.push((namespace.to_string(), data.to_vec()));
        Ok(())
    }
}

// ---------------------------------------------------------------------------- logs

#[derive(Debug, Clone)]
struct Event {
    level: tracing::Level,
    message: String,
    fields: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<Event>>>);

impl Logs {
    fn errors(&self) -> Vec<Event> {
        self.where_(|e| e.level == tracing::Level::ERROR)
    }
    fn messages(&self, message: &str) -> Vec<Event> {
        self.where_(|e| e.message == message)
    }
    fn where_(&self, f: impl Fn(&Event) -> bool) -> Vec<Event> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| f(e))
            .cloned()
            .collect()
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Logs {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let message = f.0.remove("message").unwrap_or_default();
        self.0.lock().expect("lock").push(Event {
            level: *event.metadata().level(),
            message,
            fields: f.0,
        });
    }
}

// ---------------------------------------------------------------------------- bed

struct Bed {
    demand: FakeDemand,
    asg: FakeAsg,
    tokens: FakeTokens,
    sink: FakeSink,
    logs: Logs,
    leader: watch::Sender<Leadership>,
    settings: watch::Sender<Settings>,
    /// The latest decision the scaler published.
    decision: watch::Receiver<Option<Decision>>,
    /// The in-service instances it published for the election.
    members: watch::Receiver<Vec<String>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _guard: tracing::subscriber::DefaultGuard,
}

struct Setup {
    sizes: (i32, i32, i32),
    body: String,
    overprovision: Overprovision,
    token: Option<&'static str>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            sizes: (0, 10, 0),
            body: body(0, 0),
            overprovision: Overprovision::None,
            token: Some("tok-1"),
        }
    }
}

fn start(setup: Setup) -> Bed {
    let logs = Logs::default();
    let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(logs.clone()));
    let demand = FakeDemand::new(setup.body);
    let (min, max, desired) = setup.sizes;
    let asg = FakeAsg::new(min, max, desired);
    let tokens = FakeTokens::new("tok-1");
    let sink = FakeSink::default();
    let (leader, leader_rx) = watch::channel(Leadership::default());
    let (settings_tx, settings_rx) = watch::channel(settings(setup.overprovision));
    let mut scaler = Scaler::new(
        "s1",
        settings_rx,
        demand.clone(),
        asg.clone(),
        tokens.clone(),
        sink.clone(),
    );
    if let Some(t) = setup.token {
        scaler = scaler.with_token(Token::new(t));
    }
    let (decision_tx, decision) = watch::channel(None);
    let (members_tx, members) = watch::channel(Vec::new());
    let scaler = scaler.with_decisions(decision_tx).with_members(members_tx);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(scaler.run(leader_rx, shutdown.clone()));
    Bed {
        demand,
        asg,
        tokens,
        sink,
        logs,
        leader,
        settings: settings_tx,
        decision,
        members,
        shutdown,
        task,
        _guard: guard,
    }
}

impl Bed {
    fn lead(&self, term: u64, valid_for: Duration) {
        self.leader.send_replace(Leadership::Leader {
            term,
            valid_until: Instant::now() + valid_for,
        });
    }
    fn follow(&self) {
        self.leader.send_replace(Leadership::Follower {
            term: None,
            leader: Some("other".into()),
        });
    }
    fn decision(&self) -> Decision {
        self.decision
            .borrow()
            .clone()
            .expect("a decision published")
    }
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), self.task)
            .await
            .expect("scaler stops on shutdown")
            .expect("scaler task");
    }
}

async fn sleep(d: Duration) {
    tokio::time::sleep(d).await;
}

// ---------------------------------------------------------------------------- tests

#[tokio::test(start_paused = true)]
async fn queued_jobs_raise_desired_within_one_poll_of_leading() {
    let bed = start(Setup {
        body: body(3, 0),
        ..Setup::default()
    });
    sleep(Duration::from_secs(30)).await;
    assert!(bed.demand.calls().is_empty(), "a follower never polls");
    let became_leader = Instant::now();
    bed.lead(1, LONG);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(bed.asg.desired(), 3, "raised on the first poll as leader");
    assert_eq!(bed.demand.calls()[0].0, became_leader);

    // New jobs while leading: seen within one poll interval.
    bed.demand.set(Answer::Body(body(5, 2)));
    sleep(POLL).await;
    assert_eq!(bed.asg.desired(), 7);
    assert_eq!(bed.asg.sets(), vec![3, 7]);

    let decisions = bed.logs.messages("scaling decision");
    let last = decisions.last().expect("decision line");
    assert_eq!(last.fields["jobs"], "7");
    assert_eq!(last.fields["target"], "7");
    assert_eq!(last.fields["action"], "set_desired_capacity");
    let actions = bed.logs.messages("leader action");
    let set = actions
        .iter()
        .find(|e| e.fields["action"] == "set_desired_capacity")
        .expect("set_desired_capacity logged");
    for key in [
        "term",
        "group",
        "desired",
        "check_mono_ns",
        "valid_until_mono_ns",
    ] {
        assert!(set.fields.contains_key(key), "{key} in {set:?}");
    }
    assert_eq!(set.fields["term"], "1");
    assert_eq!(set.fields["group"], "s1-agents");
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn falling_demand_never_lowers_desired() {
    let bed = start(Setup {
        body: body(4, 1),
        ..Setup::default()
    });
    bed.lead(1, LONG);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(bed.asg.desired(), 5);
    for jobs in [3, 1, 0] {
        bed.demand.set(Answer::Body(body(jobs, 0)));
        sleep(POLL * 2).await;
        assert_eq!(bed.asg.desired(), 5, "jobs {jobs}");
    }
    assert_eq!(bed.asg.sets(), vec![5]);
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn max_is_respected_and_min_is_the_floor() {
    let bed = start(Setup {
        body: body(50, 0),
        sizes: (0, 10, 0),
        ..Setup::default()
    });
    bed.lead(1, LONG);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(bed.asg.sets(), vec![10]);
    bed.stop().await;

    // No jobs at min 2 (desired 2): the target is the floor, nothing to raise.
    let bed = start(Setup {
        body: body(0, 0),
        sizes: (2, 10, 2),
        ..Setup::default()
    });
    bed.lead(1, LONG);
    sleep(POLL * 3).await;
    assert!(bed.asg.sets().is_empty());
    let (ns, data) = bed.sink.puts().last().cloned().expect("metrics published");
    assert_eq!(ns, "Semaphore");
    let target = data
        .iter()
        .find(|d| d.metric == "ScalingTarget")
        .expect("ScalingTarget");
    assert_eq!(target.value, 2.0);
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn each_overprovision_strategy() {
    for (over, expect) in [
        (Overprovision::None, 4),
        (Overprovision::Number(2), 6),
        (Overprovision::Percentage(50), 6),
        (Overprovision::Percentage(10), 5),
    ] {
        let bed = start(Setup {
            body: body(3, 1),
            overprovision: over,
            ..Setup::default()
        });
        bed.lead(1, LONG);
        sleep(Duration::from_millis(10)).await;
        assert_eq!(bed.asg.sets(), vec![expect], "{over:?}");
        bed.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn unauthorized_rereads_the_token_and_retries_once() {
    let bed = start(Setup {
        body: body(2, 0),
        token: Some("tok-0"),
        ..Setup::default()
    });
    bed.lead(1, LONG);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(bed.tokens.fetches(), 1);
    let calls = bed.demand.calls();
    assert_eq!(
        calls.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
        vec!["tok-0", "tok-1"],
        "old token, then the re-read one, in the same poll"
    );
    assert_eq!(bed.asg.sets(), vec![2]);
    assert!(bed.logs.errors().is_empty(), "{:?}", bed.logs.errors());
    // The new token is kept.
    sleep(POLL).await;
    assert_eq!(bed.tokens.fetches(), 1);
    assert_eq!(
        bed.demand.calls().last().map(|c| c.1.clone()),
        Some("tok-1".into())
    );
    // Never in a log line.
    assert!(!bed
        .logs
        .where_(|_| true)
        .iter()
        .any(|e| e.message.contains("tok-") || e.fields.values().any(|v| v.contains("tok-"))));
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn token_is_read_at_first_poll_without_an_initial_one() {
    let bed = start(Setup {
        body: body(1, 0),
        token: None,
        ..Setup::default()
    });
    bed.lead(1, LONG);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(bed.tokens.fetches(), 1);
    assert_eq!(bed.asg.sets(), vec![1]);
    assert_eq!(
        bed.demand.0.lock().expect("lock").endpoints[0],
        ("hub.test:8080".to_string(), false),
        "no_https → plain HTTP"
    );
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rejected_token_backs_off_with_one_error_line() {
    let bed = start(Setup {
        body: body(2, 0),
        ..Setup::default()
    });
    bed.demand.0.lock().expect("lock").valid_token = "rotated-elsewhere".into();
    bed.lead(1, LONG);
    sleep(Duration::from_secs(120)).await;
    let calls = bed.demand.calls();
    // First 401 with the cached token re-reads it; the re-read one is the same, so no
    // pointless retry. Later polls back off.
    assert!(
        calls.len() < 12,
        "backed off: {} polls in 120 s",
        calls.len()
    );
    assert!(bed.asg.sets().is_empty());
    let errors = bed.logs.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].message.contains("/agent-fleet/s1/token"),
        "{errors:?}"
    );
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rate_limit_honours_retry_after() {
    let bed = start(Setup {
        body: body(3, 0),
        ..Setup::default()
    });
    bed.demand.script([Answer::Fail(DemandError::RateLimited {
        retry_after: Some(Duration::from_secs(30)),
    })]);
    bed.lead(1, LONG);
    sleep(Duration::from_secs(29)).await;
    assert_eq!(bed.demand.calls().len(), 1, "no poll before Retry-After");
    assert!(bed.asg.sets().is_empty());
    sleep(Duration::from_secs(2)).await;
    let calls = bed.demand.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls[1].0 - calls[0].0 >= Duration::from_secs(30));
    assert_eq!(bed.asg.sets(), vec![3]);
    // Back to the normal cadence after a success.
    sleep(POLL * 2).await;
    assert_eq!(bed.demand.calls().len(), 4);
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn server_errors_back_off_exponentially_and_recover() {
    let bed = start(Setup {
        body: body(2, 0),
        ..Setup::default()
    });
    bed.demand.set(Answer::Fail(DemandError::Server(503)));
    bed.lead(1, LONG);
    sleep(Duration::from_secs(300)).await;
    let calls = bed.demand.calls();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(gaps.len() >= 3 && gaps.len() < 12, "{gaps:?}");
    assert!(gaps[2] > gaps[0], "grows: {gaps:?}");
    assert!(gaps.iter().all(|g| *g <= MAX_BACKOFF), "capped: {gaps:?}");
    assert_eq!(bed.logs.errors().len(), 1);
    bed.demand.set(Answer::Body(body(2, 0)));
    sleep(MAX_BACKOFF).await;
    assert_eq!(bed.asg.sets(), vec![2]);
    assert_eq!(bed.logs.messages("Semaphore metrics works again").len(), 1);
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn malformed_and_partial_answers_change_nothing_and_log_once_each() {
    let bed = start(Setup {
        body: r#"{"jobs":{"queued":3 "running":0}}"#.into(),
        sizes: (0, 10, 1),
        ..Setup::default()
    });
    bed.lead(1, LONG);
    sleep(POLL * 4).await;
    assert!(bed.demand.calls().len() >= 4);
    assert!(bed.asg.sets().is_empty());
    assert_eq!(bed.asg.desired(), 1);
    let errors = bed.logs.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].message.contains("no scaling action"),
        "{errors:?}"
    );

    bed.demand
        .set(Answer::Body(r#"{"jobs":{"queued":3"#.into()));
    sleep(POLL * 4).await;
    bed.demand
        .set(Answer::Body(r#"{"jobs":{"queued":3,"running":0}}"#.into()));
    sleep(POLL * 4).await;
    assert!(bed.asg.sets().is_empty());
    assert_eq!(bed.asg.desired(), 1);
    assert_eq!(bed.logs.errors().len(), 3, "{:?}", bed.logs.errors());
    // Metrics of a bad poll carry no job counts (a gap, not a false zero).
    let (_, data) = bed.sink.puts().last().cloned().expect("published");
    assert!(!data.iter().any(|d| d.metric == "JobCount"));
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn one_set_desired_per_change_of_target() {
    let bed = start(Setup {
        body: body(3, 0),
        ..Setup::default()
    });
    // Describe lags behind the raise, as Auto Scaling may right after it.
    bed.asg.0.lock().expect("lock").stale = true;
    bed.lead(1, LONG);
    sleep(POLL * 5).await;
    assert_eq!(bed.asg.sets(), vec![3]);
    bed.demand.set(Answer::Body(body(4, 0)));
    sleep(POLL * 5).await;
    assert_eq!(bed.asg.sets(), vec![3, 4]);
    // Demand falls and rises again: a new change of target, a new call is allowed.
    bed.asg.0.lock().expect("lock").stale = false;
    bed.asg.set_desired_externally(1);
    bed.demand.set(Answer::Body(body(1, 0)));
    sleep(POLL * 2).await;
    bed.demand.set(Answer::Body(body(4, 0)));
    sleep(POLL * 2).await;
    assert_eq!(bed.asg.sets(), vec![3, 4, 4]);
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn nothing_happens_while_follower() {
    let bed = start(Setup {
        body: body(3, 0),
        ..Setup::default()
    });
    sleep(Duration::from_secs(60)).await;
    // A leader whose lease already lapsed is no leader either.
    bed.leader.send_replace(Leadership::Leader {
        term: 4,
        valid_until: Instant::now(),
    });
    sleep(Duration::from_secs(60)).await;
    assert!(bed.demand.calls().is_empty());
    assert!(bed.asg.all_calls().is_empty());
    assert!(bed.sink.puts().is_empty());
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stepping_down_stops_all_work() {
    let bed = start(Setup {
        body: body(1, 0),
        ..Setup::default()
    });
    bed.lead(1, LONG);
    sleep(POLL * 2).await;
    let polls = bed.demand.calls().len();
    assert!(polls >= 2);
    bed.follow();
    let stepped_down = Instant::now();
    sleep(Duration::from_secs(60)).await;
    assert_eq!(bed.demand.calls().len(), polls);
    assert!(bed.asg.all_calls().iter().all(|(t, _)| *t < stepped_down));
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn no_side_effect_after_valid_until() {
    let bed = start(Setup {
        body: body(1, 0),
        ..Setup::default()
    });
    // Never renewed: valid for 7 s from now.
    bed.lead(1, Duration::from_secs(7));
    let valid_until = Instant::now() + Duration::from_secs(7);
    sleep(Duration::from_secs(3)).await;
    bed.demand.set(Answer::Body(body(6, 0)));
    sleep(Duration::from_secs(60)).await;
    // Poll at 0 s and 5 s; at 10 s the lease has lapsed: no poll, no action.
    assert_eq!(bed.asg.sets(), vec![1, 6]);
    assert!(bed.asg.all_calls().iter().all(|(t, _)| *t < valid_until));
    assert_eq!(bed.demand.calls().len(), 2);
    let actions = bed.logs.messages("leader action");
    assert!(!actions.is_empty());
    for a in &actions {
        let check: u64 = a.fields["check_mono_ns"].parse().expect("ns");
        let until: u64 = a.fields["valid_until_mono_ns"].parse().expect("ns");
        assert!(check < until, "{a:?}");
    }
    // Renewed later in the same term: work resumes, remembering what the term did.
    bed.lead(1, LONG);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(bed.demand.calls().len(), 3);
    assert_eq!(bed.asg.suspends(), 1);
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn az_rebalance_suspended_once_per_term() {
    let bed = start(Setup {
        body: body(1, 0),
        ..Setup::default()
    });
    bed.asg.0.lock().expect("lock").stale = true;
    bed.lead(1, LONG);
    sleep(POLL * 6).await;
    assert_eq!(bed.asg.suspends(), 1);
    // The suspension comes after the first scale-up, not before it.
    let calls = bed.asg.all_calls();
    let first_set = calls.iter().position(|(_, c)| *c == AsgCall::SetDesired(1));
    let first_suspend = calls
        .iter()
        .position(|(_, c)| matches!(c, AsgCall::Suspend(..)));
    assert!(first_set < first_suspend, "{calls:?}");
    assert_eq!(bed.asg.sets(), vec![1]);

    // A new term: AZRebalance again, and the "already raised" memory is gone.
    bed.follow();
    sleep(POLL).await;
    bed.lead(2, LONG);
    sleep(POLL * 3).await;
    assert_eq!(bed.asg.suspends(), 2);
    assert_eq!(bed.asg.sets(), vec![1, 1]);
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn settings_apply_live() {
    let bed = start(Setup {
        body: body(1, 0),
        ..Setup::default()
    });
    bed.lead(1, LONG);
    sleep(Duration::from_millis(10)).await;
    bed.settings
        .send_modify(|s| s.scaler.poll_interval = Duration::from_secs(20));
    let before = bed.demand.calls().len();
    sleep(Duration::from_secs(60)).await;
    assert_eq!(bed.demand.calls().len() - before, 3, "every 20 s now");

    bed.settings
        .send_modify(|s| s.scaler.overprovision = Overprovision::Number(2));
    sleep(Duration::from_secs(20)).await;
    assert_eq!(bed.asg.desired(), 3);

    bed.settings.send_modify(|s| s.scaler.enabled = false);
    sleep(Duration::from_secs(20)).await;
    let polls = bed.demand.calls().len();
    bed.demand.set(Answer::Body(body(9, 0)));
    sleep(Duration::from_secs(60)).await;
    assert_eq!(bed.demand.calls().len(), polls, "disabled: no polls");
    assert_eq!(bed.asg.desired(), 3);
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn with_a_warm_pool_the_metrics_carry_its_size_and_desired_counts_only_in_service() {
    let bed = start(Setup {
        body: body(2, 0),
        ..Setup::default()
    });
    bed.asg.0.lock().expect("lock").warm_pool = Some(vec![
        ("i-w1".into(), "Warmed:Stopped".into()),
        ("i-w2".into(), "Warmed:Pending:Wait".into()),
        ("i-w3".into(), "Warmed:Stopped".into()),
    ]);
    // Without a launch hook in the config the group has no pool: no call, no datum.
    bed.lead(7, LONG);
    sleep(Duration::from_millis(10)).await;
    let sizes = |bed: &Bed| {
        bed.sink
            .puts()
            .iter()
            .flat_map(|(_, d)| d.iter().filter(|d| d.metric == "WarmPoolSize"))
            .map(|d| (d.dimensions.clone(), d.value))
            .collect::<Vec<_>>()
    };
    assert_eq!(sizes(&bed), vec![]);
    assert_eq!(
        bed.asg.sets(),
        vec![2],
        "the pool changes nothing in the rule"
    );
    bed.settings.send_modify(|s| {
        s.launch_hook = Some(crate::config::LifecycleHook {
            name: "agent-fleet-warm".into(),
            heartbeat_timeout: Duration::from_secs(600),
        })
    });
    sleep(super::METRICS_EVERY + POLL).await;
    assert_eq!(
        sizes(&bed),
        vec![(vec![("StackName", "s1".to_string())], 3.0)],
        "one datum a minute"
    );
    assert_eq!(bed.asg.sets(), vec![2]);
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn metrics_are_published_each_minute_and_on_scale_ups_and_failures_do_not_stop_scaling() {
    let bed = start(Setup {
        body: body(2, 1),
        ..Setup::default()
    });
    bed.lead(7, LONG);
    sleep(Duration::from_millis(10)).await;
    let puts = bed.sink.puts();
    assert_eq!(puts.len(), 1);
    let (ns, data) = &puts[0];
    assert_eq!(ns, "Semaphore");
    let find = |metric: &str, dim: Option<(&str, &str)>| {
        data.iter()
            .find(|d| {
                d.metric == metric
                    && d.dimensions[0] == ("StackName", "s1".to_string())
                    && dim.is_none_or(|(k, v)| d.dimensions.get(1) == Some(&(k, v.to_string())))
            })
            .map(|d| d.value)
    };
    assert_eq!(find("JobCount", Some(("JobState", "queued"))), Some(2.0));
    assert_eq!(find("JobCount", Some(("JobState", "running"))), Some(1.0));
    assert_eq!(find("AgentCount", Some(("AgentState", "idle"))), Some(0.0));
    assert_eq!(
        find("AgentCount", Some(("AgentState", "occupied"))),
        Some(1.0)
    );
    assert_eq!(find("LeaderTerm", None), Some(7.0));
    assert_eq!(find("ScalingTarget", None), Some(3.0));
    assert_eq!(find("DesiredCapacity", None), Some(3.0));
    assert_eq!(find("ScaleUps", None), Some(1.0));
    assert_eq!(data.len(), 8);

    bed.sink.fail(true);
    bed.demand.set(Answer::Body(body(5, 0)));
    sleep(POLL * 3).await;
    assert_eq!(bed.asg.sets(), vec![3, 5], "scaling goes on");
    assert_eq!(bed.logs.errors().len(), 1, "{:?}", bed.logs.errors());
    let put_actions = || {
        bed.logs
            .where_(|e| e.message == "leader action" && e.fields["action"] == "put_metric_data")
            .len()
    };
    // The term's first poll and the scale-up to 5; quiet polls in between publish nothing.
    assert_eq!(put_actions(), 2);
    sleep(super::METRICS_EVERY + POLL).await;
    assert_eq!(put_actions(), 3, "then once a minute");
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn missing_group_is_named_once() {
    let bed = start(Setup {
        body: body(1, 0),
        ..Setup::default()
    });
    bed.settings
        .send_modify(|s| s.agent_group = "typo-agents".into());
    bed.lead(1, LONG);
    sleep(Duration::from_secs(120)).await;
    assert!(bed.asg.sets().is_empty());
    let errors = bed.logs.where_(|e| {
        e.level == tracing::Level::ERROR
            && e.fields.get("call").map(String::as_str) == Some("DescribeAutoScalingGroups")
    });
    assert_eq!(errors.len(), 1, "{:?}", bed.logs.errors());
    assert!(errors[0].message.contains("typo-agents"));
    bed.stop().await;
}

#[test]
fn backoff_is_capped_and_honours_retry_after() {
    let (_tx, rx) = watch::channel(settings(Overprovision::None));
    let mut s = Scaler::new(
        "s1",
        rx,
        FakeDemand::new(body(0, 0)),
        FakeAsg::new(0, 1, 0),
        FakeTokens::new("t"),
        FakeSink::default(),
    );
    let mut last = Duration::ZERO;
    for i in 0..20 {
        let d = s.backoff(POLL, None);
        assert!(d <= MAX_BACKOFF, "{i}: {d:?}");
        if i < 3 {
            assert!(d > last, "{i}: grows");
        }
        last = d;
    }
    assert!(s.backoff(POLL, Some(Duration::from_secs(300))) >= Duration::from_secs(300));
}

/// The daemon's concrete scaler can be spawned (its `run` future is `Send`).
#[allow(dead_code)]
fn the_real_scaler_is_spawnable(
    s: Scaler<
        HttpDemand,
        crate::aws::autoscaling::SdkAutoScaling,
        SsmTokenSource<crate::aws::ssm::SdkParameterStore>,
        crate::aws::cloudwatch::QueryCloudWatch,
    >,
    leadership: watch::Receiver<Leadership>,
    shutdown: CancellationToken,
) {
    drop(tokio::spawn(s.run(leadership, shutdown)));
}

#[tokio::test(start_paused = true)]
async fn each_poll_publishes_its_decision() {
    let bed = start(Setup {
        body: body(3, 1),
        sizes: (0, 10, 1),
        ..Setup::default()
    });
    sleep(Duration::from_secs(30)).await;
    assert_eq!(*bed.decision.borrow(), None, "a follower decides nothing");

    // Scale-up: raised, with the numbers it acted on.
    let before = std::time::SystemTime::now();
    bed.lead(1, LONG);
    sleep(Duration::from_millis(10)).await;
    let d = bed.decision();
    assert_eq!(
        (d.action.as_str(), d.queued, d.running, d.target),
        ("raised", Some(3), Some(1), Some(4))
    );
    assert_eq!((d.desired_before, d.desired_after), (Some(1), Some(4)));
    assert_eq!(d.reason, None);
    assert!(d.at() + Duration::from_secs(1) >= before, "{d:?}");

    // The group is big enough now: held.
    sleep(POLL).await;
    let d = bed.decision();
    assert_eq!(
        (
            d.action.as_str(),
            d.target,
            d.desired_before,
            d.desired_after
        ),
        ("held", Some(4), Some(4), Some(4))
    );
    assert_eq!(d.reason, None);

    // A raise the group has not caught up with is held, and says so.
    bed.asg.0.lock().expect("lock").stale = true;
    bed.demand.set(Answer::Body(body(6, 1)));
    sleep(POLL).await;
    assert_eq!(bed.decision().action, "raised");
    sleep(POLL).await;
    let d = bed.decision();
    assert_eq!(
        (
            d.action.as_str(),
            d.target,
            d.desired_before,
            d.desired_after
        ),
        ("held", Some(7), Some(4), Some(4))
    );
    assert!(
        d.reason
            .as_deref()
            .is_some_and(|r| r.contains("already asked for 7")),
        "{d:?}"
    );

    // No answer from Semaphore: skipped, with the reason and no made-up numbers.
    bed.demand.set(Answer::Fail(DemandError::Server(503)));
    sleep(POLL * 2).await;
    let d = bed.decision();
    assert_eq!(d.action, "skipped");
    assert_eq!((d.queued, d.target, d.desired_after), (None, None, None));
    assert_eq!(d.reason.as_deref(), Some("Semaphore answered HTTP 503"));

    // Dynamic scaling switched off by a reload.
    bed.demand.set(Answer::Body(body(0, 0)));
    bed.settings.send_modify(|s| s.scaler.enabled = false);
    sleep(MAX_BACKOFF + POLL).await;
    let d = bed.decision();
    assert_eq!(d.action, "skipped");
    assert!(
        d.reason
            .as_deref()
            .is_some_and(|r| r.contains("scaler.enabled")),
        "{d:?}"
    );
    bed.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_fleet_for_standbys_comes_from_each_polls_describe_without_a_call_of_its_own() {
    let bed = start(Setup::default());
    bed.asg.0.lock().expect("asg").sizes.in_service = vec!["i-1".into(), "i-2".into()];
    sleep(Duration::from_secs(30)).await;
    assert!(bed.members.borrow().is_empty(), "a follower reads nothing");
    bed.lead(1, LONG);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(
        *bed.members.borrow(),
        vec!["i-1".to_string(), "i-2".to_string()]
    );
    bed.asg.0.lock().expect("asg").sizes.in_service = vec!["i-2".into()];
    sleep(POLL).await;
    assert_eq!(*bed.members.borrow(), vec!["i-2".to_string()]);
    // One describe per poll, whatever the renews do: leadership updates alone (a renew
    // moves `valid_until`) cause no call.
    let describes = || {
        bed.asg
            .0
            .lock()
            .expect("asg")
            .calls
            .iter()
            .filter(|(_, c)| matches!(c, AsgCall::Describe))
            .count()
    };
    let before = describes();
    for _ in 0..10 {
        bed.lead(1, LONG);
        sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(describes(), before, "renews cost no Auto Scaling call");
    bed.stop().await;
}

// --- The lifetime cap (cap.rs) ---------------------------------------------------------

use crate::aws::ec2::{Ec2, Ec2Instance};
use crate::aws::query::QueryError;
use cap::LifetimeCap;

const HOUR: Duration = Duration::from_secs(3600);

/// Launch times by id; `fail` makes every describe fail; `asked` counts ids described.
#[derive(Clone, Default)]
struct FakeEc2(Arc<Mutex<Ec2State>>);

/// (launch times by id, every describe fails, ids described in order).
type Ec2State = (BTreeMap<String, SystemTime>, bool, Vec<String>);

impl Ec2 for FakeEc2 {
    async fn describe_instances(&self, ids: &[String]) -> Result<Vec<Ec2Instance>, QueryError> {
        let mut s = self.0.lock().expect("lock");
        s.2.extend(ids.iter().cloned());
        if s.1 {
            return Err(QueryError::Malformed {
                service: "EC2",
                action: "DescribeInstances",
                detail: "injected".into(),
            });
        }
        Ok(ids
            .iter()
            .filter_map(|id| {
                s.0.get(id).map(|t| Ec2Instance {
                    id: id.clone(),
                    state: "running".into(),
                    launch_time: *t,
                    instance_type: "t3.small".into(),
                    lifecycle: None,
                    availability_zone: "us-east-1a".into(),
                })
            })
            .collect())
    }
}

/// A cap of 26 h over agents launched `ages` ago (ids a, b, …), led in term 1.
fn cap_bed(
    cap: Option<Duration>,
    ages: &[Duration],
    now: SystemTime,
) -> (
    LifetimeCap<FakeAsg, FakeEc2>,
    FakeAsg,
    FakeEc2,
    watch::Sender<Leadership>,
) {
    let mut s = settings(Overprovision::None);
    s.scaler.agent_lifetime_cap = cap;
    let (_tx, rx) = watch::channel(s);
    std::mem::forget(_tx);
    let asg = FakeAsg::new(0, 10, ages.len() as i32);
    let ec2 = FakeEc2::default();
    for (i, age) in ages.iter().enumerate() {
        let id = format!("i-{}", (b'a' + i as u8) as char);
        asg.0
            .lock()
            .expect("lock")
            .sizes
            .in_service
            .push(id.clone());
        ec2.0.lock().expect("lock").0.insert(id, now - *age);
    }
    let (lead, _) = watch::channel(Leadership::Leader {
        term: 1,
        valid_until: Instant::now() + LONG,
    });
    (
        LifetimeCap::new(rx, asg.clone(), ec2.clone()),
        asg,
        ec2,
        lead,
    )
}

fn terminations(asg: &FakeAsg) -> Vec<(String, bool)> {
    asg.calls_where(|c| match c {
        AsgCall::Terminate(id, d) => Some((id.clone(), *d)),
        _ => None,
    })
}

#[tokio::test(start_paused = true)]
async fn the_cap_ends_only_agents_in_service_past_it_without_decrement_once_each() {
    let now = SystemTime::now();
    let (mut cap, asg, ec2, lead) = cap_bed(
        Some(26 * HOUR),
        &[27 * HOUR, HOUR, 26 * HOUR - Duration::from_secs(1)],
        now,
    );
    let ended = cap.check(&lead.subscribe(), 1, now).await;
    assert_eq!(ended, ["i-a"]);
    assert_eq!(
        terminations(&asg),
        [("i-a".to_string(), false)],
        "never a decrement: a clean VM replaces it"
    );
    // Later checks: the younger ones cross the cap in their turn; launch times are not
    // described again, and nobody is asked twice.
    let later = now + Duration::from_secs(2);
    assert_eq!(cap.check(&lead.subscribe(), 1, later).await, ["i-c"]);
    assert_eq!(
        cap.check(&lead.subscribe(), 1, later).await,
        Vec::<String>::new()
    );
    let described = ec2.0.lock().expect("lock").2.clone();
    assert_eq!(
        described,
        ["i-a", "i-b", "i-c"],
        "each instance described once"
    );
}

#[tokio::test(start_paused = true)]
async fn no_cap_a_follower_or_unreadable_launch_times_end_nothing() {
    let now = SystemTime::now();
    let (mut cap, asg, _, lead) = cap_bed(None, &[100 * HOUR], now);
    assert!(cap.check(&lead.subscribe(), 1, now).await.is_empty());
    assert!(asg.all_calls().is_empty(), "no cap: not even a describe");

    let (mut cap, asg, _, lead) = cap_bed(Some(26 * HOUR), &[100 * HOUR], now);
    lead.send_replace(Leadership::Follower {
        term: Some(2),
        leader: Some("other".into()),
    });
    assert!(cap.check(&lead.subscribe(), 1, now).await.is_empty());
    assert!(terminations(&asg).is_empty(), "a follower never terminates");

    let (mut cap, asg, ec2, lead) = cap_bed(Some(26 * HOUR), &[100 * HOUR], now);
    ec2.0.lock().expect("lock").1 = true;
    assert!(cap.check(&lead.subscribe(), 1, now).await.is_empty());
    ec2.0.lock().expect("lock").1 = false;
    assert_eq!(
        cap.check(&lead.subscribe(), 1, now).await,
        ["i-a"],
        "the next check tries again"
    );
    assert_eq!(terminations(&asg).len(), 1);
}

#[test]
fn the_cap_is_checked_every_ten_polls_at_most_a_minute() {
    assert_eq!(
        cap::check_every(Duration::from_secs(1)),
        Duration::from_secs(10)
    );
    assert_eq!(
        cap::check_every(Duration::from_secs(5)),
        Duration::from_secs(50)
    );
    assert_eq!(
        cap::check_every(Duration::from_secs(300)),
        Duration::from_secs(60)
    );
}

// ---------------------------------------------------------------------------- host keys

mod host_keys {
    use super::*;
    use crate::aws::ssm::{Parameter, ParameterStore, ParameterWriter, SsmError};
    use crate::known_hosts::tests::{github, key, meta};
    use crate::known_hosts::{parse_stored, render, HostKey, PLACEHOLDER};
    use crate::scaler::host_keys::{
        wait_before_refresh, HostKeys, MetaSource, FETCH_BOUND, NO_PARAMETER_RECHECK,
        RETRY_AFTER_FAILURE,
    };
    use tokio::time::{advance, sleep};

    const PARAM: &str = "/agent-fleet/s1/known-hosts";
    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[derive(Clone)]
    struct FakeParam {
        value: Arc<Mutex<String>>,
        puts: Arc<Mutex<u32>>,
    }

    impl FakeParam {
        fn new(value: &str) -> Self {
            Self {
                value: Arc::new(Mutex::new(value.into())),
                puts: Default::default(),
            }
        }
        fn value(&self) -> String {
            self.value.lock().expect("lock").clone()
        }
        fn puts(&self) -> u32 {
            *self.puts.lock().expect("lock")
        }
    }

    impl ParameterStore for FakeParam {
        async fn get(&self, _: &str) -> Result<Parameter, SsmError> {
            Ok(Parameter {
                value: self.value(),
                secure: false,
            })
        }
    }

    impl ParameterWriter for FakeParam {
        async fn put_string(&self, name: &str, value: &str) -> Result<(), SsmError> {
            assert_eq!(name, PARAM);
            *self.value.lock().expect("lock") = value.into();
            *self.puts.lock().expect("lock") += 1;
            Ok(())
        }
    }

    /// A body, or why there is none.
    type Answer = Result<Vec<u8>, String>;

    /// GitHub: answers with whatever the test set last (`None`: never), counts the calls.
    #[derive(Clone)]
    struct FakeGithub {
        answer: Arc<Mutex<Option<Answer>>>,
        calls: Arc<Mutex<u32>>,
    }

    impl FakeGithub {
        fn new(answer: Result<Vec<u8>, String>) -> Self {
            Self {
                answer: Arc::new(Mutex::new(Some(answer))),
                calls: Default::default(),
            }
        }
        /// `None`: never answers.
        fn set(&self, answer: Option<Result<Vec<u8>, String>>) {
            *self.answer.lock().expect("lock") = answer;
        }
        fn calls(&self) -> u32 {
            *self.calls.lock().expect("lock")
        }
    }

    impl MetaSource for FakeGithub {
        async fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
            assert_eq!(url, "https://api.github.com/meta");
            *self.calls.lock().expect("lock") += 1;
            let answer = self.answer.lock().expect("lock").clone();
            match answer {
                Some(a) => a,
                None => std::future::pending().await,
            }
        }
    }

    struct KeysBed {
        settings: watch::Sender<Settings>,
        param: FakeParam,
        github: FakeGithub,
        leader: watch::Sender<Leadership>,
        logs: Logs,
        _guard: tracing::subscriber::DefaultGuard,
        _task: crate::AbortOnDrop<()>,
    }

    fn start(value: &str, answer: Result<Vec<u8>, String>) -> KeysBed {
        let logs = Logs::default();
        let guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(logs.clone()));
        let mut s = settings(Overprovision::None);
        s.known_hosts.parameter = Some(PARAM.into());
        let (settings, rx) = watch::channel(s);
        let (leader, leadership) = watch::channel(Leadership::default());
        let (param, github) = (FakeParam::new(value), FakeGithub::new(answer));
        let task = HostKeys::new(rx, param.clone(), github.clone())
            .run(leadership, CancellationToken::new());
        KeysBed {
            settings,
            param,
            github,
            leader,
            logs,
            _guard: guard,
            _task: crate::AbortOnDrop(tokio::spawn(task)),
        }
    }

    impl KeysBed {
        fn lead(&self, term: u64) {
            self.leader.send_replace(Leadership::Leader {
                term,
                valid_until: Instant::now() + 30 * DAY,
            });
        }
        fn warnings(&self) -> usize {
            self.logs.where_(|e| e.level == tracing::Level::WARN).len()
        }
    }

    fn good() -> Result<Vec<u8>, String> {
        Ok(meta(&github()))
    }

    #[test]
    fn a_set_younger_than_the_interval_waits_out_the_rest_of_it() {
        let now = SystemTime::now();
        assert_eq!(wait_before_refresh(None, now, DAY), Duration::ZERO);
        let h = Duration::from_secs(3600);
        assert_eq!(wait_before_refresh(Some(now - 20 * h), now, DAY), 4 * h);
        assert_eq!(
            wait_before_refresh(Some(now - 2 * DAY), now, DAY),
            Duration::ZERO
        );
        // Another machine's clock ahead of ours: as if just fetched.
        assert_eq!(wait_before_refresh(Some(now + h), now, DAY), DAY);
    }

    #[tokio::test(start_paused = true)]
    async fn the_placeholder_is_replaced_as_soon_as_a_leader_leads_then_refreshed_daily() {
        let bed = start(PLACEHOLDER, good());
        sleep(Duration::from_secs(3600)).await;
        assert_eq!(bed.github.calls(), 0, "a follower never calls GitHub");
        bed.lead(1);
        sleep(Duration::from_secs(1)).await;
        assert_eq!((bed.github.calls(), bed.param.puts()), (1, 1));
        let stored = parse_stored(&bed.param.value());
        assert_eq!(stored.keys.len(), 3);
        assert!(stored.fetched_at.is_some());
        assert!(bed
            .param
            .value()
            .lines()
            .skip(1)
            .all(|l| l.starts_with("github.com ")));
        advance(DAY - Duration::from_secs(10)).await;
        sleep(Duration::from_secs(1)).await;
        assert_eq!(bed.github.calls(), 1, "at most daily");
        sleep(Duration::from_secs(20)).await;
        assert_eq!((bed.github.calls(), bed.param.puts()), (2, 2));
        assert_eq!(
            bed.logs.messages("GitHub host keys updated").len(),
            1,
            "the same keys are not news"
        );
        assert_eq!(bed.warnings(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_term_refreshes_a_day_old_set_at_once_and_leaves_a_younger_one() {
        let keys: Vec<HostKey> = github()
            .iter()
            .map(|k| HostKey::parse(k).expect("k"))
            .collect();
        let h = Duration::from_secs(3600);
        let young = render(
            &keys,
            SystemTime::now() - 20 * h,
            "https://api.github.com/meta",
        );
        let bed = start(&young, good());
        bed.lead(7);
        sleep(Duration::from_secs(3 * 3600 + 3500)).await;
        assert_eq!(bed.github.calls(), 0, "20 h old: left for 4 h more");
        sleep(Duration::from_secs(200)).await;
        assert_eq!(bed.github.calls(), 1);

        let old = render(
            &keys,
            SystemTime::now() - 25 * h,
            "https://api.github.com/meta",
        );
        let bed = start(&old, good());
        bed.lead(8);
        sleep(Duration::from_secs(1)).await;
        assert_eq!((bed.github.calls(), bed.param.puts()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_keep_the_last_good_set_and_are_said_once_until_it_recovers() {
        let bed = start(PLACEHOLDER, good());
        bed.lead(1);
        sleep(Duration::from_secs(1)).await;
        let good_set = bed.param.value();
        assert_eq!(parse_stored(&good_set).keys.len(), 3);
        let bad_answers: Vec<Result<Vec<u8>, String>> = vec![
            Ok(b"{\"message\": \"API rate limit exceeded\"".to_vec()),
            Err("GET https://api.github.com/meta: HTTP 500".into()),
            Ok(meta(&[key("ssh-dss", 40)])),
            Ok(meta(&[])),
        ];
        let before = bed.github.calls();
        for (i, bad) in bad_answers.into_iter().enumerate() {
            bed.github.set(Some(bad));
            // The first failure comes at the daily refresh, the next ones at the retries.
            advance(if i == 0 { DAY } else { RETRY_AFTER_FAILURE }).await;
            sleep(Duration::from_secs(1)).await;
            assert_eq!(bed.github.calls(), before + i as u32 + 1, "failure {i}");
            assert_eq!(
                bed.param.value(),
                good_set,
                "failure {i}: the last good set stays"
            );
        }
        assert_eq!(bed.param.puts(), 1);
        assert_eq!(bed.warnings(), 1, "said once");
        let warning = &bed.logs.where_(|e| e.level == tracing::Level::WARN)[0];
        assert!(
            warning.message.contains("keeps the last good set") && warning.message.contains("JSON"),
            "{warning:?}"
        );
        bed.github.set(Some(good()));
        advance(RETRY_AFTER_FAILURE).await;
        sleep(Duration::from_secs(1)).await;
        assert_eq!(bed.param.puts(), 2);
        assert_eq!(
            bed.logs.messages("GitHub host keys refreshed again").len(),
            1
        );
        assert_eq!(bed.warnings(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_parameter_named_by_a_reload_is_filled_within_the_recheck() {
        let bed = start(PLACEHOLDER, good());
        bed.settings.send_modify(|s| s.known_hosts.parameter = None);
        bed.lead(1);
        sleep(Duration::from_secs(3 * 3600)).await;
        assert_eq!(bed.github.calls(), 0, "no parameter, nothing to refresh");
        bed.settings
            .send_modify(|s| s.known_hosts.parameter = Some(PARAM.into()));
        sleep(NO_PARAMETER_RECHECK).await;
        assert_eq!((bed.github.calls(), bed.param.puts()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_github_that_never_answers_is_given_up_on_at_the_bound() {
        let bed = start(PLACEHOLDER, good());
        bed.github.set(None);
        bed.lead(1);
        sleep(FETCH_BOUND - Duration::from_secs(1)).await;
        assert_eq!(bed.warnings(), 0);
        sleep(Duration::from_secs(2)).await;
        assert_eq!(bed.warnings(), 1);
        assert_eq!(bed.param.value(), PLACEHOLDER);
        bed.github.set(Some(good()));
        advance(RETRY_AFTER_FAILURE).await;
        sleep(Duration::from_secs(1)).await;
        assert_eq!(parse_stored(&bed.param.value()).keys.len(), 3);
    }
}
