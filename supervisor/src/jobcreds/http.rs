//! The endpoint's HTTP/1.1: one request per connection, answered and closed. The request a
//! credentials provider sends is one line and a few headers, so a hand-written reader of
//! the request head does, bounded in size, time and connections.

use super::refresh::Cached;
use super::{Shared, PATH};
use crate::aws::sts::rfc3339;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::Instrument;

/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 64;

/// Largest request head (request line and headers) read.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// The whole request head must arrive within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The answer must be taken within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// An answer: status and JSON body.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) body: String,
}

impl Reply {
    fn error(status: u16) -> Reply {
        let (code, message) = match status {
            400 => ("BadRequest", "Bad request"),
            401 => ("Unauthorized", "Unauthorized"),
            403 => ("Forbidden", "Forbidden"),
            404 => ("NotFound", "Not found"),
            405 => ("MethodNotAllowed", "Only GET"),
            431 => ("RequestHeaderFieldsTooLarge", "Request head too large"),
            _ => (
                "CredentialsUnavailable",
                "No credentials at the moment; try again",
            ),
        };
        Reply {
            status,
            body: serde_json::json!({ "code": code, "message": message }).to_string(),
        }
    }

    fn credentials(cached: &Cached) -> Reply {
        let c = &cached.creds;
        Reply {
            status: 200,
            body: serde_json::json!({
                "AccessKeyId": c.access_key_id,
                "SecretAccessKey": c.secret_access_key,
                "Token": c.session_token,
                "Expiration": rfc3339(c.expiration),
            })
            .to_string(),
        }
    }

    /// The bytes on the wire.
    fn render(&self) -> String {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            _ => "Service Unavailable",
        };
        let allow = if self.status == 405 {
            "Allow: GET\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\n{allow}Connection: close\r\n\r\n{}",
            self.status,
            self.body.len(),
            self.body
        )
    }
}

/// Accepts on `listener` for ever (until the task is aborted).
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::from_millis(50);
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let conn = match listener.accept().await {
            Ok((conn, _)) => {
                backoff = Duration::from_millis(50);
                conn
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "job credentials endpoint: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                answer(conn, &shared).await;
            }
            .in_current_span(),
        );
    }
}

/// What reading a request head came to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// The peer closed or failed before a whole head arrived.
    Gone,
}

async fn answer(mut conn: TcpStream, shared: &Shared) {
    let reply = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut conn)).await {
        Ok(Head::Complete(head)) => respond(&head, shared, Instant::now()),
        Ok(Head::TooLarge) => Reply::error(431),
        Ok(Head::Gone) | Err(_) => return,
    };
    let sent = async {
        conn.write_all(reply.render().as_bytes()).await?;
        conn.shutdown().await
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, sent).await;
}

pub(super) async fn read_head<R: AsyncRead + Unpin>(conn: &mut R) -> Head {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return Head::Gone,
            Ok(n) => n,
        };
        let searched_from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head[searched_from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
        {
            head.truncate(searched_from + end);
            return Head::Complete(head);
        }
        if head.len() > MAX_HEAD_BYTES {
            return Head::TooLarge;
        }
    }
}

/// The answer to one request head (without its final blank line) at `now`.
pub(super) fn respond(head: &[u8], shared: &Shared, now: Instant) -> Reply {
    let Ok(head) = std::str::from_utf8(head) else {
        return Reply::error(400);
    };
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version), None) = (
        request.next(),
        request.next(),
        request.next(),
        request.next(),
    ) else {
        return Reply::error(400);
    };
    if !version.starts_with("HTTP/1.") {
        return Reply::error(400);
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != PATH {
        return Reply::error(404);
    }
    if method != "GET" {
        return Reply::error(405);
    }
    let presented: Vec<&str> = lines
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, value)| value.trim_matches([' ', '\t']))
        .collect();
    let authorized = match presented.as_slice() {
        [] => return Reply::error(401),
        [one] => shared
            .token
            .read()
            .ok()
            .and_then(|t| t.as_ref().map(|t| t.matches(one.as_bytes())))
            .unwrap_or(false),
        _ => false,
    };
    if !authorized {
        return Reply::error(403);
    }
    let current = shared.current.read().ok();
    match current.as_ref().and_then(|c| c.as_ref()) {
        Some(cached) if cached.servable(now) => Reply::credentials(cached),
        _ => Reply::error(503),
    }
}
