//! The leader keeps GitHub's SSH host keys fresh in the runtime config's
//! `known_hosts_parameter` (the value's format: [`crate::known_hosts`]).
//!
//! Policy ([`wait_before_refresh`]): at the start of each term the leader reads the
//! parameter; a set GitHub confirmed less than `known_hosts_refresh_secs` (a day) ago is
//! left until it is that old, an older one, the template's placeholder or an unreadable
//! parameter is refreshed at once. Then once per refresh interval while it leads. So
//! failovers do not multiply the calls to GitHub: at most one a day for the fleet, plus one
//! per term whose predecessor never refreshed. A runtime config without a parameter (an
//! older template) is looked at again every [`NO_PARAMETER_RECHECK`]: a reload that names
//! one is acted on within that.
//!
//! A refresh is `GET <github_meta_url>` (at most [`FETCH_BOUND`], [`MAX_META_BYTES`]), the
//! keys checked ([`crate::known_hosts::parse_meta`]), then, after a leadership check logged
//! as a `leader action` (`put_known_hosts`, as the scaler's), `PutParameter` (at most
//! [`PUT_BOUND`]). A failure (network, status, malformed answer, a
//! refused write) keeps the set already in the parameter — nothing is written — and is
//! retried after [`RETRY_AFTER_FAILURE`] (or the refresh interval, if shorter). It is said
//! once: a warning at the first failure, debug lines while it lasts, an info line when a
//! refresh works again.
//!
//! It is a task of its own beside the scaler ([`crate::election::LeaderWork`]): a slow
//! GitHub never delays a scaling poll.

use super::{check, lead_or_stop, stepped_down};
use crate::aws::ssm::{ParameterStore, ParameterWriter};
use crate::config::Settings;
use crate::election::Leadership;
use crate::known_hosts::{parse_meta, parse_stored, render, HostKey};
use std::future::Future;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest a meta API call may take, connection included.
pub const FETCH_BOUND: Duration = Duration::from_secs(15);
/// Longest the answer may be (GitHub's is about 200 KB, mostly address ranges).
pub const MAX_META_BYTES: usize = 4 << 20;
/// Longest the parameter's read or write may take.
pub const PUT_BOUND: Duration = Duration::from_secs(30);
/// Without a parameter in the runtime config, the leader looks again after this long.
pub const NO_PARAMETER_RECHECK: Duration = Duration::from_secs(600);
/// A failed refresh is tried again after this long.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(3600);

/// How long to wait before refreshing a set GitHub confirmed at `fetched_at` (`None`: never,
/// or unknown): `every` after that, at once when older. A time ahead of `now` (another
/// machine's clock) counts as just now.
pub fn wait_before_refresh(
    fetched_at: Option<SystemTime>,
    now: SystemTime,
    every: Duration,
) -> Duration {
    match fetched_at {
        None => Duration::ZERO,
        Some(at) => every.saturating_sub(now.duration_since(at).unwrap_or_default()),
    }
}

/// GitHub's meta API, behind a trait for the tests.
pub trait MetaSource: Send + Sync {
    /// The answer's body, or why there is none.
    fn fetch(&self, url: &str) -> impl Future<Output = Result<Vec<u8>, String>> + Send;
}

/// [`MetaSource`] over HTTPS (reqwest, rustls).
pub struct HttpMeta {
    client: reqwest::Client,
}

impl HttpMeta {
    pub fn new() -> Result<Self, reqwest::Error> {
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(FETCH_BOUND)
            // GitHub's API refuses requests without a User-Agent.
            .user_agent(concat!(
                "agent-fleet-supervisor/",
                env!("CARGO_PKG_VERSION")
            ))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { client })
    }
}

impl MetaSource for HttpMeta {
    async fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut resp = self
            .client
            .get(url)
            .header("Accept", "application/vnd.github+json")
            .send()
            .await
            .map_err(|e| failed(url, &e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("GET {url}: HTTP {}", status.as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| failed(url, &e))? {
            if body.len() + chunk.len() > MAX_META_BYTES {
                return Err(format!("GET {url}: answer over {MAX_META_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// Why a GET failed, with reqwest's causes (its own line is only "error sending request").
fn failed(url: &str, e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return format!("GET {url}: no answer within {FETCH_BOUND:?}");
    }
    let mut why = format!("GET {url}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        why.push_str(&format!(": {s}"));
        source = s.source();
    }
    why
}

/// The leader's host-key task. See the module docs.
pub struct HostKeys<S, F> {
    settings: watch::Receiver<Settings>,
    ssm: S,
    meta: F,
    /// The keys last read from or written to the parameter (to say when they change).
    last: Option<Vec<HostKey>>,
    /// The failure being reported, while refreshes fail: said once.
    failing: Option<String>,
    /// The parameter whose age this term has read (a reload may name another).
    aged: Option<String>,
}

impl<S: ParameterStore + ParameterWriter, F: MetaSource> HostKeys<S, F> {
    pub fn new(settings: watch::Receiver<Settings>, ssm: S, meta: F) -> Self {
        Self {
            settings,
            ssm,
            meta,
            last: None,
            failing: None,
            aged: None,
        }
    }

    /// Refreshes as the module says while this process validly leads; returns on
    /// `shutdown` or when the election's channel closes.
    pub async fn run(
        mut self,
        mut leadership: watch::Receiver<Leadership>,
        shutdown: CancellationToken,
    ) {
        loop {
            let Some(term) = lead_or_stop(&mut leadership, &shutdown).await else {
                return;
            };
            let mut watcher = leadership.clone();
            self.aged = None;
            let mut due = Instant::now();
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = stepped_down(&mut watcher, term) => break,
                    _ = tokio::time::sleep_until(due) => {}
                }
                due = Instant::now() + self.step(&leadership, term).await;
            }
        }
    }

    /// What is due now: reading the parameter's age (once per term and parameter), or a
    /// refresh. Returns the wait before the next step.
    async fn step(&mut self, leadership: &watch::Receiver<Leadership>, term: u64) -> Duration {
        let s = self.settings.borrow().known_hosts.clone();
        let Some(name) = s.parameter else {
            // No parameter (an older template): look again after a reload may have named one.
            self.aged = None;
            return NO_PARAMETER_RECHECK.min(s.refresh);
        };
        if self.aged.as_deref() != Some(name.as_str()) {
            let wait = self.age_wait(&name, s.refresh).await;
            self.aged = Some(name.clone());
            if !wait.is_zero() {
                return wait;
            }
        }
        self.refresh(leadership, term, &name).await
    }

    /// How long until the set in `name` is `every` old (zero: absent, unreadable, older).
    async fn age_wait(&mut self, name: &str, every: Duration) -> Duration {
        let stored = match tokio::time::timeout(PUT_BOUND, self.ssm.get(name)).await {
            Ok(Ok(p)) => parse_stored(&p.value),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "host keys: cannot read {name}; refreshing now");
                Default::default()
            }
            Err(_) => Default::default(),
        };
        let wait = wait_before_refresh(stored.fetched_at, SystemTime::now(), every);
        tracing::debug!(
            parameter = %name,
            keys = stored.keys.len(),
            wait_s = wait.as_secs(),
            "host keys: next refresh"
        );
        if !stored.keys.is_empty() {
            self.last = Some(stored.keys);
        }
        wait
    }

    /// One refresh of `name`; returns the wait before the next.
    async fn refresh(
        &mut self,
        leadership: &watch::Receiver<Leadership>,
        term: u64,
        name: &str,
    ) -> Duration {
        let s = self.settings.borrow().known_hosts.clone();
        let retry = RETRY_AFTER_FAILURE.min(s.refresh);
        let url = &s.meta_url;
        let keys = match tokio::time::timeout(FETCH_BOUND, self.meta.fetch(url)).await {
            Ok(Ok(body)) => parse_meta(&body).map_err(|e| format!("{url} answered {e}")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("GET {url}: no answer within {FETCH_BOUND:?}")),
        };
        let keys = match keys {
            Ok(k) => k,
            Err(why) => {
                self.failed(name, why);
                return retry;
            }
        };
        let Some(c) = check(leadership, term) else {
            return s.refresh;
        };
        tracing::info!(
            action = "put_known_hosts",
            term,
            parameter = %name,
            check_mono_ns = c.check_mono_ns,
            valid_until_mono_ns = c.valid_until_mono_ns,
            "leader action"
        );
        let value = render(&keys, SystemTime::now(), url);
        match tokio::time::timeout(PUT_BOUND, self.ssm.put_string(name, &value)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.failed(name, e.to_string());
                return retry;
            }
            Err(_) => {
                self.failed(
                    name,
                    format!("PutParameter {name}: no answer within {PUT_BOUND:?}"),
                );
                return retry;
            }
        }
        if self.failing.take().is_some() {
            tracing::info!(parameter = %name, keys = keys.len(), "GitHub host keys refreshed again");
        }
        if self.last.as_ref() != Some(&keys) {
            tracing::info!(
                parameter = %name,
                keys = keys.len(),
                algorithms = %keys.iter().map(|k| k.algorithm.as_str()).collect::<Vec<_>>().join(","),
                "GitHub host keys updated"
            );
            self.last = Some(keys);
        } else {
            tracing::debug!(parameter = %name, "GitHub host keys confirmed");
        }
        s.refresh
    }

    /// A failed refresh: a warning the first time, debug while it lasts.
    fn failed(&mut self, name: &str, why: String) {
        if self.failing.is_none() {
            tracing::warn!(
                parameter = %name,
                error = %why,
                "GitHub host keys not refreshed; the parameter keeps the last good set: {why}"
            );
        } else {
            tracing::debug!(parameter = %name, error = %why, "GitHub host keys still not refreshed");
        }
        self.failing = Some(why);
    }
}
