//! Agent names a server can verify (`use_pre_signed_url` in the runtime config, the
//! stack's `SEMAPHORE_AGENT_USE_PRE_SIGNED_URL`): the agent's `name` is a pre-signed STS
//! `GetCallerIdentity` GET URL, signed with this instance's credentials. Semaphore GETs
//! the URL, STS answers with the caller's identity (on EC2 the instance profile's session,
//! `arn:aws:sts::<account>:assumed-role/<role>/<instance id>`), and Semaphore names the
//! agent after it and returns that name in the register answer; the agent goes on under
//! the returned name (the real agent: `pkg/listener/listener.go`, `Register`). A name
//! that is a URL skips the agent's own 8–80 character check (`main.go`,
//! `validateAgentName`).
//!
//! - URL: `<endpoint>/?Action=GetCallerIdentity&Version=2011-06-15` plus SigV4's query
//!   parameters (`X-Amz-Algorithm`, `-Credential`, `-Date`, `-Expires`, `-SignedHeaders`
//!   = `host`, `-Signature`, and `X-Amz-Security-Token` when the credentials have a
//!   session token, as instance profile credentials do).
//! - Endpoint: `AWS_ENDPOINT_URL_STS`, else `AWS_ENDPOINT_URL`, else the regional
//!   `https://sts.<region>.amazonaws.com` (`.com.cn` in the China regions).
//! - Valid for [`EXPIRES`] (15 minutes, as the reference stack signs): a fresh URL for
//!   every agent start.
//! - Region from IMDS, credentials from the SDK's chain: the same the daemon's AWS clients
//!   use. GetCallerIdentity needs no IAM permission.
//! - No signed name, no start. A glitch (IMDS, the credential chain) is tried three times;
//!   then the agent owner reports the start failed, and the daemon exits (2 when the region
//!   or the credentials are missing, 1 otherwise) for systemd to restart it 30 s later. Not
//!   a random name instead: Semaphore could not verify it, which is what the operator asked
//!   for. Not the registration failure's restart in place either: that path is for an agent
//!   that ran and exited, and like it, this never replaces the instance (a missing instance
//!   profile is the whole fleet's).
//!
//! The URL carries the session token of the instance's credentials. It only authorizes
//! GetCallerIdentity, for 15 minutes, but it belongs in `config.yaml` and nowhere else:
//! [`AgentName`] keeps it apart from the label the supervisor logs, and its `Debug`
//! leaves it out.

use crate::aws::imds::Metadata;
use crate::aws::query::{encode_form, resolve_endpoint};
use crate::aws::sts::SERVICE;
use crate::retry::RetryPolicy;
use aws_config::SdkConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use std::time::{Duration, SystemTime};

/// The setting, as operators know it (errors name it).
pub const SETTING: &str = "SEMAPHORE_AGENT_USE_PRE_SIGNED_URL";

/// How long a signed name is valid (`X-Amz-Expires`).
pub const EXPIRES: Duration = Duration::from_secs(900);

/// The IMDS path of the instance's region.
const REGION_PATH: &str = "/latest/meta-data/placement/region";

/// The agent's name for one run: what the agent is told (`config.yaml`'s `name`), and
/// what the supervisor calls the run in its log, its status and the one-job marker.
/// They differ for a signed name: the URL carries a session token.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentName {
    for_agent: String,
    label: String,
}

impl AgentName {
    /// A name the agent registers as is; the supervisor logs it too.
    pub fn plain(name: String) -> Self {
        Self {
            for_agent: name.clone(),
            label: name,
        }
    }

    /// A signed URL, logged as `<instance id>__sts`: Semaphore names such an agent itself
    /// (on EC2 after the instance profile's session, which is the instance id).
    pub fn signed(url: String, instance_id: &str) -> Self {
        Self {
            for_agent: url,
            label: format!("{instance_id}__sts"),
        }
    }

    /// The `name` for `config.yaml`; never for a log.
    pub fn for_agent(&self) -> &str {
        &self.for_agent
    }

    /// Short and stable, fit for logs.
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl std::fmt::Debug for AgentName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentName")
            .field("label", &self.label)
            .field("signed", &(self.for_agent != self.label))
            .finish()
    }
}

/// Why no signed name could be made. Each names [`SETTING`] and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PresignError {
    #[error("{SETTING} is on, but this instance's region is unknown ({detail}); fix: IMDS must answer {REGION_PATH}, or turn {SETTING} off")]
    Region { detail: String },
    #[error("{SETTING} is on, but there are no AWS credentials to sign the agent's name with: {detail}; fix: give the instance an instance profile (the stack's launch template does), or turn {SETTING} off")]
    Credentials { detail: String },
    #[error("{SETTING} is on, but the agent's name cannot be signed: {detail}")]
    Signing { detail: String },
}

impl PresignError {
    /// Whether an operator's change is needed (as opposed to a failure of the moment).
    pub fn is_input(&self) -> bool {
        !matches!(self, Self::Signing { .. })
    }
}

/// The pre-signed `GetCallerIdentity` URL for `endpoint` (no trailing slash) in `region`,
/// signed with `credentials` at `at`. A pure function: the same inputs give the same URL.
pub fn presign_url(
    endpoint: &str,
    region: &str,
    credentials: &Credentials,
    at: SystemTime,
) -> Result<String, PresignError> {
    let signing_error = |e: &dyn std::fmt::Display| PresignError::Signing {
        detail: e.to_string(),
    };
    let fields = [
        ("Action".to_string(), "GetCallerIdentity".to_string()),
        ("Version".to_string(), SERVICE.api_version.to_string()),
    ];
    let unsigned = format!("{endpoint}/?{}", encode_form(&fields));
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(EXPIRES);
    let identity = credentials.clone().into();
    let params: aws_sigv4::http_request::SigningParams<'_> = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE.signing_name)
        .time(at)
        .settings(settings)
        .build()
        .map_err(|e| signing_error(&e))?
        .into();
    let request = SignableRequest::new(
        "GET",
        unsigned.as_str(),
        std::iter::empty(),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| signing_error(&e))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| signing_error(&e))?
        .into_parts();
    let signed: Vec<(String, String)> = instructions
        .params()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(format!("{unsigned}&{}", encode_form(&signed)))
}

/// Signs names with one region, endpoint and credential chain.
pub struct Presigner {
    endpoint: String,
    region: String,
    credentials: Option<SharedCredentialsProvider>,
}

impl Presigner {
    /// Region, credentials and the SDK's endpoint from `config` (see the module docs for
    /// the endpoint order).
    pub fn new(config: &SdkConfig) -> Result<Self, PresignError> {
        let region = config
            .region()
            .map(|r| r.as_ref().to_string())
            .ok_or_else(|| PresignError::Region {
                detail: "the AWS config has no region".into(),
            })?;
        Ok(Self {
            endpoint: resolve_endpoint(
                SERVICE.host_prefix,
                std::env::var(SERVICE.endpoint_env).ok().as_deref(),
                config.endpoint_url(),
                &region,
            ),
            region,
            credentials: config.credentials_provider(),
        })
    }

    /// For this instance: its region from IMDS (three tries), and the SDK's credential
    /// chain and endpoint overrides, as the daemon's clients have them.
    pub async fn for_instance<M: Metadata>(
        imds: &M,
        first_backoff: Duration,
    ) -> Result<Self, PresignError> {
        let (region, _) = retries(first_backoff)
            .run(
                || imds.get(REGION_PATH),
                |_| true,
                |attempt, e, _| tracing::warn!(attempt, error = %e, "reading the region for the agent's signed name failed; retrying"),
            )
            .await;
        let region = region.map_err(|e| PresignError::Region {
            detail: e.to_string(),
        })?;
        Self::new(&crate::aws::sdk_config(region.trim()).await)
    }

    /// The endpoint the names are signed for.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A fresh signed name (the credentials fetched now, a glitch retried a few times).
    pub async fn name(
        &self,
        instance_id: &str,
        first_backoff: Duration,
    ) -> Result<AgentName, PresignError> {
        let provider = self
            .credentials
            .as_ref()
            .ok_or_else(|| PresignError::Credentials {
                detail: "the AWS config has no credentials provider".into(),
            })?;
        let (credentials, _) = retries(first_backoff)
            .run(
                || provider.provide_credentials(),
                |e| !matches!(e, CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_)),
                |attempt, e, _| tracing::warn!(attempt, error = %crate::aws::describe(e), "fetching credentials for the agent's signed name failed; retrying"),
            )
            .await;
        let credentials = credentials.map_err(|e| PresignError::Credentials {
            detail: crate::aws::describe(&e),
        })?;
        let url = presign_url(
            &self.endpoint,
            &self.region,
            &credentials,
            SystemTime::now(),
        )?;
        Ok(AgentName::signed(url, instance_id))
    }
}

/// Three tries: what a signed name may wait for before the start fails.
fn retries(first_delay: Duration) -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        first_delay,
        max_delay: Duration::from_secs(5),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLE/+=";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY";

    /// 2026-01-02T03:04:05Z.
    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_323_045)
    }

    fn creds(token: Option<&str>) -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            SECRET,
            token.map(str::to_string),
            None,
            "test",
        )
    }

    /// The query of `url`, decoded; duplicates fail the test.
    fn query(url: &str) -> BTreeMap<String, String> {
        let url = reqwest::Url::parse(url).expect("a URL");
        let mut out = BTreeMap::new();
        for (k, v) in url.query_pairs() {
            assert!(
                out.insert(k.to_string(), v.to_string()).is_none(),
                "{k} twice"
            );
        }
        out
    }

    #[test]
    fn the_url_is_a_presigned_get_caller_identity_valid_for_15_minutes() {
        let url = presign_url(
            "https://sts.us-east-1.amazonaws.com",
            "us-east-1",
            &creds(Some(TOKEN)),
            at(),
        )
        .expect("signed");
        assert!(
            url.starts_with(
                "https://sts.us-east-1.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15&"
            ),
            "{url}"
        );
        let q = query(&url);
        let want = [
            ("Action", "GetCallerIdentity"),
            ("Version", "2011-06-15"),
            ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
            (
                "X-Amz-Credential",
                "AKIDEXAMPLE/20260102/us-east-1/sts/aws4_request",
            ),
            ("X-Amz-Date", "20260102T030405Z"),
            ("X-Amz-Expires", "900"),
            ("X-Amz-SignedHeaders", "host"),
            ("X-Amz-Security-Token", TOKEN),
            // botocore's SigV4QueryAuth (the AWS CLI's signer) gives the same signature
            // for these inputs: an independent implementation agrees.
            (
                "X-Amz-Signature",
                "ff4d0ff87c13b4a99eac0e2a8d222bec114740579bbadea9fb54d1ae24d271c7",
            ),
        ];
        let want: BTreeMap<String, String> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(q, want);
        // The secret key is in no part of it.
        assert!(!url.contains("wJalr"), "{url}");
    }

    #[test]
    fn signing_is_deterministic_and_the_token_only_there_when_the_credentials_have_one() {
        let endpoint = "http://127.0.0.1:4566";
        let a = presign_url(endpoint, "us-east-1", &creds(None), at()).expect("signed");
        let b = presign_url(endpoint, "us-east-1", &creds(None), at()).expect("signed");
        assert_eq!(a, b);
        let q = query(&a);
        assert!(!q.contains_key("X-Amz-Security-Token"), "{a}");
        // botocore, same inputs, an emulator's endpoint (the port is part of the signed host).
        assert_eq!(
            q["X-Amz-Signature"],
            "8234c09ba374338adbdbcd72d7d960e9d1c7934f5982b61103a718d99768fa46"
        );
        let later = presign_url(
            endpoint,
            "us-east-1",
            &creds(None),
            at() + Duration::from_secs(1),
        )
        .expect("signed");
        assert_ne!(query(&later)["X-Amz-Signature"], q["X-Amz-Signature"]);
    }

    #[test]
    fn the_endpoint_follows_the_sts_override_then_the_sdk_then_the_region() {
        let config = |endpoint: Option<&str>| {
            let b = SdkConfig::builder().region(aws_config::Region::new("eu-west-1"));
            match endpoint {
                Some(e) => b.endpoint_url(e).build(),
                None => b.build(),
            }
        };
        // Not set in the test environment; the override itself is `resolve_endpoint`'s,
        // tested in `aws::query`.
        if std::env::var_os(SERVICE.endpoint_env).is_none() {
            let p = Presigner::new(&config(None)).expect("presigner");
            assert_eq!(p.endpoint(), "https://sts.eu-west-1.amazonaws.com");
            let p = Presigner::new(&config(Some("http://127.0.0.1:5000/"))).expect("presigner");
            assert_eq!(p.endpoint(), "http://127.0.0.1:5000");
        }
        let e = Presigner::new(&SdkConfig::builder().build())
            .err()
            .expect("no region");
        assert!(e.to_string().contains(SETTING), "{e}");
    }

    /// A credential chain that fails every time, counting the calls.
    #[derive(Debug)]
    struct Failing {
        transient: bool,
        calls: std::sync::Arc<std::sync::atomic::AtomicU32>,
    }

    impl ProvideCredentials for Failing {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let e = if self.transient {
                CredentialsError::provider_error("IMDS timed out")
            } else {
                CredentialsError::not_loaded("no instance profile")
            };
            aws_credential_types::provider::future::ProvideCredentials::ready(Err(e))
        }
    }

    /// A name for `i-0abc` from a config with `chain` (and an emulator's endpoint).
    async fn name_with(
        chain: Option<SharedCredentialsProvider>,
    ) -> Result<AgentName, PresignError> {
        let mut config = SdkConfig::builder()
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url("http://127.0.0.1:4566");
        config.set_credentials_provider(chain);
        let config = config.build();
        Presigner::new(&config)
            .expect("presigner")
            .name("i-0abc", Duration::from_millis(1))
            .await
    }

    async fn fail_with(transient: bool) -> (PresignError, u32) {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let chain = Failing {
            transient,
            calls: calls.clone(),
        };
        let e = name_with(Some(SharedCredentialsProvider::new(chain)))
            .await
            .expect_err("no credentials");
        (e, calls.load(std::sync::atomic::Ordering::SeqCst))
    }

    #[tokio::test]
    async fn without_credentials_no_name_and_the_error_names_the_setting_and_the_fix() {
        let (e, calls) = fail_with(false).await;
        assert_eq!(calls, 1, "a chain without credentials is not asked again");
        assert!(e.is_input());
        let text = e.to_string();
        assert!(
            text.contains(SETTING) && text.contains("no instance profile") && text.contains("fix:"),
            "{text}"
        );
        let (e, calls) = fail_with(true).await;
        assert_eq!(calls, 3, "a glitch is tried three times");
        assert!(e.to_string().contains("IMDS timed out"), "{e}");
        let e = name_with(None).await.expect_err("no chain at all");
        assert!(e.to_string().contains(SETTING), "{e}");
    }

    #[tokio::test]
    async fn a_signed_name_is_logged_by_its_label_only() {
        let chain = SharedCredentialsProvider::new(creds(Some(TOKEN)));
        let name = name_with(Some(chain)).await.expect("signed");
        assert!(name
            .for_agent()
            .starts_with("http://127.0.0.1:4566/?Action=GetCallerIdentity&"));
        assert_eq!(name.label(), "i-0abc__sts");
        let shown = format!("{name:?}");
        assert!(
            !shown.contains("X-Amz") && !shown.contains("IQoJ"),
            "{shown}"
        );
        let plain = AgentName::plain("i-0abc__0a1b2c".into());
        assert_eq!(
            (plain.for_agent(), plain.label()),
            ("i-0abc__0a1b2c", "i-0abc__0a1b2c")
        );
    }
}
