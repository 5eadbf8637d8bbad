//! EC2 `DescribeInstances`, spoken in the Query protocol ([`QueryClient`]) so that the
//! operator CLI can show instance state, age, type, lifecycle and zone, and the leader can
//! find agents past their lifetime cap, without the
//! `aws-sdk-ec2` crate (the largest of the SDK crates, for one call).
//!
//! - Endpoint: `AWS_ENDPOINT_URL_EC2`, else the SDK config's endpoint
//!   (`AWS_ENDPOINT_URL`), else `https://ec2.<region>.amazonaws.com`.
//! - Region and credentials: from the [`SdkConfig`], cached (see [`super::query`]).
//! - Signing name `ec2`, API version `2016-11-15`.
//!
//! The answer is read with `aws-smithy-xml`, element by element within each scope, so the
//! nested `item`s of other sets (groups, network interfaces, block devices, tags) are never
//! mistaken for instances.

use super::query::{QueryClient, QueryError, Service};
use aws_config::SdkConfig;
use aws_smithy_types::date_time::{DateTime, Format};
use aws_smithy_xml::decode::{try_data, Document, ScopedDecoder, XmlDecodeError};
use std::future::Future;
use std::time::{Duration, SystemTime};

/// Env var naming an EC2-only endpoint (the SDKs' service-specific override).
pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL_EC2";

/// EC2 in the Query protocol.
pub const SERVICE: Service = Service {
    name: "EC2",
    signing_name: "ec2",
    api_version: "2016-11-15",
    endpoint_env: ENDPOINT_ENV,
    host_prefix: "ec2",
    timeout: Duration::from_secs(10),
};

/// Instance ids per request: EC2 refuses long id lists in some calls (100 in
/// `DescribeInstanceStatus`); staying under that costs nothing at a fleet's size.
pub const IDS_PER_REQUEST: usize = 100;

/// Pages followed per batch of ids before giving up: a `nextToken` that never ends is a
/// bug on the other side, not a reason to loop forever.
const MAX_PAGES: usize = 100;

/// One instance, as `DescribeInstances` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Instance {
    pub id: String,
    /// `pending`, `running`, `shutting-down`, `terminated`, `stopping` or `stopped`.
    pub state: String,
    pub launch_time: SystemTime,
    /// e.g. `t3.small`.
    pub instance_type: String,
    /// `Some("spot")` for a Spot instance (also `scheduled`, `capacity-block`); `None` for
    /// On-Demand.
    pub lifecycle: Option<String>,
    /// e.g. `us-east-1a`.
    pub availability_zone: String,
}

/// What the CLI needs of EC2, so that its logic can be tested with a fake. The adapter is
/// [`QueryEc2`].
pub trait Ec2: Send + Sync {
    /// See [`QueryEc2::describe_instances`].
    fn describe_instances(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<Ec2Instance>, QueryError>> + Send;
}

/// `DescribeInstances` over the Query protocol.
#[derive(Debug)]
pub struct QueryEc2 {
    client: QueryClient,
}

impl QueryEc2 {
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

    /// The instances with these ids, in EC2's order, all pages (`nextToken`) of every
    /// batch of [`IDS_PER_REQUEST`]. No ids: no call and no instances (EC2 would answer
    /// with every instance in the region).
    ///
    /// EC2 refuses the whole call if one id is unknown
    /// (`InvalidInstanceID.NotFound`, see [`QueryError::code`]); terminated instances stay
    /// visible for about an hour, but a just-launched one may not be visible yet.
    pub async fn describe_instances(&self, ids: &[String]) -> Result<Vec<Ec2Instance>, QueryError> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(IDS_PER_REQUEST) {
            let mut token: Option<String> = None;
            for page in 0.. {
                if page == MAX_PAGES {
                    return Err(self.malformed(format!("more than {MAX_PAGES} pages")));
                }
                let params = describe_instances_params(batch, token.as_deref());
                let body = self.client.call("DescribeInstances", &params).await?;
                let parsed =
                    parse_describe_instances(&body).map_err(|e| self.malformed(e.to_string()))?;
                out.extend(parsed.instances);
                match parsed.next_token {
                    Some(next) if token.as_deref() != Some(next.as_str()) => token = Some(next),
                    Some(_) => return Err(self.malformed("nextToken repeats itself".into())),
                    None => break,
                }
            }
        }
        Ok(out)
    }

    fn malformed(&self, detail: String) -> QueryError {
        QueryError::Malformed {
            service: SERVICE.name,
            action: "DescribeInstances",
            detail,
        }
    }
}

impl Ec2 for QueryEc2 {
    async fn describe_instances(&self, ids: &[String]) -> Result<Vec<Ec2Instance>, QueryError> {
        QueryEc2::describe_instances(self, ids).await
    }
}

/// The form fields of `DescribeInstances` after `Action` and `Version`.
fn describe_instances_params(ids: &[String], next_token: Option<&str>) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (format!("InstanceId.{}", i + 1), id.clone()))
        .collect();
    if let Some(t) = next_token {
        p.push(("NextToken".into(), t.into()));
    }
    p
}

/// One page of a `DescribeInstances` answer.
#[derive(Debug, Default, PartialEq, Eq)]
struct Page {
    instances: Vec<Ec2Instance>,
    /// Non-empty when there is another page.
    next_token: Option<String>,
}

/// Reads `DescribeInstancesResponse` → `reservationSet/item` → `instancesSet/item`, and
/// `nextToken`. Unknown elements are skipped; a missing required field is an error, as is
/// a document cut short (no closing root tag).
fn parse_describe_instances(body: &str) -> Result<Page, XmlDecodeError> {
    const ROOT: &str = "DescribeInstancesResponse";
    if !body.trim_end().ends_with(&format!("</{ROOT}>")) {
        return Err(XmlDecodeError::custom(format!(
            "not a complete {ROOT}: {}",
            body.chars().take(200).collect::<String>()
        )));
    }
    let mut doc = Document::new(body);
    let mut root = doc.root_element()?;
    if !root.start_el().matches(ROOT) {
        return Err(XmlDecodeError::custom(format!(
            "root element is {}, not {ROOT}",
            root.start_el().local()
        )));
    }
    let mut page = Page::default();
    while let Some(mut tag) = root.next_tag() {
        match tag.start_el().local() {
            "reservationSet" => {
                while let Some(mut reservation) = tag.next_tag() {
                    if reservation.start_el().matches("item") {
                        read_reservation(&mut reservation, &mut page.instances)?;
                    }
                }
            }
            "nextToken" => {
                let t = try_data(&mut tag)?;
                let t = t.trim();
                if !t.is_empty() {
                    page.next_token = Some(t.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(page)
}

fn read_reservation(
    reservation: &mut ScopedDecoder<'_, '_>,
    out: &mut Vec<Ec2Instance>,
) -> Result<(), XmlDecodeError> {
    while let Some(mut tag) = reservation.next_tag() {
        if tag.start_el().matches("instancesSet") {
            while let Some(mut item) = tag.next_tag() {
                if item.start_el().matches("item") {
                    out.push(read_instance(&mut item)?);
                }
            }
        }
    }
    Ok(())
}

fn read_instance(item: &mut ScopedDecoder<'_, '_>) -> Result<Ec2Instance, XmlDecodeError> {
    let mut id = None;
    let mut state = None;
    let mut launch_time = None;
    let mut instance_type = None;
    let mut lifecycle = None;
    let mut zone = None;
    while let Some(mut tag) = item.next_tag() {
        match tag.start_el().local() {
            "instanceId" => id = Some(text(&mut tag)?),
            "instanceState" => state = child_text(&mut tag, "name")?,
            "launchTime" => {
                let s = text(&mut tag)?;
                let t = DateTime::from_str(&s, Format::DateTime)
                    .map_err(|e| XmlDecodeError::custom(format!("launchTime {s:?}: {e}")))?;
                let t = SystemTime::try_from(t)
                    .map_err(|e| XmlDecodeError::custom(format!("launchTime {s:?}: {e}")))?;
                launch_time = Some(t);
            }
            "instanceType" => instance_type = Some(text(&mut tag)?),
            "instanceLifecycle" => lifecycle = Some(text(&mut tag)?).filter(|s| !s.is_empty()),
            "placement" => zone = child_text(&mut tag, "availabilityZone")?,
            _ => {}
        }
    }
    let id = required(id.filter(|s| !s.is_empty()), "instanceId", "?")?;
    Ok(Ec2Instance {
        state: required(state, "instanceState/name", &id)?,
        launch_time: required(launch_time, "launchTime", &id)?,
        instance_type: required(instance_type, "instanceType", &id)?,
        lifecycle,
        availability_zone: required(zone, "placement/availabilityZone", &id)?,
        id,
    })
}

fn required<T>(v: Option<T>, what: &str, id: &str) -> Result<T, XmlDecodeError> {
    v.ok_or_else(|| XmlDecodeError::custom(format!("instance {id} without {what}")))
}

/// The trimmed text of the current element.
fn text(tag: &mut ScopedDecoder<'_, '_>) -> Result<String, XmlDecodeError> {
    Ok(try_data(tag)?.trim().to_string())
}

/// The text of the direct child `name` of the current element, if any.
fn child_text(
    tag: &mut ScopedDecoder<'_, '_>,
    name: &str,
) -> Result<Option<String>, XmlDecodeError> {
    let mut found = None;
    while let Some(mut child) = tag.next_tag() {
        if child.start_el().matches(name) {
            found = Some(text(&mut child)?);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::query::xml_error;

    /// Shaped like a real answer: namespaces, a group set and network interfaces with
    /// their own `item`s and `placement`-like children, tags, a Spot instance.
    const PAGE_1: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>8f7724cf-496f-496e-8fe3-example</requestId>
    <reservationSet>
        <item>
            <reservationId>r-1234567890abcdef0</reservationId>
            <ownerId>123456789012</ownerId>
            <groupSet>
                <item><groupId>sg-1a2b3c4d</groupId><groupName>agents</groupName></item>
            </groupSet>
            <instancesSet>
                <item>
                    <instanceId>i-1234567890abcdef0</instanceId>
                    <imageId>ami-bff32ccc</imageId>
                    <instanceState>
                        <code>16</code>
                        <name>running</name>
                    </instanceState>
                    <privateDnsName>ip-192-168-1-88.eu-west-1.compute.internal</privateDnsName>
                    <reason/>
                    <amiLaunchIndex>0</amiLaunchIndex>
                    <productCodes/>
                    <instanceType>t3.small</instanceType>
                    <launchTime>2024-03-01T10:15:30.000Z</launchTime>
                    <placement>
                        <availabilityZone>eu-west-1c</availabilityZone>
                        <groupName/>
                        <tenancy>default</tenancy>
                    </placement>
                    <monitoring><state>disabled</state></monitoring>
                    <stateReason><code>none</code><message>none</message></stateReason>
                    <blockDeviceMapping>
                        <item>
                            <deviceName>/dev/xvda</deviceName>
                            <ebs>
                                <volumeId>vol-1234567890abcdef0</volumeId>
                                <status>attached</status>
                                <attachTime>2024-03-01T10:15:31.000Z</attachTime>
                            </ebs>
                        </item>
                    </blockDeviceMapping>
                    <instanceLifecycle>spot</instanceLifecycle>
                    <spotInstanceRequestId>sir-1234abcd</spotInstanceRequestId>
                    <networkInterfaceSet>
                        <item>
                            <networkInterfaceId>eni-0f8b8b8b8b8b8b8b8</networkInterfaceId>
                            <attachment>
                                <attachmentId>eni-attach-1</attachmentId>
                                <status>attached</status>
                            </attachment>
                            <groupSet>
                                <item><groupId>sg-1a2b3c4d</groupId></item>
                            </groupSet>
                        </item>
                    </networkInterfaceSet>
                    <tagSet>
                        <item><key>aws:autoscaling:groupName</key><value>s1-agents</value></item>
                        <item><key>instanceId</key><value>i-not-this-one</value></item>
                    </tagSet>
                </item>
                <item>
                    <instanceId>i-0aaaaaaaaaaaaaaa1</instanceId>
                    <instanceState><code>32</code><name>shutting-down</name></instanceState>
                    <instanceType>t3.small</instanceType>
                    <launchTime>2024-03-01T09:00:00Z</launchTime>
                    <placement><availabilityZone>eu-west-1a</availabilityZone></placement>
                </item>
            </instancesSet>
            <requesterId>940372691376</requesterId>
        </item>
        <item>
            <reservationId>r-0bbbbbbbbbbbbbbbb</reservationId>
            <ownerId>123456789012</ownerId>
            <groupSet/>
            <instancesSet>
                <item>
                    <instanceId>i-0ccccccccccccccc2</instanceId>
                    <instanceState><code>0</code><name>pending</name></instanceState>
                    <instanceType>m6i.large</instanceType>
                    <launchTime>2024-03-01T10:20:00.000Z</launchTime>
                    <placement><availabilityZone>eu-west-1b</availabilityZone></placement>
                    <instanceLifecycle></instanceLifecycle>
                </item>
            </instancesSet>
        </item>
    </reservationSet>
    <nextToken>eyJ2IjoiMiIsImMiOiJ0b2tlbiJ9</nextToken>
</DescribeInstancesResponse>"#;

    const PAGE_2: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>9f7724cf-example</requestId>
    <reservationSet>
        <item>
            <reservationId>r-0ddddddddddddddd3</reservationId>
            <instancesSet>
                <item>
                    <instanceId>i-0eeeeeeeeeeeeeee3</instanceId>
                    <instanceState><code>48</code><name>terminated</name></instanceState>
                    <instanceType>t3.small</instanceType>
                    <launchTime>2024-02-29T23:59:59.500Z</launchTime>
                    <placement><availabilityZone>eu-west-1a</availabilityZone></placement>
                </item>
            </instancesSet>
        </item>
    </reservationSet>
    <nextToken/>
</DescribeInstancesResponse>"#;

    fn at(rfc3339: &str) -> SystemTime {
        SystemTime::try_from(DateTime::from_str(rfc3339, Format::DateTime).expect("time"))
            .expect("system time")
    }

    #[test]
    fn reads_instances_across_reservations_and_the_next_token() {
        let page = parse_describe_instances(PAGE_1).expect("parsed");
        assert_eq!(
            page.next_token.as_deref(),
            Some("eyJ2IjoiMiIsImMiOiJ0b2tlbiJ9")
        );
        assert_eq!(
            page.instances,
            vec![
                Ec2Instance {
                    id: "i-1234567890abcdef0".into(),
                    state: "running".into(),
                    launch_time: at("2024-03-01T10:15:30Z"),
                    instance_type: "t3.small".into(),
                    lifecycle: Some("spot".into()),
                    availability_zone: "eu-west-1c".into(),
                },
                Ec2Instance {
                    id: "i-0aaaaaaaaaaaaaaa1".into(),
                    state: "shutting-down".into(),
                    launch_time: at("2024-03-01T09:00:00Z"),
                    instance_type: "t3.small".into(),
                    lifecycle: None,
                    availability_zone: "eu-west-1a".into(),
                },
                Ec2Instance {
                    id: "i-0ccccccccccccccc2".into(),
                    state: "pending".into(),
                    launch_time: at("2024-03-01T10:20:00Z"),
                    instance_type: "m6i.large".into(),
                    lifecycle: None,
                    availability_zone: "eu-west-1b".into(),
                },
            ]
        );

        let last = parse_describe_instances(PAGE_2).expect("parsed");
        assert_eq!(last.next_token, None, "an empty nextToken ends the pages");
        assert_eq!(last.instances.len(), 1);
        assert_eq!(last.instances[0].state, "terminated");
        assert_eq!(
            last.instances[0]
                .launch_time
                .duration_since(at("2024-02-29T23:59:59Z"))
                .expect("later"),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn no_reservations_is_no_instances() {
        let body = r#"<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
            <requestId>x</requestId><reservationSet/></DescribeInstancesResponse>"#;
        assert_eq!(
            parse_describe_instances(body).expect("parsed"),
            Page::default()
        );
    }

    #[test]
    fn bad_answers_are_errors() {
        // Cut short, another document, a missing field, a bad timestamp.
        let cut = &PAGE_1[..PAGE_1.len() / 2];
        assert!(parse_describe_instances(cut).is_err());
        let other = "<DescribeTagsResponse><tagSet/></DescribeTagsResponse>";
        assert!(parse_describe_instances(other).is_err());
        let no_zone = PAGE_2.replace("<availabilityZone>eu-west-1a</availabilityZone>", "");
        let err = parse_describe_instances(&no_zone).expect_err("no zone");
        assert!(
            err.to_string().contains("i-0eeeeeeeeeeeeeee3")
                && err.to_string().contains("availabilityZone"),
            "{err}"
        );
        let bad_time = PAGE_2.replace("2024-02-29T23:59:59.500Z", "yesterday");
        assert!(parse_describe_instances(&bad_time).is_err());
        assert!(parse_describe_instances("").is_err());
    }

    #[test]
    fn error_body_is_read() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>The instance ID 'i-0123456789abcdef0' does not exist</Message></Error></Errors><RequestID>ea966190-f9aa-478e-9ede-example</RequestID></Response>"#;
        assert_eq!(
            xml_error(body),
            (
                "InvalidInstanceID.NotFound".into(),
                "The instance ID 'i-0123456789abcdef0' does not exist".into()
            )
        );
        assert!(parse_describe_instances(body).is_err());
    }

    #[test]
    fn params_number_the_ids_and_carry_the_token() {
        let ids = vec!["i-1".to_string(), "i-2".to_string()];
        assert_eq!(
            describe_instances_params(&ids, Some("t")),
            vec![
                ("InstanceId.1".to_string(), "i-1".to_string()),
                ("InstanceId.2".to_string(), "i-2".to_string()),
                ("NextToken".to_string(), "t".to_string()),
            ]
        );
    }

    fn config(endpoint: &str) -> SdkConfig {
        use aws_sdk_ssm::config::{Credentials, SharedCredentialsProvider};
        SdkConfig::builder()
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "testing", "testing", None, None, "test",
            )))
            .build()
    }

    /// A one-connection-per-answer HTTP server that answers `bodies` in order and returns
    /// the form bodies it was sent.
    async fn serve(
        bodies: Vec<(u16, &'static str)>,
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (status, body) in bodies {
                let (mut conn, _) = listener.accept().await.expect("accept");
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                let form = loop {
                    let n = conn.read(&mut buf).await.expect("read");
                    assert!(n > 0, "request cut short");
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).into_owned();
                    let Some((head, rest)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .expect("content-length");
                    if rest.len() >= length {
                        assert!(head
                            .to_ascii_lowercase()
                            .contains("authorization: aws4-hmac-sha256"));
                        break rest.to_string();
                    }
                };
                seen.push(form);
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: text/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(answer.as_bytes()).await.expect("write");
                conn.shutdown().await.expect("shutdown");
            }
            seen
        });
        (endpoint, task)
    }

    #[tokio::test]
    async fn follows_next_token_to_the_last_page() {
        let (endpoint, server) = serve(vec![(200, PAGE_1), (200, PAGE_2)]).await;
        let ec2 = QueryEc2::new(&config(&endpoint)).expect("client");
        let ids: Vec<String> = ["i-1234567890abcdef0", "i-0aaaaaaaaaaaaaaa1"]
            .into_iter()
            .map(String::from)
            .collect();
        let got = ec2.describe_instances(&ids).await.expect("described");
        let got: Vec<&str> = got.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(
            got,
            [
                "i-1234567890abcdef0",
                "i-0aaaaaaaaaaaaaaa1",
                "i-0ccccccccccccccc2",
                "i-0eeeeeeeeeeeeeee3"
            ]
        );
        let forms = server.await.expect("server");
        assert_eq!(
            forms,
            [
                "Action=DescribeInstances&Version=2016-11-15\
                 &InstanceId.1=i-1234567890abcdef0&InstanceId.2=i-0aaaaaaaaaaaaaaa1",
                "Action=DescribeInstances&Version=2016-11-15\
                 &InstanceId.1=i-1234567890abcdef0&InstanceId.2=i-0aaaaaaaaaaaaaaa1\
                 &NextToken=eyJ2IjoiMiIsImMiOiJ0b2tlbiJ9",
            ]
        );
    }

    #[tokio::test]
    async fn refusals_and_garbage_are_errors() {
        const NOT_FOUND: &str = "<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code>\
            <Message>The instance ID 'i-1' does not exist</Message></Error></Errors>\
            <RequestID>r</RequestID></Response>";
        const THROTTLED: &str = "<Response><Errors><Error><Code>RequestLimitExceeded</Code>\
            <Message>Request limit exceeded.</Message></Error></Errors></Response>";
        let (endpoint, server) = serve(vec![
            (400, NOT_FOUND),
            (503, THROTTLED),
            (200, "<html>captive portal</html>"),
        ])
        .await;
        let ec2 = QueryEc2::new(&config(&endpoint)).expect("client");
        let ids = vec!["i-1".to_string()];
        let e = ec2.describe_instances(&ids).await.expect_err("not found");
        assert_eq!(e.code(), Some("InvalidInstanceID.NotFound"));
        assert!(!e.is_transient());
        assert_eq!(
            e.to_string(),
            "EC2 DescribeInstances: HTTP 400 InvalidInstanceID.NotFound: \
             The instance ID 'i-1' does not exist"
        );
        let e = ec2.describe_instances(&ids).await.expect_err("throttled");
        assert!(e.is_transient(), "{e}");
        let e = ec2.describe_instances(&ids).await.expect_err("garbage");
        assert!(matches!(e, QueryError::Malformed { .. }), "{e:?}");
        server.await.expect("server");
    }

    /// Starts the test bed's moto (it exits when its stdin closes) and returns its endpoint.
    fn start_test_moto() -> (std::process::Child, String) {
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
        let port = line
            .trim()
            .strip_prefix("LISTENING ")
            .expect("LISTENING line");
        (child, format!("http://127.0.0.1:{port}"))
    }

    /// Against the test bed's moto (`make venv` first):
    /// `cargo test -p agent-fleet ec2 -- --ignored`.
    #[tokio::test]
    #[ignore = "needs the test bed's moto venv"]
    async fn moto_describes_instances() {
        let (mut child, endpoint) = start_test_moto();
        let config = config(&endpoint);
        let raw = QueryClient::new(SERVICE, &config).expect("client");
        let ec2 = QueryEc2::new(&config).expect("client");

        let run = |count: &str, spot: bool| {
            let mut p: Vec<(String, String)> = [
                ("ImageId", "ami-785db401"),
                ("MinCount", count),
                ("MaxCount", count),
                ("InstanceType", "t3.small"),
                ("Placement.AvailabilityZone", "us-east-1b"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            if spot {
                p.push(("InstanceMarketOptions.MarketType".into(), "spot".into()));
            }
            p
        };
        let instance_ids = |body: &str| -> Vec<String> {
            let mut ids = Vec::new();
            let mut doc = Document::new(body);
            while let Some(el) = doc.next_start_element() {
                if el.local() == "instanceId" {
                    let mut scope = doc.scoped_to(el);
                    ids.push(try_data(&mut scope).expect("id").to_string());
                }
            }
            ids
        };
        let before = SystemTime::now() - Duration::from_secs(5);
        let on_demand = raw
            .call("RunInstances", &run("2", false))
            .await
            .expect("RunInstances");
        let spot = raw
            .call("RunInstances", &run("1", true))
            .await
            .expect("RunInstances spot");
        let mut ids = instance_ids(&on_demand);
        ids.extend(instance_ids(&spot));
        assert_eq!(ids.len(), 3, "{on_demand}");

        let got = ec2.describe_instances(&ids).await.expect("described");
        let unknown = ec2
            .describe_instances(&["i-00000000000000000".to_string()])
            .await
            .expect_err("unknown id");
        drop(child.stdin.take());
        let _ = child.kill();
        let _ = child.wait();

        let mut got_ids: Vec<&str> = got.iter().map(|i| i.id.as_str()).collect();
        got_ids.sort_unstable();
        let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
        want.sort_unstable();
        assert_eq!(got_ids, want);
        for i in &got {
            assert_eq!(i.instance_type, "t3.small");
            assert_eq!(i.availability_zone, "us-east-1b");
            assert!(["pending", "running"].contains(&i.state.as_str()), "{i:?}");
            assert!(i.launch_time >= before, "{i:?}");
            let is_spot = i.id == ids[2];
            assert_eq!(i.lifecycle.as_deref(), is_spot.then_some("spot"), "{i:?}");
        }
        assert_eq!(
            unknown.code(),
            Some("InvalidInstanceID.NotFound"),
            "{unknown}"
        );
    }

    #[tokio::test]
    async fn no_ids_no_call() {
        let config = SdkConfig::builder()
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url("http://127.0.0.1:9")
            .build();
        let ec2 = QueryEc2::new(&config).expect("client");
        assert_eq!(ec2.endpoint(), "http://127.0.0.1:9");
        assert!(ec2
            .describe_instances(&[])
            .await
            .expect("no call")
            .is_empty());
    }
}
