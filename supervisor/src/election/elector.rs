//! The election loop: one candidate's view of the terms in the store.

use super::record::Record;
use super::store::{next_term, term_name, Created, LeaseStore, StoreError, MAX_TERM};
use super::{mono_ns, STANDBYS};
use crate::config::{ElectionSettings, MAX_ELECTION_TIMING};
use crate::election::Leadership;
use crate::scaler::Decision;
use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// Reads per second that the followers outside the standbys share, fleet-wide. With the
/// leader (2 calls per retry) and [`STANDBYS`] standbys (1 per retry) at the default
/// 4 s retry the fleet makes ≈ 1.35 SSM calls/s at any size up to
/// [`MAX_FOLLOWER_POLL`] × this budget ≈ 1,080 members; beyond that the cap wins and the
/// rate creeps up (1.5 calls/s at ≈ 2,700 members).
pub const FOLLOWER_READS_PER_SEC: f64 = 0.1;

/// The slowest a follower outside the standbys ever polls. It bounds failover when the
/// leader and every standby are gone at once, and how late a newly named standby learns
/// its role.
pub const MAX_FOLLOWER_POLL: Duration = Duration::from_secs(3 * 3600);

/// The follower poll when the leader has no fleet list (the daemon feeds none yet) or the
/// record is unreadable.
pub const UNKNOWN_FLEET_FOLLOWER_POLL: Duration = Duration::from_secs(60);

/// One candidate. Build it, [`run`](Self::run) it until shutdown, then
/// [`release`](Self::release) once leader work has stopped.
pub struct Elector<S: LeaseStore> {
    store: S,
    settings: ElectionSettings,
    instance_id: String,
    /// `<instance-id>#<nonce>`: unique per process, so a restarted supervisor on the same
    /// instance is a different candidate from its predecessor.
    holder: String,
    /// The scaler-only role: polls every retry and takes over as soon as a lease expires;
    /// everyone else waits one more retry, so a live preferred candidate wins the race.
    preferred: bool,
    /// Instance ids of the fleet's members, in the order the leader should pick standbys.
    fleet: watch::Receiver<Vec<String>>,
    /// The scaler's latest decision, copied into every record this candidate writes (for
    /// operators; see [`Decision`]). A closed channel keeps its last value.
    decision: watch::Receiver<Option<Decision>>,
    rng: fastrand::Rng,
    state: State,
    /// The last (term, holder) announced in the log, so each change is logged once.
    announced: Option<(u64, Option<String>)>,
    /// The last term whose unreadable (or overlong-lease) record was logged.
    malformed_logged: Option<u64>,
}

enum State {
    /// Learning the latest term. `floor` is the highest term known so far (0 at boot):
    /// terms only ever go up, even if someone wiped the prefix.
    Start {
        floor: u64,
    },
    Following(Observed),
    Leading(Lead),
}

/// What a follower knows about the term it watches.
struct Observed {
    term: u64,
    version: u64,
    /// When this candidate first saw `version` (its own monotonic clock).
    first_seen: Instant,
    /// `None`: the record is unreadable; the version still serves as the heartbeat.
    record: Option<Record>,
    next_poll: Instant,
    /// Observed since start-up: a term held by an earlier process on this instance can be
    /// taken over without waiting out its lease.
    since_start: bool,
    /// Slow followers spread their first poll over a whole interval, so a fleet started
    /// at once does not poll in step.
    spread_next: bool,
}

/// What a leader (or a winner still waiting out `renew_deadline`) knows.
struct Lead {
    term: u64,
    seq: u64,
    /// The version of our last write; a smaller one means the parameter was deleted and
    /// written anew, so someone has moved on.
    version: u64,
    /// Start of the last counted renew + renew_deadline. Never extended otherwise.
    valid_until: Instant,
    /// The create's return + renew_deadline: by then every older leader's validity,
    /// which ends at most renew_deadline after its last check that found no newer term,
    /// has run out.
    lead_from: Instant,
    /// Published `Leader` (after `lead_from`).
    leading: bool,
    next_renew: Instant,
    standbys: Vec<String>,
    follower_poll: Duration,
    /// An old term (winner of N deletes N-2) still to delete, once leading.
    cleanup: Option<u64>,
}

enum Next {
    Go(State),
    /// Shutdown: keep the state for [`Elector::release`].
    Stop(State),
}

impl<S: LeaseStore> Elector<S> {
    pub fn new(
        store: S,
        settings: ElectionSettings,
        instance_id: impl Into<String>,
        preferred: bool,
        fleet: watch::Receiver<Vec<String>>,
    ) -> Self {
        let seed = fastrand::u64(..) ^ u64::from(std::process::id()).rotate_left(32);
        Self::build(
            store,
            settings,
            instance_id.into(),
            preferred,
            fleet,
            fastrand::Rng::with_seed(seed),
        )
    }

    /// Deterministic nonce and jitter, for tests and the simulation.
    pub fn with_seed(self, seed: u64) -> Self {
        let Self {
            store,
            settings,
            instance_id,
            preferred,
            fleet,
            decision,
            ..
        } = self;
        Self {
            decision,
            ..Self::build(
                store,
                settings,
                instance_id,
                preferred,
                fleet,
                fastrand::Rng::with_seed(seed),
            )
        }
    }

    /// Feeds the scaler's latest decision into the records this candidate writes while it
    /// holds a term (see [`Record::decision`]). Without it, records carry none.
    pub fn with_decisions(mut self, decision: watch::Receiver<Option<Decision>>) -> Self {
        self.decision = decision;
        self
    }

    fn build(
        store: S,
        mut settings: ElectionSettings,
        instance_id: String,
        preferred: bool,
        fleet: watch::Receiver<Vec<String>>,
        mut rng: fastrand::Rng,
    ) -> Self {
        let holder = format!("{instance_id}#{:016x}", rng.u64(..));
        // Validated settings are within the cap already; a hand-built one is clamped so
        // that no `Instant + timing` below can overflow (a panic aborts the supervisor).
        for d in [
            &mut settings.lease,
            &mut settings.renew_deadline,
            &mut settings.retry,
        ] {
            *d = (*d).min(MAX_ELECTION_TIMING);
        }
        Self {
            store,
            settings,
            instance_id,
            holder,
            preferred,
            fleet,
            decision: watch::channel(None).1,
            rng,
            state: State::Start { floor: 0 },
            announced: None,
            malformed_logged: None,
        }
    }

    /// `<instance-id>#<nonce>`, as written in the records.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The term this candidate created and still holds (leading or waiting to lead).
    pub fn held_term(&self) -> Option<u64> {
        match &self.state {
            State::Leading(l) => Some(l.term),
            _ => None,
        }
    }

    /// Runs the election until `shutdown`, publishing on `tx`. Store failures are retried
    /// forever; nothing here ends the loop but `shutdown`.
    ///
    /// On shutdown it stops renewing, publishes `Follower` (so leader work stops) and
    /// returns the elector **without** releasing the term: the caller stops its leader
    /// work, then calls [`release`](Self::release) so a successor takes over at once. A
    /// term never released simply expires after its lease. Dropping the future is a
    /// crash as far as the fleet can tell, and equally safe.
    pub async fn run(mut self, shutdown: CancellationToken, tx: watch::Sender<Leadership>) -> Self {
        let mut state = std::mem::replace(&mut self.state, State::Start { floor: 0 });
        loop {
            let next = match state {
                State::Start { floor } => self.start(floor, &shutdown, &tx).await,
                State::Following(o) => self.follow(o, &shutdown, &tx).await,
                State::Leading(l) => self.lead(l, &shutdown, &tx).await,
            };
            match next {
                Next::Go(s) => state = s,
                Next::Stop(s) => {
                    if let State::Leading(l) = &s {
                        let term = l.term;
                        publish(
                            &tx,
                            Leadership::Follower {
                                term: Some(term),
                                leader: Some(self.holder.clone()),
                            },
                        );
                        tracing::info!(
                            term,
                            holder = %self.holder,
                            reason = "shutdown",
                            leadership = "stopped",
                            "stopped leading; the term is held until released or expired"
                        );
                    }
                    self.state = s;
                    return self;
                }
            }
        }
    }

    /// Gives up the held term by writing its record with `released: true`, so the next
    /// candidate (a preferred one first) takes over without waiting out the lease. Call
    /// it after [`run`](Self::run) returned and leader work stopped. Returns the
    /// released term, `None` if this candidate held none.
    pub async fn release(&mut self) -> Result<Option<u64>, StoreError> {
        let State::Leading(l) = &mut self.state else {
            return Ok(None);
        };
        l.seq += 1;
        let name = term_name(&self.settings.prefix, l.term);
        let record = Record {
            released: true,
            ..record_for(&self.holder, &self.settings, l, &self.decision)
        };
        let limit = self.settings.retry / 2;
        let version = bounded(
            limit,
            "PutParameter",
            &name,
            self.store.overwrite(&name, &record.to_json()),
        )
        .await?;
        let term = l.term;
        tracing::info!(
            term,
            holder = %self.holder,
            reason = "released",
            leadership = "released",
            "released the lease"
        );
        let now = Instant::now();
        self.state = State::Following(Observed {
            term,
            version,
            first_seen: now,
            record: Some(record),
            next_poll: now,
            since_start: false,
            spread_next: false,
        });
        Ok(Some(term))
    }

    /// Each store call's deadline; a renew (write + check) thus fits in one retry.
    fn call_timeout(&self) -> Duration {
        self.settings.retry / 2
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.9 + 0.2 * self.rng.f64())
    }

    async fn start(
        &mut self,
        floor: u64,
        shutdown: &CancellationToken,
        tx: &watch::Sender<Leadership>,
    ) -> Next {
        let prefix = self.settings.prefix.clone();
        let listed = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Next::Stop(State::Start { floor }),
            r = bounded(self.settings.retry, "GetParametersByPath", &prefix, self.store.latest_term(&prefix)) => r,
        };
        let latest = match listed {
            Ok(latest) => latest.unwrap_or(0),
            Err(e @ StoreError::ListTooLong { .. }) => {
                // Needs an operator; listing again soon would only cost every candidate
                // MAX_LIST_PAGES calls per retry.
                tracing::error!(prefix = %prefix, error = %e, "cannot find the latest lease term; retrying slowly");
                let pause = self.jitter(UNKNOWN_FLEET_FOLLOWER_POLL.max(self.settings.retry));
                return self.pause(pause, State::Start { floor }, shutdown).await;
            }
            Err(e) => {
                tracing::warn!(prefix = %prefix, error = %e, "cannot list the lease terms; retrying");
                let pause = self.jitter(self.settings.retry);
                return self.pause(pause, State::Start { floor }, shutdown).await;
            }
        };
        if latest <= floor {
            // Nothing at all (a new fleet), or the prefix was wiped under us.
            return self.take_over(floor, None, shutdown, tx).await;
        }
        let name = term_name(&prefix, latest);
        let got = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Next::Stop(State::Start { floor }),
            r = bounded(self.call_timeout(), "GetParameter", &name, self.store.get(&name)) => r,
        };
        match got {
            Ok(Some((value, version))) => {
                let o = self.observe_new(latest, &value, version, true, "start-up", tx);
                self.take_over_or_wait(o, shutdown, tx).await
            }
            // Deleted between the list and the read: a newer term exists; list again.
            Ok(None) => {
                let pause = self.jitter(self.settings.retry);
                self.pause(pause, State::Start { floor }, shutdown).await
            }
            Err(e) => {
                tracing::warn!(term = latest, error = %e, "cannot read the lease; retrying");
                let pause = self.jitter(self.settings.retry);
                self.pause(pause, State::Start { floor }, shutdown).await
            }
        }
    }

    async fn pause(&mut self, d: Duration, then: State, shutdown: &CancellationToken) -> Next {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => Next::Stop(then),
            _ = tokio::time::sleep(d) => Next::Go(then),
        }
    }

    async fn follow(
        &mut self,
        mut o: Observed,
        shutdown: &CancellationToken,
        tx: &watch::Sender<Leadership>,
    ) -> Next {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Next::Stop(State::Following(o)),
            _ = sleep_until(o.next_poll) => {}
        }
        let name = term_name(&self.settings.prefix, o.term);
        let got = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Next::Stop(State::Following(o)),
            r = bounded(self.call_timeout(), "GetParameter", &name, self.store.get(&name)) => r,
        };
        match got {
            Ok(Some((value, version))) => {
                if version != o.version {
                    let now = Instant::now();
                    o.version = version;
                    o.first_seen = now;
                    o.record = self.parse(o.term, &value);
                    self.announce(o.term, o.record.as_ref(), "lease record changed", tx);
                }
            }
            // The term was deleted: newer terms exist (or the prefix was wiped).
            Ok(None) => return Next::Go(State::Start { floor: o.term }),
            Err(e) => {
                // Take over only on a fresh read that confirms the version stood still.
                if e.is_transient() {
                    tracing::debug!(term = o.term, error = %e, "cannot read the lease; will poll again");
                } else {
                    tracing::warn!(term = o.term, error = %e, "cannot read the lease; will poll again");
                }
                return self.schedule(o);
            }
        }
        self.take_over_or_wait(o, shutdown, tx).await
    }

    /// After a fresh read of the watched term: take over if its time has come.
    async fn take_over_or_wait(
        &mut self,
        o: Observed,
        shutdown: &CancellationToken,
        tx: &watch::Sender<Leadership>,
    ) -> Next {
        if Instant::now() >= self.takeover_at(&o) {
            let record = o.record.clone();
            return self.take_over(o.term, record.as_ref(), shutdown, tx).await;
        }
        self.schedule(o)
    }

    /// When this candidate may take over the term it watches, if its version stays put.
    fn takeover_at(&self, o: &Observed) -> Instant {
        let extra = if self.preferred {
            Duration::ZERO
        } else {
            self.settings.retry
        };
        let wait = match &o.record {
            Some(r)
                if r.released
                    || (o.since_start
                        && r.holder_instance() == self.instance_id
                        && r.holder != self.holder) =>
            {
                Duration::ZERO
            }
            Some(r) => r.lease(),
            None => self.settings.lease,
        };
        o.first_seen + wait + extra
    }

    /// Sets the next poll: every retry for standbys and preferred candidates (and exactly
    /// at the takeover instant), the leader's slow interval for everyone else.
    fn schedule(&mut self, mut o: Observed) -> Next {
        let now = Instant::now();
        let fast = self.preferred
            || o.record
                .as_ref()
                .is_some_and(|r| r.standbys.contains(&self.instance_id));
        o.next_poll = if fast {
            let poll = now + self.jitter(self.settings.retry);
            // Exactly at the takeover instant — unless that passed while reads failed.
            match self.takeover_at(&o) {
                at if at > now => poll.min(at),
                _ => poll,
            }
        } else {
            let interval = match &o.record {
                Some(r) => r
                    .follower_poll()
                    .max(self.settings.retry)
                    .min(MAX_FOLLOWER_POLL.max(self.settings.retry)),
                None => UNKNOWN_FLEET_FOLLOWER_POLL.max(self.settings.retry),
            };
            if o.spread_next {
                now + interval.mul_f64(self.rng.f64())
            } else {
                now + self.jitter(interval)
            }
        };
        o.spread_next = false;
        Next::Go(State::Following(o))
    }

    /// Tries to create term `term + 1`. Winner: lead (after `renew_deadline`). Loser:
    /// follow the winner.
    async fn take_over(
        &mut self,
        term: u64,
        old: Option<&Record>,
        shutdown: &CancellationToken,
        tx: &watch::Sender<Leadership>,
    ) -> Next {
        let prefix = self.settings.prefix.clone();
        let Some(new_term) = next_term(term) else {
            // Only a parameter written by hand gets here. Nobody can take over: say so
            // loudly, and retry slowly in case the operator cleans up.
            tracing::error!(
                term,
                prefix = %prefix,
                "the lease is at the largest term ({MAX_TERM}) and no candidate can take over; fix: delete every parameter under {prefix} and restart the supervisors, or set election.prefix to a new path"
            );
            let pause = self.jitter(UNKNOWN_FLEET_FOLLOWER_POLL.max(self.settings.retry));
            return self
                .pause(pause, State::Start { floor: term }, shutdown)
                .await;
        };
        let name = term_name(&prefix, new_term);
        let (standbys, follower_poll) = self.plan(&[]);
        let mut lead = Lead {
            term: new_term,
            seq: 0,
            version: 0,
            valid_until: Instant::now(),
            lead_from: Instant::now(),
            leading: false,
            next_renew: Instant::now(),
            standbys,
            follower_poll,
            cleanup: new_term.checked_sub(2).filter(|t| *t > 0),
        };
        let value = record_for(&self.holder, &self.settings, &lead, &self.decision).to_json();
        let start = Instant::now();
        let created = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Next::Stop(State::Start { floor: term }),
            r = bounded(self.call_timeout(), "PutParameter", &name, self.store.create(&name, &value)) => r,
        };
        match created {
            Ok(Created::Won { version }) => {
                let now = Instant::now();
                lead.version = version;
                lead.valid_until = start + self.settings.renew_deadline;
                lead.lead_from = now + self.settings.renew_deadline;
                lead.next_renew = start + self.settings.retry;
                let reason = match old {
                    None if term == 0 => "no term yet",
                    None => "term missing",
                    Some(r) if r.released => "previous term released",
                    Some(r) if r.holder_instance() == self.instance_id => {
                        "previous term held by an earlier process on this instance"
                    }
                    Some(_) => "previous term's lease expired",
                };
                tracing::info!(
                    term = new_term,
                    holder = %self.holder,
                    previous = old.map(|r| r.holder.as_str()).unwrap_or("none"),
                    reason,
                    lead_from_mono_ns = mono_ns(lead.lead_from),
                    leadership = "won",
                    "won term; leading after renew_deadline"
                );
                self.announced = Some((new_term, Some(self.holder.clone())));
                publish(
                    tx,
                    Leadership::Follower {
                        term: Some(new_term),
                        leader: Some(self.holder.clone()),
                    },
                );
                Next::Go(State::Leading(lead))
            }
            Ok(Created::AlreadyExists) => {
                let got = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Next::Stop(State::Start { floor: term }),
                    r = bounded(self.call_timeout(), "GetParameter", &name, self.store.get(&name)) => r,
                };
                match got {
                    Ok(Some((value, version))) => {
                        let o = self.observe_new(
                            new_term,
                            &value,
                            version,
                            false,
                            "another candidate won the term",
                            tx,
                        );
                        self.schedule(o)
                    }
                    // Gone already, or unreadable: start over from the list, unhurried.
                    Ok(None) => {
                        let pause = self.jitter(self.settings.retry);
                        self.pause(pause, State::Start { floor: term }, shutdown)
                            .await
                    }
                    Err(e) => {
                        tracing::warn!(term = new_term, error = %e, "cannot read the new term; retrying");
                        let pause = self.jitter(self.settings.retry);
                        self.pause(pause, State::Start { floor: term }, shutdown)
                            .await
                    }
                }
            }
            Err(e) => {
                // If a timed-out create was applied after all, the term is ours but
                // unknown to us: nobody renews it, so it expires like a crashed leader's.
                tracing::warn!(term = new_term, error = %e, "cannot create the next term; retrying");
                let pause = self.jitter(self.settings.retry);
                self.pause(pause, State::Start { floor: term }, shutdown)
                    .await
            }
        }
    }

    async fn lead(
        &mut self,
        mut l: Lead,
        shutdown: &CancellationToken,
        tx: &watch::Sender<Leadership>,
    ) -> Next {
        enum Wake {
            Expired,
            Lead,
            Renew,
        }
        let wake = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Next::Stop(State::Leading(l)),
            _ = sleep_until(l.valid_until) => Wake::Expired,
            _ = sleep_until(l.lead_from), if !l.leading => Wake::Lead,
            _ = sleep_until(l.next_renew) => Wake::Renew,
        };
        match wake {
            Wake::Expired => self.fail_stop(l, tx),
            Wake::Lead => {
                if Instant::now() < l.valid_until {
                    self.start_leading(&mut l, tx);
                }
                Next::Go(State::Leading(l))
            }
            Wake::Renew => self.renew(l, shutdown, tx).await,
        }
    }

    fn start_leading(&mut self, l: &mut Lead, tx: &watch::Sender<Leadership>) {
        l.leading = true;
        tracing::info!(
            term = l.term,
            holder = %self.holder,
            reason = "renew_deadline waited",
            valid_until_mono_ns = mono_ns(l.valid_until),
            leadership = "leading",
            "leading"
        );
        publish(
            tx,
            Leadership::Leader {
                term: l.term,
                valid_until: l.valid_until,
            },
        );
    }

    /// The one log line of every way out of leadership (operators grep for it).
    fn log_step_down(&self, l: &Lead, reason: &'static str) {
        tracing::warn!(
            term = l.term,
            holder = %self.holder,
            reason,
            valid_until_mono_ns = mono_ns(l.valid_until),
            leadership = "stepped_down",
            "stepped down"
        );
    }

    /// Renew deadline missed: stop leading at once and watch the term like anyone else.
    /// This process never writes the term again.
    fn fail_stop(&mut self, l: Lead, tx: &watch::Sender<Leadership>) -> Next {
        self.log_step_down(&l, "renew deadline missed");
        publish(
            tx,
            Leadership::Follower {
                term: Some(l.term),
                leader: Some(self.holder.clone()),
            },
        );
        let now = Instant::now();
        let record = record_for(&self.holder, &self.settings, &l, &self.decision);
        self.schedule(Observed {
            term: l.term,
            version: l.version,
            first_seen: now,
            record: Some(record),
            next_poll: now,
            since_start: false,
            spread_next: false,
        })
    }

    /// Overwrite our term (seq + 1), then check that `term + 1` does not exist. Counts
    /// only if both answered within their deadlines and the check found nothing.
    async fn renew(
        &mut self,
        mut l: Lead,
        shutdown: &CancellationToken,
        tx: &watch::Sender<Leadership>,
    ) -> Next {
        let start = Instant::now();
        l.next_renew = start + self.settings.retry;
        l.seq += 1;
        let (standbys, follower_poll) = self.plan(&l.standbys);
        l.standbys = standbys;
        l.follower_poll = follower_poll;
        let name = term_name(&self.settings.prefix, l.term);
        // None at MAX_TERM: no newer term can exist, there is nothing to check.
        let next = next_term(l.term).map(|t| (t, term_name(&self.settings.prefix, t)));
        let value = record_for(&self.holder, &self.settings, &l, &self.decision).to_json();
        let limit = self.call_timeout();
        let store = &self.store;
        let attempt = async {
            let version =
                bounded(limit, "PutParameter", &name, store.overwrite(&name, &value)).await?;
            let newer = match &next {
                Some((t, next_name)) => {
                    bounded(limit, "GetParameter", next_name, store.get(next_name))
                        .await?
                        .map(|found| (*t, found))
                }
                None => None,
            };
            Ok::<_, StoreError>((version, newer))
        };
        let out = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            _ = sleep_until(l.valid_until) => Some(None),
            out = attempt => Some(Some(out)),
        };
        let out = match out {
            None => return Next::Stop(State::Leading(l)),
            Some(None) => return self.fail_stop(l, tx),
            Some(Some(out)) => out,
        };
        match out {
            Err(e) => {
                tracing::warn!(term = l.term, error = %e, "renew failed; not counted");
                Next::Go(State::Leading(l))
            }
            Ok((version, _)) if version <= l.version => {
                // Deleted and written anew: the fleet is two or more terms ahead.
                self.log_step_down(&l, "term parameter was deleted");
                publish(
                    tx,
                    Leadership::Follower {
                        term: Some(l.term),
                        leader: None,
                    },
                );
                Next::Go(State::Start { floor: l.term })
            }
            Ok((_, Some((newer, (value, version))))) => {
                self.log_step_down(&l, "a newer term exists");
                let o = self.observe_new(newer, &value, version, false, "a newer term exists", tx);
                self.schedule(o)
            }
            Ok((version, None)) => {
                l.version = version;
                l.valid_until = l.valid_until.max(start + self.settings.renew_deadline);
                let now = Instant::now();
                if l.leading {
                    tracing::debug!(
                        term = l.term,
                        valid_until_mono_ns = mono_ns(l.valid_until),
                        "lease renewed"
                    );
                    publish(
                        tx,
                        Leadership::Leader {
                            term: l.term,
                            valid_until: l.valid_until,
                        },
                    );
                } else if now >= l.lead_from && now < l.valid_until {
                    self.start_leading(&mut l, tx);
                }
                if l.leading {
                    self.clean_up(&mut l, shutdown).await;
                }
                Next::Go(State::Leading(l))
            }
        }
    }

    /// Deletes the term two before ours, once: nobody needs it any more.
    async fn clean_up(&mut self, l: &mut Lead, shutdown: &CancellationToken) {
        let Some(old) = l.cleanup else { return };
        let name = term_name(&self.settings.prefix, old);
        let deleted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = bounded(self.call_timeout(), "DeleteParameter", &name, self.store.delete(&name)) => r,
        };
        match deleted {
            Ok(()) => {
                tracing::debug!(term = old, "deleted an old term");
                l.cleanup = None;
            }
            Err(e) => tracing::debug!(term = old, error = %e, "cannot delete an old term yet"),
        }
    }

    /// The standbys to name and the slow followers' interval, from the fleet list.
    /// Standbys still in the fleet keep their role (a newly named one learns it only at
    /// its next slow poll); vacancies go to the first members in the list's order.
    fn plan(&self, current: &[String]) -> (Vec<String>, Duration) {
        let fleet = self.fleet.borrow();
        if fleet.is_empty() {
            return (Vec::new(), UNKNOWN_FLEET_FOLLOWER_POLL);
        }
        let mut seen = HashSet::new();
        let members: Vec<&String> = fleet
            .iter()
            .filter(|id| **id != self.instance_id && seen.insert(*id))
            .collect();
        let mut standbys: Vec<String> = current
            .iter()
            .filter(|s| seen.contains(s))
            .take(STANDBYS)
            .cloned()
            .collect();
        for m in &members {
            if standbys.len() == STANDBYS {
                break;
            }
            if !standbys.contains(m) {
                standbys.push(m.to_string());
            }
        }
        let others = members.len().saturating_sub(standbys.len());
        let retry = self.settings.retry;
        let poll = Duration::try_from_secs_f64(others as f64 / FOLLOWER_READS_PER_SEC)
            .unwrap_or(MAX_FOLLOWER_POLL)
            .max(retry)
            .min(MAX_FOLLOWER_POLL.max(retry));
        (standbys, poll)
    }

    /// Starts watching `term` at `version`, announcing its holder.
    fn observe_new(
        &mut self,
        term: u64,
        value: &str,
        version: u64,
        since_start: bool,
        reason: &'static str,
        tx: &watch::Sender<Leadership>,
    ) -> Observed {
        let record = self.parse(term, value);
        self.announce(term, record.as_ref(), reason, tx);
        let now = Instant::now();
        Observed {
            term,
            version,
            first_seen: now,
            record,
            next_poll: now,
            since_start,
            spread_next: true,
        }
    }

    fn parse(&mut self, term: u64, value: &str) -> Option<Record> {
        match Record::parse(value) {
            Ok(r) => {
                if r.lease_over_cap() && self.malformed_logged != Some(term) {
                    self.malformed_logged = Some(term);
                    tracing::warn!(
                        term,
                        lease_ms = r.lease_ms,
                        "lease record advertises a lease over the longest valid one; waiting {:?} instead",
                        MAX_ELECTION_TIMING
                    );
                }
                Some(r)
            }
            Err(error) => {
                if self.malformed_logged != Some(term) {
                    self.malformed_logged = Some(term);
                    tracing::warn!(
                        term,
                        error = %error,
                        "unreadable lease record; its version still counts as the heartbeat"
                    );
                }
                None
            }
        }
    }

    /// Publishes `Follower` and logs when the followed term or holder changes.
    fn announce(
        &mut self,
        term: u64,
        record: Option<&Record>,
        reason: &'static str,
        tx: &watch::Sender<Leadership>,
    ) {
        let leader = record.map(|r| r.holder.clone());
        publish(
            tx,
            Leadership::Follower {
                term: Some(term),
                leader: leader.clone(),
            },
        );
        let now = (term, leader);
        if self.announced.as_ref() != Some(&now) {
            tracing::info!(
                term,
                holder = now.1.as_deref().unwrap_or("unknown"),
                reason,
                released = record.is_some_and(|r| r.released),
                leadership = "following",
                "following"
            );
            self.announced = Some(now);
        }
    }
}

/// The largest record written with a decision: SSM standard parameters hold 4 KB, and a
/// renew must never fail for the sake of an informational field.
const MAX_RECORD_BYTES: usize = 3 * 1024;

fn record_for(
    holder: &str,
    settings: &ElectionSettings,
    l: &Lead,
    decision: &watch::Receiver<Option<Decision>>,
) -> Record {
    let mut r = Record {
        holder: holder.to_string(),
        seq: l.seq,
        lease_ms: millis(settings.lease),
        renew_deadline_ms: millis(settings.renew_deadline),
        released: false,
        standbys: l.standbys.clone(),
        follower_poll_ms: millis(l.follower_poll).max(1),
        decision: decision.borrow().clone(),
    };
    if r.decision.is_some() && r.to_json().len() > MAX_RECORD_BYTES {
        r.decision = None;
    }
    r
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn publish(tx: &watch::Sender<Leadership>, new: Leadership) {
    tx.send_if_modified(|cur| {
        if *cur == new {
            false
        } else {
            *cur = new;
            true
        }
    });
}

/// Runs a store call under `limit` and refuses a late answer even if the future did
/// complete: after a stop (SIGSTOP, a stalled VM) the answer may be ready yet long stale.
async fn bounded<T>(
    limit: Duration,
    operation: &'static str,
    name: &str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let start = Instant::now();
    match tokio::time::timeout(limit, call).await {
        Ok(out) if start.elapsed() <= limit => out,
        _ => Err(StoreError::Timeout {
            operation,
            name: name.to_string(),
            after: limit,
        }),
    }
}
