//! Semaphore's demand: `GET /api/v1/self_hosted_agents/metrics` with the agent type's
//! registration token.
//!
//! The answer is parsed strictly: every count must be there and be a non-negative
//! integer, so a truncated or garbled body is an error — never a scaling action built
//! on a default of zero. Unknown extra keys are allowed (the server may grow).

use serde::Deserialize;
use std::future::Future;
use std::time::Duration;

/// The path under the endpoint.
pub const METRICS_PATH: &str = "/api/v1/self_hosted_agents/metrics";
/// Per request, connection included. A poll that takes longer is worth less than the
/// next one.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A metrics body is ~80 bytes; anything much bigger is not the answer we want.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// `Retry-After` is honoured up to this long; a larger value is taken as this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The agent type's registration token. Its `Debug` never shows the value, so it can't
/// leak through a log line or a panic message.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself: only for the `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// `/metrics`: jobs waiting or running for the agent type, and its agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct DemandMetrics {
    pub jobs: JobCounts,
    pub agents: AgentCounts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct JobCounts {
    /// Enqueued and scheduled jobs, not yet on an agent.
    pub queued: u32,
    /// Jobs started on an agent.
    pub running: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct AgentCounts {
    pub idle: u32,
    pub occupied: u32,
}

impl DemandMetrics {
    /// `queued + running`: the agents these jobs need.
    pub fn jobs(&self) -> u64 {
        u64::from(self.jobs.queued) + u64::from(self.jobs.running)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DemandError {
    /// 401: the token is wrong or was rotated.
    #[error("Semaphore refused the registration token (HTTP 401)")]
    Unauthorized,
    /// The token can't even be sent (e.g. it holds a newline).
    #[error("the registration token is not a valid HTTP header value")]
    InvalidToken,
    #[error("Semaphore is rate-limiting (HTTP 429){}", retry_after.map(|d| format!(", retry after {}s", d.as_secs())).unwrap_or_default())]
    RateLimited { retry_after: Option<Duration> },
    #[error("Semaphore answered HTTP {0}")]
    Server(u16),
    /// Any other non-success status (3xx, 4xx other than 401/429).
    #[error("Semaphore answered HTTP {0}, which the metrics API never should")]
    Unexpected(u16),
    #[error("Semaphore's metrics answer is not what the API promises: {0}")]
    Malformed(String),
    #[error("cannot reach Semaphore: {0}")]
    Transport(String),
}

/// Where demand comes from. [`HttpDemand`] asks Semaphore; tests use a fake.
pub trait Demand: Send + Sync {
    /// `endpoint` is `host[:port]`, no scheme; `https` false only for a local test hub.
    fn metrics(
        &self,
        endpoint: &str,
        https: bool,
        token: &Token,
    ) -> impl Future<Output = Result<DemandMetrics, DemandError>> + Send;
}

pub fn metrics_url(endpoint: &str, https: bool) -> String {
    let scheme = if https { "https" } else { "http" };
    format!("{scheme}://{endpoint}{METRICS_PATH}")
}

/// Parses a 200 body, strictly (see the module docs).
pub fn parse_metrics(body: &[u8]) -> Result<DemandMetrics, DemandError> {
    serde_json::from_slice(body).map_err(|e| DemandError::Malformed(e.to_string()))
}

/// Maps a response to a result: the part of the client that needs no network.
pub fn interpret(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
) -> Result<DemandMetrics, DemandError> {
    match status {
        200 => parse_metrics(body),
        401 => Err(DemandError::Unauthorized),
        429 => Err(DemandError::RateLimited {
            retry_after: retry_after
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER)),
        }),
        500..=599 => Err(DemandError::Server(status)),
        other => Err(DemandError::Unexpected(other)),
    }
}

/// The Semaphore client: reqwest over rustls, [`REQUEST_TIMEOUT`], no redirects (the
/// token is never sent anywhere but the configured endpoint).
#[derive(Debug, Clone)]
pub struct HttpDemand {
    _private: (),
}

impl HttpDemand {
    /// The client itself is [`crate::tls::shared_client`], built at the first poll (only
    /// a leader polls).
    pub fn new() -> Result<Self, DemandError> {
        Ok(Self { _private: () })
    }
}

impl Demand for HttpDemand {
    async fn metrics(
        &self,
        endpoint: &str,
        https: bool,
        token: &Token,
    ) -> Result<DemandMetrics, DemandError> {
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("Token {}", token.expose()))
            .map_err(|_| DemandError::InvalidToken)?;
        auth.set_sensitive(true);
        let transport = |e: reqwest::Error| DemandError::Transport(crate::aws::describe(&e));
        let http = crate::tls::shared_client().map_err(DemandError::Transport)?;
        let mut resp = http
            .get(metrics_url(endpoint, https))
            .timeout(REQUEST_TIMEOUT)
            .header(reqwest::header::AUTHORIZATION, auth)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        if status == 200 {
            while let Some(chunk) = resp.chunk().await.map_err(transport)? {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(DemandError::Malformed(format!(
                        "body larger than {MAX_BODY_BYTES} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
        }
        interpret(status, retry_after.as_deref(), &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_shape_and_nothing_less() {
        let m = parse_metrics(
            br#"{"jobs":{"queued":3,"running":2},"agents":{"idle":1,"occupied":2},"new":true}"#,
        )
        .expect("good body");
        assert_eq!(m.jobs(), 5);
        assert_eq!(m.agents.idle, 1);
        for bad in [
            &br#"{"jobs":{"queued":3 "running":2}}"#[..],
            br#"{"jobs":{"queued":3"#,
            br#"{"jobs":{"queued":3,"running":2}}"#,
            br#"{"jobs":{"queued":3},"agents":{"idle":1,"occupied":2}}"#,
            br#"{"jobs":{"queued":-1,"running":2},"agents":{"idle":1,"occupied":2}}"#,
            br#"{"jobs":{"queued":"3","running":2},"agents":{"idle":1,"occupied":2}}"#,
            br#"{"jobs":{"queued":null,"running":2},"agents":{"idle":1,"occupied":2}}"#,
            b"<html>proxy login</html>",
            b"",
        ] {
            assert!(
                matches!(parse_metrics(bad), Err(DemandError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn statuses_map_to_errors() {
        assert_eq!(interpret(401, None, b""), Err(DemandError::Unauthorized));
        assert_eq!(
            interpret(429, Some(" 30 "), b""),
            Err(DemandError::RateLimited {
                retry_after: Some(Duration::from_secs(30))
            })
        );
        assert_eq!(
            interpret(429, Some("Wed, 21 Oct 2015 07:28:00 GMT"), b""),
            Err(DemandError::RateLimited { retry_after: None })
        );
        assert_eq!(
            interpret(429, Some("86400"), b""),
            Err(DemandError::RateLimited {
                retry_after: Some(MAX_RETRY_AFTER)
            })
        );
        assert_eq!(interpret(503, None, b""), Err(DemandError::Server(503)));
        assert_eq!(interpret(302, None, b""), Err(DemandError::Unexpected(302)));
        assert_eq!(
            metrics_url("127.0.0.1:9", false),
            "http://127.0.0.1:9/api/v1/self_hosted_agents/metrics"
        );
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::new("s3cret");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        assert!(!format!("{:?}", Some(&t)).contains("s3cret"));
    }

    /// One canned HTTP/1.1 answer per connection; returns the request head it got.
    async fn serve_once(response: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            sock.write_all(response.as_bytes()).await.expect("write");
            sock.shutdown().await.ok();
            String::from_utf8_lossy(&head).into_owned()
        });
        (addr, task)
    }

    /// The wire: URL, headers, status and `Retry-After` plumbing.
    #[tokio::test]
    async fn http_client_sends_token_and_reads_answers() {
        let client = HttpDemand::new().expect("client");
        let token = Token::new("reg-token");
        let (addr, req) = serve_once(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 66\r\n\r\n\
             {\"jobs\":{\"queued\":3,\"running\":1},\"agents\":{\"idle\":0,\"occupied\":1}}",
        )
        .await;
        let m = client.metrics(&addr, false, &token).await.expect("metrics");
        assert_eq!(m.jobs(), 4);
        let head = req.await.expect("request").to_ascii_lowercase();
        assert!(
            head.starts_with("get /api/v1/self_hosted_agents/metrics http/1.1"),
            "{head}"
        );
        assert!(
            head.contains("authorization: token reg-token\r\n"),
            "{head}"
        );
        assert!(head.contains("user-agent: agent-fleet/"), "{head}");

        let (addr, _req) = serve_once(
            "HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(
            client.metrics(&addr, false, &token).await,
            Err(DemandError::RateLimited {
                retry_after: Some(Duration::from_secs(7))
            })
        );
        let (addr, _req) =
            serve_once("HTTP/1.1 200 OK\r\ncontent-length: 19\r\n\r\n{\"jobs\":{\"queued\":3")
                .await;
        assert!(matches!(
            client.metrics(&addr, false, &token).await,
            Err(DemandError::Malformed(_))
        ));
        // Nothing listening: a transport error, not a panic or a zero.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = closed.local_addr().expect("addr").to_string();
        drop(closed);
        assert!(matches!(
            client.metrics(&addr, false, &token).await,
            Err(DemandError::Transport(_))
        ));
        assert_eq!(
            client
                .metrics("127.0.0.1:1", false, &Token::new("bad\ntoken"))
                .await,
            Err(DemandError::InvalidToken)
        );
    }
}
