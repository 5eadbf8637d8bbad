//! The election against [`MemoryStore`] on a paused clock: a fleet of candidates in one
//! runtime, every publication recorded, validity windows checked for overlap.

use super::*;
use crate::config::ElectionSettings;
use crate::election::Leadership;
use crate::scaler::Decision;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(20);
const DEADLINE: Duration = Duration::from_secs(12);
const RETRY: Duration = Duration::from_secs(4);

fn settings() -> ElectionSettings {
    ElectionSettings {
        lease: LEASE,
        renew_deadline: DEADLINE,
        retry: RETRY,
        prefix: "/agent-fleet/test/leader".into(),
    }
}

fn name(term: u64) -> String {
    term_name(&settings().prefix, term)
}

/// Stops polling the wrapped future while paused, the way SIGSTOP stops a process: its
/// timers still expire, and it sees them all at once when it resumes.
#[derive(Clone, Default)]
struct Stopper {
    paused: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl Stopper {
    fn stop(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().expect("lock").take() {
            w.wake();
        }
    }
}

struct Stoppable<F> {
    inner: Pin<Box<F>>,
    stopper: Stopper,
}

impl<F: Future> Future for Stoppable<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if self.stopper.paused.load(Ordering::SeqCst) {
            *self.stopper.waker.lock().expect("lock") = Some(cx.waker().clone());
            if self.stopper.paused.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        self.inner.as_mut().poll(cx)
    }
}

#[derive(Debug, Clone)]
struct Event {
    who: usize,
    at: Instant,
    state: Leadership,
}

struct Member {
    instance_id: String,
    holder: String,
    store: MemoryStore,
    rx: watch::Receiver<Leadership>,
    stop: CancellationToken,
    stopper: Stopper,
    task: Option<JoinHandle<Elector<MemoryStore>>>,
}

/// Candidates on one store, each with its own store handle (for faults), all
/// publications funnelled into one ordered history.
struct Fleet {
    store: MemoryStore,
    fleet_tx: watch::Sender<Vec<String>>,
    members: Vec<Member>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    history: Vec<Event>,
    seed: u64,
}

impl Fleet {
    fn new(ids: usize, seed: u64) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let fleet_ids = (0..ids).map(|i| format!("i-{i}")).collect();
        Self {
            store: MemoryStore::new(),
            fleet_tx: watch::channel(fleet_ids).0,
            members: Vec::new(),
            events_tx,
            events,
            history: Vec::new(),
            seed,
        }
    }

    /// Starts a candidate on instance `i-<instance>`; returns its index.
    fn start(&mut self, instance: usize, preferred: bool) -> usize {
        let who = self.members.len();
        let instance_id = format!("i-{instance}");
        let store = self.store.handle();
        let elector = Elector::new(
            store.clone(),
            settings(),
            instance_id.clone(),
            preferred,
            self.fleet_tx.subscribe(),
        )
        .with_seed(self.seed * 1000 + who as u64);
        let holder = elector.holder().to_string();
        let (tx, rx) = watch::channel(Leadership::default());
        let stop = CancellationToken::new();
        let stopper = Stopper::default();
        let task = tokio::spawn(Stoppable {
            inner: Box::pin(elector.run(stop.clone(), tx)),
            stopper: stopper.clone(),
        });
        let mut forward = rx.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            while forward.changed().await.is_ok() {
                let state = forward.borrow_and_update().clone();
                let at = Instant::now();
                if events.send(Event { who, at, state }).is_err() {
                    break;
                }
            }
        });
        self.members.push(Member {
            instance_id,
            holder,
            store,
            rx,
            stop,
            stopper,
            task: Some(task),
        });
        who
    }

    fn kill(&mut self, who: usize) {
        if let Some(t) = self.members[who].task.take() {
            t.abort();
        }
    }

    /// Cancels `who`'s run and returns its elector.
    async fn shut_down(&mut self, who: usize) -> Elector<MemoryStore> {
        let m = &mut self.members[who];
        m.stop.cancel();
        m.task.take().expect("running").await.expect("run returns")
    }

    fn drain(&mut self) {
        while let Ok(e) = self.events.try_recv() {
            self.history.push(e);
        }
    }

    /// Runs the clock until an event matches, recording everything on the way.
    async fn wait_for(&mut self, within: Duration, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        let deadline = Instant::now() + within;
        loop {
            let next = tokio::select! {
                e = self.events.recv() => e,
                _ = tokio::time::sleep_until(deadline) => None,
            };
            let e = next?;
            self.history.push(e.clone());
            if pred(&e) {
                return Some(e);
            }
        }
    }

    async fn wait_for_leader(&mut self, within: Duration, term_above: u64) -> Option<Event> {
        self.wait_for(
            within,
            |e| matches!(e.state, Leadership::Leader { term, .. } if term > term_above),
        )
        .await
    }

    async fn run_for(&mut self, d: Duration) {
        sleep(d).await;
        self.drain();
    }

    /// Who considers itself leader right now.
    fn leaders(&self) -> Vec<usize> {
        let now = Instant::now();
        (0..self.members.len())
            .filter(|i| self.members[*i].task.is_some())
            .filter(|i| self.members[*i].rx.borrow().valid_term(now).is_some())
            .collect()
    }

    /// Every `[published, valid_until)` window of every `Leader` publication; windows of
    /// different terms must never overlap.
    fn assert_windows_disjoint(&mut self) -> usize {
        self.drain();
        let windows: Vec<(u64, Instant, Instant, usize)> = self
            .history
            .iter()
            .filter_map(|e| match e.state {
                Leadership::Leader { term, valid_until } => {
                    assert!(valid_until > e.at, "published an expired lease: {e:?}");
                    Some((term, e.at, valid_until, e.who))
                }
                _ => None,
            })
            .collect();
        for a in &windows {
            for b in &windows {
                if a.0 != b.0 {
                    assert!(
                        a.2 <= b.1 || b.2 <= a.1,
                        "term {} (candidate {}) valid [{:?}, {:?}) overlaps term {} (candidate {}) valid [{:?}, {:?})",
                        a.0, a.3, a.1, a.2, b.0, b.3, b.1, b.2
                    );
                }
            }
        }
        windows.len()
    }
}

#[tokio::test(start_paused = true)]
async fn exactly_one_leader_among_five_and_all_agree_on_the_term() {
    let mut f = Fleet::new(5, 1);
    for i in 0..5 {
        f.start(i, false);
    }
    let t0 = Instant::now();
    let first = f.wait_for_leader(LEASE + RETRY, 0).await.expect("a leader");
    assert!(first.at - t0 <= LEASE + RETRY);
    f.run_for(LEASE + RETRY - (first.at - t0)).await;
    assert_eq!(f.leaders(), vec![first.who]);
    let holder = f.members[first.who].holder.clone();
    for (i, m) in f.members.iter().enumerate() {
        let l = m.rx.borrow().clone();
        assert_eq!(l.term(), Some(1), "candidate {i}: {l:?}");
        if i != first.who {
            assert_eq!(
                l,
                Leadership::Follower {
                    term: Some(1),
                    leader: Some(holder.clone())
                }
            );
        }
    }
    // Stays put: no spurious takeover over many leases.
    f.run_for(LEASE * 20).await;
    assert_eq!(f.leaders(), vec![first.who]);
    assert_eq!(f.store.names(), vec![name(1)]);
    f.assert_windows_disjoint();
}

#[tokio::test(start_paused = true)]
async fn a_killed_leader_is_replaced_within_lease_plus_deadline_plus_retry() {
    for seed in 0..5 {
        let mut f = Fleet::new(5, seed);
        for i in 0..5 {
            f.start(i, false);
        }
        let first = f.wait_for_leader(LEASE + RETRY, 0).await.expect("a leader");
        f.run_for(LEASE + RETRY.mul_f64(seed as f64 / 5.0)).await;
        f.kill(first.who);
        let killed = Instant::now();
        let next = f.wait_for_leader(LEASE * 5, 1).await.expect("a new leader");
        let took = next.at - killed;
        // Non-preferred candidates wait one extra retry for a preferred one that is not
        // there; each poll is jittered by up to 10 %.
        assert!(
            took <= LEASE + DEADLINE + RETRY * 2 + RETRY / 10,
            "seed {seed}: failover took {took:?}"
        );
        assert_eq!(next.state.term(), Some(2));
        f.assert_windows_disjoint();
    }
}

#[tokio::test(start_paused = true)]
async fn a_live_preferred_candidate_wins_the_failover() {
    for seed in 0..5 {
        let mut f = Fleet::new(5, seed);
        let old = f.start(0, false);
        f.wait_for_leader(LEASE, 0).await.expect("a new leader");
        for i in 1..4 {
            f.start(i, false);
        }
        let preferred = f.start(4, true);
        f.run_for(LEASE + RETRY.mul_f64(seed as f64 / 5.0)).await;
        f.kill(old);
        let killed = Instant::now();
        let next = f.wait_for_leader(LEASE * 5, 1).await.expect("a new leader");
        assert_eq!(next.who, preferred, "seed {seed}");
        let took = next.at - killed;
        assert!(
            took <= LEASE + DEADLINE + RETRY + RETRY / 10,
            "seed {seed}: failover took {took:?}"
        );
        f.assert_windows_disjoint();
    }
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_store_fails_steps_down_by_its_deadline() {
    for (seed, slow) in [(0, false), (1, true), (2, false), (3, true)] {
        let mut f = Fleet::new(4, seed);
        for i in 0..4 {
            f.start(i, false);
        }
        let first = f.wait_for_leader(LEASE + RETRY, 0).await.expect("a leader");
        f.run_for(LEASE + RETRY.mul_f64(seed as f64 / 4.0)).await;
        let m = &f.members[first.who];
        if slow {
            // Answers arrive, but after the renew's deadline: they must not count.
            m.store
                .set_latency(Some(RETRY / 2 + Duration::from_millis(1)));
        } else {
            m.store.fail_all(true);
        }
        let broke = Instant::now();
        let Leadership::Leader { valid_until, .. } = m.rx.borrow().clone() else {
            panic!("not leading");
        };
        let who = first.who;
        let down = f
            .wait_for(LEASE, |e| {
                e.who == who && matches!(e.state, Leadership::Follower { .. })
            })
            .await
            .expect("stepped down");
        assert!(down.at <= valid_until, "stepped down at {:?}", down.at);
        assert!(down.at - broke <= DEADLINE);
        // Nobody else has led yet at that instant, and someone takes over later.
        let next = f.wait_for_leader(LEASE * 3, 1).await.expect("a new leader");
        assert_ne!(next.who, who);
        assert!(f.members[who]
            .rx
            .borrow()
            .valid_term(Instant::now())
            .is_none());
        f.assert_windows_disjoint();
    }
}

#[tokio::test(start_paused = true)]
async fn a_stopped_leader_never_overlaps_its_successor() {
    let mut takeovers = 0;
    for seed in 0..24u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut f = Fleet::new(4, seed);
        for i in 0..4 {
            f.start(i, false);
        }
        let first = f.wait_for_leader(LEASE + RETRY, 0).await.expect("a leader");
        let who = first.who;
        // Store calls that take a while, so a stop can land in the middle of a renew.
        let latency = Duration::from_millis(rng.u64(0..1500));
        f.members[who].store.set_latency(Some(latency));
        f.run_for(RETRY * 3 + Duration::from_millis(rng.u64(0..4000)))
            .await;
        let m = &f.members[who];
        match rng.u8(0..3) {
            0 => {}
            1 => m.store.freeze(Freeze::Requests),
            _ => m.store.freeze(Freeze::Responses),
        }
        m.stopper.stop();
        let stopped_for = LEASE + Duration::from_millis(rng.u64(0..40_000));
        f.run_for(stopped_for).await;
        let m = &f.members[who];
        m.store.thaw();
        m.stopper.resume();
        f.run_for(LEASE * 3).await;
        let windows = f.assert_windows_disjoint();
        assert!(windows > 0);
        if f.history
            .iter()
            .any(|e| e.who != who && matches!(e.state, Leadership::Leader { .. }))
        {
            takeovers += 1;
        }
        assert_eq!(f.leaders().len(), 1, "seed {seed}");
    }
    assert!(
        takeovers >= 20,
        "only {takeovers} of 24 runs saw a takeover"
    );
}

#[tokio::test(start_paused = true)]
async fn release_hands_over_at_once_to_the_preferred_candidate() {
    for seed in 0..5 {
        let mut f = Fleet::new(4, seed);
        let old = f.start(0, false);
        f.wait_for_leader(LEASE, 0).await.expect("a new leader");
        f.start(1, false);
        f.start(2, false);
        let preferred = f.start(3, true);
        f.run_for(LEASE + RETRY.mul_f64(seed as f64 / 5.0)).await;

        let mut elector = f.shut_down(old).await;
        assert_eq!(
            *f.members[old].rx.borrow(),
            Leadership::Follower {
                term: Some(1),
                leader: Some(f.members[old].holder.clone())
            }
        );
        assert_eq!(elector.held_term(), Some(1));
        assert_eq!(elector.release().await.expect("released"), Some(1));
        assert_eq!(elector.release().await.expect("released"), None);
        let released = Instant::now();
        let next = f.wait_for_leader(LEASE * 3, 1).await.expect("a new leader");
        assert_eq!(next.who, preferred);
        assert!(
            next.at - released <= RETRY + RETRY / 10 + DEADLINE,
            "took {:?}",
            next.at - released
        );
        f.assert_windows_disjoint();
    }
}

#[tokio::test(start_paused = true)]
async fn release_without_a_preferred_candidate_still_skips_the_lease() {
    let mut f = Fleet::new(3, 9);
    let old = f.start(0, false);
    f.wait_for_leader(LEASE, 0).await.expect("a new leader");
    f.start(1, false);
    f.start(2, false);
    f.run_for(LEASE).await;
    let mut elector = f.shut_down(old).await;
    elector.release().await.expect("released");
    let released = Instant::now();
    let next = f.wait_for_leader(LEASE * 3, 1).await.expect("a new leader");
    assert!(next.at - released <= RETRY * 2 + RETRY / 5 + DEADLINE);
    f.assert_windows_disjoint();
}

#[tokio::test(start_paused = true)]
async fn a_restarted_supervisor_takes_over_its_predecessors_term() {
    let mut f = Fleet::new(3, 4);
    let old = f.start(0, true);
    f.wait_for_leader(LEASE, 0).await.expect("a new leader");
    f.start(1, false);
    f.run_for(LEASE).await;
    f.kill(old);
    let restarted_at = Instant::now();
    let again = f.start(0, true);
    let next = f.wait_for_leader(LEASE * 3, 1).await.expect("a new leader");
    assert_eq!(next.who, again);
    assert!(next.at - restarted_at <= DEADLINE + Duration::from_millis(10));
    f.assert_windows_disjoint();
}

#[tokio::test(start_paused = true)]
async fn old_terms_are_deleted() {
    let mut f = Fleet::new(3, 5);
    let mut leader = f.start(0, false);
    f.wait_for_leader(LEASE, 0).await.expect("a new leader");
    f.start(1, false);
    f.start(2, false);
    for round in 1..=5u64 {
        f.run_for(LEASE).await;
        let mut elector = f.shut_down(leader).await;
        elector.release().await.expect("released");
        let instance = f.members[leader]
            .instance_id
            .trim_start_matches("i-")
            .parse()
            .expect("instance number");
        f.start(instance, false);
        let next = f
            .wait_for_leader(LEASE * 3, round)
            .await
            .expect("a new leader");
        leader = next.who;
    }
    f.run_for(RETRY * 2).await;
    assert_eq!(f.store.names(), vec![name(5), name(6)]);
    f.assert_windows_disjoint();
}

#[tokio::test(start_paused = true)]
async fn malformed_records_do_not_stop_the_election() {
    let garbage = [
        "",
        "not json",
        "{}",
        "{\"holder\":\"i-9#1\",\"seq\":1}",
        "{\"holder\":\"i-9#1\",\"seq\":1,\"lease_ms\":0,\"renew_deadline_ms\":1,\"released\":false,\"standbys\":[],\"follower_poll_ms\":1}",
        // One past u64::MAX: not a u64, so the record is unreadable (an overlong lease
        // that parses is waited as the cap: see the test below).
        "{\"holder\":\"i-9#1\",\"seq\":1,\"lease_ms\":18446744073709551616,\"renew_deadline_ms\":1,\"released\":false,\"standbys\":[],\"follower_poll_ms\":1}",
        "[[[[[[[[[[",
    ];
    for (seed, junk) in garbage.iter().enumerate() {
        // A garbage term 1 before anyone starts: it expires like any silent term.
        let mut f = Fleet::new(3, seed as u64);
        f.store.raw_put(&name(1), junk);
        for i in 0..3 {
            f.start(i, i == 0);
        }
        let first = f.wait_for_leader(LEASE * 3, 1).await.expect("a new leader");
        assert_eq!(first.state.term(), Some(2), "junk {junk:?}");

        // Junk over the live term: the leader overwrites it and keeps leading.
        f.run_for(LEASE).await;
        f.store.raw_put(&name(2), junk);
        f.run_for(LEASE * 3).await;
        assert_eq!(f.leaders(), vec![first.who]);

        // Junk as the next term: the leader steps down, the junk term expires.
        f.store.raw_put(&name(3), junk);
        let next = f.wait_for_leader(LEASE * 4, 3).await.expect("a new leader");
        assert_eq!(next.state.term(), Some(4), "junk {junk:?}");
        f.assert_windows_disjoint();
    }
}

/// A record written by someone other than a validated supervisor.
fn record_json(lease_ms: u64, follower_poll_ms: u64) -> String {
    serde_json::json!({
        "holder": "i-9#1", "seq": 1, "lease_ms": lease_ms, "renew_deadline_ms": u64::MAX,
        "released": false, "standbys": [], "follower_poll_ms": follower_poll_ms,
    })
    .to_string()
}

#[tokio::test(start_paused = true)]
async fn an_overlong_advertised_lease_is_waited_as_the_cap_not_a_day() {
    use crate::config::MAX_ELECTION_TIMING;
    for (seed, (lease_ms, poll_ms)) in [
        (u64::MAX, u64::MAX),
        (24 * 3600 * 1000, 1),
        (MAX_ELECTION_TIMING.as_millis() as u64 + 1, u64::MAX),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = Fleet::new(3, seed as u64);
        f.store.raw_put(&name(1), &record_json(lease_ms, poll_ms));
        let t0 = Instant::now();
        f.start(0, true);
        f.start(1, false);
        f.start(2, false);
        let first = f
            .wait_for_leader(MAX_ELECTION_TIMING + DEADLINE + RETRY * 2, 1)
            .await
            .unwrap_or_else(|| panic!("lease {lease_ms}: no takeover after the cap"));
        assert_eq!(first.state.term(), Some(2));
        let took = first.at - t0;
        assert!(
            took >= MAX_ELECTION_TIMING + DEADLINE,
            "lease {lease_ms}: took over after {took:?}, before the cap"
        );
        assert_eq!(first.who, 0, "the preferred candidate");
        f.assert_windows_disjoint();
    }
}

#[tokio::test(start_paused = true)]
async fn names_beyond_ten_digits_are_not_terms() {
    let mut f = Fleet::new(3, 11);
    let prefix = settings().prefix;
    for junk in [
        "99999999999",
        "18446744073709551615",
        "184467440737095516150",
    ] {
        f.store
            .raw_put(&format!("{prefix}/{junk}"), &record_json(20_000, 60_000));
    }
    f.start(0, false);
    f.start(1, false);
    let first = f.wait_for_leader(LEASE + RETRY, 0).await.expect("a leader");
    assert_eq!(first.state.term(), Some(1));
}

#[tokio::test(start_paused = true)]
async fn the_largest_term_is_led_and_then_nothing_wraps_or_panics() {
    let mut f = Fleet::new(3, 12);
    f.store
        .raw_put(&name(MAX_TERM - 1), &record_json(20_000, 60_000));
    let a = f.start(0, true);
    f.start(1, false);
    f.start(2, false);
    let first = f
        .wait_for_leader(LEASE + DEADLINE + RETRY * 2, MAX_TERM - 2)
        .await
        .expect("a leader");
    assert_eq!((first.who, first.state.term()), (a, Some(MAX_TERM)));
    // Renews go on without a term to check after it.
    f.run_for(LEASE * 3).await;
    assert_eq!(f.leaders(), vec![a]);
    // Its successor has no term to create: nobody leads, nobody crashes, no name wraps.
    f.kill(a);
    assert!(f.wait_for_leader(LEASE * 10, 0).await.is_none());
    assert!(f.members[1].task.as_ref().is_some_and(|t| !t.is_finished()));
    assert!(f.members[2].task.as_ref().is_some_and(|t| !t.is_finished()));
    assert_eq!(
        f.store.names(),
        vec![name(MAX_TERM - 1), name(MAX_TERM)],
        "no eleven-digit term"
    );
    f.assert_windows_disjoint();
}

#[tokio::test(start_paused = true)]
async fn too_many_parameters_under_the_prefix_stop_the_listing_not_the_fleet() {
    let mut f = Fleet::new(3, 13);
    let prefix = settings().prefix;
    for i in 0..MAX_LIST_PAGES * 10 {
        f.store.raw_put(&format!("{prefix}/junk-{i}"), "x");
    }
    f.store.raw_put(&name(4), &record_json(20_000, 60_000));
    let before = f.store.calls().list;
    f.start(0, false);
    // Nobody may guess the latest term from a partial list: no leader, slow retries.
    assert!(f.wait_for_leader(LEASE * 3, 0).await.is_none());
    let pages = f.store.calls().list - before;
    let per_attempt = MAX_LIST_PAGES as u64;
    assert!(
        pages <= per_attempt * (1 + (LEASE * 3).as_secs() / 50),
        "{pages} pages listed"
    );
    // Cleaned up: the candidate finds term 4 and takes over from it.
    for name in f.store.names() {
        if name.contains("junk-") {
            f.store.delete(&name).await.expect("memory");
        }
    }
    let next = f
        .wait_for_leader(UNKNOWN_FLEET_FOLLOWER_POLL * 2 + LEASE * 2, 0)
        .await
        .expect("a leader once the prefix is clean");
    assert_eq!(next.state.term(), Some(5));
}

#[tokio::test(start_paused = true)]
async fn the_leader_names_standbys_and_a_slow_poll_from_the_fleet_size() {
    let mut f = Fleet::new(50, 6);
    let old = f.start(7, false);
    f.wait_for_leader(LEASE, 0).await.expect("a new leader");
    let (value, _) = f.store.peek(&name(1)).expect("term 1");
    let r = Record::parse(&value).expect("a record");
    assert_eq!(r.holder, f.members[old].holder);
    assert_eq!(r.standbys, vec!["i-0", "i-1", "i-2"]);
    // 46 others share FOLLOWER_READS_PER_SEC.
    assert_eq!(
        r.follower_poll(),
        Duration::from_secs_f64(46.0 / FOLLOWER_READS_PER_SEC)
    );
    assert_eq!((r.lease(), r.released), (LEASE, false));

    // Standbys keep their role while they are members; vacancies go by list order.
    let mut ids: Vec<String> = (0..50).rev().map(|i| format!("i-{i}")).collect();
    ids.retain(|id| id != "i-1");
    f.fleet_tx.send_replace(ids);
    f.run_for(RETRY * 2).await;
    let r = Record::parse(&f.store.peek(&name(1)).expect("term 1").0).expect("a record");
    assert_eq!(r.standbys, vec!["i-0", "i-2", "i-49"]);

    // A fleet of two: nobody left to poll slowly, and the floor is `retry`.
    f.fleet_tx.send_replace(vec!["i-7".into(), "i-0".into()]);
    f.run_for(RETRY * 2).await;
    let r = Record::parse(&f.store.peek(&name(1)).expect("term 1").0).expect("a record");
    assert_eq!(
        (r.follower_poll(), r.standbys),
        (RETRY, vec!["i-0".to_string()])
    );
}

#[tokio::test(start_paused = true)]
async fn store_outage_then_recovery() {
    let mut f = Fleet::new(3, 8);
    for i in 0..3 {
        f.start(i, false);
    }
    f.wait_for_leader(LEASE, 0).await.expect("a new leader");
    for m in &f.members {
        m.store.fail_all(true);
    }
    f.run_for(LEASE * 3).await;
    assert!(f.leaders().is_empty());
    for m in &f.members {
        m.store.fail_all(false);
    }
    let next = f.wait_for_leader(LEASE * 5, 0).await.expect("a new leader");
    assert!(next.state.term().is_some());
    f.run_for(LEASE * 2).await;
    assert_eq!(f.leaders().len(), 1);
    f.assert_windows_disjoint();
}

#[tokio::test]
async fn mono_ns_is_clock_monotonic() {
    let now = tokio::time::Instant::now();
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    let mono = ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64;
    let ours = mono_ns(now);
    assert!(ours.abs_diff(mono) < 50_000_000, "{ours} vs {mono}");
    let later = mono_ns(now + Duration::from_secs(5));
    // Each call reads both clocks anew: allow for the time between the reads.
    assert!((later - ours).abs_diff(5_000_000_000) < 1_000_000);
}

#[tokio::test(start_paused = true)]
async fn fleet_cost_and_failover_by_size() {
    let cfg = settings();
    let mut rows = Vec::new();
    for n in [10, 100, 1000] {
        rows.push(simulate(n, Duration::from_secs(600), cfg.clone()).await);
    }
    println!(
        "candidates  ssm_calls_per_s  failover_s  (overwrite/get/create/delete/list in 600 s)"
    );
    for r in &rows {
        let c = r.calls;
        println!(
            "{:>10}  {:>15.3}  {:>10.1}  ({}/{}/{}/{}/{})",
            r.candidates,
            r.ssm_calls_per_sec,
            r.failover.as_secs_f64(),
            c.overwrite,
            c.get,
            c.create,
            c.delete,
            c.list
        );
    }
    for r in &rows {
        assert!(r.ssm_calls_per_sec <= 1.5, "{r:?}");
        assert!(r.failover <= LEASE + DEADLINE + RETRY * 2, "{r:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_leader_writes_the_scalers_latest_decision_into_its_record() {
    let store = MemoryStore::new();
    let (decision_tx, decision_rx) = watch::channel(None);
    let elector = Elector::new(
        store.handle(),
        settings(),
        "i-0",
        false,
        watch::channel(Vec::new()).1,
    )
    .with_decisions(decision_rx)
    .with_seed(3);
    let (tx, mut rx) = watch::channel(Leadership::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(elector.run(stop.clone(), tx));
    tokio::time::timeout(LEASE, async {
        while !matches!(*rx.borrow_and_update(), Leadership::Leader { .. }) {
            rx.changed().await.expect("election running");
        }
    })
    .await
    .expect("leads");
    let record = || Record::parse(&store.peek(&name(1)).expect("term 1").0).expect("a record");
    assert_eq!(record().decision, None, "no decision yet");

    let raised = Decision {
        queued: Some(3),
        running: Some(1),
        target: Some(4),
        desired_before: Some(1),
        desired_after: Some(4),
        ..Decision::new(
            std::time::UNIX_EPOCH + Duration::from_secs(1_767_225_600),
            "raised",
        )
    };
    decision_tx.send_replace(Some(raised.clone()));
    sleep(RETRY + RETRY / 5).await;
    assert_eq!(
        record().decision,
        Some(raised.clone()),
        "written at the next renew"
    );

    // A decision that would make the record too big for SSM is left out; the renew
    // goes on.
    decision_tx.send_replace(Some(Decision {
        reason: Some("x".repeat(5_000)),
        ..raised.clone()
    }));
    sleep(RETRY * 2).await;
    let r = record();
    assert_eq!(r.decision, None);
    assert!(r.to_json().len() < 4096);
    assert_eq!(rx.borrow().valid_term(Instant::now()), Some(1));

    // The release carries the latest decision too.
    decision_tx.send_replace(Some(raised.clone()));
    stop.cancel();
    let mut elector = task.await.expect("run returns");
    assert_eq!(elector.release().await.expect("released"), Some(1));
    let r = record();
    assert!(r.released);
    assert_eq!(r.decision, Some(raised));
}
