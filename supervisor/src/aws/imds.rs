//! Instance metadata, IMDSv2 only (the SDK's client always fetches a session token).
//! The endpoint follows `AWS_EC2_METADATA_SERVICE_ENDPOINT`.

use std::future::Future;
use std::time::{Duration, SystemTime};

/// The instance identity document (JSON); its `pendingTime` is when the instance launched.
pub const IDENTITY_DOCUMENT: &str = "/latest/dynamic/instance-identity/document";

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("IMDS {path}: not found")]
    NotFound { path: String },
    #[error("IMDS {path}: {detail}")]
    Unreachable { path: String, detail: String },
    #[error("IMDS {path}: unexpected answer: {detail}")]
    Malformed { path: String, detail: String },
}

pub trait Metadata: Send + Sync {
    /// Reads one IMDS path, e.g. `/latest/meta-data/instance-id`.
    fn get(&self, path: &str) -> impl Future<Output = Result<String, ImdsError>> + Send;
}

#[derive(Clone)]
pub struct SdkImds {
    client: aws_config::imds::Client,
}

impl SdkImds {
    /// One attempt per call with short timeouts: callers own their retries, so a dead
    /// IMDS is reported within a bounded time.
    pub fn new() -> Self {
        Self {
            client: aws_config::imds::Client::builder()
                .max_attempts(1)
                .connect_timeout(Duration::from_millis(500))
                .read_timeout(Duration::from_secs(2))
                .build(),
        }
    }
}

impl Default for SdkImds {
    fn default() -> Self {
        Self::new()
    }
}

impl Metadata for SdkImds {
    async fn get(&self, path: &str) -> Result<String, ImdsError> {
        use aws_config::imds::client::error::ImdsError as E;
        match self.client.get(path).await {
            Ok(v) => Ok(v.into()),
            Err(E::ErrorResponse(r)) if r.response().status().as_u16() == 404 => {
                Err(ImdsError::NotFound {
                    path: path.to_string(),
                })
            }
            Err(e) => Err(ImdsError::Unreachable {
                path: path.to_string(),
                detail: super::describe(&e),
            }),
        }
    }
}

/// What the supervisor needs to know about its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub instance_id: String,
    pub region: String,
    pub user_data: String,
}

/// Reads instance id, region and user data, retrying each call a bounded number of
/// times (IMDS can lag a few hundred ms behind boot).
pub async fn instance_info<M: Metadata>(
    imds: &M,
    attempts: u32,
    first_backoff: Duration,
) -> Result<InstanceInfo, ImdsError> {
    let instance_id = with_retries(
        imds,
        "/latest/meta-data/instance-id",
        attempts,
        first_backoff,
    )
    .await?;
    let region = with_retries(
        imds,
        "/latest/meta-data/placement/region",
        attempts,
        first_backoff,
    )
    .await?;
    let user_data = match with_retries(imds, "/latest/user-data", attempts, first_backoff).await {
        Ok(u) => u,
        Err(ImdsError::NotFound { .. }) => String::new(),
        Err(e) => return Err(e),
    };
    Ok(InstanceInfo {
        instance_id: instance_id.trim().to_string(),
        region: region.trim().to_string(),
        user_data,
    })
}

/// When the instance launched: the identity document's `pendingTime` (RFC 3339, whole
/// seconds on EC2). Used for the boot timing's first phase only.
pub async fn launch_time<M: Metadata>(
    imds: &M,
    attempts: u32,
    first_backoff: Duration,
) -> Result<SystemTime, ImdsError> {
    let doc = with_retries(imds, IDENTITY_DOCUMENT, attempts, first_backoff).await?;
    pending_time(&doc).ok_or_else(|| ImdsError::Malformed {
        path: IDENTITY_DOCUMENT.to_string(),
        detail: "no RFC 3339 pendingTime".into(),
    })
}

/// `pendingTime` of an identity document.
pub fn pending_time(document: &str) -> Option<SystemTime> {
    use aws_smithy_types::date_time::{DateTime, Format};
    let doc: serde_json::Value = serde_json::from_str(document).ok()?;
    let text = doc.get("pendingTime")?.as_str()?;
    let t = DateTime::from_str(text, Format::DateTimeWithOffset).ok()?;
    SystemTime::try_from(t).ok()
}

async fn with_retries<M: Metadata>(
    imds: &M,
    path: &str,
    attempts: u32,
    first_backoff: Duration,
) -> Result<String, ImdsError> {
    let mut backoff = first_backoff;
    let mut attempt = 1;
    loop {
        match imds.get(path).await {
            Ok(v) => return Ok(v),
            Err(e @ ImdsError::NotFound { .. }) => return Err(e),
            Err(e) if attempt >= attempts => return Err(e),
            Err(e) => {
                tracing::warn!(attempt, error = %e, "IMDS not answering yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn pending_time_is_read_from_the_identity_document() {
        let doc = r#"{"accountId":"123456789012","instanceId":"i-1","pendingTime":"2016-11-19T16:32:11Z","region":"us-east-1"}"#;
        assert_eq!(
            pending_time(doc),
            Some(UNIX_EPOCH + Duration::from_secs(1_479_573_131))
        );
        let ms = r#"{"pendingTime":"2016-11-19T16:32:11.250+01:00"}"#;
        assert_eq!(
            pending_time(ms),
            Some(UNIX_EPOCH + Duration::from_millis(1_479_569_531_250))
        );
        assert_eq!(pending_time(r#"{"pendingTime":"yesterday"}"#), None);
        assert_eq!(pending_time(r#"{"instanceId":"i-1"}"#), None);
        assert_eq!(pending_time("<html>"), None);
    }
}
