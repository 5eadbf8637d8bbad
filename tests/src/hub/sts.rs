//! Agent names the server verifies (`SEMAPHORE_AGENT_USE_PRE_SIGNED_URL`): a name that is
//! a URL must be a pre-signed STS `GetCallerIdentity` GET; the hub checks it, GETs it from
//! the emulator and names the agent after the identity STS answers with.
//!
//! What the hub checks, before any request: the URL's scheme, host and port are the
//! configured emulator's (which must be a loopback address: the hub never fetches any
//! other host, and follows no redirect); the path is the endpoint's; the query is
//! `Action=GetCallerIdentity`, `Version=2011-06-15` and SigV4's query parameters and
//! nothing else, each once (`X-Amz-Algorithm=AWS4-HMAC-SHA256`, `X-Amz-Credential` with
//! the `sts` scope and `X-Amz-Date`'s day, `X-Amz-SignedHeaders` with `host`, a 64-digit
//! `X-Amz-Signature`; `X-Amz-Security-Token` optional); `X-Amz-Date` + `X-Amz-Expires` is
//! not past (and the date not more than 5 minutes ahead). Then it GETs the URL and reads
//! `<Arn>` and `<Account>` of the `GetCallerIdentityResponse`.
//!
//! What that proves and what it cannot: moto verifies no SigV4 signature, and routes a
//! request by its `Authorization` header alone (an unsigned GET reaches its S3 backend).
//! So the hub restates the URL's own credential scope and signature as that header when it
//! asks the emulator — real STS would refuse a request carrying both. moto then answers
//! with the identity of the URL's access key id (an assumed-role session's ARN, or
//! `user/moto` for keys it never issued). The hub thus proves the URL is shaped as a
//! presigned `GetCallerIdentity` for the emulator, in date, and names a key the emulator
//! knows; it does not prove the signature is right, nor that the signer held the secret
//! key. The signature itself is pinned elsewhere: the supervisor's presigner is tested
//! against botocore's for fixed inputs (`agent_supervisor::agent::presign`).
//!
//! Refusals are answered as the real server answers a bad name: 400. An emulator that
//! cannot be reached gets 503 (the agent retries registration). No answer quotes the URL:
//! it carries the signer's session token, and the agent logs the answer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::Response;
use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::http::message;

/// The identity STS vouched for, as the hub records it with the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedIdentity {
    /// `arn:aws:sts::<account>:assumed-role/<role>/<session>` on EC2 (the session is the
    /// instance id), or an IAM user's ARN.
    pub arn: String,
    pub account: String,
}

impl VerifiedIdentity {
    /// The agent's name on the hub: the ARN's last part (an instance id on EC2) and a
    /// random suffix, so that two agents of one identity do not replace each other.
    pub fn agent_name(&self, suffix: &str) -> String {
        let last = self.arn.rsplit(['/', ':']).next().unwrap_or_default();
        let base: String = last
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        format!("{base}__{suffix}")
    }
}

/// Why a URL name was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// 400: not a name the server would take.
    BadName(String),
    /// 503: the emulator did not answer; registering again may work.
    Unavailable(String),
}

impl Refusal {
    pub(super) fn response(&self) -> Response {
        match self {
            Self::BadName(why) => message(
                StatusCode::BAD_REQUEST,
                &format!("agent name is not a valid pre-signed STS GetCallerIdentity URL: {why}"),
            ),
            Self::Unavailable(why) => message(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cannot verify the agent name now: {why}"),
            ),
        }
    }
}

fn bad(why: impl Into<String>) -> Refusal {
    Refusal::BadName(why.into())
}

/// The endpoint names are verified against: an http(s) URL on a loopback address.
pub(super) fn endpoint(s: &str) -> anyhow::Result<Url> {
    let url = Url::parse(s)?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    anyhow::ensure!(
        matches!(url.scheme(), "http" | "https") && loopback,
        "the STS endpoint must be an http(s) URL on a loopback address (the emulator), not {s}"
    );
    Ok(url)
}

/// The query parameters a pre-signed `GetCallerIdentity` has, and may have.
const REQUIRED: &[&str] = &[
    "Action",
    "Version",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
];
const OPTIONAL: &[&str] = &["X-Amz-Security-Token"];

/// Longest `X-Amz-Expires` SigV4 allows (7 days).
const MAX_EXPIRES_SECS: u64 = 604_800;

/// How far ahead of the hub's clock a signing time may be.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// A URL that passed the checks: what the emulator needs to route it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Presigned {
    url: Url,
    credential: String,
    signed_headers: String,
    signature: String,
}

/// Every check that needs no request (see the module docs), at `now`.
pub(super) fn check(name: &str, endpoint: &Url, now: SystemTime) -> Result<Presigned, Refusal> {
    let url = Url::parse(name).map_err(|_| bad("not a URL"))?;
    let same_origin = url.scheme() == endpoint.scheme()
        && url.host_str() == endpoint.host_str()
        && url.port_or_known_default() == endpoint.port_or_known_default();
    if !same_origin {
        return Err(bad("not the STS endpoint (wrong scheme, host or port)"));
    }
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err(bad("user info or a fragment"));
    }
    let want_path = format!("{}/", endpoint.path().trim_end_matches('/'));
    if url.path() != want_path {
        return Err(bad(format!("path {} (expected {want_path})", url.path())));
    }
    let mut q = std::collections::BTreeMap::new();
    for (k, v) in url.query_pairs() {
        if !REQUIRED.contains(&k.as_ref()) && !OPTIONAL.contains(&k.as_ref()) {
            return Err(bad(format!("unexpected query parameter {k}")));
        }
        if q.insert(k.to_string(), v.to_string()).is_some() {
            return Err(bad(format!("{k} twice")));
        }
    }
    if let Some(missing) = REQUIRED.iter().find(|k| !q.contains_key(**k)) {
        return Err(bad(format!("no {missing}")));
    }
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
    for (k, want) in [
        ("Action", "GetCallerIdentity"),
        ("Version", "2011-06-15"),
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
    ] {
        if get(k) != want {
            return Err(bad(format!("{k} is not {want}")));
        }
    }
    let date = get("X-Amz-Date");
    let signed_at =
        parse_amz_date(date).ok_or_else(|| bad("X-Amz-Date is not YYYYMMDDTHHMMSSZ"))?;
    let scope: Vec<&str> = get("X-Amz-Credential").split('/').collect();
    let scope_ok = matches!(
        scope.as_slice(),
        [key, day, region, "sts", "aws4_request"]
            if !key.is_empty() && !region.is_empty() && date.starts_with(day) && day.len() == 8
    );
    if !scope_ok {
        return Err(bad(
            "X-Amz-Credential is not <key>/<X-Amz-Date's day>/<region>/sts/aws4_request",
        ));
    }
    if !get("X-Amz-SignedHeaders").split(';').any(|h| h == "host") {
        return Err(bad("X-Amz-SignedHeaders does not sign host"));
    }
    let signature = get("X-Amz-Signature");
    let hex = signature.len() == 64
        && signature
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        return Err(bad("X-Amz-Signature is not 64 hex digits"));
    }
    let expires = get("X-Amz-Expires")
        .parse::<u64>()
        .ok()
        .filter(|s| (1..=MAX_EXPIRES_SECS).contains(s))
        .ok_or_else(|| bad(format!("X-Amz-Expires is not 1 to {MAX_EXPIRES_SECS}")))?;
    if signed_at > now + CLOCK_SKEW {
        return Err(bad("signed in the future"));
    }
    if now > signed_at + Duration::from_secs(expires) {
        return Err(bad("expired"));
    }
    Ok(Presigned {
        credential: get("X-Amz-Credential").to_string(),
        signed_headers: get("X-Amz-SignedHeaders").to_string(),
        signature: signature.to_string(),
        url,
    })
}

/// [`check`]s the name, then GETs it from the emulator (see the module docs).
pub(super) async fn verify(
    name: &str,
    endpoint: &Url,
    now: SystemTime,
) -> Result<VerifiedIdentity, Refusal> {
    let p = check(name, endpoint, now)?;
    agent_supervisor::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Refusal::Unavailable(format!("no HTTP client: {e}")))?;
    let resp = http
        .get(p.url)
        .header(
            "Authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={}, SignedHeaders={}, Signature={}",
                p.credential, p.signed_headers, p.signature
            ),
        )
        .send()
        .await
        .map_err(|e| Refusal::Unavailable(format!("STS did not answer: {}", e.without_url())))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| {
        Refusal::Unavailable(format!("STS's answer broke off: {}", e.without_url()))
    })?;
    if !status.is_success() {
        let code = element(&body, "Code").unwrap_or("no error code");
        return Err(bad(format!(
            "STS answered HTTP {} ({code})",
            status.as_u16()
        )));
    }
    let result = body
        .find("<GetCallerIdentityResult>")
        .map(|i| &body[i..])
        .ok_or_else(|| bad("STS's answer is not a GetCallerIdentityResponse"))?;
    match (element(result, "Arn"), element(result, "Account")) {
        (Some(arn), Some(account)) if arn.starts_with("arn:") => Ok(VerifiedIdentity {
            arn: arn.to_string(),
            account: account.to_string(),
        }),
        _ => Err(bad("STS's answer has no Arn and Account")),
    }
}

/// The text of the first `<tag>…</tag>` in `xml` (no attributes, no nesting: what
/// STS's answers hold).
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..start + len].trim())
}

/// `YYYYMMDDTHHMMSSZ` (SigV4's `X-Amz-Date`) as a time.
pub(super) fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, sec) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), for years from 1970.
    let (y, mo) = if mo <= 2 { (y - 1, mo + 12) } else { (y, mo) };
    let era = y / 400;
    let yoe = y % 400;
    let doy = (153 * (mo - 3) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(UNIX_EPOCH + Duration::from_secs(days * 86_400 + h * 3600 + mi * 60 + sec))
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;
    use agent_supervisor::agent::presign::presign_url;
    use aws_sdk_ssm::config::Credentials;

    const ENDPOINT: &str = "http://127.0.0.1:4566";
    const TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLE/+=";

    fn signed_at(at: SystemTime) -> String {
        let creds = Credentials::new(
            "ASIAEXAMPLEEXAMPLE01",
            "secret",
            Some(TOKEN.to_string()),
            None,
            "test",
        );
        presign_url(ENDPOINT, "us-east-1", &creds, at).expect("signed")
    }

    fn refusal(name: &str, now: SystemTime) -> String {
        let endpoint = endpoint(ENDPOINT).expect("endpoint");
        match check(name, &endpoint, now) {
            Ok(_) => panic!("taken: {name}"),
            Err(Refusal::BadName(why)) => why,
            Err(r) => panic!("not a bad name: {r:?}"),
        }
    }

    #[test]
    fn amz_dates_are_read_as_utc() {
        assert_eq!(
            parse_amz_date("20260102T030405Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_767_323_045))
        );
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(UNIX_EPOCH));
        for bad in [
            "2026-01-02T03:04:05Z",
            "20261302T030405Z",
            "20260102T030405",
            "2026010xT030405Z",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_fresh_presigned_get_caller_identity_for_the_emulator_passes() {
        let now = SystemTime::now();
        let endpoint = endpoint(ENDPOINT).expect("endpoint");
        let p = check(&signed_at(now), &endpoint, now).expect("taken");
        assert!(p.credential.starts_with("ASIAEXAMPLEEXAMPLE01/"), "{p:?}");
        assert_eq!(p.signed_headers, "host");
        // Near the end of its 15 minutes still, not after.
        let old = signed_at(now - Duration::from_secs(899));
        assert!(check(&old, &endpoint, now).is_ok());
    }

    #[test]
    fn tampered_expired_and_foreign_urls_are_refused_before_any_request() {
        let now = SystemTime::now();
        let good = signed_at(now);
        let cases: Vec<(String, &str)> = vec![
            (
                good.replace("Action=GetCallerIdentity", "Action=AssumeRole"),
                "Action",
            ),
            (
                good.replace("Version=2011-06-15", "Version=2010-05-08"),
                "Version",
            ),
            (signed_at(now - Duration::from_secs(901)), "expired"),
            (signed_at(now + Duration::from_secs(600)), "future"),
            (
                good.replace("127.0.0.1:4566", "127.0.0.1:4567"),
                "STS endpoint",
            ),
            (
                good.replace("127.0.0.1:4566", "127.0.0.2:4566"),
                "STS endpoint",
            ),
            (
                good.replace("127.0.0.1:4566", "169.254.169.254"),
                "STS endpoint",
            ),
            (good.replace("http://", "https://"), "STS endpoint"),
            (good.replace("4566/?", "4566/x/?"), "path"),
            (
                format!("{good}&RoleArn=x"),
                "unexpected query parameter RoleArn",
            ),
            (format!("{good}&Action=GetCallerIdentity"), "Action twice"),
            (good.replace("%2Fsts%2F", "%2Fs3%2F"), "X-Amz-Credential"),
            (
                good.replace("X-Amz-SignedHeaders=host", "X-Amz-SignedHeaders=x-amz-date"),
                "host",
            ),
            (
                good.replace("X-Amz-Expires=900", "X-Amz-Expires=0"),
                "X-Amz-Expires",
            ),
            (
                good.split("&X-Amz-Signature=")
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                "no X-Amz-Signature",
            ),
            (format!("{good}#x"), "fragment"),
            ("not a url".to_string(), "not a URL"),
        ];
        for (name, why) in cases {
            let got = refusal(&name, now);
            assert!(got.contains(why), "{name}: {got}");
            assert!(
                !got.contains("X-Amz-Security-Token=") && !got.contains("IQoJ"),
                "{got}"
            );
        }
    }

    #[test]
    fn only_a_loopback_emulator_is_an_endpoint() {
        for ok in [
            "http://127.0.0.1:4566",
            "http://localhost:4566/",
            "http://[::1]:4566",
        ] {
            assert!(endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:4566",
            "https://sts.us-east-1.amazonaws.com",
            "http://169.254.169.254",
            "ftp://127.0.0.1",
        ] {
            assert!(endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn agents_are_named_after_the_identity() {
        let id = |arn: &str| VerifiedIdentity {
            arn: arn.into(),
            account: "123456789012".into(),
        };
        assert_eq!(
            id("arn:aws:sts::123456789012:assumed-role/agents/i-0abc").agent_name("0a1b2c"),
            "i-0abc__0a1b2c"
        );
        assert_eq!(
            id("arn:aws:sts::123456789012:user/moto").agent_name("0a1b2c"),
            "moto__0a1b2c"
        );
        assert_eq!(
            id("arn:aws:sts::1:assumed-role/r/a@b.c").agent_name("x"),
            "a-b-c__x"
        );
    }
}
