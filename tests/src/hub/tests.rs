//! The hub against its own contract, over HTTP.

use super::*;
use agent_supervisor::aws::sts::{QuerySts, SessionCredentials, Sts};
use reqwest::StatusCode as Status;

const REG: &str = "reg-token";

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(hub: &Hub) -> Api {
        Api {
            http: {
                agent_supervisor::tls::install_crypto_provider();
                reqwest::Client::builder()
            }
            .no_proxy()
            .build()
            .expect("http client"),
            base: format!("{}{API_BASE}", hub.base_url()),
        }
    }

    /// `GET /jobs/{id}` with an access token.
    async fn job(&self, token: &str, id: &str) -> JobPayload {
        self.http
            .get(format!("{}/jobs/{id}", self.base))
            .header("Authorization", format!("Token {token}"))
            .send()
            .await
            .expect("get job")
            .json()
            .await
            .expect("job json")
    }

    async fn register_raw(
        &self,
        token: Option<&str>,
        body: serde_json::Value,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}/register", self.base))
            .json(&body);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Token {t}"));
        }
        req.send().await.expect("register request")
    }

    async fn register(&self, name: &str, extra: serde_json::Value) -> RegisterResponse {
        let mut body = serde_json::json!({
            "name": name, "version": "v2.4.0", "pid": 1, "os": "linux", "arch": "x86_64",
            "hostname": "test", "single_job": false, "idle_timeout": 0,
            "interruption_grace_period": 0, "job_id": ""
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let resp = self.register_raw(Some(REG), body).await;
        assert_eq!(resp.status(), Status::CREATED);
        resp.json().await.expect("register body")
    }

    async fn sync_raw(&self, token: &str, req: &SyncRequest) -> reqwest::Response {
        self.http
            .post(format!("{}/sync", self.base))
            .header("Authorization", format!("Token {token}"))
            .json(req)
            .send()
            .await
            .expect("sync request")
    }

    async fn sync(
        &self,
        token: &str,
        state: &str,
        job_id: &str,
        result: &str,
        interrupted_at: i64,
    ) -> SyncResponse {
        let req = SyncRequest {
            state: state.into(),
            job_id: job_id.into(),
            job_result: result.into(),
            interrupted_at,
        };
        let resp = self.sync_raw(token, &req).await;
        assert_eq!(resp.status(), Status::OK);
        resp.json().await.expect("sync body")
    }

    async fn metrics(&self, token: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(format!("{}/metrics", self.base));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Token {t}"));
        }
        req.send().await.expect("metrics request")
    }

    async fn disconnect(&self, token: &str) -> Status {
        self.http
            .post(format!("{}/disconnect", self.base))
            .header("Authorization", format!("Token {token}"))
            .send()
            .await
            .expect("disconnect request")
            .status()
    }
}

async fn hub() -> Hub {
    Hub::start(HubOptions::default()).await.expect("hub starts")
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(1)
}

#[tokio::test]
async fn register_good_and_bad() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let mut events = hub.subscribe();
    let body = serde_json::json!({"name": "agent-one"});
    assert_eq!(
        api.register_raw(Some("wrong"), body.clone()).await.status(),
        Status::NOT_FOUND
    );
    assert_eq!(
        api.register_raw(None, body.clone()).await.status(),
        Status::UNAUTHORIZED
    );
    let bad = serde_json::json!({"name": "short"});
    assert_eq!(
        api.register_raw(Some(REG), bad).await.status(),
        Status::BAD_REQUEST
    );
    let bad = serde_json::json!({"name": "bad name!"});
    assert_eq!(
        api.register_raw(Some(REG), bad).await.status(),
        Status::BAD_REQUEST
    );
    assert!(hub.agents().is_empty());

    let r = api.register("agent-one", serde_json::json!({"single_job": true, "idle_timeout": 30, "interruption_grace_period": 7})).await;
    assert_eq!(r.name, "agent-one");
    assert!(!r.token.is_empty());
    let agents = hub.agents();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].state, AgentState::Idle);
    assert!(agents[0].single_job);
    assert_eq!(agents[0].idle_timeout, 30);
    assert_eq!(agents[0].interruption_grace_period, 7);
    assert_eq!(agents[0].disconnected, None);
    assert_eq!(
        events.recv().await.ok(),
        Some(HubEvent::AgentRegistered {
            name: "agent-one".into()
        })
    );

    // A URL name (server-verified STS name) needs an emulator to verify it with; this
    // hub has none (see `sts_names_*`).
    let url = serde_json::json!({"name": "https://sts.amazonaws.com/?Action=GetCallerIdentity"});
    assert_eq!(
        api.register_raw(Some(REG), url).await.status(),
        Status::BAD_REQUEST
    );
    let r3 = api.register("agent-three", serde_json::json!({})).await;

    // Same name again replaces the live one.
    let r2 = api.register("agent-one", serde_json::json!({})).await;
    assert_ne!(r2.token, r.token);
    assert_ne!(r2.token, r3.token);
    let a = hub.agents();
    assert_eq!(a.len(), 3);
    assert_eq!(a[0].disconnected.as_deref(), Some("replaced"));
    assert_eq!(hub.live_agents().len(), 2);
}

#[tokio::test]
async fn job_assignment_and_payload() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let r = api.register("agent-jobs", serde_json::json!({})).await;
    let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
    assert_eq!(s.action, "continue");
    assert_eq!(s.next_sync_after, 200);

    let mut events = hub.subscribe();
    let id = hub.enqueue_job(JobSpec {
        commands: vec!["echo hi".into(), "true".into()],
        env: vec![("FOO".into(), "a=b c".into())],
    });
    assert_eq!(hub.metrics().jobs.queued, 1);
    let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
    assert_eq!(
        (s.action.as_str(), s.job_id.as_str()),
        ("run-job", id.as_str())
    );
    let m = hub.metrics();
    assert_eq!(
        (
            m.jobs.queued,
            m.jobs.running,
            m.agents.idle,
            m.agents.occupied
        ),
        (0, 1, 0, 1)
    );
    assert_eq!(hub.agents()[0].state, AgentState::Busy);

    // Lost response: still waiting -> same job again.
    let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
    assert_eq!(
        (s.action.as_str(), s.job_id.as_str()),
        ("run-job", id.as_str())
    );

    let payload = api.job(&r.token, &id).await;
    assert_eq!(payload.id, id);
    assert_eq!(payload.job_id, id);
    assert_eq!(payload.commands[0].directive, "echo hi");
    assert_eq!(payload.env_vars[0].name, "SEMAPHORE_JOB_ID");
    assert_eq!(payload.env_vars[1].name, "FOO");
    assert_eq!(
        base64_decode(&payload.env_vars[1].value).as_deref(),
        Some(b"a=b c".as_slice())
    );
    let other = api
        .http
        .get(format!("{}/jobs/nope", api.base))
        .header("Authorization", format!("Token {}", r.token))
        .send()
        .await
        .expect("get job");
    assert_eq!(other.status(), Status::NOT_FOUND);

    assert_eq!(
        api.sync(&r.token, "starting-job", &id, "", 0).await.action,
        "continue"
    );
    assert_eq!(
        api.sync(&r.token, "running-job", &id, "", 0).await.action,
        "continue"
    );
    let s = api.sync(&r.token, "finished-job", &id, "passed", 0).await;
    assert_eq!(s.action, "wait-for-jobs");
    let job = hub.job(&id).expect("job");
    assert_eq!(job.state, JobState::Finished);
    assert_eq!(job.result.as_deref(), Some("passed"));
    assert_eq!(job.agent.as_deref(), Some("agent-jobs"));
    assert!(job.started_at.is_some() && job.finished_at.is_some());
    // Repeated finished-job is harmless.
    assert_eq!(
        api.sync(&r.token, "finished-job", &id, "passed", 0)
            .await
            .action,
        "wait-for-jobs"
    );
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "continue"
    );

    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push(ev);
    }
    assert_eq!(
        seen,
        vec![
            HubEvent::JobQueued { id: id.clone() },
            HubEvent::JobStarted {
                id: id.clone(),
                agent: "agent-jobs".into()
            },
            HubEvent::JobFinished {
                id: id.clone(),
                agent: "agent-jobs".into(),
                result: "passed".into()
            },
        ]
    );
    let m = hub.metrics();
    assert_eq!(
        (
            m.jobs.queued,
            m.jobs.running,
            m.agents.idle,
            m.agents.occupied
        ),
        (0, 0, 1, 0)
    );
}

#[tokio::test]
async fn single_job_agent_shuts_down_after_its_job() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let r = api
        .register("agent-single", serde_json::json!({"single_job": true}))
        .await;
    let id = hub.enqueue_job(JobSpec::default());
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "run-job"
    );
    let s = api.sync(&r.token, "finished-job", &id, "failed", 0).await;
    assert_eq!(
        (s.action.as_str(), s.shutdown_reason.as_str()),
        ("shutdown", "job-finished")
    );
    assert_eq!(
        hub.job(&id).and_then(|j| j.result).as_deref(),
        Some("failed")
    );
    assert_eq!(hub.agents()[0].state, AgentState::ShuttingDown);
    // Sticky.
    let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
    assert_eq!(s.shutdown_reason, "job-finished");
    assert_eq!(api.disconnect(&r.token).await, Status::OK);
    let a = &hub.agents()[0];
    assert_eq!(a.state, AgentState::Gone);
    assert_eq!(a.disconnected.as_deref(), Some("job-finished"));
    assert!(hub.live_agents().is_empty());
    let resp = api.sync_raw(&r.token, &SyncRequest::default()).await;
    assert_eq!(resp.status(), Status::UNAUTHORIZED);
    assert_eq!(api.disconnect(&r.token).await, Status::UNAUTHORIZED);
}

#[tokio::test]
async fn idle_agent_is_shut_down_by_the_server() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let r = api
        .register("agent-idle", serde_json::json!({"idle_timeout": 1}))
        .await;
    let never = api
        .register("agent-never", serde_json::json!({"idle_timeout": 0}))
        .await;
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "continue"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
    assert_eq!(
        (s.action.as_str(), s.shutdown_reason.as_str()),
        ("shutdown", "idle")
    );
    assert_eq!(
        api.sync(&never.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "continue"
    );
}

#[tokio::test]
async fn idle_time_counts_from_the_end_of_the_last_job() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let r = api
        .register("agent-idle2", serde_json::json!({"idle_timeout": 1}))
        .await;
    let id = hub.enqueue_job(JobSpec::default());
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "run-job"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        api.sync(&r.token, "running-job", &id, "", 0).await.action,
        "continue"
    );
    assert_eq!(
        api.sync(&r.token, "finished-job", &id, "passed", 0)
            .await
            .action,
        "wait-for-jobs"
    );
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "continue"
    );
}

#[tokio::test]
async fn requested_disconnect() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let r = api.register("agent-req1", serde_json::json!({})).await;
    let busy = api.register("agent-req2", serde_json::json!({})).await;
    let id = hub.enqueue_job(JobSpec::default());
    assert_eq!(
        api.sync(&busy.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "run-job"
    );

    assert!(hub.disconnect_agent("agent-req1"));
    assert!(!hub.disconnect_agent("agent-nobody"));
    let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
    assert_eq!(
        (s.action.as_str(), s.shutdown_reason.as_str()),
        ("shutdown", "requested")
    );

    // Through the control API; a busy agent finishes its job first.
    let url = format!("{}/control/agents/agent-req2/disconnect", hub.base_url());
    assert_eq!(
        api.http.post(&url).send().await.expect("control").status(),
        Status::OK
    );
    let url = format!("{}/control/agents/agent-nobody/disconnect", hub.base_url());
    assert_eq!(
        api.http.post(&url).send().await.expect("control").status(),
        Status::NOT_FOUND
    );
    assert_eq!(
        api.sync(&busy.token, "running-job", &id, "", 0)
            .await
            .action,
        "continue"
    );
    let s = api
        .sync(&busy.token, "finished-job", &id, "passed", 0)
        .await;
    assert_eq!(
        (s.action.as_str(), s.shutdown_reason.as_str()),
        ("shutdown", "requested")
    );
}

#[tokio::test]
async fn interrupted_while_idle() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let r = api
        .register(
            "agent-int1",
            serde_json::json!({"interruption_grace_period": 60}),
        )
        .await;
    hub.enqueue_job(JobSpec::default());
    let s = api
        .sync(&r.token, "waiting-for-jobs", "", "", now_unix())
        .await;
    assert_eq!(
        (s.action.as_str(), s.shutdown_reason.as_str()),
        ("shutdown", "interrupted")
    );
    assert_eq!(
        hub.metrics().jobs.queued,
        1,
        "an interrupted agent gets no job"
    );
    assert!(hub.agents()[0].interrupted);
}

#[tokio::test]
async fn interrupted_while_running_stops_the_job_after_the_grace_period() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let mut events = hub.subscribe();
    let r = api
        .register(
            "agent-int2",
            serde_json::json!({"interruption_grace_period": 1}),
        )
        .await;
    let id = hub.enqueue_job(JobSpec::default());
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "run-job"
    );
    let at = now_unix();
    assert_eq!(
        api.sync(&r.token, "running-job", &id, "", at).await.action,
        "continue"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        api.sync(&r.token, "running-job", &id, "", at).await.action,
        "continue"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = api.sync(&r.token, "running-job", &id, "", at).await;
    assert_eq!(
        (s.action.as_str(), s.job_id.as_str()),
        ("stop-job", id.as_str())
    );
    assert_eq!(hub.job(&id).map(|j| j.state), Some(JobState::Stopping));
    assert_eq!(hub.metrics().jobs.running, 1);
    assert_eq!(
        api.sync(&r.token, "stopping-job", &id, "", at).await.action,
        "continue"
    );
    let s = api.sync(&r.token, "finished-job", &id, "stopped", at).await;
    assert_eq!(
        (s.action.as_str(), s.shutdown_reason.as_str()),
        ("shutdown", "interrupted")
    );
    let job = hub.job(&id).expect("job");
    assert_eq!(
        (job.state, job.result.as_deref()),
        (JobState::Finished, Some("stopped"))
    );
    assert_eq!(api.disconnect(&r.token).await, Status::OK);
    assert_eq!(hub.agents()[0].disconnected.as_deref(), Some("interrupted"));
    let mut shutdowns = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let HubEvent::AgentShutdown { reason, .. } = ev {
            shutdowns.push(reason);
        }
    }
    assert_eq!(shutdowns, vec!["interrupted".to_string()]);
}

#[tokio::test]
async fn interrupted_with_zero_grace_stops_at_once() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let r = api.register("agent-int3", serde_json::json!({})).await;
    let id = hub.enqueue_job(JobSpec::default());
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "run-job"
    );
    let s = api.sync(&r.token, "running-job", &id, "", now_unix()).await;
    assert_eq!(s.action, "stop-job");
}

#[tokio::test]
async fn metrics_counts_and_auth() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let a = api.register("agent-m-1", serde_json::json!({})).await;
    let _b = api.register("agent-m-2", serde_json::json!({})).await;
    for _ in 0..3 {
        hub.enqueue_job(JobSpec::default());
    }
    assert_eq!(
        api.sync(&a.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "run-job"
    );
    let resp = api.metrics(Some(REG)).await;
    assert_eq!(resp.status(), Status::OK);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        serde_json::json!({"jobs": {"queued": 2, "running": 1}, "agents": {"idle": 1, "occupied": 1}})
    );
    assert_eq!(
        api.metrics(Some("wrong")).await.status(),
        Status::UNAUTHORIZED
    );
    assert_eq!(api.metrics(None).await.status(), Status::UNAUTHORIZED);
    assert_eq!(hub.metrics_polls(), 3);
    assert_eq!(
        hub.metrics(),
        serde_json::from_value::<Metrics>(body).expect("metrics")
    );
}

#[tokio::test]
async fn metrics_faults() {
    let hub = hub().await;
    let api = Api::new(&hub);
    hub.enqueue_job(JobSpec::default());
    hub.enqueue_job(JobSpec::default());
    hub.enqueue_job(JobSpec::default());

    hub.set_fault(Some(Fault::Unauthorized));
    assert_eq!(api.metrics(Some(REG)).await.status(), Status::UNAUTHORIZED);

    hub.set_fault(Some(Fault::TooMany {
        retry_after_secs: 7,
    }));
    let resp = api.metrics(Some(REG)).await;
    assert_eq!(resp.status(), Status::TOO_MANY_REQUESTS);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("7")
    );

    hub.set_fault(Some(Fault::ServerError));
    assert_eq!(
        api.metrics(Some(REG)).await.status(),
        Status::INTERNAL_SERVER_ERROR
    );

    hub.set_fault(Some(Fault::Slow { ms: 300 }));
    let t = Instant::now();
    let resp = api.metrics(Some(REG)).await;
    assert_eq!(resp.status(), Status::OK);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(resp.json::<Metrics>().await.is_ok());

    hub.set_fault(Some(Fault::MalformedJson));
    let resp = api.metrics(Some(REG)).await;
    assert_eq!(resp.status(), Status::OK);
    let text = resp.text().await.expect("text");
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "{text}"
    );

    hub.set_fault(Some(Fault::PartialJson));
    let resp = api.metrics(Some(REG)).await;
    assert_eq!(resp.status(), Status::OK);
    let text = resp.text().await.expect("text");
    assert_eq!(text, r#"{"jobs":{"queued":3"#);

    // Through the control API, and back to healthy.
    let url = format!("{}/control/fault", hub.base_url());
    let resp = api
        .http
        .post(&url)
        .body(r#"{"TooMany":{"retry_after_secs":2}}"#)
        .send()
        .await
        .expect("fault");
    assert_eq!(resp.status(), Status::OK);
    assert_eq!(
        api.metrics(Some(REG)).await.status(),
        Status::TOO_MANY_REQUESTS
    );
    let resp = api
        .http
        .post(&url)
        .body("null")
        .send()
        .await
        .expect("fault");
    assert_eq!(resp.status(), Status::OK);
    assert_eq!(api.metrics(Some(REG)).await.status(), Status::OK);
    hub.set_fault(Some(Fault::ServerError));
    hub.set_fault(None);
    assert_eq!(api.metrics(Some(REG)).await.status(), Status::OK);
    assert_eq!(hub.metrics_polls(), 9);
}

#[tokio::test]
async fn token_rotation() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let r = api.register("agent-rot1", serde_json::json!({})).await;
    hub.set_registration_token("new-token");
    let body = serde_json::json!({"name": "agent-rot2"});
    assert_eq!(
        api.register_raw(Some(REG), body.clone()).await.status(),
        Status::NOT_FOUND
    );
    assert_eq!(api.metrics(Some(REG)).await.status(), Status::UNAUTHORIZED);
    assert_eq!(api.metrics(Some("new-token")).await.status(), Status::OK);
    assert_eq!(
        api.register_raw(Some("new-token"), body).await.status(),
        Status::CREATED
    );
    // Registered agents keep working.
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "continue"
    );

    let url = format!("{}/control/token", hub.base_url());
    let resp = api
        .http
        .post(&url)
        .json(&serde_json::json!({"token": "third"}))
        .send()
        .await
        .expect("token");
    assert_eq!(resp.status(), Status::OK);
    assert_eq!(
        api.metrics(Some("new-token")).await.status(),
        Status::UNAUTHORIZED
    );
    assert_eq!(api.metrics(Some("third")).await.status(), Status::OK);
}

#[tokio::test]
async fn control_api_jobs_and_state() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let url = format!("{}/control/jobs", hub.base_url());
    let spec = JobSpec {
        commands: vec!["sleep 1".into()],
        env: vec![("A".into(), "1".into())],
    };
    let resp: serde_json::Value = api
        .http
        .post(&url)
        .json(&spec)
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let id = resp["id"].as_str().expect("id").to_string();
    let _ = api.register("agent-ctl1", serde_json::json!({})).await;
    let state: HubState = api
        .http
        .get(format!("{}/control/state", hub.base_url()))
        .send()
        .await
        .expect("state")
        .json()
        .await
        .expect("state json");
    assert_eq!(state.jobs.len(), 1);
    assert_eq!(state.jobs[0].id, id);
    assert_eq!(state.jobs[0].spec, spec);
    assert_eq!(state.jobs[0].state, JobState::Queued);
    assert_eq!(state.agents[0].name, "agent-ctl1");
    assert_eq!(state.metrics.jobs.queued, 1);
    assert_eq!(state.metrics.agents.idle, 1);
    let bad = api
        .http
        .post(&url)
        .body("{not json")
        .send()
        .await
        .expect("post");
    assert_eq!(bad.status(), Status::BAD_REQUEST);
}

#[tokio::test]
async fn stale_agents_are_dropped_and_their_job_fails() {
    let hub = Hub::start(HubOptions {
        stale_agent_after_ms: 200,
        ..HubOptions::default()
    })
    .await
    .expect("hub");
    let api = Api::new(&hub);
    let r = api.register("agent-stale", serde_json::json!({})).await;
    let id = hub.enqueue_job(JobSpec::default());
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "run-job"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hub.agents()[0].disconnected.as_deref(), Some("stale"));
    assert_eq!(
        hub.job(&id).and_then(|j| j.result).as_deref(),
        Some("failed")
    );
    assert_eq!(
        api.sync_raw(&r.token, &SyncRequest::default())
            .await
            .status(),
        Status::UNAUTHORIZED
    );
}

#[tokio::test]
async fn outage_and_stop() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let r = api.register("agent-out1", serde_json::json!({})).await;
    hub.set_api_outage(true);
    let resp = api.sync_raw(&r.token, &SyncRequest::default()).await;
    assert_eq!(resp.status(), Status::SERVICE_UNAVAILABLE);
    assert_eq!(api.metrics(Some(REG)).await.status(), Status::OK);
    hub.set_api_outage(false);
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "continue"
    );
    hub.stop().await;
    // Keep-alive connections are closed too.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = api.http.post(format!("{}/sync", api.base)).send().await;
    assert!(err.is_err(), "hub still answering after stop");
}

#[tokio::test]
async fn down_as_a_whole_and_poll_times() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let r = api.register("agent-down1", serde_json::json!({})).await;
    hub.set_down(true);
    assert_eq!(
        api.metrics(Some(REG)).await.status(),
        Status::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        api.sync_raw(&r.token, &SyncRequest::default())
            .await
            .status(),
        Status::SERVICE_UNAVAILABLE
    );
    assert!(hub.state().metrics_outage && hub.state().api_outage);
    hub.set_down(false);
    assert_eq!(api.metrics(Some(REG)).await.status(), Status::OK);
    // Through the control API: metrics alone.
    let url = format!("{}/control/outage", hub.base_url());
    let resp = api
        .http
        .post(&url)
        .body(r#"{"metrics": true}"#)
        .send()
        .await
        .expect("outage");
    assert_eq!(resp.status(), Status::OK);
    assert_eq!(
        api.metrics(Some(REG)).await.status(),
        Status::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "continue"
    );
    let bad = api
        .http
        .post(&url)
        .body(r#"{"metric": true}"#)
        .send()
        .await
        .expect("outage");
    assert_eq!(bad.status(), Status::BAD_REQUEST);
    assert_eq!(hub.metrics_polls(), 3);
    let times = hub.metrics_poll_times();
    assert_eq!(times.len(), 3);
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
}

/// Registers, takes a job and reads its payload: (access token, job id, logger).
async fn job_with_logger(api: &Api, hub: &Hub, name: &str) -> (String, String, JobLogger) {
    let r = api.register(name, serde_json::json!({})).await;
    let id = hub.enqueue_job(JobSpec::default());
    assert_eq!(
        api.sync(&r.token, "waiting-for-jobs", "", "", 0)
            .await
            .action,
        "run-job"
    );
    let payload = api.job(&r.token, &id).await;
    (r.token, id, payload.logger.expect("a logger"))
}

async fn push(api: &Api, logger: &JobLogger, token: &str, start: &str, body: &str) -> Status {
    api.http
        .post(format!("{}?start_from={start}", logger.url))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "text/plain")
        .body(body.to_string())
        .send()
        .await
        .expect("push")
        .status()
}

fn out(o: &str) -> String {
    format!(
        "{}\n",
        serde_json::json!({"event": "cmd_output", "timestamp": 1, "output": o})
    )
}

fn ev(kind: &str, extra: serde_json::Value) -> String {
    let mut v = serde_json::json!({"event": kind, "timestamp": 1});
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    format!("{v}\n")
}

#[tokio::test]
async fn job_logs_are_json_events_with_start_from() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let (_, id, logger) = job_with_logger(&api, &hub, "agent-logs1").await;
    assert_eq!(logger.method, "push");
    assert!(
        logger.url.ends_with(&format!("{LOGS_BASE}/{id}")),
        "{}",
        logger.url
    );
    let t = logger.token.clone();
    let first = format!(
        "{}{}{}{}",
        ev("job_started", serde_json::json!({})),
        ev("cmd_started", serde_json::json!({"directive": "echo one"})),
        out("one\r\ntw"),
        out("o\n"),
    );
    assert_eq!(
        push(&api, &logger, "wrong", "0", &first).await,
        Status::UNAUTHORIZED
    );
    assert_eq!(push(&api, &logger, &t, "0", &first).await, Status::OK);
    // The same batch again (a lost answer): nothing twice.
    assert_eq!(push(&api, &logger, &t, "0", &first).await, Status::OK);
    // Overlapping: two known, one new.
    let next = format!(
        "{}{}{}",
        out("o\n"),
        ev(
            "cmd_finished",
            serde_json::json!({"directive": "echo one", "exit_code": 0})
        ),
        ev(
            "cmd_started",
            serde_json::json!({"directive": "printf three"})
        ),
    );
    let overlap = format!("{}{next}", out("one\r\ntw"));
    assert_eq!(push(&api, &logger, &t, "2", &overlap).await, Status::OK);
    // A gap, no start_from, not JSON: refused, nothing stored.
    let later = format!(
        "{}{}",
        out("three"),
        ev("job_finished", serde_json::json!({"result": "passed"}))
    );
    assert_eq!(push(&api, &logger, &t, "9", &later).await, Status::CONFLICT);
    assert_eq!(
        push(&api, &logger, &t, "x", &later).await,
        Status::BAD_REQUEST
    );
    assert_eq!(
        push(&api, &logger, &t, "6", "plain text\n").await,
        Status::BAD_REQUEST
    );
    assert_eq!(hub.job_log_events(&id).len(), 6);
    assert_eq!(push(&api, &logger, &t, "6", &later).await, Status::OK);
    let job = hub.job(&id).expect("job");
    assert_eq!(job.log_events.len(), 8);
    assert_eq!(hub.job_output(&id), vec!["one", "two", "three"]);
    assert_eq!(job.logged_result().as_deref(), Some("passed"));
    assert_eq!(job.logged_directives(), vec!["echo one", "printf three"]);
    let statuses: Vec<u16> = job.log_pushes.iter().map(|p| p.status).collect();
    assert_eq!(statuses, vec![401, 200, 200, 200, 409, 400, 400, 200]);
    let appended: Vec<u64> = job.log_pushes.iter().map(|p| p.appended).collect();
    assert_eq!(appended, vec![0, 4, 0, 2, 0, 0, 0, 2]);
}

#[tokio::test]
async fn an_expired_log_token_is_refreshed() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let (access, id, logger) = job_with_logger(&api, &hub, "agent-logs2").await;
    let batch = out("x\n");
    hub.expire_log_tokens();
    assert_eq!(
        push(&api, &logger, &logger.token, "0", &batch).await,
        Status::UNAUTHORIZED
    );
    let refresh = |token: String| {
        api.http
            .post(format!("{}/refresh", api.base))
            .header("Authorization", format!("Token {token}"))
            .send()
    };
    assert_eq!(
        refresh("nope".into()).await.expect("refresh").status(),
        Status::UNAUTHORIZED
    );
    let resp = refresh(access.clone()).await.expect("refresh");
    assert_eq!(resp.status(), Status::OK);
    let new: RefreshTokenResponse = resp.json().await.expect("json");
    assert_ne!(new.token, logger.token);
    assert_eq!(
        push(&api, &logger, &new.token, "0", &batch).await,
        Status::OK
    );
    assert_eq!(hub.job_output(&id), vec!["x"]);
    assert_eq!(hub.job(&id).map(|j| j.log_token_refreshes), Some(1));
    // Through the control API.
    let url = format!("{}/control/logs", hub.base_url());
    let resp = api
        .http
        .post(&url)
        .body(r#"{"expire_tokens": true}"#)
        .send()
        .await
        .expect("control");
    assert_eq!(resp.status(), Status::OK);
    assert_eq!(
        push(&api, &logger, &new.token, "1", &batch).await,
        Status::UNAUTHORIZED
    );
    // Without a job there is nothing to refresh.
    assert_eq!(
        api.sync(&access, "finished-job", &id, "passed", 0)
            .await
            .action,
        "wait-for-jobs"
    );
    assert_eq!(
        refresh(access).await.expect("refresh").status(),
        Status::NOT_FOUND
    );
}

#[tokio::test]
async fn log_space_used_up_is_422() {
    let hub = Hub::start(HubOptions {
        max_log_events_per_job: 3,
        ..HubOptions::default()
    })
    .await
    .expect("hub");
    let api = Api::new(&hub);
    let (_, id, logger) = job_with_logger(&api, &hub, "agent-logs3").await;
    let t = &logger.token;
    let two = format!("{}{}", out("a\n"), out("b\n"));
    assert_eq!(push(&api, &logger, t, "0", &two).await, Status::OK);
    assert_eq!(push(&api, &logger, t, "2", &two).await, Status::OK);
    assert_eq!(hub.job_output(&id), vec!["a", "b", "a", "b"]);
    assert_eq!(
        push(&api, &logger, t, "4", &two).await,
        Status::UNPROCESSABLE_ENTITY
    );
    // Before the token check.
    assert_eq!(
        push(&api, &logger, "wrong", "4", &two).await,
        Status::UNPROCESSABLE_ENTITY
    );
    assert!(hub.job(&id).is_some_and(|j| j.log_trimmed));
    hub.set_max_log_events(0);
    assert_eq!(push(&api, &logger, t, "3", &two).await, Status::OK);
    assert_eq!(hub.job_log_events(&id).len(), 5, "one known, one new");
}

#[tokio::test]
async fn sync_interval_range() {
    let hub = Hub::start(HubOptions::real_sync()).await.expect("hub");
    let api = Api::new(&hub);
    let r = api.register("agent-sync1", serde_json::json!({})).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let s = api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
        assert!(
            (4000..=6000).contains(&s.next_sync_after),
            "{}",
            s.next_sync_after
        );
        seen.insert(s.next_sync_after);
    }
    assert!(seen.len() > 1, "random: {seen:?}");
    assert_eq!(HubOptions::default().next_sync_after_ms, 200);
}

#[tokio::test]
async fn register_takes_any_integer_timeouts() {
    let hub = hub().await;
    let api = Api::new(&hub);
    api.register(
        "agent-neg1",
        serde_json::json!({"interruption_grace_period": -5, "idle_timeout": -1, "extra": 1}),
    )
    .await;
    let a = &hub.agents()[0];
    assert_eq!((a.idle_timeout, a.interruption_grace_period), (0, 0));
}

#[tokio::test]
async fn epilogues_are_in_the_payload() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let r = api.register("agent-epi1", serde_json::json!({})).await;
    let id = hub.enqueue_job_with_epilogues(
        JobSpec::default(),
        Epilogues {
            epilogue_always_commands: vec!["echo always".into()],
            epilogue_on_pass_commands: vec![],
            epilogue_on_fail_commands: vec!["echo failed".into()],
        },
    );
    api.sync(&r.token, "waiting-for-jobs", "", "", 0).await;
    let payload = api.job(&r.token, &id).await;
    assert_eq!(payload.epilogue_always_commands[0].directive, "echo always");
    assert_eq!(
        payload.epilogue_on_fail_commands[0].directive,
        "echo failed"
    );
    let url = format!("{}/control/jobs", hub.base_url());
    let resp = api
        .http
        .post(&url)
        .body(r#"{"commands":["true"],"epilogue_on_pass_commands":["echo ok"]}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), Status::OK);
    let jobs = hub.jobs();
    assert_eq!(jobs[1].epilogues.epilogue_on_pass_commands, vec!["echo ok"]);
}

/// A hub that verifies URL names with a fresh moto; the moto must outlive the test.
async fn sts_hub() -> (Hub, crate::moto::Moto) {
    let moto = crate::moto::Moto::start().await.expect("moto (make venv)");
    let hub = hub().await;
    hub.verify_sts_names_with(Some(&moto.endpoint()))
        .expect("a loopback endpoint");
    (hub, moto)
}

/// What EC2 gives instance `id` (its instance profile's session, named after it), from
/// `moto`'s STS.
async fn instance_session(moto: &crate::moto::Moto, id: &str) -> SessionCredentials {
    let sts = QuerySts::new(&moto.sdk_config().await).expect("STS client");
    sts.assume_role(AGENTS_ROLE, id, Duration::from_secs(3600))
        .await
        .expect("AssumeRole")
}

/// A name signed at `at` by `session`'s credentials, for `endpoint`.
fn sts_name(endpoint: &str, session: &SessionCredentials, at: std::time::SystemTime) -> String {
    let creds = aws_sdk_ssm::config::Credentials::new(
        session.access_key_id.clone(),
        session.secret_access_key.clone(),
        Some(session.session_token.clone()),
        None,
        "test",
    );
    agent_supervisor::agent::presign::presign_url(endpoint, "us-east-1", &creds, at)
        .expect("signed")
}

const AGENTS_ROLE: &str = "arn:aws:iam::123456789012:role/agents";
const INSTANCE: &str = "i-0123456789abcdef0";

#[tokio::test]
async fn sts_names_are_verified_by_the_emulator_and_named_after_the_identity() {
    let (hub, moto) = sts_hub().await;
    let api = Api::new(&hub);
    let mut events = hub.subscribe();
    let session = instance_session(&moto, INSTANCE).await;
    let name = sts_name(&moto.endpoint(), &session, std::time::SystemTime::now());
    let r = api.register(&name, serde_json::json!({})).await;
    assert!(r.name.starts_with(&format!("{INSTANCE}__")), "{}", r.name);
    let a = hub.agents();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].name, r.name);
    assert_eq!(
        a[0].verified,
        Some(VerifiedIdentity {
            arn: format!("arn:aws:sts::123456789012:assumed-role/agents/{INSTANCE}"),
            account: "123456789012".into(),
        })
    );
    assert_eq!(
        events.recv().await.ok(),
        Some(HubEvent::AgentRegistered {
            name: r.name.clone()
        })
    );
    // Two agents of one identity do not replace each other.
    let again = sts_name(&moto.endpoint(), &session, std::time::SystemTime::now());
    let r2 = api.register(&again, serde_json::json!({})).await;
    assert_ne!(r2.name, r.name);
    assert_eq!(hub.live_agents().len(), 2);
    // Plain names are untouched by all this.
    assert_eq!(
        api.register("agent-plain", serde_json::json!({}))
            .await
            .name,
        "agent-plain"
    );
    assert_eq!(hub.agents()[2].verified, None);
}

#[tokio::test]
async fn sts_names_that_fail_the_checks_are_refused_with_400_and_never_quoted() {
    let (hub, moto) = sts_hub().await;
    let api = Api::new(&hub);
    let session = instance_session(&moto, INSTANCE).await;
    let now = std::time::SystemTime::now();
    let good = sts_name(&moto.endpoint(), &session, now);
    // A host the hub must never ask: a loopback listener that counts connections.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let other_port = other.local_addr().expect("addr").port();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = asked.clone();
    let _other = tokio::spawn(async move {
        while other.accept().await.is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let elsewhere = sts_name(&format!("http://127.0.0.1:{other_port}"), &session, now);
    let tampered = [
        good.replace("Action=GetCallerIdentity", "Action=AssumeRole"),
        sts_name(
            &moto.endpoint(),
            &session,
            now - Duration::from_secs(16 * 60),
        ),
        elsewhere,
        format!("{good}&RoleArn=x"),
    ];
    for name in tampered {
        let resp = api
            .register_raw(Some(REG), serde_json::json!({ "name": name }))
            .await;
        assert_eq!(resp.status(), Status::BAD_REQUEST);
        let body = resp.text().await.expect("body");
        assert!(body.contains("pre-signed STS"), "{body}");
        assert!(
            !body.contains(&session.session_token) && !body.contains("X-Amz-Signature="),
            "{body}"
        );
    }
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the hub asked another host"
    );
    assert!(hub.agents().is_empty());

    // The untampered URL passes, and it is the emulator that answered for it.
    let bed_calls_before = moto.calls(0).await.expect("calls").len();
    let r = api.register(&good, serde_json::json!({})).await;
    assert!(r.name.starts_with(INSTANCE), "{}", r.name);
    assert!(
        moto.calls(0).await.expect("calls").len() > bed_calls_before,
        "verified at the emulator"
    );

    // What the bed cannot prove: moto checks no signature, so a URL with a made-up
    // signature (and one whose signer never held the secret key) passes. If moto ever
    // verifies presigned URLs, this flips, and the `sts` module docs must say so.
    let forged = {
        let (head, tail) = good.split_once("X-Amz-Signature=").expect("signature");
        let rest = tail.find('&').map(|i| &tail[i..]).unwrap_or("");
        format!("{head}X-Amz-Signature={}{rest}", "0".repeat(64))
    };
    let resp = api
        .register_raw(Some(REG), serde_json::json!({ "name": forged }))
        .await;
    assert_eq!(
        resp.status(),
        Status::CREATED,
        "moto now checks signatures: update the docs"
    );
}

#[tokio::test]
async fn sts_names_without_an_emulator_are_refused_and_an_unreachable_one_is_503() {
    let hub = hub().await;
    let api = Api::new(&hub);
    let session = SessionCredentials {
        access_key_id: "ASIAEXAMPLEEXAMPLE01".into(),
        secret_access_key: "secret".into(),
        session_token: "token".into(),
        expiration: std::time::SystemTime::now(),
    };
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let name = sts_name(&endpoint, &session, std::time::SystemTime::now());
    let register = || api.register_raw(Some(REG), serde_json::json!({ "name": name }));
    assert_eq!(
        register().await.status(),
        Status::BAD_REQUEST,
        "no emulator given"
    );
    hub.verify_sts_names_with(Some(&endpoint))
        .expect("loopback");
    assert_eq!(register().await.status(), Status::SERVICE_UNAVAILABLE);
    assert!(hub.agents().is_empty());
    // Only loopback emulators, also through the control API.
    assert!(hub
        .verify_sts_names_with(Some("http://10.0.0.1:4566"))
        .is_err());
    let control = |body: serde_json::Value| {
        api.http
            .post(format!("{}/control/sts", hub.base_url()))
            .json(&body)
            .send()
    };
    let resp = control(serde_json::json!({"endpoint": "https://sts.amazonaws.com"}))
        .await
        .expect("control");
    assert_eq!(resp.status(), Status::BAD_REQUEST);
    let resp = control(serde_json::json!({"endpoint": null}))
        .await
        .expect("control");
    assert_eq!(resp.status(), Status::OK);
    assert_eq!(register().await.status(), Status::BAD_REQUEST);
}
