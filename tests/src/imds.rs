//! A fake EC2 instance metadata service (IMDSv2 only), one per simulated instance, served
//! in-process by axum on 127.0.0.1 with an ephemeral port. Point a supervisor at it with
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT=<endpoint()>` (the SDK's IMDS client,
//! `aws_config::imds::Client::builder().build()`, reads that variable).
//!
//! IMDSv2 as on EC2 with `HttpTokens=required`:
//! - `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 1..=21600` answers a
//!   token (and echoes the TTL header); a missing or out-of-range TTL is 400; a request carrying
//!   `X-Forwarded-For` is 403 (IMDS refuses proxied token requests).
//! - every `GET` needs `X-aws-ec2-metadata-token` with a valid, unexpired token, else 401.
//!
//! Paths: `/latest/meta-data/` `instance-id`, `instance-type`, `instance-life-cycle`,
//! `placement/region`, `placement/availability-zone`, `spot/instance-action`,
//! `events/recommendations/rebalance`, `autoscaling/target-lifecycle-state`,
//! `tags/instance[/<key>]`, `iam/security-credentials/` (404: tests give credentials by env),
//! `/latest/user-data` (404 if none), `/latest/dynamic/instance-identity/document`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// The instance a [`FakeImds`] describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceMeta {
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    /// Raw user data (IMDS serves it decoded); `None` -> `/latest/user-data` is 404.
    pub user_data: Option<String>,
    /// `"on-demand"` or `"spot"` (`/latest/meta-data/instance-life-cycle`).
    pub life_cycle: String,
    pub instance_type: String,
    /// Launch time (Unix ms): `pendingTime` of the identity document. `None`: when the fake
    /// started.
    pub launch_time_unix_ms: Option<u64>,
}

impl InstanceMeta {
    /// An on-demand t3.micro in us-east-1a without user data.
    pub fn new(instance_id: impl Into<String>) -> Self {
        InstanceMeta {
            instance_id: instance_id.into(),
            ..InstanceMeta::default()
        }
    }
}

impl Default for InstanceMeta {
    fn default() -> Self {
        InstanceMeta {
            instance_id: "i-0123456789abcdef0".to_string(),
            region: "us-east-1".to_string(),
            availability_zone: "us-east-1a".to_string(),
            user_data: None,
            life_cycle: "on-demand".to_string(),
            instance_type: "t3.micro".to_string(),
            launch_time_unix_ms: None,
        }
    }
}

const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const MAX_TTL_SECONDS: u64 = 21600;

#[derive(Debug)]
struct Dynamic {
    meta: InstanceMeta,
    spot_action: Option<String>,
    rebalance: Option<String>,
    target_lifecycle_state: String,
    tags: BTreeMap<String, String>,
    down: bool,
    tokens: HashMap<String, Instant>,
    /// GETs answered (any status) per path.
    gets: HashMap<String, u64>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<Dynamic>,
    requests: AtomicU64,
    started_unix_ms: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Dynamic> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fake IMDSv2 for one instance (see the module docs). Stops when dropped.
#[derive(Debug)]
pub struct FakeImds {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeImds {
    /// Serve `meta` on 127.0.0.1 with an ephemeral port (on the current tokio runtime).
    pub async fn start(meta: InstanceMeta) -> anyhow::Result<FakeImds> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake IMDS on 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let started_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            state: Mutex::new(Dynamic {
                meta,
                spot_action: None,
                rebalance: None,
                target_lifecycle_state: "InService".to_string(),
                tags: BTreeMap::new(),
                down: false,
                tokens: HashMap::new(),
                gets: HashMap::new(),
            }),
            requests: AtomicU64::new(0),
            started_unix_ms,
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = rx.await;
            });
            if let Err(e) = serve.await {
                eprintln!("fake IMDS on {addr}: {e}");
            }
        });
        Ok(FakeImds {
            shared,
            addr,
            shutdown: Some(tx),
        })
    }

    /// `http://127.0.0.1:PORT` (for `AWS_EC2_METADATA_SERVICE_ENDPOINT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The instance this fake describes.
    pub fn meta(&self) -> InstanceMeta {
        self.shared.lock().meta.clone()
    }

    /// Body of `/latest/meta-data/spot/instance-action` (404 when `None`), e.g.
    /// `{"action": "terminate", "time": "2017-09-18T08:22:00Z"}`.
    pub fn set_spot_action(&self, v: Option<String>) {
        self.shared.lock().spot_action = v;
    }

    /// Body of `/latest/meta-data/events/recommendations/rebalance` (404 when `None`), e.g.
    /// `{"noticeTime": "2020-11-05T08:22:00Z"}`.
    pub fn set_rebalance(&self, v: Option<String>) {
        self.shared.lock().rebalance = v;
    }

    /// `/latest/meta-data/autoscaling/target-lifecycle-state` (default `InService`; the ASG
    /// sets `Terminated` when it wants the instance gone, `Warmed:*` for warm pools).
    pub fn set_target_lifecycle_state(&self, s: &str) {
        self.shared.lock().target_lifecycle_state = s.to_string();
    }

    /// Instance tag under `/latest/meta-data/tags/instance/<key>` (instance metadata tags).
    pub fn set_tag(&self, key: &str, value: &str) {
        self.shared
            .lock()
            .tags
            .insert(key.to_string(), value.to_string());
    }

    /// While down, every request (token or metadata) is answered 500.
    pub fn set_down(&self, down: bool) {
        self.shared.lock().down = down;
    }

    /// Requests served so far (token PUTs included, whatever the answer).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// GETs of one path so far (e.g. `/latest/meta-data/spot/instance-action`), whatever the
    /// answer: how often the supervisor polls it.
    pub fn gets(&self, path: &str) -> u64 {
        self.shared
            .lock()
            .gets
            .get(path)
            .copied()
            .unwrap_or_default()
    }

    /// A spot interruption notice as EC2 gives it, two minutes ahead:
    /// `{"action": "<action>", "time": "<now + in_secs, RFC 3339>"}`.
    pub fn set_spot_interruption(&self, action: &str, in_secs: u64) {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
            + in_secs;
        self.set_spot_action(Some(
            serde_json::json!({"action": action, "time": rfc3339_seconds(at)}).to_string(),
        ));
    }

    /// A rebalance recommendation noticed now: `{"noticeTime": "<now, RFC 3339>"}`.
    pub fn set_rebalance_now(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        self.set_rebalance(Some(
            serde_json::json!({"noticeTime": rfc3339_seconds(now)}).to_string(),
        ));
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body.into()).into_response()
}

fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "Not Found")
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let mut st = shared.lock();
    if st.down {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
    }
    let path = uri.path();
    if path == "/latest/api/token" {
        if method != Method::PUT {
            return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
        }
        if headers.contains_key("x-forwarded-for") {
            return text(StatusCode::FORBIDDEN, "Forbidden");
        }
        let ttl = headers
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|ttl| (1..=MAX_TTL_SECONDS).contains(ttl));
        let Some(ttl) = ttl else {
            return text(StatusCode::BAD_REQUEST, "Bad Request");
        };
        let now = Instant::now();
        st.tokens.retain(|_, expiry| *expiry > now);
        let token: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(56)
            .collect();
        st.tokens
            .insert(token.clone(), now + Duration::from_secs(ttl));
        return (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE.as_str(), "text/plain".to_string()),
                (TTL_HEADER, ttl.to_string()),
            ],
            token,
        )
            .into_response();
    }
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    *st.gets.entry(path.to_string()).or_default() += 1;
    let valid = headers
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| st.tokens.get(t))
        .is_some_and(|expiry| *expiry > Instant::now());
    if !valid {
        return text(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let body = match path {
        "/latest/user-data" => st.meta.user_data.clone(),
        "/latest/dynamic/instance-identity/document" => {
            Some(identity_document(&st.meta, shared.started_unix_ms))
        }
        _ => match path.strip_prefix("/latest/meta-data/") {
            Some(key) => meta_data(&st, key),
            None => None,
        },
    };
    match body {
        Some(body) => text(StatusCode::OK, body),
        None => not_found(),
    }
}

fn meta_data(st: &Dynamic, key: &str) -> Option<String> {
    let m = &st.meta;
    match key {
        "instance-id" => Some(m.instance_id.clone()),
        "instance-type" => Some(m.instance_type.clone()),
        "instance-life-cycle" => Some(m.life_cycle.clone()),
        "placement/region" => Some(m.region.clone()),
        "placement/availability-zone" => Some(m.availability_zone.clone()),
        "spot/instance-action" => st.spot_action.clone(),
        "events/recommendations/rebalance" => st.rebalance.clone(),
        "autoscaling/target-lifecycle-state" => Some(st.target_lifecycle_state.clone()),
        "tags/instance" | "tags/instance/" if !st.tags.is_empty() => {
            Some(st.tags.keys().cloned().collect::<Vec<_>>().join("\n"))
        }
        _ => key
            .strip_prefix("tags/instance/")
            .and_then(|k| st.tags.get(k).cloned()),
        // iam/security-credentials/ and anything else: 404.
    }
}

fn identity_document(m: &InstanceMeta, started_unix_ms: u64) -> String {
    let pending = m.launch_time_unix_ms.unwrap_or(started_unix_ms);
    serde_json::json!({
        "accountId": "123456789012",
        "architecture": "x86_64",
        "availabilityZone": m.availability_zone,
        "imageId": "ami-785db401",
        "instanceId": m.instance_id,
        "instanceType": m.instance_type,
        "pendingTime": rfc3339_seconds(pending / 1000),
        "privateIp": "10.0.0.10",
        "region": m.region,
        "version": "2017-09-30",
    })
    .to_string()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds (civil-from-days, H. Hinnant).
fn rfc3339_seconds(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http() -> reqwest::Client {
        {
            agent_supervisor::tls::install_crypto_provider();
            reqwest::Client::builder()
        }
        .no_proxy()
        .build()
        .expect("reqwest client")
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339_seconds(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_seconds(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_seconds(1_505_723_000), "2017-09-18T08:23:20Z");
    }

    #[tokio::test]
    async fn the_sdk_imds_client_reads_the_fake() -> anyhow::Result<()> {
        let imds = FakeImds::start(InstanceMeta {
            user_data: Some("#!/bin/sh\necho hi\n".to_string()),
            ..InstanceMeta::new("i-0aaaabbbbccccdddd")
        })
        .await?;
        let client = aws_config::imds::Client::builder()
            .endpoint(imds.endpoint())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .build();
        let id = client.get("/latest/meta-data/instance-id").await?;
        assert_eq!(id.as_ref(), "i-0aaaabbbbccccdddd");
        let ud = client.get("/latest/user-data").await?;
        assert_eq!(ud.as_ref(), "#!/bin/sh\necho hi\n");
        assert_eq!(
            client
                .get("/latest/meta-data/placement/region")
                .await?
                .as_ref(),
            "us-east-1"
        );
        assert_eq!(
            client
                .get("/latest/meta-data/autoscaling/target-lifecycle-state")
                .await?
                .as_ref(),
            "InService"
        );
        assert!(client
            .get("/latest/meta-data/spot/instance-action")
            .await
            .is_err());
        imds.set_spot_action(Some(
            r#"{"action":"terminate","time":"2017-09-18T08:22:00Z"}"#.into(),
        ));
        imds.set_target_lifecycle_state("Terminated");
        assert!(client
            .get("/latest/meta-data/spot/instance-action")
            .await?
            .as_ref()
            .contains("terminate"));
        assert_eq!(
            client
                .get("/latest/meta-data/autoscaling/target-lifecycle-state")
                .await?
                .as_ref(),
            "Terminated"
        );
        let doc: serde_json::Value = serde_json::from_str(
            client
                .get("/latest/dynamic/instance-identity/document")
                .await?
                .as_ref(),
        )?;
        assert_eq!(doc["instanceId"], "i-0aaaabbbbccccdddd");
        // pendingTime defaults to when the fake started (whole seconds, as on EC2), and is
        // what the supervisor reads as the launch time.
        let pending = agent_supervisor::aws::imds::pending_time(&doc.to_string())
            .expect("pendingTime parses");
        let age = SystemTime::now().duration_since(pending)?;
        assert!(age < Duration::from_secs(5), "pendingTime {doc}");
        assert!(imds.requests() >= 7);
        assert_eq!(imds.gets("/latest/meta-data/spot/instance-action"), 2);
        imds.set_spot_interruption("stop", 120);
        let action: serde_json::Value = serde_json::from_str(
            client
                .get("/latest/meta-data/spot/instance-action")
                .await?
                .as_ref(),
        )?;
        assert_eq!(action["action"], "stop");
        let time = action["time"].as_str().unwrap_or_default();
        assert!(time.len() == 20 && time.ends_with('Z'), "{action}");
        imds.set_rebalance_now();
        assert!(client
            .get("/latest/meta-data/events/recommendations/rebalance")
            .await?
            .as_ref()
            .contains("noticeTime"));

        imds.set_down(true);
        let once = aws_config::imds::Client::builder()
            .endpoint(imds.endpoint())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .max_attempts(1)
            .build();
        assert!(once.get("/latest/meta-data/instance-id").await.is_err());
        imds.set_down(false);
        assert!(once.get("/latest/meta-data/instance-id").await.is_ok());
        Ok(())
    }

    #[tokio::test]
    async fn launch_time_is_configurable() -> anyhow::Result<()> {
        let imds = FakeImds::start(InstanceMeta {
            launch_time_unix_ms: Some(1_479_573_131_999),
            ..InstanceMeta::new("i-0launch")
        })
        .await?;
        let client = aws_config::imds::Client::builder()
            .endpoint(imds.endpoint())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .build();
        let doc = client
            .get("/latest/dynamic/instance-identity/document")
            .await?;
        let doc: serde_json::Value = serde_json::from_str(doc.as_ref())?;
        assert_eq!(doc["pendingTime"], "2016-11-19T16:32:11Z");
        Ok(())
    }

    #[tokio::test]
    async fn imdsv2_only() -> anyhow::Result<()> {
        let imds = FakeImds::start(InstanceMeta::new("i-0123")).await?;
        let base = imds.endpoint();
        let http = http();
        // IMDSv1 (no token): 401.
        let r = http
            .get(format!("{base}/latest/meta-data/instance-id"))
            .send()
            .await?;
        assert_eq!(r.status(), 401);
        // Token TTL must be 1..=21600.
        for bad in [None, Some("0"), Some("21601"), Some("x")] {
            let mut req = http.put(format!("{base}/latest/api/token"));
            if let Some(ttl) = bad {
                req = req.header(TTL_HEADER, ttl);
            }
            assert_eq!(req.send().await?.status(), 400, "ttl {bad:?}");
        }
        let r = http
            .put(format!("{base}/latest/api/token"))
            .header(TTL_HEADER, "1")
            .send()
            .await?;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers().get(TTL_HEADER).and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let token = r.text().await?;
        let get = |path: &str, token: &str| {
            http.get(format!("{base}{path}"))
                .header(TOKEN_HEADER, token)
                .send()
        };
        let r = get("/latest/meta-data/instance-id", &token).await?;
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await?, "i-0123");
        assert_eq!(
            get("/latest/meta-data/instance-id", "forged")
                .await?
                .status(),
            401
        );
        assert_eq!(get("/latest/user-data", &token).await?.status(), 404);
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/", &token)
                .await?
                .status(),
            404
        );
        assert_eq!(
            get("/latest/meta-data/tags/instance/Name", &token)
                .await?
                .status(),
            404
        );
        imds.set_tag("Name", "agent");
        assert_eq!(
            get("/latest/meta-data/tags/instance/Name", &token)
                .await?
                .text()
                .await?,
            "agent"
        );
        // Proxied token requests are refused.
        let r = http
            .put(format!("{base}/latest/api/token"))
            .header(TTL_HEADER, "60")
            .header("X-Forwarded-For", "10.0.0.1")
            .send()
            .await?;
        assert_eq!(r.status(), 403);
        // The 1 s token expires.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            get("/latest/meta-data/instance-id", &token).await?.status(),
            401
        );
        Ok(())
    }

    /// `aws_config::imds::Client::builder().build()` (no explicit endpoint) honours
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT`: checked in a child process (this test binary,
    /// running `env_var_child`) so no test mutates this process's environment.
    #[tokio::test]
    async fn the_sdk_imds_client_honours_the_endpoint_env_var() -> anyhow::Result<()> {
        let imds = FakeImds::start(InstanceMeta::new("i-0feedfacecafebeef")).await?;
        let exe = std::env::current_exe()?;
        let out = tokio::process::Command::new(exe)
            .args([
                "--exact",
                "imds::tests::env_var_child",
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint())
            .env("BED_IMDS_EXPECT_INSTANCE_ID", "i-0feedfacecafebeef")
            .env_remove("AWS_EC2_METADATA_DISABLED")
            .kill_on_drop(true)
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child failed: {}\n{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(imds.requests() >= 2, "the child never reached the fake");
        Ok(())
    }

    #[tokio::test]
    #[ignore = "run by the_sdk_imds_client_honours_the_endpoint_env_var in a child process"]
    async fn env_var_child() -> anyhow::Result<()> {
        let Ok(expected) = std::env::var("BED_IMDS_EXPECT_INSTANCE_ID") else {
            return Ok(());
        };
        let client = aws_config::imds::Client::builder().build();
        let id = client.get("/latest/meta-data/instance-id").await?;
        assert_eq!(id.as_ref(), expected);
        Ok(())
    }
}
