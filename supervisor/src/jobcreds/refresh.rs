//! The refresher task: fetches the credentials, keeps the ones being served, and plans the
//! next fetch (see the module docs of [`super`] for the policy).

use super::{Ack, CredentialSource, Shared};
use crate::aws::sts::SessionCredentials;
use crate::retry::{jitter, RetryPolicy};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Fetch again this long before the credentials expire (half-way through a session shorter
/// than twice this). botocore starts asking again 15 min before expiry, other SDKs later:
/// by then the endpoint already holds the next credentials.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(20 * 60);

/// Credentials with less than this left are not served (503 instead): a client must have
/// time to use them, and some SDKs refuse credentials about to expire.
pub const SERVE_MIN_LEFT: Duration = Duration::from_secs(5 * 60);

/// Longest one fetch may take, credentials of the instance profile included.
const FETCH_BOUND: Duration = Duration::from_secs(30);

/// Planned fetches are at least this far apart (credentials that arrive nearly expired
/// mean a wrong clock; asking again at once would not help).
const MIN_GAP: Duration = Duration::from_secs(30);

/// Retries of a failed fetch: 1 s doubling to 60 s (jittered), for as long as it fails.
const RETRY: RetryPolicy = RetryPolicy {
    attempts: u32::MAX,
    first_delay: Duration::from_secs(1),
    max_delay: Duration::from_secs(60),
};

/// Credentials as served, with their deadlines on the monotonic clock.
#[derive(Debug, Clone)]
pub(super) struct Cached {
    pub(super) creds: SessionCredentials,
    /// When they expire.
    pub(super) expires: Instant,
    /// When the next fetch is due.
    pub(super) refresh_at: Instant,
}

impl Cached {
    /// `creds` that arrived at `now` (monotonic) and `wall_now` (the clock STS's expiry
    /// is read against).
    pub(super) fn new(creds: SessionCredentials, now: Instant, wall_now: SystemTime) -> Cached {
        let left = creds
            .expiration
            .duration_since(wall_now)
            .unwrap_or(Duration::ZERO);
        let expires = now + left;
        Cached {
            creds,
            expires,
            refresh_at: expires - REFRESH_MARGIN.min(left / 2),
        }
    }

    /// Whether they may be handed out at `now`.
    pub(super) fn servable(&self, now: Instant) -> bool {
        self.expires.saturating_duration_since(now) >= SERVE_MIN_LEFT
    }
}

/// The refresher (see [`super::JobCredentials::start`]).
pub(super) struct Refresher<S> {
    pub(super) source: S,
    pub(super) shared: Arc<Shared>,
}

impl<S: CredentialSource> Refresher<S> {
    /// Fetches at once, then when due or when forced; stops when the forcing side hangs
    /// up (the endpoint was dropped).
    pub(super) async fn run(self, mut forced: mpsc::Receiver<Ack>) {
        let mut next = Instant::now();
        let mut failures = 0u32;
        loop {
            let ack = tokio::select! {
                biased;
                ack = forced.recv() => match ack {
                    Some(ack) => Some(ack),
                    None => return,
                },
                () = tokio::time::sleep_until(next) => None,
            };
            let fetched = self.fetch().await;
            let now = Instant::now();
            let result = match fetched {
                Ok(cached) => {
                    failures = 0;
                    next = cached.refresh_at.max(now + MIN_GAP);
                    let expires_in = cached.expires.saturating_duration_since(now);
                    if cached.servable(now) {
                        tracing::info!(
                            access_key_id = %cached.creds.access_key_id,
                            expires_in_secs = expires_in.as_secs(),
                            refresh_in_secs = next.saturating_duration_since(now).as_secs(),
                            "job role credentials fetched"
                        );
                    } else {
                        tracing::error!(
                            expires_in_secs = expires_in.as_secs(),
                            "job role credentials arrived with less than {} s left: is this instance's clock right?",
                            SERVE_MIN_LEFT.as_secs()
                        );
                    }
                    if let Ok(mut current) = self.shared.current.write() {
                        *current = Some(cached);
                    }
                    Ok(())
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = jitter(RETRY.delay_after(failures));
                    next = now + delay;
                    let serving_for = self
                        .shared
                        .current
                        .read()
                        .ok()
                        .and_then(|c| c.as_ref().map(|c| c.expires))
                        .map(|expires| {
                            expires
                                .saturating_duration_since(now)
                                .saturating_sub(SERVE_MIN_LEFT)
                        })
                        .unwrap_or_default();
                    if serving_for > Duration::ZERO {
                        tracing::warn!(
                            error = %e,
                            failures,
                            retry_in_ms = delay.as_millis() as u64,
                            serving_previous_for_secs = serving_for.as_secs(),
                            "cannot refresh the job role's credentials; jobs get the previous ones meanwhile"
                        );
                    } else {
                        tracing::error!(
                            error = %e,
                            failures,
                            retry_in_ms = delay.as_millis() as u64,
                            "cannot get the job role's credentials; jobs asking for them get 503 (fix: the instance role may sts:AssumeRole the job role, and the job role trusts it)"
                        );
                    }
                    Err(e)
                }
            };
            if let Some(ack) = ack {
                let _ = ack.send(result);
            }
        }
    }

    /// One bounded fetch.
    async fn fetch(&self) -> Result<Cached, String> {
        match tokio::time::timeout(FETCH_BOUND, self.source.fetch()).await {
            Ok(Ok(creds)) => Ok(Cached::new(creds, Instant::now(), SystemTime::now())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no credentials within {} s", FETCH_BOUND.as_secs())),
        }
    }
}
