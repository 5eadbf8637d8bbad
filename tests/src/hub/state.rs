//! The hub's state behind one lock: agents, jobs, log tokens, faults and outages; the
//! sync decision (see the module docs of [`crate::hub`]).

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::{
    AgentInfo, AgentState, Epilogues, Fault, HubEvent, HubOptions, HubState, JobInfo, JobSpec,
    JobState, Metrics, SyncRequest, SyncResponse,
};

pub(super) struct AgentRec {
    pub(super) info: AgentInfo,
    pub(super) token: String,
    pub(super) idle_since: Instant,
    pub(super) last_sync: Instant,
    pub(super) interrupted_seen: Option<Instant>,
}

impl AgentRec {
    pub(super) fn live(&self) -> bool {
        self.info.disconnected.is_none()
    }

    pub(super) fn snapshot(&self) -> AgentInfo {
        let mut info = self.info.clone();
        info.state = if info.disconnected.is_some() {
            AgentState::Gone
        } else if info.shutdown_reason.is_some() {
            AgentState::ShuttingDown
        } else if info.job.is_some() {
            AgentState::Busy
        } else {
            AgentState::Idle
        };
        info
    }
}

pub(super) struct Inner {
    pub(super) registration_token: String,
    pub(super) jobs: Vec<JobInfo>,
    pub(super) agents: Vec<AgentRec>,
    pub(super) fault: Option<Fault>,
    pub(super) api_outage: bool,
    pub(super) metrics_outage: bool,
    pub(super) metrics_polls: u64,
    /// When each `/metrics` request arrived, ms since the hub started.
    pub(super) metrics_poll_ms: Vec<u64>,
    /// Job id -> the tokens its log pushes may carry (issued with the payload or by
    /// `/refresh`; emptied by [`Hub::expire_log_tokens`]).
    pub(super) log_tokens: std::collections::HashMap<String, Vec<String>>,
    /// Log space per job in events (0 = unlimited).
    pub(super) max_log_events: u64,
    /// Where URL names are verified ([`Hub::verify_sts_names_with`](super::Hub::verify_sts_names_with));
    /// `None`: URL names are refused.
    pub(super) sts_endpoint: Option<reqwest::Url>,
}

pub(super) struct Shared {
    pub(super) inner: Mutex<Inner>,
    pub(super) events: broadcast::Sender<HubEvent>,
    pub(super) opts: HubOptions,
    pub(super) epoch: Instant,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn emit(&self, ev: HubEvent) {
        // No receiver is fine.
        let _ = self.events.send(ev);
    }

    pub(super) fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Locks, reaps stale agents, and returns the guard.
    pub(super) fn state(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        let now = Instant::now();
        let stale = self.opts.stale_agent_after_ms;
        if stale > 0 {
            let limit = Duration::from_millis(stale);
            let stale_idx: Vec<usize> = inner
                .agents
                .iter()
                .enumerate()
                .filter(|(_, a)| a.live() && now.saturating_duration_since(a.last_sync) > limit)
                .map(|(i, _)| i)
                .collect();
            for i in stale_idx {
                self.drop_agent(&mut inner, i, Some("stale"), now);
            }
        }
        inner
    }

    /// Removes an agent from the live set; its unfinished job fails.
    /// `why` None: the agent called `/disconnect` (reason = the shutdown
    /// reason it was sent, or `unsolicited`).
    pub(super) fn drop_agent(
        &self,
        inner: &mut Inner,
        idx: usize,
        why: Option<&str>,
        now: Instant,
    ) {
        let Some(a) = inner.agents.get_mut(idx) else {
            return;
        };
        if !a.live() {
            return;
        }
        let reason = match why {
            Some(w) => w.to_string(),
            None => a
                .info
                .shutdown_reason
                .clone()
                .unwrap_or_else(|| "unsolicited".to_string()),
        };
        a.info.disconnected = Some(reason);
        let name = a.info.name.clone();
        if let Some(job) = a.info.job.take() {
            self.finish_job(inner, &job, &name, "failed", now);
        }
        self.emit(HubEvent::AgentDisconnected { name });
    }

    fn finish_job(&self, inner: &mut Inner, id: &str, agent: &str, result: &str, now: Instant) {
        let ms = self.ms(now);
        if let Some(j) = inner.jobs.iter_mut().find(|j| j.id == id) {
            if j.state == JobState::Finished {
                return;
            }
            j.state = JobState::Finished;
            j.result = Some(result.to_string());
            j.finished_at = Some(now);
            j.finished_ms = Some(ms);
            if j.agent.is_none() {
                j.agent = Some(agent.to_string());
            }
            self.emit(HubEvent::JobFinished {
                id: id.to_string(),
                agent: agent.to_string(),
                result: result.to_string(),
            });
        }
    }

    pub(super) fn metrics(&self, inner: &Inner) -> Metrics {
        let mut m = Metrics::default();
        for j in &inner.jobs {
            match j.state {
                JobState::Queued => m.jobs.queued += 1,
                JobState::Running | JobState::Stopping => m.jobs.running += 1,
                JobState::Finished => {}
            }
        }
        for a in inner.agents.iter().filter(|a| a.live()) {
            if a.info.job.is_some() {
                m.agents.occupied += 1;
            } else {
                m.agents.idle += 1;
            }
        }
        m
    }

    pub(super) fn enqueue(&self, spec: JobSpec, epilogues: Epilogues) -> String {
        let id = uuid();
        let now = Instant::now();
        let mut inner = self.state();
        inner.jobs.push(JobInfo {
            id: id.clone(),
            spec,
            state: JobState::Queued,
            agent: None,
            result: None,
            queued_at: now,
            started_at: None,
            finished_at: None,
            queued_ms: self.ms(now),
            started_ms: None,
            finished_ms: None,
            output: Vec::new(),
            epilogues,
            log_events: Vec::new(),
            log_pushes: Vec::new(),
            log_token_refreshes: 0,
            log_trimmed: false,
        });
        drop(inner);
        self.emit(HubEvent::JobQueued { id: id.clone() });
        id
    }

    pub(super) fn disconnect_by_name(&self, name: &str) -> bool {
        let mut inner = self.state();
        let mut found = false;
        for a in inner
            .agents
            .iter_mut()
            .filter(|a| a.live() && a.info.name == name)
        {
            a.info.disconnect_requested = true;
            found = true;
        }
        found
    }

    pub(super) fn snapshot(&self) -> HubState {
        let inner = self.state();
        HubState {
            jobs: inner.jobs.clone(),
            agents: inner.agents.iter().map(AgentRec::snapshot).collect(),
            metrics: self.metrics(&inner),
            metrics_polls: inner.metrics_polls,
            fault: inner.fault.clone(),
            api_outage: inner.api_outage,
            metrics_outage: inner.metrics_outage,
        }
    }

    /// The sync decision. Returns the answer (without `next_sync_after`).
    pub(super) fn sync(
        &self,
        inner: &mut Inner,
        idx: usize,
        req: &SyncRequest,
        now: Instant,
    ) -> SyncResponse {
        let ms = self.ms(now);
        let Some(a) = inner.agents.get_mut(idx) else {
            return action("continue");
        };
        a.last_sync = now;
        a.info.syncs += 1;
        a.info.last_sync_ms = Some(ms);
        if req.interrupted_at > 0 && a.interrupted_seen.is_none() {
            a.interrupted_seen = Some(now);
            a.info.interrupted = true;
        }
        if let Some(reason) = &a.info.shutdown_reason {
            return shutdown_answer(reason);
        }
        let name = a.info.name.clone();
        let grace = Duration::from_secs(a.info.interruption_grace_period);
        let stop_due = a
            .interrupted_seen
            .is_some_and(|seen| now.saturating_duration_since(seen) >= grace);

        match req.state.as_str() {
            "finished-job" => {
                let job = if req.job_id.is_empty() {
                    a.info.job.clone()
                } else {
                    Some(req.job_id.clone())
                };
                let result = if req.job_result.is_empty() {
                    "failed".to_string()
                } else {
                    req.job_result.clone()
                };
                if a.info.job.is_some() {
                    a.info.job = None;
                    a.idle_since = now;
                }
                let (interrupted, single, requested) = (
                    a.interrupted_seen.is_some(),
                    a.info.single_job,
                    a.info.disconnect_requested,
                );
                if let Some(job) = job {
                    let mine = inner
                        .jobs
                        .iter()
                        .any(|j| j.id == job && j.agent.as_deref() == Some(name.as_str()));
                    if mine {
                        self.finish_job(inner, &job, &name, &result, now);
                    }
                }
                if interrupted {
                    self.shutdown(inner, idx, "interrupted")
                } else if single {
                    self.shutdown(inner, idx, "job-finished")
                } else if requested {
                    self.shutdown(inner, idx, "requested")
                } else {
                    action("wait-for-jobs")
                }
            }
            "starting-job" | "running-job" => {
                let Some(job) = a.info.job.clone() else {
                    return action("continue");
                };
                if stop_due {
                    if let Some(j) = inner.jobs.iter_mut().find(|j| j.id == job) {
                        if j.state == JobState::Running {
                            j.state = JobState::Stopping;
                        }
                    }
                    SyncResponse {
                        action: "stop-job".into(),
                        job_id: job,
                        ..SyncResponse::default()
                    }
                } else {
                    action("continue")
                }
            }
            "stopping-job" => action("continue"),
            _ => {
                // waiting-for-jobs (or anything unknown: treated as idle)
                if let Some(job) = a.info.job.clone() {
                    return SyncResponse {
                        action: "run-job".into(),
                        job_id: job,
                        ..SyncResponse::default()
                    };
                }
                let idle_for = now.saturating_duration_since(a.idle_since);
                let idle_limit = a.info.idle_timeout;
                if a.info.disconnect_requested {
                    return self.shutdown(inner, idx, "requested");
                }
                if a.interrupted_seen.is_some() {
                    return self.shutdown(inner, idx, "interrupted");
                }
                if idle_limit > 0 && idle_for > Duration::from_secs(idle_limit) {
                    return self.shutdown(inner, idx, "idle");
                }
                let Some(j) = inner.jobs.iter_mut().find(|j| j.state == JobState::Queued) else {
                    return action("continue");
                };
                j.state = JobState::Running;
                j.agent = Some(name.clone());
                j.started_at = Some(now);
                j.started_ms = Some(ms);
                let id = j.id.clone();
                if let Some(a) = inner.agents.get_mut(idx) {
                    a.info.job = Some(id.clone());
                }
                self.emit(HubEvent::JobStarted {
                    id: id.clone(),
                    agent: name,
                });
                SyncResponse {
                    action: "run-job".into(),
                    job_id: id,
                    ..SyncResponse::default()
                }
            }
        }
    }

    fn shutdown(&self, inner: &mut Inner, idx: usize, reason: &str) -> SyncResponse {
        if let Some(a) = inner.agents.get_mut(idx) {
            if a.info.shutdown_reason.is_none() {
                a.info.shutdown_reason = Some(reason.to_string());
                self.emit(HubEvent::AgentShutdown {
                    name: a.info.name.clone(),
                    reason: reason.to_string(),
                });
            }
        }
        shutdown_answer(reason)
    }
}

fn action(a: &str) -> SyncResponse {
    SyncResponse {
        action: a.to_string(),
        ..SyncResponse::default()
    }
}

fn shutdown_answer(reason: &str) -> SyncResponse {
    SyncResponse {
        action: "shutdown".into(),
        shutdown_reason: reason.to_string(),
        ..SyncResponse::default()
    }
}

pub(super) fn random_hex(n: usize) -> String {
    (0..n)
        .map(|_| char::from(b"0123456789abcdef"[fastrand::usize(..16)]))
        .collect()
}

fn uuid() -> String {
    format!(
        "{}-{}-4{}-{}{}-{}",
        random_hex(8),
        random_hex(4),
        random_hex(3),
        char::from(b"89ab"[fastrand::usize(..4)]),
        random_hex(3),
        random_hex(12)
    )
}
