//! STS `AssumeRole`, spoken in the Query protocol ([`QueryClient`]): the supervisor assumes
//! the stack's job role with the instance profile's credentials and hands the short-lived
//! credentials to jobs (see [`crate::jobcreds`]). No `aws-sdk-sts` for one call.
//!
//! - Endpoint: `AWS_ENDPOINT_URL_STS`, else the SDK config's endpoint (`AWS_ENDPOINT_URL`),
//!   else the regional `https://sts.<region>.amazonaws.com` (never the global endpoint:
//!   regional STS keeps working when us-east-1 does not, and its session tokens are valid
//!   in every region).
//! - Region and credentials: from the [`SdkConfig`], cached (see [`super::query`]).
//! - Signing name `sts`, API version `2011-06-15`.
//!
//! [`SessionCredentials`] never shows its secret key or session token in `Debug`, and no
//! error built here quotes an answer that holds them.

use super::query::{QueryClient, QueryError, Service};
use aws_config::SdkConfig;
use aws_smithy_types::date_time::{DateTime, Format};
use aws_smithy_xml::decode::{try_data, Document};
use std::future::Future;
use std::time::{Duration, SystemTime};

/// Env var naming an STS-only endpoint (the SDKs' service-specific override).
pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL_STS";

/// STS in the Query protocol.
pub const SERVICE: Service = Service {
    name: "STS",
    signing_name: "sts",
    api_version: "2011-06-15",
    endpoint_env: ENDPOINT_ENV,
    host_prefix: "sts",
    timeout: Duration::from_secs(10),
};

/// The shortest session `AssumeRole` grants (`DurationSeconds` ≥ 900), which every role
/// allows: a role's `MaxSessionDuration` is at least one hour, but a role chained from
/// another role session is held to one hour and an SCP may cap it lower.
pub const MIN_SESSION: Duration = Duration::from_secs(900);

/// `RoleSessionName`: 2 to 64 characters of `[A-Za-z0-9_+=,.@-]`.
const SESSION_NAME_MAX: usize = 64;

/// Short-lived credentials of an assumed role. `Debug` shows the access key id (it names
/// the session in CloudTrail, it grants nothing) and the expiry, never the secret key or
/// the session token.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// When STS says they stop working (its clock).
    pub expiration: SystemTime,
}

impl std::fmt::Debug for SessionCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration", &rfc3339(self.expiration))
            .finish()
    }
}

/// What the supervisor needs of STS, so that the job credentials' logic can be tested
/// with a fake. The adapter is [`QuerySts`].
pub trait Sts: Send + Sync {
    /// `AssumeRole` of `role_arn` for `duration` (whole seconds, 900 to the role's
    /// maximum), naming the session `session_name` (see [`session_name`]).
    fn assume_role(
        &self,
        role_arn: &str,
        session_name: &str,
        duration: Duration,
    ) -> impl Future<Output = Result<SessionCredentials, QueryError>> + Send;
}

/// `AssumeRole` over the Query protocol.
#[derive(Debug)]
pub struct QuerySts {
    client: QueryClient,
}

impl QuerySts {
    /// Region, credentials and endpoint from `config` (see the module docs for the
    /// endpoint order). Installs the rustls crypto provider if nobody has yet.
    pub fn new(config: &SdkConfig) -> Result<Self, QueryError> {
        Ok(Self {
            client: QueryClient::new(SERVICE, config)?,
        })
    }

    pub fn endpoint(&self) -> &str {
        self.client.endpoint()
    }
}

impl Sts for QuerySts {
    async fn assume_role(
        &self,
        role_arn: &str,
        session_name: &str,
        duration: Duration,
    ) -> Result<SessionCredentials, QueryError> {
        let params = [
            ("RoleArn".to_string(), role_arn.to_string()),
            ("RoleSessionName".to_string(), session_name.to_string()),
            (
                "DurationSeconds".to_string(),
                duration.as_secs().to_string(),
            ),
        ];
        let body = self.client.call("AssumeRole", &params).await?;
        parse_assume_role(&body).map_err(|detail| QueryError::Malformed {
            service: SERVICE.name,
            action: "AssumeRole",
            detail,
        })
    }
}

/// A valid `RoleSessionName` made from `id` (the instance id, which CloudTrail then shows
/// for every call a job makes): characters outside `[A-Za-z0-9_+=,.@-]` become `-`, cut
/// to 64, padded to the minimum of 2.
pub fn session_name(id: &str) -> String {
    let mut name: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(SESSION_NAME_MAX)
        .collect();
    while name.len() < 2 {
        name.push('-');
    }
    name
}

/// `time` as RFC 3339 UTC (`2026-01-02T03:04:05Z`), cut to whole seconds (never later
/// than it is).
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    DateTime::from_secs(i64::try_from(secs).unwrap_or(i64::MAX))
        .fmt(Format::DateTime)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// The four fields of `<AssumeRoleResult><Credentials>`. Errors name the missing field,
/// never quote the answer (it holds the secrets).
fn parse_assume_role(body: &str) -> Result<SessionCredentials, String> {
    let mut fields: [(&str, Option<String>); 4] = [
        ("AccessKeyId", None),
        ("SecretAccessKey", None),
        ("SessionToken", None),
        ("Expiration", None),
    ];
    let mut doc = Document::new(body);
    let mut in_credentials = false;
    while let Some(el) = doc.next_start_element() {
        if el.local() == "Credentials" {
            in_credentials = true;
            let mut scope = doc.scoped_to(el);
            while let Some(child) = scope.next_tag() {
                let name = child.start_el().local().to_string();
                let mut child = child;
                if let Some(slot) = fields.iter_mut().find(|(n, _)| *n == name) {
                    let text = try_data(&mut child)
                        .map_err(|_| format!("<{name}> is not text"))?
                        .trim()
                        .to_string();
                    slot.1 = Some(text);
                }
            }
            break;
        }
    }
    if !in_credentials {
        return Err("no <Credentials> in the answer".into());
    }
    let mut take = |i: usize| -> Result<String, String> {
        let (name, value) = &mut fields[i];
        value
            .take()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("no <{name}> in <Credentials>"))
    };
    let access_key_id = take(0)?;
    let secret_access_key = take(1)?;
    let session_token = take(2)?;
    let expiration_text = take(3)?;
    let expiration = DateTime::from_str(&expiration_text, Format::DateTime)
        .ok()
        .and_then(|d| SystemTime::try_from(d).ok())
        .ok_or_else(|| format!("<Expiration> {expiration_text:?} is not an RFC 3339 time"))?;
    Ok(SessionCredentials {
        access_key_id,
        secret_access_key,
        session_token,
        expiration,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const ANSWER: &str = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <SourceIdentity>Alice</SourceIdentity>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/job/i-0abc</Arn>
      <AssumedRoleId>ARO123EXAMPLE123:i-0abc</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>IQoJb3JpZ2luX2VjEXAMPLE/+=</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2026-07-15T23:28:33.359Z</Expiration>
      <AccessKeyId>ASIAIOSFODNN7EXAMPLE</AccessKeyId>
    </Credentials>
    <PackedPolicySize>6</PackedPolicySize>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>c6104cbe</RequestId></ResponseMetadata>
</AssumeRoleResponse>"#;

    #[test]
    fn the_answer_is_read_and_its_secrets_stay_out_of_debug() {
        let c = parse_assume_role(ANSWER).expect("parsed");
        assert_eq!(c.access_key_id, "ASIAIOSFODNN7EXAMPLE");
        assert_eq!(
            c.secret_access_key,
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
        );
        assert_eq!(c.session_token, "IQoJb3JpZ2luX2VjEXAMPLE/+=");
        assert_eq!(rfc3339(c.expiration), "2026-07-15T23:28:33Z");
        let shown = format!("{c:?}");
        assert!(shown.contains("ASIAIOSFODNN7EXAMPLE"), "{shown}");
        assert!(
            !shown.contains("wJalr") && !shown.contains("IQoJ"),
            "{shown}"
        );
    }

    #[test]
    fn an_incomplete_answer_names_what_is_missing_and_quotes_nothing() {
        let no_token = ANSWER.replace(
            "<SessionToken>IQoJb3JpZ2luX2VjEXAMPLE/+=</SessionToken>",
            "",
        );
        let e = parse_assume_role(&no_token).expect_err("no token");
        assert_eq!(e, "no <SessionToken> in <Credentials>");
        let bad_time = ANSWER.replace("2026-07-15T23:28:33.359Z", "tomorrow");
        let e = parse_assume_role(&bad_time).expect_err("bad time");
        assert!(e.contains("Expiration") && !e.contains("wJalr"), "{e}");
        assert_eq!(
            parse_assume_role("<x/>").expect_err("empty"),
            "no <Credentials> in the answer"
        );
    }

    #[test]
    fn session_names_are_valid() {
        assert_eq!(session_name("i-0123456789abcdef0"), "i-0123456789abcdef0");
        assert_eq!(session_name("a b/c"), "a-b-c");
        assert_eq!(session_name(""), "--");
        assert_eq!(session_name(&"x".repeat(80)).len(), 64);
    }

    /// Against the test bed's moto (`make venv` first):
    /// `cargo test -p agent-supervisor sts -- --ignored`.
    #[tokio::test]
    #[ignore = "needs the test bed's moto venv"]
    async fn moto_grants_a_session() {
        let (mut child, endpoint) = crate::aws::start_test_moto();
        let config = crate::aws::test_moto_config(&endpoint);
        let sts = QuerySts::new(&config).expect("client");
        let role = "arn:aws:iam::123456789012:role/job";
        let c = sts
            .assume_role(role, "i-0abc", Duration::from_secs(3600))
            .await
            .expect("AssumeRole");
        let left = c
            .expiration
            .duration_since(SystemTime::now())
            .expect("in the future");
        assert!(left > Duration::from_secs(3500), "{left:?}");
        // An error in the Query shape is read by its code.
        reqwest::Client::new()
            .post(format!("{endpoint}/_bed/faults"))
            .json(&serde_json::json!({
                "service": "sts", "action": "AssumeRole",
                "error": "ValidationError", "status": 400, "count": 1
            }))
            .send()
            .await
            .expect("inject fault");
        let e = sts
            .assume_role(role, "i-0abc", Duration::from_secs(3600))
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Some("ValidationError"), "{e}");
        child.kill().ok();
    }
}
