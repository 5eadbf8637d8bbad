//! The endpoint as a client sees it (over TCP), its answers one by one, and the refresher
//! on paused time with a scripted source.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::http::{read_head, respond, Head};
use super::*;
use crate::aws::sts::{Sts, MIN_SESSION};
use aws_smithy_types::date_time::{DateTime, Format};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// A source that counts its fetches; credentials number `n` have key `ASIA000n` and last
/// `lifetime` from the moment they are fetched; while `failing`, fetches fail.
#[derive(Clone)]
struct Script(Arc<Mutex<ScriptState>>);

struct ScriptState {
    lifetime: Duration,
    failing: bool,
    fetches: u32,
}

impl Script {
    fn lasting(lifetime: Duration) -> Script {
        Script(Arc::new(Mutex::new(ScriptState {
            lifetime,
            failing: false,
            fetches: 0,
        })))
    }
    fn fetches(&self) -> u32 {
        self.0.lock().unwrap().fetches
    }
    fn fail(&self, failing: bool) {
        self.0.lock().unwrap().failing = failing;
    }
}

fn unavailable() -> QueryError {
    QueryError::Service {
        service: "STS",
        action: "AssumeRole",
        status: 503,
        code: "ServiceUnavailable".into(),
        message: "down".into(),
    }
}

fn numbered(n: u32, lifetime: Duration) -> SessionCredentials {
    SessionCredentials {
        access_key_id: format!("ASIA{n:04}"),
        secret_access_key: format!("secret-{n}"),
        session_token: format!("session-token-{n}"),
        expiration: SystemTime::now() + lifetime,
    }
}

impl CredentialSource for Script {
    async fn fetch(&self) -> Result<SessionCredentials, QueryError> {
        let (n, failing, lifetime) = {
            let mut s = self.0.lock().unwrap();
            s.fetches += 1;
            (s.fetches, s.failing, s.lifetime)
        };
        if failing {
            return Err(unavailable());
        }
        Ok(numbered(n, lifetime))
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const MIN: Duration = Duration::from_secs(60);

async fn started(source: Script) -> JobCredentials {
    let creds = JobCredentials::start(bind_loopback().await.unwrap(), source.clone()).unwrap();
    // The first fetch, at once. On a busy machine the refresher's task may not have run
    // yet after one sleep: wait for its fetch (the tests run on one thread, so the fetch's
    // result is stored by the time the count shows it).
    for _ in 0..5000 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if source.fetches() >= 1 {
            break;
        }
    }
    assert!(source.fetches() >= 1, "the first fetch never ran");
    creds
}

fn get_head(auth: Option<&str>) -> Vec<u8> {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!("GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: identity\r\n{auth}User-Agent: test")
        .into_bytes()
}

/// The endpoint's answer now to a GET with `auth`.
fn ask(creds: &JobCredentials, auth: Option<&str>) -> (u16, serde_json::Value) {
    let reply = respond(&get_head(auth), &creds.shared, Instant::now());
    (reply.status, serde_json::from_str(&reply.body).unwrap())
}

fn key_served(creds: &JobCredentials, env: &JobEnv) -> Option<String> {
    let (status, body) = ask(creds, Some(&env.token.0));
    (status == 200).then(|| body["AccessKeyId"].as_str().unwrap().to_string())
}

/// One request over TCP: status and body.
async fn fetch_over_tcp(uri: &str, request: &[u8]) -> (u16, String) {
    let addr = uri
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn the_right_token_gets_the_credentials_in_the_container_format() {
    let creds = started(Script::lasting(HOUR)).await;
    let env = creds.issue().unwrap();
    assert!(
        creds.uri().starts_with("http://127.0.0.1:"),
        "{}",
        creds.uri()
    );
    assert!(creds.uri().ends_with(PATH));
    let vars = env.vars();
    assert_eq!(vars[0], format!("{URI_ENV}={}", creds.uri()));
    assert!(vars[1].starts_with(&format!("{TOKEN_ENV}=")));
    let token = &vars[1][TOKEN_ENV.len() + 1..];
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    // The agent's env-vars cannot carry a value with `=`.
    for v in &vars {
        assert!(!v.split_once('=').unwrap().1.contains('='), "{v}");
    }
    assert!(!format!("{env:?}").contains(token), "Debug shows the token");

    let request =
        format!("GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n\r\n");
    let (status, body) = fetch_over_tcp(creds.uri(), request.as_bytes()).await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let fields: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        fields,
        ["AccessKeyId", "Expiration", "SecretAccessKey", "Token"]
    );
    assert_eq!(json["AccessKeyId"], "ASIA0001");
    assert_eq!(json["SecretAccessKey"], "secret-1");
    assert_eq!(json["Token"], "session-token-1");
    let expiration = json["Expiration"].as_str().unwrap();
    assert!(expiration.ends_with('Z'), "{expiration}");
    let t =
        SystemTime::try_from(DateTime::from_str(expiration, Format::DateTime).unwrap()).unwrap();
    let left = t.duration_since(SystemTime::now()).unwrap();
    assert!(left > HOUR - MIN && left <= HOUR, "{left:?}");
}

#[tokio::test]
async fn a_missing_or_wrong_token_and_other_requests_are_refused_without_detail() {
    let creds = started(Script::lasting(HOUR)).await;
    // Before the first agent, no token opens it.
    assert_eq!(ask(&creds, Some("")).0, 403);
    let env = creds.issue().unwrap();
    let (status, body) = ask(&creds, None);
    assert_eq!(status, 401);
    assert_eq!(body["code"], "Unauthorized");
    let (status, body) = ask(&creds, Some("0123"));
    assert_eq!(status, 403);
    assert!(!body.to_string().contains("ASIA"), "{body}");
    // Same length, one character off.
    let mut near = env.token.0.clone().into_bytes();
    near[63] = if near[63] == b'0' { b'1' } else { b'0' };
    assert_eq!(
        ask(&creds, Some(std::str::from_utf8(&near).unwrap())).0,
        403
    );
    // Two Authorization headers, one of them right.
    let two = format!(
        "GET {PATH} HTTP/1.1\r\nAuthorization: x\r\nauthorization: {}",
        env.token.0
    );
    assert_eq!(
        respond(two.as_bytes(), &creds.shared, Instant::now()).status,
        403
    );
    // Header names are case-insensitive, the value's surrounding blanks are not part of it.
    let lower = format!("GET {PATH} HTTP/1.1\r\nauthorization:  {}\t", env.token.0);
    assert_eq!(
        respond(lower.as_bytes(), &creds.shared, Instant::now()).status,
        200
    );
    let other = |head: &str| respond(head.as_bytes(), &creds.shared, Instant::now()).status;
    let auth = format!("\r\nAuthorization: {}", env.token.0);
    assert_eq!(other(&format!("GET /latest/meta-data HTTP/1.1{auth}")), 404);
    assert_eq!(other(&format!("POST {PATH} HTTP/1.1{auth}")), 405);
    assert_eq!(other(&format!("GET {PATH}{auth}")), 400);
    assert_eq!(other("\u{0}\u{1}"), 400);

    let (status, body) = fetch_over_tcp(
        creds.uri(),
        format!("GET {PATH} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (401, r#"{"code":"Unauthorized","message":"Unauthorized"}"#)
    );
}

#[tokio::test]
async fn a_new_agents_token_revokes_the_previous_one() {
    let creds = started(Script::lasting(HOUR)).await;
    let first = creds.issue().unwrap();
    assert_eq!(key_served(&creds, &first).as_deref(), Some("ASIA0001"));
    let second = creds.issue().unwrap();
    assert_ne!(first.token, second.token);
    assert_eq!(ask(&creds, Some(&first.token.0)).0, 403);
    assert_eq!(key_served(&creds, &second).as_deref(), Some("ASIA0001"));
}

#[tokio::test(start_paused = true)]
async fn credentials_are_refreshed_twenty_minutes_before_they_expire() {
    let source = Script::lasting(HOUR);
    let creds = started(source.clone()).await;
    let env = creds.issue().unwrap();
    assert_eq!(source.fetches(), 1);
    tokio::time::sleep(40 * MIN - Duration::from_secs(1)).await;
    assert_eq!(source.fetches(), 1, "no fetch before 20 min are left");
    assert_eq!(key_served(&creds, &env).as_deref(), Some("ASIA0001"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(source.fetches(), 2);
    assert_eq!(key_served(&creds, &env).as_deref(), Some("ASIA0002"));
    // And every 40 min from then on.
    tokio::time::sleep(80 * MIN).await;
    assert_eq!(source.fetches(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_short_session_is_refreshed_half_way() {
    let source = Script::lasting(MIN_SESSION);
    let creds = started(source.clone()).await;
    tokio::time::sleep(MIN_SESSION / 2 - Duration::from_secs(1)).await;
    assert_eq!(source.fetches(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(source.fetches(), 2);
    drop(creds);
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_serving_valid_credentials_then_503_then_recovers() {
    let source = Script::lasting(HOUR);
    let creds = started(source.clone()).await;
    let env = creds.issue().unwrap();
    source.fail(true);
    // Before the first retry (1 s ± 20 %).
    tokio::time::sleep(40 * MIN + Duration::from_millis(500)).await;
    assert_eq!(source.fetches(), 2, "the refresh was tried");
    assert_eq!(key_served(&creds, &env).as_deref(), Some("ASIA0001"));
    // Retried with backoff (1 s doubling, capped at 60 s): some tries in 14 min, not hundreds.
    tokio::time::sleep(14 * MIN).await;
    let tries = source.fetches() - 2;
    assert!((10..=30).contains(&tries), "{tries} retries in 14 min");
    assert_eq!(key_served(&creds, &env).as_deref(), Some("ASIA0001"));
    // Less than 5 min left: nothing is served.
    tokio::time::sleep(MIN + Duration::from_secs(1)).await;
    let (status, body) = ask(&creds, Some(&env.token.0));
    assert_eq!(status, 503);
    assert_eq!(body["code"], "CredentialsUnavailable");
    // STS is back: within the backoff's cap, fresh credentials are served.
    source.fail(false);
    tokio::time::sleep(MIN + Duration::from_secs(13)).await;
    let key = key_served(&creds, &env).expect("served again");
    assert_ne!(key, "ASIA0001");
}

#[tokio::test(start_paused = true)]
async fn without_any_credentials_the_endpoint_answers_503() {
    let source = Script::lasting(HOUR);
    source.fail(true);
    let creds = started(source.clone()).await;
    let env = creds.issue().unwrap();
    assert_eq!(ask(&creds, Some(&env.token.0)).0, 503);
    assert!(creds.refresh_now().await.is_err());
}

#[tokio::test]
async fn a_forced_refresh_returns_once_the_new_credentials_are_served() {
    let source = Script::lasting(HOUR);
    let creds = started(source.clone()).await;
    let env = creds.issue().unwrap();
    creds.refresh_now().await.unwrap();
    assert_eq!(key_served(&creds, &env).as_deref(), Some("ASIA0002"));
}

/// An STS that grants at most `max`, refusing longer sessions as AWS does.
struct CappedSts {
    max: Duration,
    asked: Arc<Mutex<Vec<(String, String, u64)>>>,
}

impl Sts for CappedSts {
    async fn assume_role(
        &self,
        role_arn: &str,
        session_name: &str,
        duration: Duration,
    ) -> Result<SessionCredentials, QueryError> {
        self.asked.lock().unwrap().push((
            role_arn.to_string(),
            session_name.to_string(),
            duration.as_secs(),
        ));
        if duration > self.max {
            return Err(QueryError::Service {
                service: "STS",
                action: "AssumeRole",
                status: 400,
                code: "ValidationError".into(),
                message: "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.".into(),
            });
        }
        Ok(numbered(1, duration))
    }
}

#[tokio::test]
async fn a_role_that_refuses_an_hour_gets_asked_for_fifteen_minutes_from_then_on() {
    let asked = Arc::new(Mutex::new(vec![]));
    let sts = CappedSts {
        max: MIN_SESSION,
        asked: asked.clone(),
    };
    let role = JobRole::new(sts, "arn:aws:iam::1:role/job", "i-0abc 1");
    role.fetch().await.expect("granted");
    role.fetch().await.expect("granted");
    let asked = asked.lock().unwrap().clone();
    let secs: Vec<u64> = asked.iter().map(|a| a.2).collect();
    assert_eq!(secs, [3600, 900, 900]);
    assert_eq!(asked[0].0, "arn:aws:iam::1:role/job");
    assert_eq!(asked[0].1, "i-0abc-1");

    // A role that refuses even 15 minutes: one shorter try, then its error.
    let tries = Arc::new(Mutex::new(vec![]));
    let denied = JobRole::new(
        CappedSts {
            max: Duration::ZERO,
            asked: tries.clone(),
        },
        "arn:aws:iam::1:role/job",
        "i-0abc",
    );
    let e = denied.fetch().await.expect_err("refused");
    assert_eq!(e.code(), Some("ValidationError"));
    assert_eq!(tries.lock().unwrap().len(), 2, "3600, then 900 once");
}

#[tokio::test]
async fn a_request_head_is_read_up_to_its_blank_line_and_no_further_than_8_kib() {
    let head = format!("GET {PATH} HTTP/1.1\r\nHost: x\r\n\r\nbody");
    assert_eq!(
        read_head(&mut head.as_bytes()).await,
        Head::Complete(format!("GET {PATH} HTTP/1.1\r\nHost: x").into_bytes())
    );
    let mut huge = format!("GET {PATH} HTTP/1.1\r\n").into_bytes();
    huge.extend(std::iter::repeat_n(b'a', 10_000));
    assert_eq!(read_head(&mut huge.as_slice()).await, Head::TooLarge);
    assert_eq!(read_head(&mut &b"GET / HTTP/1.1\r\n"[..]).await, Head::Gone);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_sends_half_a_request_is_cut_off_after_5_s() {
    let creds = started(Script::lasting(HOUR)).await;
    let addr = creds
        .uri()
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_string();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {PATH} HTTP/1.1\r\n").as_bytes())
        .await
        .unwrap();
    let began = Instant::now();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    assert!(answer.is_empty(), "no answer to half a request");
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
}

/// Under `strict` the jobs live in rootless Docker's network namespace: the endpoint is
/// served there too, at an address of that namespace's loopback, with the same token rule.
#[tokio::test]
async fn jobs_in_another_network_namespace_get_an_endpoint_on_their_own_loopback() {
    // Loopback up, as in rootlesskit's namespace.
    let Ok(mut holder) = std::process::Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link set lo up && exec sleep 30"])
        .spawn()
    else {
        eprintln!("SKIP: unshare -n is not available");
        return;
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ns = NetNs::of_pid(holder.id()).unwrap();
    let creds = started(Script::lasting(HOUR)).await;
    let env = creds.issue_in(Some(&ns)).await.unwrap();
    assert_ne!(env.uri, creds.uri(), "a second server, not the host's");
    // A client inside the namespace (as a job there would be).
    let (uri, token) = (env.uri.clone(), env.token.0.clone());
    let ns2 = ns.clone();
    let answer = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            ns2.join_this_thread().unwrap();
            let addr = uri
                .strip_prefix("http://")
                .and_then(|r| r.split('/').next())
                .unwrap()
                .to_string();
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(
                &mut conn,
                &[get_head(Some(&token)), b"\r\n\r\n".to_vec()].concat(),
            )
            .unwrap();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut conn, &mut text).unwrap();
            text
        })
        .join()
        .unwrap()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"AccessKeyId\":\"ASIA0001\""), "{answer}");
    // The same namespace again: the same server; the next token revokes this one there too.
    let again = creds.issue_in(Some(&ns)).await.unwrap();
    assert_eq!(again.uri, env.uri);
    assert_eq!(
        key_served(&creds, &env),
        None,
        "the previous token stops working"
    );
    let _ = holder.kill();
    let _ = holder.wait();
}
