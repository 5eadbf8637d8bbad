//! A client for AWS's Query protocol (`POST /`, form-encoded `Action=…&Version=…&…`, XML
//! answers), signed with SigV4. Shared by the adapters that stay off the heavy SDK crates:
//! [`super::cloudwatch`] (`PutMetricData`) and the operator CLI's EC2 `DescribeInstances`.
//!
//! - Endpoint: the service's own env var (e.g. `AWS_ENDPOINT_URL_EC2`), else the SDK
//!   config's endpoint (`AWS_ENDPOINT_URL`), else `https://<host prefix>.<region>.amazonaws.com`
//!   (`.com.cn` in the China regions).
//! - Region and credentials: from the [`SdkConfig`] (the same chain the SDK clients use:
//!   the instance profile on EC2). Credentials are cached until five minutes before they
//!   expire.
//! - Errors: a non-2xx answer becomes [`QueryError::Service`] with the `<Code>` and
//!   `<Message>` of its XML body (CloudWatch's `<ErrorResponse><Error>…` and EC2's
//!   `<Response><Errors><Error>…` alike).

use aws_config::SdkConfig;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_xml::decode::{try_data, Document};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Refresh cached credentials this long before they expire.
const CREDENTIALS_MARGIN: Duration = Duration::from_secs(300);

/// What tells one Query-protocol service from another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Service {
    /// For messages: `CloudWatch`, `EC2`.
    pub name: &'static str,
    /// SigV4 signing name: `monitoring`, `ec2`.
    pub signing_name: &'static str,
    /// The `Version` form field: `2010-08-01`, `2016-11-15`.
    pub api_version: &'static str,
    /// Env var naming an endpoint for this service only (the SDKs' service-specific
    /// override): `AWS_ENDPOINT_URL_CLOUDWATCH`, `AWS_ENDPOINT_URL_EC2`.
    pub endpoint_env: &'static str,
    /// First label of the regional default host: `monitoring`, `ec2`.
    pub host_prefix: &'static str,
    /// Per request, connection included.
    pub timeout: Duration,
}

/// A failed Query call, or a client that could not be built. `service` is
/// [`Service::name`].
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{service}: the AWS config has no region")]
    NoRegion { service: &'static str },
    #[error("{service}: no AWS credentials: {detail}")]
    Credentials {
        service: &'static str,
        detail: String,
    },
    #[error("{service}: cannot build the HTTP client: {detail}")]
    Client {
        service: &'static str,
        detail: String,
    },
    #[error("{service}: cannot sign the request: {detail}")]
    Signing {
        service: &'static str,
        detail: String,
    },
    #[error("{service} {action} to {endpoint}: {detail}")]
    Transport {
        service: &'static str,
        action: &'static str,
        endpoint: String,
        detail: String,
    },
    /// The service answered with an error (`code` from the XML error body, `Unknown` if
    /// it had none).
    #[error("{service} {action}: HTTP {status} {code}: {message}")]
    Service {
        service: &'static str,
        action: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    /// A 2xx answer that is not what the action returns.
    #[error("{service} {action}: unexpected answer: {detail}")]
    Malformed {
        service: &'static str,
        action: &'static str,
        detail: String,
    },
}

impl QueryError {
    /// Throttling, 5xx and network failures: trying again later may work.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Service { status, code, .. } => {
                *status >= 500
                    || *status == 429
                    || code.starts_with("Throttling")
                    || super::TRANSIENT_CODES.contains(&code.as_str())
            }
            _ => false,
        }
    }

    /// The AWS error code of a [`Service`](Self::Service) error, e.g.
    /// `InvalidInstanceID.NotFound`.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Service { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// One service's Query endpoint, with region and cached credentials.
pub struct QueryClient {
    service: Service,
    /// Base URL, no trailing slash; requests go to `<endpoint>/`.
    endpoint: String,
    region: String,
    credentials: Option<SharedCredentialsProvider>,
    /// The last credentials fetched, reused until close to their expiry (the instance
    /// profile provider would otherwise ask IMDS on every call).
    cached: Mutex<Option<Credentials>>,
}

impl std::fmt::Debug for QueryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryClient")
            .field("service", &self.service.name)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl QueryClient {
    /// Region, credentials and endpoint from `config` (see the module docs for the
    /// endpoint order). Installs the rustls crypto provider if nobody has yet.
    pub fn new(service: Service, config: &SdkConfig) -> Result<Self, QueryError> {
        let region =
            config
                .region()
                .map(|r| r.as_ref().to_string())
                .ok_or(QueryError::NoRegion {
                    service: service.name,
                })?;
        let endpoint = resolve_endpoint(
            service.host_prefix,
            std::env::var(service.endpoint_env).ok().as_deref(),
            config.endpoint_url(),
            &region,
        );
        crate::tls::install_crypto_provider();
        Ok(Self {
            service,
            endpoint,
            region,
            credentials: config.credentials_provider(),
            cached: Mutex::new(None),
        })
    }

    pub fn service(&self) -> &Service {
        &self.service
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn credentials(&self) -> Result<Credentials, QueryError> {
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
        let service = self.service.name;
        let provider = self
            .credentials
            .as_ref()
            .ok_or_else(|| QueryError::Credentials {
                service,
                detail: "the AWS config has no credentials provider".into(),
            })?;
        let creds = provider
            .provide_credentials()
            .await
            .map_err(|e| QueryError::Credentials {
                service,
                detail: super::describe(&e),
            })?;
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some(creds.clone());
        }
        Ok(creds)
    }

    /// One signed call of `action` with `params` (the form fields after `Action` and
    /// `Version`); returns the response body on 2xx.
    pub async fn call(
        &self,
        action: &'static str,
        params: &[(String, String)],
    ) -> Result<String, QueryError> {
        let mut form = vec![
            ("Action".to_string(), action.to_string()),
            ("Version".to_string(), self.service.api_version.to_string()),
        ];
        form.extend(params.iter().cloned());
        let body = encode_form(&form);
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let (status, text) = self.post(action, content_type, &[], body).await?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        let (code, message) = xml_error(&text);
        Err(QueryError::Service {
            service: self.service.name,
            action,
            status,
            code,
            message,
        })
    }

    /// One signed `POST /` with `body` and `headers` (beside the content type, all
    /// signed): the HTTP status and the response body, whatever the status. The shared
    /// half of the Query protocol and of the JSON protocols ([`super::logs`]).
    pub(crate) async fn post(
        &self,
        action: &'static str,
        content_type: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> Result<(u16, String), QueryError> {
        let service = self.service.name;
        let url = format!("{}/", self.endpoint);
        let creds = self.credentials().await?;
        let identity = creds.into();
        let signing_error = |detail: String| QueryError::Signing { service, detail };
        let signing: aws_sigv4::http_request::SigningParams<'_> = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(self.service.signing_name)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| signing_error(e.to_string()))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            url.as_str(),
            [("content-type", content_type)]
                .into_iter()
                .chain(headers.iter().copied()),
            SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| signing_error(e.to_string()))?;
        let (instructions, _signature) = sign(signable, &signing)
            .map_err(|e| signing_error(e.to_string()))?
            .into_parts();

        let http =
            crate::tls::shared_client().map_err(|detail| QueryError::Client { service, detail })?;
        let mut req = http
            .post(&url)
            .timeout(self.service.timeout)
            .header(reqwest::header::CONTENT_TYPE, content_type);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        for (name, value) in instructions.headers() {
            req = req.header(name, value);
        }
        let transport = |e: reqwest::Error| QueryError::Transport {
            service,
            action,
            endpoint: self.endpoint.clone(),
            detail: super::describe(&e),
        };
        let resp = req.body(body).send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(transport)?;
        Ok((status, text))
    }
}

/// The base URL: the first non-empty override, else the regional default.
pub(crate) fn resolve_endpoint(
    host_prefix: &str,
    service_env: Option<&str>,
    sdk: Option<&str>,
    region: &str,
) -> String {
    let chosen = [service_env, sdk]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|s| !s.is_empty());
    match chosen {
        Some(url) => url.trim_end_matches('/').to_string(),
        None if region.starts_with("cn-") => {
            format!("https://{host_prefix}.{region}.amazonaws.com.cn")
        }
        None => format!("https://{host_prefix}.{region}.amazonaws.com"),
    }
}

/// `application/x-www-form-urlencoded` with RFC 3986 escaping (what SigV4 and the Query
/// protocol expect: only unreserved characters stay literal).
pub(crate) fn encode_form(fields: &[(String, String)]) -> String {
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

/// The first `<Code>` and `<Message>` of a Query-protocol error body, wherever they are
/// nested; `Unknown` and the start of the body when absent.
pub fn xml_error(body: &str) -> (String, String) {
    let mut code = None;
    let mut message = None;
    let mut doc = Document::new(body);
    while let Some(el) = doc.next_start_element() {
        let slot = match el.local() {
            "Code" if code.is_none() => &mut code,
            "Message" if message.is_none() => &mut message,
            _ => continue,
        };
        let mut scope = doc.scoped_to(el);
        if let Some(text) = try_data(&mut scope).ok().filter(|t| !t.trim().is_empty()) {
            *slot = Some(text.trim().to_string());
        }
        drop(scope);
        if code.is_some() && message.is_some() {
            break;
        }
    }
    (
        code.unwrap_or_else(|| "Unknown".into()),
        message.unwrap_or_else(|| body.chars().take(200).collect()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_only_unreserved_characters() {
        assert_eq!(escape("a/b+c=d~"), "a%2Fb%2Bc%3Dd~");
        assert_eq!(
            encode_form(&[("InstanceId.1".into(), "i-0abc".into())]),
            "InstanceId.1=i-0abc"
        );
    }

    #[test]
    fn endpoint_order() {
        assert_eq!(
            resolve_endpoint(
                "ec2",
                Some("http://127.0.0.1:5000/"),
                Some("http://x"),
                "eu-west-1"
            ),
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            resolve_endpoint("ec2", None, Some("http://x:1"), "eu-west-1"),
            "http://x:1"
        );
        assert_eq!(
            resolve_endpoint("ec2", Some(" "), None, "eu-west-1"),
            "https://ec2.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            resolve_endpoint("ec2", None, None, "cn-north-1"),
            "https://ec2.cn-north-1.amazonaws.com.cn"
        );
    }

    #[test]
    fn both_error_shapes_are_read() {
        let cloudwatch = "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidParameterValue</Code>\
                          <Message>bad unit</Message></Error><RequestId>x</RequestId></ErrorResponse>";
        assert_eq!(
            xml_error(cloudwatch),
            ("InvalidParameterValue".into(), "bad unit".into())
        );
        let ec2 = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
                   <Code>InvalidInstanceID.NotFound</Code>\
                   <Message>The instance ID &apos;i-1&apos; does not exist</Message>\
                   </Error></Errors><RequestID>r</RequestID></Response>";
        assert_eq!(
            xml_error(ec2),
            (
                "InvalidInstanceID.NotFound".into(),
                "The instance ID 'i-1' does not exist".into()
            )
        );
        assert_eq!(xml_error("oops"), ("Unknown".into(), "oops".into()));
        assert_eq!(xml_error("<a><Code>").0, "Unknown");
    }

    #[test]
    fn transient_errors() {
        let service = |status, code: &str| QueryError::Service {
            service: "EC2",
            action: "DescribeInstances",
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(service(503, "Unavailable").is_transient());
        assert!(service(400, "RequestLimitExceeded").is_transient());
        assert!(service(400, "Throttling").is_transient());
        assert!(!service(400, "InvalidInstanceID.NotFound").is_transient());
        assert_eq!(
            service(400, "InvalidInstanceID.NotFound").code(),
            Some("InvalidInstanceID.NotFound")
        );
        assert!(!QueryError::NoRegion { service: "EC2" }.is_transient());
    }
}
