//! CloudWatch `PutMetricData`, spoken in the Query protocol and signed with SigV4.
//!
//! Why not `aws-sdk-cloudwatch`: the Rust SDK speaks RPC-v2 CBOR to CloudWatch, which the
//! test bed's emulator (moto 5.2.5) does not understand, and the crate is heavy for one
//! call. CloudWatch still accepts the Query protocol (`POST /`, form-encoded
//! `Action=PutMetricData&Version=2010-08-01&…`), which [`QueryClient`] speaks.
//!
//! - Endpoint: `AWS_ENDPOINT_URL_CLOUDWATCH`, else the SDK config's endpoint
//!   (`AWS_ENDPOINT_URL`), else `https://monitoring.<region>.amazonaws.com`.
//! - Region and credentials: from the [`SdkConfig`], cached (see [`super::query`]).
//! - Signing name `monitoring`.

use super::query::{QueryClient, QueryError, Service};
use aws_config::SdkConfig;
use std::future::Future;
use std::time::Duration;

/// The namespace of every metric the fleet publishes — the scaler's, the boot timing and
/// spot interruptions — as the reference stack's (`Semaphore`, dimension `StackName`).
pub const NAMESPACE: &str = "Semaphore";

/// Env var naming a CloudWatch-only endpoint (the SDKs' service-specific override).
pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL_CLOUDWATCH";

/// CloudWatch in the Query protocol. The request timeout is short: publishing is
/// best-effort and must not hold up the scaler's next poll for long.
pub const SERVICE: Service = Service {
    name: "CloudWatch",
    signing_name: "monitoring",
    api_version: "2010-08-01",
    endpoint_env: ENDPOINT_ENV,
    host_prefix: "monitoring",
    timeout: Duration::from_secs(5),
};

/// A failed CloudWatch call (the Query client's error, `service` = `CloudWatch`).
pub type CloudWatchError = QueryError;

/// CloudWatch units we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
    None,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Self::Count => "Count",
            Self::Milliseconds => "Milliseconds",
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
#[derive(Debug)]
pub struct QueryCloudWatch {
    client: QueryClient,
}

impl QueryCloudWatch {
    /// Region, credentials and endpoint from `config` (see the module docs for the
    /// endpoint order). Installs the rustls crypto provider if nobody has yet.
    pub fn new(config: &SdkConfig) -> Result<Self, CloudWatchError> {
        Ok(Self {
            client: QueryClient::new(SERVICE, config)?,
        })
    }

    pub fn endpoint(&self) -> &str {
        self.client.endpoint()
    }

    /// One signed CloudWatch Query call; returns the response body on 2xx.
    pub(crate) async fn call(
        &self,
        action: &'static str,
        params: &[(String, String)],
    ) -> Result<String, CloudWatchError> {
        self.client.call(action, params).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::query::{encode_form, resolve_endpoint, xml_error};

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
            ("Version".to_string(), SERVICE.api_version.to_string()),
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
    }

    #[test]
    fn endpoint_order() {
        let resolve = |env, sdk, region| resolve_endpoint(SERVICE.host_prefix, env, sdk, region);
        assert_eq!(
            resolve(
                Some("http://127.0.0.1:5000/"),
                Some("http://x"),
                "eu-west-1"
            ),
            "http://127.0.0.1:5000"
        );
        assert_eq!(resolve(None, Some("http://x:1"), "eu-west-1"), "http://x:1");
        assert_eq!(
            resolve(Some(""), None, "eu-west-1"),
            "https://monitoring.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            resolve(None, None, "cn-north-1"),
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

    #[test]
    fn errors_name_cloudwatch() {
        let config = SdkConfig::builder().build();
        let err = QueryCloudWatch::new(&config).expect_err("no region");
        assert_eq!(err.to_string(), "CloudWatch: the AWS config has no region");
    }

    /// Against the test bed's moto (`make venv` first):
    /// `cargo test -p agent-supervisor cloudwatch -- --ignored`.
    #[tokio::test]
    #[ignore = "needs the test bed's moto venv"]
    async fn moto_accepts_put_metric_data() {
        let (mut child, endpoint) = crate::aws::start_test_moto();

        let config = crate::aws::test_moto_config(&endpoint);
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
            matches!(&refused, CloudWatchError::Service { service: "CloudWatch", status: 400, code, .. } if code == "Throttling")
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
