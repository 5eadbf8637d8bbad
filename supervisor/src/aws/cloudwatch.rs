//! CloudWatch `PutMetricData`, spoken in the Query protocol and signed with SigV4.
//!
//! Why not `aws-sdk-cloudwatch`: the Rust SDK speaks RPC-v2 CBOR to CloudWatch, which the
//! test bed's emulator (moto 5.2.5) does not understand, and the crate is heavy for one
//! call. CloudWatch still accepts the Query protocol (`POST /`, form-encoded
//! `Action=PutMetricData&Version=2010-08-01&…`), which is a few lines with `aws-sigv4`
//! and `reqwest`.
//!
//! - Endpoint: `AWS_ENDPOINT_URL_CLOUDWATCH`, else the SDK config's endpoint
//!   (`AWS_ENDPOINT_URL`), else `https://monitoring.<region>.amazonaws.com`.
//! - Region and credentials: from the [`SdkConfig`] (the same chain the SDK clients use:
//!   the instance profile on EC2). Credentials are cached until five minutes before they
//!   expire.
//! - Signing name `monitoring`.

use aws_config::SdkConfig;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// The Query API version of CloudWatch.
const API_VERSION: &str = "2010-08-01";
/// SigV4 signing name of CloudWatch.
const SIGNING_NAME: &str = "monitoring";
/// Per request, connection included. Publishing is best-effort; it must not hold up the
/// scaler's next poll for long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Refresh cached credentials this long before they expire.
const CREDENTIALS_MARGIN: Duration = Duration::from_secs(300);
/// Env var naming a CloudWatch-only endpoint (the SDKs' service-specific override).
pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL_CLOUDWATCH";

/// CloudWatch units we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    None,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Self::Count => "Count",
            Self::None => "None",
        }
    }
}

/// One value of one metric, with its dimensions (name, value).
#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    pub metric: &'static str,
    pub dimensions: Vec<(&'static str, String)>,
    pub value: f64,
    pub unit: Unit,
}

#[derive(Debug, thiserror::Error)]
pub enum CloudWatchError {
    #[error("CloudWatch: the AWS config has no region")]
    NoRegion,
    #[error("CloudWatch: no AWS credentials: {0}")]
    Credentials(String),
    #[error("CloudWatch: cannot build the HTTP client: {0}")]
    Client(String),
    #[error("CloudWatch: cannot sign the request: {0}")]
    Signing(String),
    #[error("CloudWatch {action} to {endpoint}: {detail}")]
    Transport {
        action: &'static str,
        endpoint: String,
        detail: String,
    },
    /// CloudWatch answered with an error (`code` from the XML error body, if any).
    #[error("CloudWatch {action}: HTTP {status} {code}: {message}")]
    Service {
        action: &'static str,
        status: u16,
        code: String,
        message: String,
    },
}

impl CloudWatchError {
    /// Throttling, 5xx and network failures; the next poll simply tries again.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Service { status, code, .. } => {
                *status >= 500 || *status == 429 || code.starts_with("Throttling")
            }
            _ => false,
        }
    }
}

/// Where the scaler's metrics go. The SDK-free adapter is [`QueryCloudWatch`].
pub trait MetricsSink: Send + Sync {
    /// One `PutMetricData` call with all of `data` (CloudWatch takes up to 1000).
    fn put(
        &self,
        namespace: &str,
        data: &[Datum],
    ) -> impl Future<Output = Result<(), CloudWatchError>> + Send;
}

/// `PutMetricData` over the Query protocol.
pub struct QueryCloudWatch {
    http: reqwest::Client,
    /// Base URL, no trailing slash; requests go to `<endpoint>/`.
    endpoint: String,
    region: String,
    credentials: Option<SharedCredentialsProvider>,
    /// The last credentials fetched, reused until close to their expiry (the instance
    /// profile provider would otherwise ask IMDS on every poll).
    cached: Mutex<Option<Credentials>>,
}

impl std::fmt::Debug for QueryCloudWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryCloudWatch")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl QueryCloudWatch {
    /// Region, credentials and endpoint from `config` (see the module docs for the
    /// endpoint order). Installs the rustls crypto provider if nobody has yet.
    pub fn new(config: &SdkConfig) -> Result<Self, CloudWatchError> {
        let region = config
            .region()
            .map(|r| r.as_ref().to_string())
            .ok_or(CloudWatchError::NoRegion)?;
        let endpoint = resolve_endpoint(
            std::env::var(ENDPOINT_ENV).ok().as_deref(),
            config.endpoint_url(),
            &region,
        );
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(3))
            .user_agent(concat!("agent-fleet/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CloudWatchError::Client(super::describe(&e)))?;
        Ok(Self {
            http,
            endpoint,
            region,
            credentials: config.credentials_provider(),
            cached: Mutex::new(None),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn credentials(&self) -> Result<Credentials, CloudWatchError> {
        let fresh_enough = |c: &Credentials| match c.expiry() {
            None => true,
            Some(exp) => exp
                .duration_since(SystemTime::now())
                .is_ok_and(|left| left > CREDENTIALS_MARGIN),
        };
        if let Ok(cached) = self.cached.lock() {
            if let Some(c) = cached.as_ref().filter(|c| fresh_enough(c)) {
                return Ok(c.clone());
            }
        }
        let provider = self.credentials.as_ref().ok_or_else(|| {
            CloudWatchError::Credentials("the AWS config has no credentials provider".into())
        })?;
        let creds = provider
            .provide_credentials()
            .await
            .map_err(|e| CloudWatchError::Credentials(super::describe(&e)))?;
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some(creds.clone());
        }
        Ok(creds)
    }

    /// One signed Query call; returns the response body on 2xx.
    pub(crate) async fn call(
        &self,
        action: &'static str,
        params: &[(String, String)],
    ) -> Result<String, CloudWatchError> {
        let mut form = vec![
            ("Action".to_string(), action.to_string()),
            ("Version".to_string(), API_VERSION.to_string()),
        ];
        form.extend(params.iter().cloned());
        let body = encode_form(&form);
        let url = format!("{}/", self.endpoint);
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";

        let creds = self.credentials().await?;
        let identity = creds.into();
        let signing: aws_sigv4::http_request::SigningParams<'_> = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(SIGNING_NAME)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| CloudWatchError::Signing(e.to_string()))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            url.as_str(),
            [("content-type", content_type)].into_iter(),
            SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| CloudWatchError::Signing(e.to_string()))?;
        let (instructions, _signature) = sign(signable, &signing)
            .map_err(|e| CloudWatchError::Signing(e.to_string()))?
            .into_parts();

        let mut req = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, content_type);
        for (name, value) in instructions.headers() {
            req = req.header(name, value);
        }
        let transport = |e: reqwest::Error| CloudWatchError::Transport {
            action,
            endpoint: self.endpoint.clone(),
            detail: super::describe(&e),
        };
        let resp = req.body(body).send().await.map_err(transport)?;
        let status = resp.status();
        let text = resp.text().await.map_err(transport)?;
        if status.is_success() {
            return Ok(text);
        }
        let (code, message) = xml_error(&text);
        Err(CloudWatchError::Service {
            action,
            status: status.as_u16(),
            code,
            message,
        })
    }
}

impl MetricsSink for QueryCloudWatch {
    async fn put(&self, namespace: &str, data: &[Datum]) -> Result<(), CloudWatchError> {
        self.call("PutMetricData", &put_metric_data_params(namespace, data))
            .await
            .map(|_| ())
    }
}

/// The form fields of `PutMetricData` after `Action` and `Version`.
fn put_metric_data_params(namespace: &str, data: &[Datum]) -> Vec<(String, String)> {
    let mut p = vec![("Namespace".to_string(), namespace.to_string())];
    for (i, d) in data.iter().enumerate() {
        let m = format!("MetricData.member.{}", i + 1);
        p.push((format!("{m}.MetricName"), d.metric.to_string()));
        for (j, (name, value)) in d.dimensions.iter().enumerate() {
            let dim = format!("{m}.Dimensions.member.{}", j + 1);
            p.push((format!("{dim}.Name"), name.to_string()));
            p.push((format!("{dim}.Value"), value.clone()));
        }
        p.push((format!("{m}.Value"), d.value.to_string()));
        p.push((format!("{m}.Unit"), d.unit.as_str().to_string()));
    }
    p
}

fn resolve_endpoint(service_env: Option<&str>, sdk: Option<&str>, region: &str) -> String {
    let chosen = [service_env, sdk]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|s| !s.is_empty());
    match chosen {
        Some(url) => url.trim_end_matches('/').to_string(),
        None if region.starts_with("cn-") => {
            format!("https://monitoring.{region}.amazonaws.com.cn")
        }
        None => format!("https://monitoring.{region}.amazonaws.com"),
    }
}

/// `application/x-www-form-urlencoded` with RFC 3986 escaping (what SigV4 and the Query
/// protocol expect: only unreserved characters stay literal).
fn encode_form(fields: &[(String, String)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `<Code>` and `<Message>` of a Query-protocol error body, or placeholders.
fn xml_error(body: &str) -> (String, String) {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let start = body.find(&open)? + open.len();
        let len = body[start..].find(&close)?;
        Some(body[start..start + len].trim().to_string())
    };
    let code = tag("Code").unwrap_or_else(|| "Unknown".into());
    let message = tag("Message").unwrap_or_else(|| body.chars().take(200).collect());
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_is_the_query_shape() {
        let data = [Datum {
            metric: "JobCount",
            dimensions: vec![
                ("StackName", "ci fleet".into()),
                ("JobState", "queued".into()),
            ],
            value: 3.0,
            unit: Unit::Count,
        }];
        let mut form = vec![
            ("Action".to_string(), "PutMetricData".to_string()),
            ("Version".to_string(), API_VERSION.to_string()),
        ];
        form.extend(put_metric_data_params("Semaphore", &data));
        assert_eq!(
            encode_form(&form),
            "Action=PutMetricData&Version=2010-08-01&Namespace=Semaphore\
             &MetricData.member.1.MetricName=JobCount\
             &MetricData.member.1.Dimensions.member.1.Name=StackName\
             &MetricData.member.1.Dimensions.member.1.Value=ci%20fleet\
             &MetricData.member.1.Dimensions.member.2.Name=JobState\
             &MetricData.member.1.Dimensions.member.2.Value=queued\
             &MetricData.member.1.Value=3&MetricData.member.1.Unit=Count"
        );
        assert_eq!(escape("a/b+c=d~"), "a%2Fb%2Bc%3Dd~");
    }

    #[test]
    fn endpoint_order() {
        assert_eq!(
            resolve_endpoint(
                Some("http://127.0.0.1:5000/"),
                Some("http://x"),
                "eu-west-1"
            ),
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            resolve_endpoint(None, Some("http://x:1"), "eu-west-1"),
            "http://x:1"
        );
        assert_eq!(
            resolve_endpoint(Some(""), None, "eu-west-1"),
            "https://monitoring.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            resolve_endpoint(None, None, "cn-north-1"),
            "https://monitoring.cn-north-1.amazonaws.com.cn"
        );
    }

    #[test]
    fn xml_errors_are_read() {
        let body = "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidParameterValue</Code>\
                    <Message>bad unit</Message></Error><RequestId>x</RequestId></ErrorResponse>";
        assert_eq!(
            xml_error(body),
            ("InvalidParameterValue".into(), "bad unit".into())
        );
        assert_eq!(xml_error("oops").0, "Unknown");
    }

    /// Against the test bed's moto (`make venv` first):
    /// `cargo test -p agent-supervisor cloudwatch -- --ignored`.
    #[tokio::test]
    #[ignore = "needs the test bed's moto venv"]
    async fn moto_accepts_put_metric_data() {
        use std::io::{BufRead, BufReader};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut child = std::process::Command::new(root.join(".venv/bin/python"))
            .arg(root.join("tests/bed/moto_server.py"))
            .args(["--port", "0", "--exit-on-stdin-eof"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start moto");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read LISTENING");
        let port: u16 = line
            .trim()
            .strip_prefix("LISTENING ")
            .expect("LISTENING line")
            .parse()
            .expect("port");
        let endpoint = format!("http://127.0.0.1:{port}");

        let config = SdkConfig::builder()
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(&endpoint)
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "testing", "testing", None, None, "test",
            )))
            .build();
        let cw = QueryCloudWatch::new(&config).expect("client");
        let data = [
            Datum {
                metric: "JobCount",
                dimensions: vec![("StackName", "s1".into()), ("JobState", "queued".into())],
                value: 3.0,
                unit: Unit::Count,
            },
            Datum {
                metric: "LeaderTerm",
                dimensions: vec![("StackName", "s1".into())],
                value: 7.0,
                unit: Unit::None,
            },
        ];
        cw.put("Semaphore", &data).await.expect("PutMetricData");
        let listed = cw
            .call(
                "ListMetrics",
                &[("Namespace".to_string(), "Semaphore".to_string())],
            )
            .await
            .expect("ListMetrics");
        // An error in the Query shape (the bed's fault injection) is read by its code.
        reqwest::Client::new()
            .post(format!("{endpoint}/_bed/faults"))
            .json(&serde_json::json!({
                "service": "monitoring", "action": "PutMetricData",
                "error": "Throttling", "status": 400, "count": 1
            }))
            .send()
            .await
            .expect("inject fault");
        let refused = cw.put("Semaphore", &data).await.expect_err("throttled");
        assert!(
            matches!(&refused, CloudWatchError::Service { status: 400, code, .. } if code == "Throttling")
                && refused.is_transient(),
            "{refused:?}"
        );
        let calls = reqwest::get(format!("{endpoint}/_bed/calls?since=0"))
            .await
            .expect("bed calls")
            .text()
            .await
            .expect("bed calls body");
        drop(child.stdin.take());
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            listed.contains("<MetricName>JobCount</MetricName>")
                && listed.contains("<MetricName>LeaderTerm</MetricName>")
                && listed.contains("<Value>queued</Value>"),
            "{listed}"
        );
        assert!(calls.contains("\"PutMetricData\""), "{calls}");
    }
}
