//! One test's world: moto, a fake hub, a stack's parameters, a scratch directory.

use crate::fleet::{Fleet, FleetOptions, InstanceOptions};
use crate::github::FakeGithub;
use crate::hub::{Hub, HubOptions, JobState};
use crate::moto::{Moto, ACCOUNT_ID};
use agent_supervisor::config::{ElectionConfig, RuntimeConfig, ScalerConfig};
use anyhow::bail;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A registration token distinctive enough that finding it in any output is a leak.
pub const TOKEN: &str = "reg-token-7c1d-SECRET-e2e";

/// The e2e tests' election timings (see [`Bed::fast_runtime_config`]).
pub const FAST_LEASE_MS: u64 = 2000;
pub const FAST_DEADLINE_MS: u64 = 1400;
pub const FAST_RETRY_MS: u64 = 500;

pub struct Bed {
    pub moto: Arc<Moto>,
    pub hub: Hub,
    pub root: PathBuf,
    pub stack: String,
    pub config_parameter: String,
    pub token_parameter: String,
    /// GitHub's host keys, as the stack keeps them (created with the template's placeholder
    /// by [`Bed::put_config`]).
    pub known_hosts_parameter: String,
    /// The meta API the runtime config's `github_meta_url` names.
    pub github: FakeGithub,
    /// Dropped with the bed (or by [`Bed::disarm`]): ends the watchdog's wait.
    watchdog: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

/// How long one test's bed may live before the watchdog ends the test binary.
/// `AGENT_FLEET_BED_BUDGET_SECS` overrides it; `0` turns the watchdog off.
const BED_BUDGET: Duration = Duration::from_secs(600);

/// Ends the test binary, with a line naming the bed, if `stack`'s bed outlives `budget`.
/// A test stuck in a deadlock (a blocked runtime never reaches its own timeouts) or in a
/// wait without a timeout then fails the suite in minutes instead of holding CI until its
/// limit. A thread of its own: it must run when every runtime worker is blocked.
fn watchdog(stack: &str) -> Option<std::sync::mpsc::Sender<()>> {
    let budget = match std::env::var("AGENT_FLEET_BED_BUDGET_SECS") {
        Ok(v) => Duration::from_secs(v.trim().parse().unwrap_or(BED_BUDGET.as_secs())),
        Err(_) => BED_BUDGET,
    };
    if budget.is_zero() {
        return None;
    }
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let stack = stack.to_string();
    std::thread::Builder::new()
        .name(format!("bed-watchdog-{stack}"))
        .spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(budget) {
                eprintln!(
                    "bed {stack}: still running after {} s: the test hangs (a deadlock, or a wait \
                     without a timeout); ending the test binary so the suite does not wait \
                     for CI's limit (AGENT_FLEET_BED_BUDGET_SECS sets the budget, 0 turns this off)",
                    budget.as_secs()
                );
                std::process::exit(124);
            }
        })
        .ok()?;
    Some(tx)
}

impl Bed {
    /// Turns off the watchdog (a benchmark or demo that runs longer than a test).
    pub fn disarm(&self) {
        if let Ok(mut w) = self.watchdog.lock() {
            w.take();
        }
    }

    /// Starts moto (warmed up) and a hub, and stores the token.
    pub async fn start(stack: &str) -> anyhow::Result<Bed> {
        Self::start_with(stack, HubOptions::default()).await
    }

    pub async fn start_with(stack: &str, hub: HubOptions) -> anyhow::Result<Bed> {
        let moto = Arc::new(Moto::start().await?);
        moto.warm_up().await;
        let hub = Hub::start(HubOptions {
            registration_token: TOKEN.to_string(),
            ..hub
        })
        .await?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let root = std::env::temp_dir().join(format!(
            "agent-fleet-{stack}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&root)?;
        let bed = Bed {
            moto,
            hub,
            root,
            stack: stack.to_string(),
            config_parameter: format!("/agent-fleet/{stack}/config"),
            token_parameter: format!("/agent-fleet/{stack}/token"),
            known_hosts_parameter: format!("/agent-fleet/{stack}/known-hosts"),
            github: FakeGithub::start().await?,
            watchdog: std::sync::Mutex::new(watchdog(stack)),
        };
        bed.moto
            .put_parameter(&bed.token_parameter, TOKEN, true)
            .await?;
        Ok(bed)
    }

    /// The job role in the emulator, as the stack would make it: `<path><name>`.
    pub async fn create_job_role(&self, name: &str) -> anyhow::Result<String> {
        let trust = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT_ID}:root")},
                "Action": "sts:AssumeRole"
            }]
        })
        .to_string();
        let path = format!("/agent-fleet/{}/", self.stack);
        self.moto
            .query(
                "iam",
                "CreateRole",
                &[
                    ("RoleName", name),
                    ("Path", &path),
                    ("AssumeRolePolicyDocument", &trust),
                ],
            )
            .await?;
        Ok(format!("arn:aws:iam::{ACCOUNT_ID}:role{path}{name}"))
    }

    /// The runtime config a stack would write, aimed at the hub.
    pub fn runtime_config(&self, group: &str) -> RuntimeConfig {
        RuntimeConfig {
            endpoint: self.hub.endpoint(),
            token_parameter: self.token_parameter.clone(),
            agent_group: group.to_string(),
            disconnect_after_job: true,
            idle_timeout_secs: 300,
            interruption_grace_secs: 10,
            cache_bucket: None,
            no_https: true,
            scaler: Default::default(),
            election: Default::default(),
            lifecycle_hook: None,
            max_uptime_secs: 0,
            // The e2e scenarios are agent fleets that lead themselves unless they say
            // otherwise (a stack with a scaler group renders false).
            agents_lead: true,
            job_isolation: Default::default(),
            job_role_arn: None,
            use_pre_signed_url: false,
            launch_hook: None,
            warm_images: vec![],
            image_parameter: None,
            known_hosts_parameter: Some(self.known_hosts_parameter.clone()),
            github_meta_url: Some(self.github.url()),
            known_hosts_refresh_secs: agent_supervisor::config::DEFAULT_KNOWN_HOSTS_REFRESH_SECS,
            log_group: None,
        }
    }

    /// [`Bed::runtime_config`] with the short election and scaler timings the e2e tests use
    /// (lease 2 s, renew deadline 1.4 s, retry 0.5 s, poll 1 s).
    pub fn fast_runtime_config(&self, group: &str) -> RuntimeConfig {
        RuntimeConfig {
            election: ElectionConfig {
                lease_ms: FAST_LEASE_MS,
                renew_deadline_ms: FAST_DEADLINE_MS,
                retry_ms: FAST_RETRY_MS,
                prefix: None,
            },
            scaler: ScalerConfig {
                poll_interval_ms: 1000,
                ..ScalerConfig::default()
            },
            ..self.runtime_config(group)
        }
    }

    pub async fn put_config(&self, cfg: &RuntimeConfig) -> anyhow::Result<()> {
        self.put_config_json(&serde_json::to_string(cfg)?).await
    }

    /// Writes the runtime config, and, the first time, the known-hosts parameter with the
    /// template's placeholder (as a stack makes it; a deploy of the template makes its own).
    pub async fn put_config_json(&self, json: &str) -> anyhow::Result<()> {
        if self
            .moto
            .get_parameter(&self.known_hosts_parameter)
            .await?
            .is_none()
        {
            self.moto
                .put_parameter(
                    &self.known_hosts_parameter,
                    agent_supervisor::known_hosts::PLACEHOLDER,
                    false,
                )
                .await?;
        }
        self.moto
            .put_parameter(&self.config_parameter, json, false)
            .await
    }

    pub fn user_data(&self) -> String {
        crate::fleet::user_data(&self.stack, &self.config_parameter)
    }

    /// Options for one simulated instance of `group`.
    pub fn instance(&self, id: &str, group: &str) -> InstanceOptions {
        InstanceOptions {
            user_data: Some(self.user_data()),
            ..InstanceOptions::new(id, group, &self.moto, &self.root)
        }
    }

    /// A launcher over `groups`.
    pub fn fleet(&self, groups: &[&str], args: &[&str], agent_env: &[(&str, &str)]) -> Fleet {
        Fleet::start(
            self.moto.clone(),
            self.fleet_options(groups, args, agent_env),
        )
    }

    pub fn fleet_options(
        &self,
        groups: &[&str],
        args: &[&str],
        agent_env: &[(&str, &str)],
    ) -> FleetOptions {
        {
            FleetOptions {
                groups: groups.iter().map(|g| g.to_string()).collect(),
                user_data: self.user_data(),
                user_data_from_launch_template: false,
                root: self.root.clone(),
                args: args.iter().map(|a| a.to_string()).collect(),
                agent_env: agent_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                group_args: Default::default(),
                group_life_cycle: Default::default(),
                poll: Duration::from_millis(150),
                stop_timeout: Duration::from_secs(10),
                agent: Default::default(),
                ec2: crate::fleet::Ec2Delays::NONE,
            }
        }
    }

    /// Waits until every one of `jobs` (hub job ids) finished and passed.
    pub async fn jobs_passed(&self, jobs: &[String], within: Duration) -> anyhow::Result<()> {
        eventually(
            &format!("all {} jobs finished and passed", jobs.len()),
            within,
            || async {
                jobs.iter()
                    .all(|j| {
                        self.hub.job(j).is_some_and(|j| {
                            j.state == JobState::Finished && j.result.as_deref() == Some("passed")
                        })
                    })
                    .then_some(())
            },
        )
        .await
    }

    /// Options for a launcher over groups a stack of `cfn/agent-fleet.yaml` made
    /// (`<stack>-agents`, `<stack>-scaler`): each instance gets the user data of its group's
    /// launch template, role included (see [`FleetOptions::user_data_from_launch_template`]).
    pub fn template_fleet_options(
        &self,
        groups: &[&str],
        args: &[&str],
        agent_env: &[(&str, &str)],
    ) -> FleetOptions {
        FleetOptions {
            user_data_from_launch_template: true,
            ..self.fleet_options(groups, args, agent_env)
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::env::var_os("AGENT_FLEET_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Polls `f` until it returns `Some`, or fails naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
