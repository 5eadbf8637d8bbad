//! AWS behind narrow traits with domain types. The SDK adapters live here; the logic
//! elsewhere is written against the traits and unit-tested with fakes.
//!
//! Every endpoint honours the SDK's standard overrides (`AWS_ENDPOINT_URL`,
//! `AWS_ENDPOINT_URL_<SERVICE>`, `AWS_EC2_METADATA_SERVICE_ENDPOINT`, `AWS_MAX_ATTEMPTS`),
//! which is how the tests aim the daemon at the emulators.

pub mod autoscaling;
pub mod cloudwatch;
pub mod ec2;
pub mod imds;
pub mod logs;
pub mod query;
pub mod s3;
pub mod ssm;
pub mod sts;

use aws_config::{timeout::TimeoutConfig, BehaviorVersion, Region, SdkConfig};
use aws_sdk_ssm::config::http::HttpResponse;
use aws_sdk_ssm::error::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use std::time::Duration;

/// The one place the SDK config is built: behaviour version pinned, region given (from
/// IMDS), short timeouts — callers own their overall deadlines.
pub async fn sdk_config(region: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::v2026_01_12())
        .region(Region::new(region.to_string()))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(10))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        )
        .load()
        .await
}

/// Whether a failed call is worth retrying (throttling, 5xx, network), as opposed to a
/// refusal that will not change (validation, access denied, not found).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    Transient,
    Permanent,
}

/// Classifies an SDK error by its code and HTTP status, never by message text.
pub(crate) fn classify<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Retry {
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Retry::Transient
        }
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().unwrap_or_default();
            let status = ctx.raw().status().as_u16();
            if status >= 500 || status == 429 || TRANSIENT_CODES.contains(&code) {
                Retry::Transient
            } else {
                Retry::Permanent
            }
        }
        _ => Retry::Permanent,
    }
}

const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "InternalFailure",
    "InternalError",
    "ServiceUnavailable",
];

/// The error code of a service error, if the call got that far.
pub(crate) fn code<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Option<&str> {
    match err {
        SdkError::ServiceError(ctx) => ctx.err().code(),
        _ => None,
    }
}

/// The full error chain of an SDK error, for logs and messages.
pub(crate) fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    DisplayErrorContext(err).to_string()
}

/// Starts the test bed's moto (`make venv` first) for the `#[ignore]`d emulator tests:
/// the child (it exits when its stdin closes) and its endpoint.
#[cfg(test)]
#[allow(clippy::expect_used)]
pub(crate) fn start_test_moto() -> (std::process::Child, String) {
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
    (child, format!("http://127.0.0.1:{port}"))
}

/// An SDK config aimed at the test bed's moto (`endpoint`): us-east-1, dummy credentials.
#[cfg(test)]
pub(crate) fn test_moto_config(endpoint: &str) -> SdkConfig {
    use aws_credential_types::provider::SharedCredentialsProvider;
    use aws_credential_types::Credentials;
    SdkConfig::builder()
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "testing", "testing", None, None, "test",
        )))
        .build()
}
