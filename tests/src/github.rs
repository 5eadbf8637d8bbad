//! A fake GitHub meta API: `GET /meta` answers `{"ssh_keys": [...], ...}` as
//! `https://api.github.com/meta` does, or whatever a test sets instead ([`MetaAnswer`]: other
//! keys, a malformed body, an error status, a slow answer). The leader's host-key refresh
//! (`supervisor/src/scaler/host_keys.rs`) reads it through the runtime config's
//! `github_meta_url`. An axum server on `127.0.0.1:<ephemeral>`, stopped when dropped.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What `GET /meta` answers.
#[derive(Debug, Clone)]
pub enum MetaAnswer {
    /// 200 with these `ssh_keys` (and GitHub's other fields).
    Keys(Vec<String>),
    /// 200 with this body, as it is.
    Body(String),
    /// This status, with a GitHub-style error body.
    Status(u16),
    /// The answer, after this long.
    Slow(Duration, Box<MetaAnswer>),
}

#[derive(Default)]
struct Inner {
    answer: Option<MetaAnswer>,
    calls: u32,
}

pub struct FakeGithub {
    inner: Arc<Mutex<Inner>>,
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGithub {
    /// Serves [`FakeGithub::keys`] until told otherwise.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner {
            answer: Some(MetaAnswer::Keys(Self::keys())),
            calls: 0,
        }));
        let app = Router::new()
            .route("/meta", get(meta))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { inner, addr, task })
    }

    /// The runtime config's `github_meta_url` (plain HTTP: loopback).
    pub fn url(&self) -> String {
        format!("http://{}/meta", self.addr)
    }

    pub fn set(&self, answer: MetaAnswer) {
        if let Ok(mut i) = self.inner.lock() {
            i.answer = Some(answer);
        }
    }

    /// `GET /meta` calls so far.
    pub fn calls(&self) -> u32 {
        self.inner.lock().map(|i| i.calls).unwrap_or_default()
    }

    /// Three keys as GitHub publishes them (ed25519, ECDSA P-256, RSA), made up: valid SSH
    /// public-key blobs of their algorithms, distinct per `seed`.
    pub fn keys_with(seed: u8) -> Vec<String> {
        [
            ("ssh-ed25519", 36),
            ("ecdsa-sha2-nistp256", 90),
            ("ssh-rsa", 400),
        ]
        .iter()
        .map(|(alg, extra)| {
            let mut blob = (alg.len() as u32).to_be_bytes().to_vec();
            blob.extend_from_slice(alg.as_bytes());
            blob.extend((0..*extra).map(|i: usize| seed.wrapping_add(i as u8)));
            format!("{alg} {}", aws_smithy_types::base64::encode(blob))
        })
        .collect()
    }

    pub fn keys() -> Vec<String> {
        Self::keys_with(1)
    }
}

fn answer(a: MetaAnswer) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>> {
    Box::pin(async move {
        match a {
            MetaAnswer::Keys(keys) => axum::Json(serde_json::json!({
                "verifiable_password_authentication": false,
                "ssh_key_fingerprints": {},
                "ssh_keys": keys,
                "web": ["192.30.252.0/22", "185.199.108.0/22"],
            }))
            .into_response(),
            MetaAnswer::Body(b) => b.into_response(),
            MetaAnswer::Status(s) => (
                StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                r#"{"message":"fake GitHub says no"}"#,
            )
                .into_response(),
            MetaAnswer::Slow(d, then) => {
                tokio::time::sleep(d).await;
                answer(*then).await
            }
        }
    })
}

async fn meta(State(inner): State<Arc<Mutex<Inner>>>) -> Response {
    let a = match inner.lock() {
        Ok(mut i) => {
            i.calls += 1;
            i.answer.clone()
        }
        Err(_) => None,
    };
    match a {
        Some(a) => answer(a).await,
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
