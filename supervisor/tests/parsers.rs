//! Property tests (the fuzzing that runs in CI) for everything the supervisor parses from
//! outside: the runtime config, Semaphore's `/metrics` answer, the agent's output lines,
//! the leader record and the user data. Arbitrary input must give a value or an error —
//! never a panic — and well-formed input must come back as what was put in. The bounds
//! that keep a hostile value from being turned against the fleet are reached on purpose:
//! `u64::MAX` and cap ± 1 timings, overlong advertised leases, 11+ digit term names,
//! endpoints with `user@`, paths, queries and fragments, `no_https` off loopback. (The
//! agent's line-length cap has its property next to the private reader, in `agent`.)
//!
//! `PROPTEST_CASES=100000 cargo test -p agent-supervisor --test parsers --release` runs a
//! longer campaign.

use agent_supervisor::agent::{assigned_job, message_of};
use agent_supervisor::config::{
    check_endpoint, ElectionConfig, RuntimeConfig, ScalerConfig, Settings, StackIdentity,
    DEFAULT_LIFETIME_CAP_SECS, MAX_ELECTION_TIMING, MAX_ELECTION_TIMING_MS,
};
use agent_supervisor::election::{
    next_term, term_name, term_of, Record, MAX_FOLLOWER_POLL, MAX_TERM,
};
use agent_supervisor::scaler::semaphore::{interpret, parse_metrics};
use proptest::prelude::*;

/// JSON text that is often nearly valid: real keys, mixed value types, nesting.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Keys the parsers know, and a few they do not.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "endpoint",
            "token_parameter",
            "agent_group",
            "disconnect_after_job",
            "idle_timeout_secs",
            "interruption_grace_secs",
            "cache_bucket",
            "no_https",
            "scaler",
            "election",
            "enabled",
            "poll_interval_ms",
            "overprovision_strategy",
            "overprovision_factor",
            "lease_ms",
            "renew_deadline_ms",
            "retry_ms",
            "prefix",
            "jobs",
            "agents",
            "queued",
            "running",
            "idle",
            "occupied",
            "holder",
            "seq",
            "released",
            "standbys",
            "follower_poll_ms",
            "decision",
            "at_unix_ms",
            "action",
            "target",
            "desired_before",
            "desired_after",
            "reason",
        ])
        .prop_map(str::to_string),
        "[a-z_]{1,10}",
    ]
}

/// A DNS name that `check_endpoint` takes: labels of letters, digits and inner dashes.
fn host_name() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", 1..5)
        .prop_map(|labels| labels.join("."))
        .prop_filter("not loopback", |h| {
            !h.eq_ignore_ascii_case("localhost") && !h.starts_with("127.")
        })
}

fn port() -> impl Strategy<Value = String> {
    proptest::option::of(1u16..=u16::MAX)
        .prop_map(|p| p.map(|p| format!(":{p}")).unwrap_or_default())
}

/// Endpoints on this machine: the only ones `no_https` may be used with.
fn loopback_endpoint() -> impl Strategy<Value = String> {
    let host = prop_oneof![
        any::<[u8; 3]>().prop_map(|[a, b, c]| format!("127.{a}.{b}.{c}")),
        Just("[::1]".to_string()),
        Just("localhost".to_string()),
        Just("LocalHost".to_string()),
    ];
    (host, port()).prop_map(|(h, p)| format!("{h}{p}"))
}

/// A `u64` often at an edge: 0, 1, the election cap ± 1, `u64::MAX` and its neighbours.
fn edgy_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0u64..=1,
        MAX_ELECTION_TIMING_MS - 1..=MAX_ELECTION_TIMING_MS + 1,
        u64::MAX - 1..=u64::MAX,
        Just(u64::MAX / 10 + 1),
        Just(u64::MAX / 12 + 1),
        100u64..300_000,
    ]
}

/// Configs that pass validation by construction (the rules of `Settings::validate`).
fn runtime_config() -> impl Strategy<Value = RuntimeConfig> {
    (
        prop_oneof![
            (host_name(), port()).prop_map(|(h, p)| (format!("{h}{p}"), false)),
            (loopback_endpoint(), any::<bool>()),
        ],
        "(/[A-Za-z0-9_.-]{1,8}){1,3}",
        "[A-Za-z0-9-]{1,20}",
        any::<bool>(),
        0u64..=604_800,
        0u64..=3600,
        proptest::option::of("[a-z0-9][a-z0-9-]{2,20}"),
        (
            any::<bool>(),
            1000u64..=300_000,
            prop_oneof![
                Just(("none", 0u32)),
                (1u32..1000).prop_map(|n| ("number", n)),
                (1u32..1000).prop_map(|n| ("percentage", n)),
            ],
        ),
        (100u64..=200_000, 1u64..100_000, 1u64..100_000),
    )
        .prop_map(
            |(
                (endpoint, no_https),
                token_parameter,
                agent_group,
                daj,
                idle,
                grace,
                bucket,
                s,
                e,
            )| {
                // Up to the cap: retry ≤ 200000 keeps 1.2 × retry < deadline ≤ cap - 1.
                let (retry, extra, lease_extra) = e;
                let deadline = (retry * 12 / 10 + extra).min(MAX_ELECTION_TIMING_MS - 1);
                let lease = (deadline + lease_extra).min(MAX_ELECTION_TIMING_MS);
                RuntimeConfig {
                    endpoint,
                    token_parameter,
                    agent_group,
                    disconnect_after_job: daj,
                    idle_timeout_secs: idle,
                    interruption_grace_secs: grace,
                    cache_bucket: bucket,
                    no_https,
                    scaler: ScalerConfig {
                        enabled: s.0,
                        poll_interval_ms: s.1,
                        overprovision_strategy: s.2 .0.to_string(),
                        overprovision_factor: s.2 .1,
                        agent_lifetime_cap_secs: DEFAULT_LIFETIME_CAP_SECS,
                    },
                    election: ElectionConfig {
                        lease_ms: lease,
                        renew_deadline_ms: deadline,
                        retry_ms: retry,
                        prefix: None,
                    },
                    lifecycle_hook: None,
                    max_uptime_secs: 0,
                    agents_lead: true,
                    job_isolation: Default::default(),
                    job_role_arn: None,
                    use_pre_signed_url: false,
                    launch_hook: None,
                    warm_images: vec![],
                    image_parameter: None,
                    known_hosts_parameter: None,
                    github_meta_url: None,
                    known_hosts_refresh_secs: 86_400,
                    log_group: None,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn runtime_config_never_panics_on_text(s in ".{0,300}") {
        let _ = Settings::parse("/p", &s);
    }

    #[test]
    fn runtime_config_never_panics_on_json(v in json_value()) {
        let _ = Settings::parse("/p", &v.to_string());
    }

    /// A valid config is accepted and keeps every value it was given.
    #[test]
    fn runtime_config_round_trips(c in runtime_config()) {
        let json = serde_json::to_string(&c).expect("serialize");
        let s = Settings::parse("/p", &json);
        prop_assert!(s.is_ok(), "refused {}: {:?}", json, s.err().map(|e| e.to_string()));
        let s = s.expect("checked");
        prop_assert_eq!(&s.endpoint, &c.endpoint);
        prop_assert_eq!(&s.token_parameter, &c.token_parameter);
        prop_assert_eq!(&s.agent_group, &c.agent_group);
        prop_assert_eq!(s.disconnect_after_job, c.disconnect_after_job);
        prop_assert_eq!(s.idle_timeout.as_secs(), c.idle_timeout_secs);
        prop_assert_eq!(s.interruption_grace.as_secs(), c.interruption_grace_secs);
        prop_assert_eq!(&s.cache_bucket, &c.cache_bucket);
        prop_assert_eq!(s.no_https, c.no_https);
        prop_assert_eq!(s.scaler.enabled, c.scaler.enabled);
        prop_assert_eq!(s.scaler.poll_interval.as_millis() as u64, c.scaler.poll_interval_ms);
        prop_assert_eq!(s.election.lease.as_millis() as u64, c.election.lease_ms);
        prop_assert_eq!(s.election.retry.as_millis() as u64, c.election.retry_ms);
    }

    /// Any timings, however large: an answer, never an overflow; what is accepted is
    /// within the cap and keeps `lease > renew_deadline > 1.2 × retry`.
    #[test]
    fn election_timings_are_capped(lease in edgy_u64(), deadline in edgy_u64(), retry in edgy_u64()) {
        let json = serde_json::json!({
            "endpoint": "org.semaphoreci.com", "token_parameter": "/t", "agent_group": "g",
            "election": {"lease_ms": lease, "renew_deadline_ms": deadline, "retry_ms": retry},
        });
        match Settings::parse("/p", &json.to_string()) {
            Ok(s) => {
                let e = s.election;
                prop_assert!(e.lease <= MAX_ELECTION_TIMING);
                prop_assert!(e.lease > e.renew_deadline);
                prop_assert!(e.renew_deadline.as_millis() * 10 > e.retry.as_millis() * 12);
            }
            Err(e) => {
                let m = e.to_string();
                prop_assert!(m.contains("`election."), "{}", m);
                if lease.max(deadline).max(retry) > MAX_ELECTION_TIMING_MS {
                    prop_assert!(m.contains("is over 300000"), "{}", m);
                }
            }
        }
    }

    /// Whatever the text: an answer; what is accepted is a bare host[:port] — nothing a
    /// URL parser would read as user info, path, query or fragment.
    #[test]
    fn endpoints_never_panic_and_accepted_ones_are_bare(s in prop_oneof![
        ".{0,40}",
        "[a-z0-9.:@/?#\\[\\]-]{0,40}",
        (host_name(), "[@/?#:]", host_name()).prop_map(|(a, sep, b)| format!("{a}{sep}{b}")),
    ]) {
        if check_endpoint(&s).is_ok() {
            prop_assert!(!s.contains(['@', '/', '?', '#', '\\', '%']), "{:?}", s);
            prop_assert!(!s.contains(char::is_whitespace) && s.is_ascii(), "{:?}", s);
        }
    }

    /// `org.semaphoreci.com@evil.example` must never be taken for a Semaphore host.
    #[test]
    fn user_info_is_always_refused(user in "[a-z0-9.:-]{0,20}", host in host_name(), p in port()) {
        let endpoint = format!("{user}@{host}{p}");
        let json = serde_json::json!({"endpoint": endpoint, "token_parameter": "/t", "agent_group": "g"});
        let m = Settings::parse("/p", &json.to_string()).expect_err("user info").to_string();
        prop_assert!(m.contains("key `endpoint`") && m.contains("user info"), "{}", m);
    }

    /// Plain HTTP goes nowhere but this machine.
    #[test]
    fn no_https_only_to_loopback(host in host_name(), p in port(), lo in loopback_endpoint()) {
        let config = |endpoint: &str| serde_json::json!({
            "endpoint": endpoint, "token_parameter": "/t", "agent_group": "g", "no_https": true,
        }).to_string();
        let m = Settings::parse("/p", &config(&format!("{host}{p}"))).expect_err("off loopback").to_string();
        prop_assert!(m.contains("key `no_https`"), "{}", m);
        prop_assert!(Settings::parse("/p", &config(&lo)).is_ok(), "{}", lo);
    }

    /// Term names: 1-10 digits, at most MAX_TERM; longer ones (u64::MAX among them) are
    /// not terms, and term arithmetic never passes MAX_TERM.
    #[test]
    fn terms_are_ten_digits_at_most(t in prop_oneof![0..=MAX_TERM, MAX_TERM - 2..=MAX_TERM], long in "[0-9]{11,25}", any_t in edgy_u64()) {
        let p = "/agent-fleet/s/leader";
        prop_assert_eq!(term_of(p, &term_name(p, t)), Some(t));
        prop_assert_eq!(term_of(p, &format!("{p}/{long}")), None);
        prop_assert_eq!(term_of(p, &format!("{p}/{}", u64::MAX)), None);
        match next_term(any_t) {
            Some(n) => prop_assert!(n == any_t + 1 && n <= MAX_TERM),
            None => prop_assert!(any_t >= MAX_TERM),
        }
    }

    #[test]
    fn metrics_never_panic(body in prop::collection::vec(any::<u8>(), 0..300), status in 100u16..600, retry in proptest::option::of(".{0,12}")) {
        let _ = parse_metrics(&body);
        let _ = interpret(status, retry.as_deref(), &body);
    }

    #[test]
    fn metrics_never_panic_on_json(v in json_value()) {
        let _ = parse_metrics(v.to_string().as_bytes());
    }

    /// The documented shape comes back with its numbers.
    #[test]
    fn metrics_round_trip(q in any::<u32>(), r in any::<u32>(), i in any::<u32>(), o in any::<u32>()) {
        let body = serde_json::json!({"jobs": {"queued": q, "running": r}, "agents": {"idle": i, "occupied": o}}).to_string();
        let m = parse_metrics(body.as_bytes()).expect("documented shape");
        prop_assert_eq!((m.jobs.queued, m.jobs.running, m.agents.idle, m.agents.occupied), (q, r, i, o));
        prop_assert_eq!(m.jobs(), u64::from(q) + u64::from(r));
    }

    #[test]
    fn agent_lines_never_panic(line in prop_oneof![".{0,200}", ".{16000,17000}"]) {
        let _ = assigned_job(&line);
        let _ = message_of(&line);
    }

    /// A run-job line anywhere in a line yields its job id.
    #[test]
    fn agent_job_lines_yield_the_id(prefix in "[ -~]{0,40}", id in "[a-f0-9-]{1,36}") {
        let line = format!("{prefix}SYNC response (action: run-job, job: {id})");
        prop_assert_eq!(assigned_job(&line), Some(id.as_str()));
    }

    #[test]
    fn leader_records_never_panic(s in ".{0,300}") {
        let _ = Record::parse(&s);
    }

    #[test]
    fn leader_records_never_panic_on_json(v in json_value()) {
        let _ = Record::parse(&v.to_string());
    }

    /// What a leader writes, every follower reads back the same.
    #[test]
    fn leader_records_round_trip(
        holder in "i-[0-9a-f]{8,17}#[0-9a-f]{1,16}",
        seq in any::<u64>(),
        lease in edgy_u64().prop_filter("positive", |v| *v > 0),
        deadline in edgy_u64().prop_filter("positive", |v| *v > 0),
        released in any::<bool>(),
        standbys in prop::collection::vec("i-[0-9a-f]{8,17}", 0..4),
        poll in edgy_u64().prop_filter("positive", |v| *v > 0),
    ) {
        let r = Record {
            holder,
            seq,
            lease_ms: lease,
            renew_deadline_ms: deadline,
            released,
            standbys,
            follower_poll_ms: poll,
            decision: None,
        };
        let back = Record::parse(&r.to_json());
        prop_assert_eq!(&back, &Ok(r));
        // However long the advertised lease, nobody waits more than the longest valid one.
        let back = back.expect("checked");
        prop_assert!(back.lease() <= MAX_ELECTION_TIMING);
        prop_assert_eq!(back.lease().as_millis() as u64, lease.min(MAX_ELECTION_TIMING_MS));
        prop_assert!(back.follower_poll() <= MAX_FOLLOWER_POLL);
    }

    #[test]
    fn user_data_never_panics(s in "(.{0,40}\n){0,8}") {
        let _ = StackIdentity::from_user_data(&s);
    }
}
