//! CloudWatch Logs `CreateLogStream` and `PutLogEvents`, spoken in the awsJson1_1
//! protocol (`POST /`, `X-Amz-Target: Logs_20140328.<Operation>`, a JSON body) and signed
//! with SigV4 through the [`QueryClient`]'s signing half.
//!
//! Why not `aws-sdk-cloudwatchlogs`: two calls do not pay for another SDK crate in the
//! daemon's binary (its resident code is most of its memory, see the README's
//! benchmarks).
//!
//! - Endpoint: `AWS_ENDPOINT_URL_CLOUDWATCH_LOGS`, else the SDK config's endpoint
//!   (`AWS_ENDPOINT_URL`), else `https://logs.<region>.amazonaws.com`.
//! - Region and credentials: from the [`SdkConfig`], cached (see [`super::query`]).
//! - Errors: the JSON body's `__type` (the part after a `#`) is the code.

use super::query::{QueryClient, QueryError, Service};
use aws_config::SdkConfig;
use serde::Serialize;
use std::future::Future;
use std::time::Duration;

/// Env var naming a CloudWatch Logs-only endpoint (the SDKs' service-specific override).
pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS";

/// CloudWatch Logs. The short request timeout bounds how long one batch can hold the
/// shipper (never the fleet: nothing waits on the shipper but its own flush, itself
/// bounded).
pub const SERVICE: Service = Service {
    name: "CloudWatch Logs",
    signing_name: "logs",
    api_version: "2014-03-28",
    endpoint_env: ENDPOINT_ENV,
    host_prefix: "logs",
    timeout: Duration::from_secs(5),
};

/// A failed CloudWatch Logs call (`service` = `CloudWatch Logs`).
pub type LogsError = QueryError;

/// One log event as `PutLogEvents` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogEvent {
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    pub message: String,
}

/// Where the shipper sends batches. The SDK-free adapter is [`JsonLogs`]; tests use fakes.
pub trait LogSink: Send + Sync + 'static {
    /// `CreateLogStream`; a stream that exists already is success.
    fn create_stream(
        &self,
        group: &str,
        stream: &str,
    ) -> impl Future<Output = Result<(), LogsError>> + Send;
    /// `PutLogEvents` with one batch (the caller keeps CloudWatch's limits: see
    /// [`crate::logs::batch`]).
    fn put_events(
        &self,
        group: &str,
        stream: &str,
        events: &[LogEvent],
    ) -> impl Future<Output = Result<(), LogsError>> + Send;
}

/// CloudWatch Logs over awsJson1_1.
#[derive(Debug)]
pub struct JsonLogs {
    client: QueryClient,
}

impl JsonLogs {
    /// Region, credentials and endpoint from `config` (see the module docs).
    pub fn new(config: &SdkConfig) -> Result<Self, LogsError> {
        Ok(Self {
            client: QueryClient::new(SERVICE, config)?,
        })
    }

    pub fn endpoint(&self) -> &str {
        self.client.endpoint()
    }

    /// One signed call of `operation` with a JSON `body`; the response body on 2xx.
    async fn call(&self, operation: &'static str, body: String) -> Result<String, LogsError> {
        let target = format!("Logs_20140328.{operation}");
        let (status, text) = self
            .client
            .post(
                operation,
                "application/x-amz-json-1.1",
                &[("x-amz-target", target.as_str())],
                body,
            )
            .await?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        let (code, message) = json_error(&text);
        Err(QueryError::Service {
            service: SERVICE.name,
            action: operation,
            status,
            code,
            message,
        })
    }
}

impl LogSink for JsonLogs {
    async fn create_stream(&self, group: &str, stream: &str) -> Result<(), LogsError> {
        let body = serde_json::json!({"logGroupName": group, "logStreamName": stream});
        match self.call("CreateLogStream", body.to_string()).await {
            Err(e) if e.code() == Some("ResourceAlreadyExistsException") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    async fn put_events(
        &self,
        group: &str,
        stream: &str,
        events: &[LogEvent],
    ) -> Result<(), LogsError> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Put<'a> {
            log_group_name: &'a str,
            log_stream_name: &'a str,
            log_events: &'a [LogEvent],
        }
        let body = serde_json::to_string(&Put {
            log_group_name: group,
            log_stream_name: stream,
            log_events: events,
        })
        .map_err(|e| QueryError::Malformed {
            service: SERVICE.name,
            action: "PutLogEvents",
            detail: e.to_string(),
        })?;
        self.call("PutLogEvents", body).await.map(|_| ())
    }
}

/// The code and message of an awsJson error body (`{"__type": "…#Code", "message": …}`);
/// `Unknown` and the start of the body when it is not one.
pub fn json_error(body: &str) -> (String, String) {
    let doc: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let code = doc
        .get("__type")
        .or_else(|| doc.get("code"))
        .and_then(|v| v.as_str())
        .map(|t| t.rsplit('#').next().unwrap_or(t).to_string())
        .unwrap_or_else(|| "Unknown".into());
    let message = doc
        .get("message")
        .or_else(|| doc.get("Message"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| body.chars().take(200).collect());
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_are_read() {
        assert_eq!(
            json_error(
                r#"{"__type":"com.amazonaws.logs#ResourceNotFoundException","message":"The specified log stream does not exist."}"#
            ),
            (
                "ResourceNotFoundException".into(),
                "The specified log stream does not exist.".into()
            )
        );
        assert_eq!(
            json_error(r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#).0,
            "ThrottlingException"
        );
        assert_eq!(json_error("<html>"), ("Unknown".into(), "<html>".into()));
    }

    #[test]
    fn errors_name_cloudwatch_logs() {
        let config = SdkConfig::builder().build();
        let err = JsonLogs::new(&config).expect_err("no region");
        assert_eq!(
            err.to_string(),
            "CloudWatch Logs: the AWS config has no region"
        );
    }

    /// Against the test bed's moto (`make venv` first):
    /// `cargo test -p agent-supervisor aws::logs -- --ignored`.
    #[tokio::test]
    #[ignore = "needs the test bed's moto venv"]
    async fn moto_takes_streams_and_events() {
        let (mut child, endpoint) = crate::aws::start_test_moto();
        let config = crate::aws::test_moto_config(&endpoint);
        let logs = JsonLogs::new(&config).expect("client");
        let missing = logs.create_stream("/agent-fleet/s1", "i-1").await;
        logs.call(
            "CreateLogGroup",
            r#"{"logGroupName":"/agent-fleet/s1"}"#.into(),
        )
        .await
        .expect("CreateLogGroup");
        logs.create_stream("/agent-fleet/s1", "i-1")
            .await
            .expect("CreateLogStream");
        logs.create_stream("/agent-fleet/s1", "i-1")
            .await
            .expect("an existing stream is fine");
        let events = [
            LogEvent {
                timestamp: 1_700_000_000_000,
                message: "one".into(),
            },
            LogEvent {
                timestamp: 1_700_000_000_001,
                message: "two \"quoted\" é".into(),
            },
        ];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        let events: Vec<_> = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| LogEvent {
                timestamp: now + i as i64,
                ..e
            })
            .collect();
        logs.put_events("/agent-fleet/s1", "i-1", &events)
            .await
            .expect("PutLogEvents");
        let got = logs
            .call(
                "GetLogEvents",
                r#"{"logGroupName":"/agent-fleet/s1","logStreamName":"i-1","startFromHead":true}"#
                    .into(),
            )
            .await
            .expect("GetLogEvents");
        drop(child.stdin.take());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            missing.expect_err("no group").code(),
            Some("ResourceNotFoundException")
        );
        let doc: serde_json::Value = serde_json::from_str(&got).expect("json");
        let messages: Vec<_> = doc["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(messages, ["one", "two \"quoted\" é"]);
    }
}
