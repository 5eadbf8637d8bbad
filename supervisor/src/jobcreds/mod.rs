//! Credentials for jobs: the supervisor assumes the stack's job role (`job_role_arn` in the
//! runtime config) and serves its short-lived credentials on loopback as a
//! **container-credentials endpoint**, which the AWS CLI and every AWS SDK query by default
//! when a process has
//!
//! - `AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:<port>/v1/job-credentials`
//! - `AWS_CONTAINER_AUTHORIZATION_TOKEN=<64 hex characters>`
//!
//! in its environment. The agent owner puts both in the agent's `env-vars`, so every job
//! gets them ([`JobCredentials::issue`]). Why not a credentials file: an SDK process asks
//! the endpoint again before the credentials it holds expire (a file is read once, and a
//! long build outlives a one-hour session), nothing lands on disk, and the token dies with
//! its agent.
//!
//! ## The endpoint
//!
//! `GET /v1/job-credentials` with `Authorization: <token>` answers 200 with
//! `{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}` (RFC 3339, UTC). No
//! `Authorization` → 401; another value → 403; another path → 404; another method → 405;
//! no credentials with at least [`SERVE_MIN_LEFT`] to go → 503. Error bodies say no more
//! than the status. One request per connection; the request head must arrive within 5 s
//! and fit 8 KiB; at most 64 connections at once (see `http.rs`).
//!
//! The server runs on a listener it is given ([`JobCredentials::start`]), so that it can
//! be bound wherever jobs can reach it; [`bind_loopback`] binds 127.0.0.1 on an ephemeral
//! port. Only loopback (or the ECS/EKS link-local hosts) is accepted over plain HTTP by
//! the SDKs.
//!
//! ## The token
//!
//! One token opens the endpoint at a time: [`JobCredentials::issue`] makes a new one for
//! each agent start (32 bytes of the crypto provider's CSPRNG, hex — no `=`, which the
//! agent's `env-vars` cannot carry) and the previous one stops working at once; when the
//! agent exits, its token is revoked ([`JobCredentials::revoke`]). It is compared in
//! constant time and never logged. Before the first agent, no token opens it.
//!
//! ## Refresh
//!
//! The credentials are fetched once at start and again [`REFRESH_MARGIN`] before they
//! expire (half-way through a session shorter than twice that), so that a client asking
//! at its own refresh point (botocore: 15 min before expiry) already gets the next ones.
//! A failed fetch is retried with backoff (1 s doubling to 60 s, jittered) while the old
//! credentials are served as long as they have [`SERVE_MIN_LEFT`] left; after that the
//! endpoint answers 503 until a fetch succeeds. Deadlines are kept on the local monotonic
//! clock: the expiry STS gives is turned into an instant once, when it arrives.

mod http;
mod refresh;
mod role;
#[cfg(test)]
mod tests;

pub use refresh::{REFRESH_MARGIN, SERVE_MIN_LEFT};
pub use role::{JobRole, SESSION};

use crate::agent::netns::NetNs;
use crate::aws::query::QueryError;
use crate::aws::sts::{QuerySts, SessionCredentials};
use crate::AbortOnDrop;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

/// The endpoint's one path.
pub const PATH: &str = "/v1/job-credentials";

/// The variable naming the endpoint (the SDKs' container-credentials provider).
pub const URI_ENV: &str = "AWS_CONTAINER_CREDENTIALS_FULL_URI";

/// The variable holding the token the SDKs send as `Authorization`.
pub const TOKEN_ENV: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN";

/// Bytes of randomness in a token (64 hex characters).
const TOKEN_BYTES: usize = 32;

/// Where credentials come from: the job role ([`JobRole`]) in the daemon, a script in
/// tests.
pub trait CredentialSource: Send + Sync + 'static {
    fn fetch(&self) -> impl Future<Output = Result<SessionCredentials, QueryError>> + Send;
}

/// The token of the current agent's jobs. `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// 32 bytes from the crypto provider's CSPRNG, as hex.
    fn generate() -> Result<Token, String> {
        let mut bytes = [0u8; TOKEN_BYTES];
        rustls::crypto::aws_lc_rs::default_provider()
            .secure_random
            .fill(&mut bytes)
            .map_err(|_| "the system's random number generator failed".to_string())?;
        Ok(Token(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// The token itself, for the agent's config (and a test's client).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        if mine.len() != presented.len() {
            return false;
        }
        mine.iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What one agent's jobs are told: the endpoint and the token. `Debug` hides the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnv {
    pub uri: String,
    pub token: Token,
}

impl JobEnv {
    /// `NAME=VALUE` entries for the agent's `env-vars`.
    pub fn vars(&self) -> Vec<String> {
        vec![
            format!("{URI_ENV}={}", self.uri),
            format!("{TOKEN_ENV}={}", self.token.0),
        ]
    }
}

/// State the server reads and the refresher and the owner write.
#[derive(Default)]
struct Shared {
    /// The credentials being served, with their expiry on the monotonic clock.
    current: RwLock<Option<refresh::Cached>>,
    /// The one token that opens the endpoint: the current agent's. Replaced, never added
    /// to, so the previous agent's token stops working when the next agent is issued one.
    token: RwLock<Option<Token>>,
}

/// A forced fetch's answer: `Err` carries the error's text.
type Ack = oneshot::Sender<Result<(), String>>;

/// The running endpoint: a server task and a refresher task, both stopped when this is
/// dropped.
pub struct JobCredentials {
    shared: Arc<Shared>,
    uri: String,
    force: mpsc::Sender<Ack>,
    _tasks: (AbortOnDrop<()>, AbortOnDrop<()>),
    /// A second server inside the network namespace `strict` jobs run in (rootless
    /// Docker's), where the first one's loopback is not theirs: the namespace (by its
    /// inode), the address jobs there are given, and the server task.
    netns_server: std::sync::Mutex<Option<(u64, String, AbortOnDrop<()>)>>,
}

impl std::fmt::Debug for JobCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobCredentials")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

/// What the agent's jobs are told about AWS: the region (an SDK in a job cannot ask IMDS
/// for it) and, with a job role, where its credentials are served.
#[derive(Debug, Default)]
pub struct JobAws {
    pub region: Option<String>,
    pub credentials: Option<JobCredentials>,
}

impl JobAws {
    /// With `job_role_arn` in `settings`: the endpoint on loopback, fetching the job role's
    /// credentials with `sdk`'s (the instance profile's) from now on. Without one: only
    /// the region, and a warning if there is a cache bucket (the stack creates a job role
    /// with the bucket, so this is a stack from before job roles).
    pub async fn start(
        sdk: &aws_config::SdkConfig,
        settings: &crate::config::Settings,
        instance_id: &str,
    ) -> Result<JobAws, String> {
        let region = sdk.region().map(|r| r.as_ref().to_string());
        let Some(role_arn) = &settings.job_role_arn else {
            if settings.cache_bucket.is_some() {
                tracing::warn!(
                    "the runtime config names a cache bucket but no job role: jobs reach the cache only where IMDS is open to them; fix: update the stack (it gives jobs a job role with the bucket)"
                );
            }
            return Ok(JobAws {
                region,
                credentials: None,
            });
        };
        let sts = QuerySts::new(sdk).map_err(|e| e.to_string())?;
        let listener = bind_loopback().await.map_err(|e| {
            format!("cannot listen on 127.0.0.1 for the job credentials endpoint: {e}")
        })?;
        let credentials = JobCredentials::start(listener, JobRole::new(sts, role_arn, instance_id))
            .map_err(|e| format!("job credentials endpoint: {e}"))?;
        tracing::info!(role_arn = %role_arn, "jobs get the job role's credentials");
        Ok(JobAws {
            region,
            credentials: Some(credentials),
        })
    }
}

/// 127.0.0.1 on a port the kernel picks.
pub async fn bind_loopback() -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
}

/// 127.0.0.1 on a port the kernel picks, inside `ns`: a socket stays in the namespace it
/// was made in, so a short-lived thread joins `ns` (only that thread changes namespace),
/// binds, and hands the listener back.
pub async fn bind_loopback_in(ns: NetNs) -> std::io::Result<TcpListener> {
    let std_listener = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || -> std::io::Result<std::net::TcpListener> {
            ns.join_this_thread()?;
            let l = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| std::io::Error::other("the binding thread panicked"))?
    })
    .await
    .map_err(std::io::Error::other)??;
    TcpListener::from_std(std_listener)
}

impl JobCredentials {
    /// Serves on `listener` (its address is the one jobs are given) and starts fetching
    /// from `source` at once. Fails only if the listener has no local address.
    pub fn start<S: CredentialSource>(
        listener: TcpListener,
        source: S,
    ) -> std::io::Result<JobCredentials> {
        let addr = listener.local_addr()?;
        let uri = format!("http://{addr}{PATH}");
        let shared = Arc::new(Shared::default());
        let (force, forced) = mpsc::channel(4);
        let server = tokio::spawn(http::serve(listener, shared.clone()).in_current_span());
        let refresher = refresh::Refresher {
            source,
            shared: shared.clone(),
        };
        let refreshing = tokio::spawn(refresher.run(forced).in_current_span());
        tracing::info!(endpoint = %uri, "job credentials endpoint listening");
        Ok(JobCredentials {
            shared,
            uri,
            force,
            _tasks: (AbortOnDrop(server), AbortOnDrop(refreshing)),
            netns_server: std::sync::Mutex::new(None),
        })
    }

    /// [`issue`](Self::issue) for jobs that run in the network namespace `netns` (under
    /// `strict`, rootless Docker's): the same credentials and token, served by a second
    /// server bound to 127.0.0.1 inside that namespace — made the first time, and again
    /// when the namespace changes (a job may restart rootless dockerd).
    pub async fn issue_in(&self, netns: Option<&NetNs>) -> Result<JobEnv, String> {
        let mut env = self.issue()?;
        let Some(ns) = netns else {
            return Ok(env);
        };
        let inode = ns
            .inode()
            .map_err(|e| format!("the jobs' network namespace: {e}"))?;
        let known = self.netns_server.lock().ok().and_then(|slot| {
            slot.as_ref()
                .filter(|(i, ..)| *i == inode)
                .map(|(_, uri, _)| uri.clone())
        });
        env.uri = match known {
            Some(uri) => uri,
            None => {
                let listener = bind_loopback_in(ns.clone()).await.map_err(|e| {
                    format!("cannot listen on 127.0.0.1 in the jobs' network namespace: {e}")
                })?;
                let addr = listener.local_addr().map_err(|e| e.to_string())?;
                let uri = format!("http://{addr}{PATH}");
                let server =
                    tokio::spawn(http::serve(listener, self.shared.clone()).in_current_span());
                tracing::info!(endpoint = %uri, "job credentials endpoint listening in the jobs' network namespace");
                if let Ok(mut slot) = self.netns_server.lock() {
                    *slot = Some((inode, uri.clone(), AbortOnDrop(server)));
                }
                uri
            }
        };
        Ok(env)
    }

    /// `http://<address>/v1/job-credentials`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A new token for the next agent's jobs; the previous one stops working now.
    pub fn issue(&self) -> Result<JobEnv, String> {
        let token = Token::generate()?;
        if let Ok(mut slot) = self.shared.token.write() {
            *slot = Some(token.clone());
        }
        Ok(JobEnv {
            uri: self.uri.clone(),
            token,
        })
    }

    /// No token opens the endpoint until the next [`issue`](Self::issue): for when the
    /// agent whose jobs had the token has exited.
    pub fn revoke(&self) {
        if let Ok(mut slot) = self.shared.token.write() {
            *slot = None;
        }
    }

    /// Fetches new credentials now (the refresher's next fetch is then planned from
    /// them) and returns once they are served, or with the fetch's error.
    pub async fn refresh_now(&self) -> Result<(), String> {
        let (ack, done) = oneshot::channel();
        self.force
            .send(ack)
            .await
            .map_err(|_| "the refresher has stopped".to_string())?;
        done.await
            .map_err(|_| "the refresher has stopped".to_string())?
    }
}
