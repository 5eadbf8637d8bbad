//! The agent API client: register, sync, job, refresh, disconnect, against loopback
//! endpoints only.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use agent_fleet_tests::semaphore_wire::{
    JobPayload, RefreshTokenResponse, RegisterRequest, RegisterResponse, SyncRequest, SyncResponse,
    API_BASE,
};
use anyhow::bail;

use crate::config::{Config, Knobs};
use crate::log::log;
use crate::VERSION;

pub(crate) fn loopback_host(endpoint: &str) -> bool {
    let host = if let Some(rest) = endpoint.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        endpoint.split(':').next().unwrap_or_default()
    };
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    base: String,
    loopback: bool,
    endpoint: String,
    access_token: Mutex<String>,
}

impl Api {
    pub(crate) fn new(cfg: &Config, knobs: &Knobs) -> anyhow::Result<Api> {
        let timeout = knobs
            .sync_timeout
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
        let http = {
            agent_supervisor::tls::install_crypto_provider();
            reqwest::Client::builder()
        }
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(format!("SemaphoreAgent/{VERSION}"))
        .no_proxy()
        .build()?;
        let scheme = if cfg.no_https { "http" } else { "https" };
        Ok(Api {
            http,
            base: format!("{scheme}://{}{API_BASE}", cfg.endpoint),
            loopback: loopback_host(&cfg.endpoint),
            endpoint: cfg.endpoint.clone(),
            access_token: Mutex::new(String::new()),
        })
    }

    fn guard(&self) -> anyhow::Result<()> {
        if self.loopback {
            Ok(())
        } else {
            bail!(
                "the fake agent only talks to loopback endpoints, not {:?}",
                self.endpoint
            )
        }
    }

    fn token(&self) -> String {
        self.access_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) async fn register(
        &self,
        cfg: &Config,
        reg_token: &str,
    ) -> anyhow::Result<RegisterResponse> {
        self.guard()?;
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let body = RegisterRequest {
            name: cfg.name.clone(),
            version: VERSION.to_string(),
            pid: i64::from(std::process::id()),
            os: "Ubuntu".to_string(),
            arch: arch.to_string(),
            hostname,
            single_job: cfg.disconnect_after_job,
            idle_timeout: cfg.idle_timeout,
            interruption_grace_period: cfg.interruption_grace_period,
            job_id: cfg.job_id.clone(),
        };
        let url = format!("{}/register", self.base);
        let resp = self
            .http
            .post(&url)
            .header("Authorization", format!("Token {reg_token}"))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "register request to {url} got HTTP {}: {}",
                status.as_u16(),
                text.trim()
            );
        }
        let r: RegisterResponse = serde_json::from_str(&text)?;
        *self
            .access_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = r.token.clone();
        Ok(r)
    }

    pub(crate) async fn sync(&self, req: &SyncRequest) -> anyhow::Result<SyncResponse> {
        self.guard()?;
        match req.state.as_str() {
            "waiting-for-jobs" => log(&format!("SYNC request (state: {})", req.state)),
            "finished-job" => log(&format!(
                "SYNC request (state: {}, job: {}, result: {})",
                req.state, req.job_id, req.job_result
            )),
            _ => log(&format!(
                "SYNC request (state: {}, job: {})",
                req.state, req.job_id
            )),
        }
        let resp = self
            .http
            .post(format!("{}/sync", self.base))
            .header("Authorization", format!("Token {}", self.token()))
            .json(req)
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::OK {
            bail!(
                "failed to sync with upstream, got HTTP {}",
                resp.status().as_u16()
            );
        }
        let r: SyncResponse = resp.json().await?;
        match r.action.as_str() {
            "continue" | "wait-for-jobs" => log(&format!("SYNC response (action: {})", r.action)),
            "run-job" | "stop-job" => log(&format!(
                "SYNC response (action: {}, job: {})",
                r.action, r.job_id
            )),
            "shutdown" => log(&format!(
                "SYNC response (action: {}, reason: {})",
                r.action, r.shutdown_reason
            )),
            other => log(&format!("SYNC response: {other:?}")),
        }
        Ok(r)
    }

    pub(crate) async fn get_job(&self, id: &str) -> anyhow::Result<JobPayload> {
        self.guard()?;
        let resp = self
            .http
            .get(format!("{}/jobs/{id}", self.base))
            .header("Authorization", format!("Token {}", self.token()))
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::OK {
            bail!(
                "failed to describe job, got HTTP {}",
                resp.status().as_u16()
            );
        }
        Ok(resp.json().await?)
    }

    /// `POST /refresh`: a new token for the current job's log.
    pub(crate) async fn refresh_token(&self) -> anyhow::Result<String> {
        self.guard()?;
        log("Refreshing token for current job logs...");
        let resp = self
            .http
            .post(format!("{}/refresh", self.base))
            .header("Authorization", format!("Token {}", self.token()))
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::OK {
            bail!(
                "failed to refresh token, got HTTP {}",
                resp.status().as_u16()
            );
        }
        let r: RefreshTokenResponse = resp.json().await?;
        log("Successfully refreshed token for current job logs.");
        Ok(r.token)
    }

    pub(crate) async fn disconnect(&self) -> anyhow::Result<()> {
        self.guard()?;
        let resp = self
            .http
            .post(format!("{}/disconnect", self.base))
            .header("Authorization", format!("Token {}", self.token()))
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::OK {
            bail!("disconnect got HTTP {}", resp.status().as_u16());
        }
        Ok(())
    }
}
