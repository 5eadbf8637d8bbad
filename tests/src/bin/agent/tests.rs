//! The config reader, the Go formats, and in-process protocol runs against the fake hub.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use agent_fleet_tests::hub::{Epilogues, Hub, HubOptions, JobSpec, JobState};
use agent_fleet_tests::semaphore_wire::valid_agent_name;
use tokio::sync::{mpsc, Notify};

use crate::api::loopback_host;
use crate::config::{
    go_parse_int, parse_args, parse_config, valid_config_name, Config, Knobs, LogCadence,
};
use crate::job::shell_quote;
use crate::listener::run_agent;
use crate::log::{go_duration, timestamp};

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse(text: &str) -> anyhow::Result<Config> {
    parse_config(text, &no_env)
}

fn err(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(e) => format!("{e:#}"),
    }
}

const MIN: &str = "endpoint: 127.0.0.1:9\ntoken: t\n";

#[test]
fn minimal_config_and_defaults() {
    let c = parse(MIN).expect("valid");
    assert_eq!(c.endpoint, "127.0.0.1:9");
    assert_eq!(c.token, "t");
    assert!(!c.no_https && !c.disconnect_after_job && !c.fail_on_missing_files);
    assert_eq!((c.idle_timeout, c.interruption_grace_period), (0, 0));
    assert_eq!(c.name.len(), 20, "random name");
    assert!(valid_config_name(&c.name));
    assert!(valid_agent_name(&c.name), "the hub takes it");
    assert_eq!(c.upload_job_logs, "never");
    assert_eq!(c.shutdown_hook_path, None);
    assert!(c.warnings.is_empty());
}

#[test]
fn full_config() {
    let c = parse(
        "endpoint: 127.0.0.1:9\ntoken: t\nno-https: true\nname: i-0123456789abcdef0\n\
         disconnect-after-job: true\ndisconnect-after-idle-timeout: 300\n\
         interruption-grace-period: 60\nshutdown-hook-path: /opt/hook.sh\n\
         pre-job-hook-path: /opt/pre.sh\npost-job-hook-path: ''\n\
         env-vars: [SEMAPHORE_CACHE_BACKEND=s3, EMPTY=]\nfiles: ['/a:/b']\n\
         fail-on-missing-files: true\nupload-job-logs: when-trimmed\n\
         fail-on-pre-job-hook-error: true\nsource-pre-job-hook: true\njob-id: j1\n\
         kubernetes-executor: false\nkubernetes-labels: [a=b]\n\
         kubernetes-pod-start-timeout: 10\nname-from-env: X\nconfig-file: /c\n",
    )
    .expect("valid");
    assert!(c.no_https && c.disconnect_after_job && c.fail_on_missing_files);
    assert!(c.fail_on_pre_job_hook_error && c.source_pre_job_hook);
    assert_eq!(c.name, "i-0123456789abcdef0");
    assert_eq!(c.job_id, "j1");
    assert_eq!((c.idle_timeout, c.interruption_grace_period), (300, 60));
    assert_eq!(c.shutdown_hook_path.as_deref(), Some("/opt/hook.sh"));
    assert_eq!(c.pre_job_hook_path.as_deref(), Some("/opt/pre.sh"));
    assert_eq!(c.post_job_hook_path, None);
    assert_eq!(
        c.env_vars,
        vec![
            ("SEMAPHORE_CACHE_BACKEND".to_string(), "s3".to_string()),
            ("EMPTY".to_string(), String::new())
        ]
    );
    assert_eq!(c.files, vec![("/a".to_string(), "/b".to_string())]);
    assert_eq!(c.upload_job_logs, "when-trimmed");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn values_are_read_leniently() {
    let c = parse(&format!(
        "{MIN}no-https: \"true\"\ndisconnect-after-job: yes\n\
         disconnect-after-idle-timeout: \"300\"\ninterruption-grace-period: 1.9\n\
         fail-on-missing-files: 1\nName: UPPER-case-key\nenv-vars: \"A=1 B=2\"\n"
    ))
    .expect("valid");
    assert!(c.no_https && c.disconnect_after_job && c.fail_on_missing_files);
    assert_eq!((c.idle_timeout, c.interruption_grace_period), (300, 1));
    assert_eq!(c.name, "UPPER-case-key");
    assert_eq!(
        c.env_vars,
        vec![("A".into(), "1".into()), ("B".into(), "2".into())]
    );
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // Not what the key expects: false / 0 / "", with a warning.
    let c = parse(&format!(
        "{MIN}no-https: \"maybe\"\ninterruption-grace-period: soon\n\
         disconnect-after-idle-timeout: 0x10\nname: [a, b]\n"
    ))
    .expect("valid");
    assert!(!c.no_https);
    assert_eq!((c.idle_timeout, c.interruption_grace_period), (16, 0));
    assert_eq!(c.name.len(), 20, "random name");
    assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
    // Negative grace periods go to the server as they are.
    let c = parse(&format!("{MIN}interruption-grace-period: -5\n")).expect("valid");
    assert_eq!(c.interruption_grace_period, -5);
    // Names: only the length, or a URL.
    let c = parse(&format!("{MIN}name: has spaces in it\n")).expect("valid");
    assert_eq!(c.name, "has spaces in it");
    let url = "https://sts.amazonaws.com/?Action=GetCallerIdentity";
    assert_eq!(
        parse(&format!("{MIN}name: '{url}'\n")).expect("url").name,
        url
    );
    assert_eq!(parse(&format!("{MIN}name: /x\n")).expect("path").name, "/x");
}

#[test]
fn fatal_config_errors() {
    assert!(err(&format!("{MIN}log-level: debug\n")).contains("Unrecognized option 'log-level'"));
    assert!(err(&format!("{MIN}disconnect_after_job: true\n")).contains("disconnect_after_job"));
    assert!(err(&format!("{MIN}name:\n  first: x\n")).contains("'name.first'"));
    assert!(err(&format!("{MIN}disconnect-after-idle-timeout: -1\n")).contains("negative"));
    assert!(err(&format!("{MIN}kubernetes-pod-start-timeout: -1\n")).contains("negative"));
    assert!(err("token: t\n").contains("endpoint was not specified"));
    assert!(err("endpoint: 127.0.0.1:9\n").contains("token was not specified"));
    assert!(err("endpoint: 127.0.0.1:9\ntoken: ''\n").contains("token"));
    assert!(err("- a\n- b\n").contains("mapping"));
    assert!(err("endpoint: https://x.example\ntoken: t\n").contains("scheme"));
    assert!(err(&format!("{MIN}env-vars: [A=b=c]\n")).contains("A=b=c"));
    assert!(err(&format!("{MIN}env-vars: [NOVALUE]\n")).contains("NOVALUE"));
    assert!(err(&format!("{MIN}env-vars: [=x]\n")).contains("empty name"));
    assert!(err(&format!("{MIN}files: [nocolon]\n")).contains("nocolon"));
    assert!(err(&format!("{MIN}kubernetes-labels: [nolabel]\n")).contains("nolabel"));
    assert!(err(&format!("{MIN}upload-job-logs: sometimes\n")).contains("upload-job-logs"));
    assert!(err(&format!("{MIN}job-id: j\n")).contains("job-id"));
    assert!(err(&format!("{MIN}name: short\n")).contains("short"));
    assert!(err(&format!("{MIN}name: '{}'\n", "x".repeat(81))).contains("81"));
    assert!(parse("").is_err());
}

#[test]
fn env_overrides_every_key() {
    let env = |k: &str| match k {
        "SEMAPHORE_AGENT_NAME" => Some("from-env-name".to_string()),
        "SEMAPHORE_AGENT_NO_HTTPS" => Some("true".to_string()),
        "SEMAPHORE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT" => Some("42".to_string()),
        "SEMAPHORE_AGENT_ENV_VARS" => Some("X=1 Y=2".to_string()),
        "SEMAPHORE_AGENT_TOKEN" => Some(String::new()),
        _ => None,
    };
    let c = parse_config(
        &format!("{MIN}name: from-file-name\nenv-vars: [Z=3]\n"),
        &env,
    )
    .expect("valid");
    assert_eq!(c.name, "from-env-name");
    assert!(c.no_https);
    assert_eq!(c.idle_timeout, 42);
    assert_eq!(c.token, "t", "an empty variable does not override");
    assert_eq!(
        c.env_vars,
        vec![("X".into(), "1".into()), ("Y".into(), "2".into())]
    );
    // `yes` is YAML's, not strconv's: from the environment it reads as false.
    let env = |k: &str| (k == "SEMAPHORE_AGENT_DISCONNECT_AFTER_JOB").then(|| "yes".to_string());
    let c = parse_config(MIN, &env).expect("valid");
    assert!(!c.disconnect_after_job);
    assert_eq!(c.warnings.len(), 1);
    // name-from-env
    let env = |k: &str| (k == "MY_NAME").then(|| "named-by-env".to_string());
    let c = parse_config(&format!("{MIN}name-from-env: MY_NAME\n"), &env).expect("valid");
    assert_eq!(c.name, "named-by-env");
}

#[test]
fn go_formats() {
    assert_eq!(go_duration(Duration::from_millis(200)), "200ms");
    assert_eq!(go_duration(Duration::from_millis(4500)), "4.5s");
    assert_eq!(go_duration(Duration::from_secs(1)), "1s");
    assert_eq!(go_duration(Duration::from_secs(600)), "10m0s");
    assert_eq!(go_parse_int("300"), Some(300));
    assert_eq!(go_parse_int("300.00"), Some(300));
    assert_eq!(go_parse_int("010"), Some(8));
    assert_eq!(go_parse_int("-0x10"), Some(-16));
    assert_eq!(go_parse_int("abc"), None);
    assert_eq!(go_parse_int("1.5"), None);
    assert_eq!(shell_quote("a b'c"), "'a b'\"'\"'c'");
    assert_eq!(shell_quote("plain/path-1"), "plain/path-1");
    assert_eq!(shell_quote(""), "''");
}

#[test]
fn cli_args() {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        parse_args(&v(&["start", "--config-file", "/c.yaml"]))
            .ok()
            .as_deref(),
        Some("/c.yaml")
    );
    assert_eq!(
        parse_args(&v(&["start", "--config-file=/c.yaml"]))
            .ok()
            .as_deref(),
        Some("/c.yaml")
    );
    for bad in [
        &[][..],
        &["start"][..],
        &["start", "--config-file"][..],
        &["start", "--config-file="][..],
        &["start", "--config", "/c.yaml"][..],
        &["run", "--config-file", "/c.yaml"][..],
        &["start", "--config-file", "/c.yaml", "--name", "x"][..],
    ] {
        assert!(parse_args(&v(bad)).is_err(), "{bad:?}");
    }
}

#[test]
fn log_timestamp_is_go_layout() {
    assert_eq!(timestamp(UNIX_EPOCH), "Jan  1 00:00:00.000");
    let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    assert_eq!(timestamp(t), "Nov 14 22:13:20.123");
    let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
    assert_eq!(timestamp(t), "Feb 29 00:00:00.000");
}

#[test]
fn only_loopback() {
    assert!(loopback_host("127.0.0.1:8080"));
    assert!(loopback_host("127.1.2.3"));
    assert!(loopback_host("localhost:1"));
    assert!(loopback_host("[::1]:80"));
    assert!(!loopback_host("myorg.semaphoreci.com"));
    assert!(!loopback_host("10.0.0.1:80"));
}

// ------------------------------------------------ in-process protocol runs

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "fake-agent-{tag}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&d).expect("tmpdir");
    d
}

fn knobs() -> Knobs {
    Knobs {
        register_tries: 3,
        register_interval: Duration::from_millis(50),
        sync_timeout: Duration::from_secs(600),
        disconnect_tries: 2,
        disconnect_interval: Duration::from_millis(10),
        hook_sleep: Duration::ZERO,
        hook_hang: Duration::ZERO,
        log_cadence: LogCadence::FAST,
    }
}

struct Run {
    hub: Hub,
    dir: PathBuf,
    cfg: Config,
}

async fn setup(tag: &str, extra: &str) -> Run {
    let hub = Hub::start(HubOptions {
        next_sync_after_ms: 50,
        ..HubOptions::default()
    })
    .await
    .expect("hub");
    let dir = tmpdir(tag);
    let hook = dir.join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "echo \"$SEMAPHORE_AGENT_SHUTDOWN_REASON\" > {}\n",
            dir.join("hook.out").display()
        ),
    )
    .expect("hook");
    let cfg = parse(&format!(
        "endpoint: {}\ntoken: reg-token\nno-https: true\nname: agent-{tag}\n\
         shutdown-hook-path: {}\n{extra}",
        hub.endpoint(),
        hook.display()
    ))
    .expect("config");
    Run { hub, dir, cfg }
}

fn spawn_agent(
    run: &Run,
    knobs: Knobs,
) -> (mpsc::UnboundedSender<()>, tokio::task::JoinHandle<i32>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = tokio::spawn(run_agent(
        run.cfg.clone(),
        knobs,
        Arc::new(Notify::new()),
        rx,
    ));
    (tx, handle)
}

async fn finish(handle: tokio::task::JoinHandle<i32>) -> i32 {
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("agent finishes in time")
        .expect("agent task")
}

fn hook_reason(run: &Run) -> Option<String> {
    std::fs::read_to_string(run.dir.join("hook.out"))
        .ok()
        .map(|s| s.trim().to_string())
}

#[tokio::test]
async fn single_job_run_with_env_and_hook() {
    let run = setup(
        "single1",
        "disconnect-after-job: true\nenv-vars: [CFG_V=c]\n",
    )
    .await;
    let out = run.dir.join("job.out");
    let id = run.hub.enqueue_job(JobSpec {
        commands: vec![
            format!(
                "echo \"$CFG_V $JOB_V $SEMAPHORE_JOB_ID\" > {}",
                out.display()
            ),
            "test -z \"$FAKE_AGENT_CHILD\"".to_string(),
        ],
        env: vec![("JOB_V".into(), "j w".into())],
    });
    let (_tx, handle) = spawn_agent(&run, knobs());
    assert_eq!(finish(handle).await, 0);
    assert_eq!(
        std::fs::read_to_string(&out).expect("job output").trim(),
        format!("c j w {id}")
    );
    assert_eq!(hook_reason(&run).as_deref(), Some("JOB_FINISHED"));
    let job = run.hub.job(&id).expect("job");
    assert_eq!(
        (job.state, job.result.as_deref()),
        (JobState::Finished, Some("passed"))
    );
    let agents = run.hub.agents();
    assert_eq!(agents[0].disconnected.as_deref(), Some("job-finished"));
    assert!(agents[0].single_job);
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test]
async fn failed_job_then_idle_shutdown() {
    let run = setup("idle1", "disconnect-after-idle-timeout: 1\n").await;
    let id = run.hub.enqueue_job(JobSpec {
        commands: vec!["exit 3".into(), "echo not reached".into()],
        env: vec![],
    });
    let (_tx, handle) = spawn_agent(&run, knobs());
    assert_eq!(finish(handle).await, 0);
    assert_eq!(
        run.hub.job(&id).and_then(|j| j.result).as_deref(),
        Some("failed")
    );
    assert_eq!(hook_reason(&run).as_deref(), Some("IDLE"));
    assert_eq!(run.hub.agents()[0].disconnected.as_deref(), Some("idle"));
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test]
async fn interrupt_stops_a_running_job() {
    let run = setup("int1", "interruption-grace-period: 1\n").await;
    let id = run.hub.enqueue_job(JobSpec {
        commands: vec!["sleep 30".into()],
        env: vec![],
    });
    let (tx, handle) = spawn_agent(&run, knobs());
    let running = run
        .hub
        .wait_until(Duration::from_secs(10), |h| {
            h.job(&id).is_some_and(|j| j.state == JobState::Running)
        })
        .await;
    assert!(running);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    tx.send(()).expect("interrupt");
    tx.send(()).expect("second interrupt is ignored");
    assert_eq!(finish(handle).await, 0);
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "grace period honoured"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(
        run.hub.job(&id).and_then(|j| j.result).as_deref(),
        Some("stopped")
    );
    assert_eq!(hook_reason(&run).as_deref(), Some("INTERRUPTED"));
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test]
async fn unable_to_sync_exits_1() {
    let run = setup("nosync1", "").await;
    let mut k = knobs();
    k.sync_timeout = Duration::from_secs(1);
    let (_tx, handle) = spawn_agent(&run, k);
    assert!(
        run.hub
            .wait_until(Duration::from_secs(10), |h| h
                .agents()
                .first()
                .is_some_and(|a| a.syncs > 0))
            .await
    );
    run.hub.set_api_outage(true);
    assert_eq!(finish(handle).await, 1);
    assert_eq!(hook_reason(&run).as_deref(), Some("UNABLE_TO_SYNC"));
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test]
async fn several_jobs_then_requested() {
    let run = setup("multi1", "").await;
    let ids: Vec<String> = (0..3)
        .map(|i| {
            run.hub.enqueue_job(JobSpec {
                // `exit` would end the job's shell session: a subshell's exit status.
                commands: vec![format!("(exit {})", i % 2)],
                env: vec![],
            })
        })
        .collect();
    let (_tx, handle) = spawn_agent(&run, knobs());
    assert!(
        run.hub
            .wait_until(Duration::from_secs(15), |h| h
                .jobs()
                .iter()
                .all(|j| j.state == JobState::Finished))
            .await
    );
    let results: Vec<Option<String>> = ids
        .iter()
        .map(|id| run.hub.job(id).and_then(|j| j.result))
        .collect();
    assert_eq!(
        results,
        vec![
            Some("passed".to_string()),
            Some("failed".to_string()),
            Some("passed".to_string())
        ]
    );
    assert!(run.hub.disconnect_agent("agent-multi1"));
    assert_eq!(finish(handle).await, 0);
    assert_eq!(hook_reason(&run).as_deref(), Some("REQUESTED"));
    assert_eq!(run.hub.agents().len(), 1, "one registration for all jobs");
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test]
async fn failed_registration_exits_1_without_hook() {
    let run = setup("noreg1", "").await;
    run.hub.set_registration_token("rotated");
    let (_tx, handle) = spawn_agent(&run, knobs());
    assert_eq!(finish(handle).await, 1);
    assert_eq!(hook_reason(&run), None);
    assert!(run.hub.agents().is_empty());
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test]
async fn requested_disconnect_with_a_hanging_hook() {
    let run = setup("req1", "").await;
    let mut k = knobs();
    k.hook_sleep = Duration::from_secs(1);
    let (_tx, handle) = spawn_agent(&run, k);
    assert!(
        run.hub
            .wait_until(Duration::from_secs(10), |h| !h.live_agents().is_empty())
            .await
    );
    assert!(run.hub.disconnect_agent("agent-req1"));
    let t = Instant::now();
    assert_eq!(finish(handle).await, 0);
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert_eq!(hook_reason(&run).as_deref(), Some("REQUESTED"));
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test]
async fn a_hook_that_hangs_after_its_script_holds_the_exit() {
    let run = setup("hang1", "disconnect-after-idle-timeout: 1\n").await;
    let mut k = knobs();
    k.hook_hang = Duration::from_secs(2);
    let (_tx, handle) = spawn_agent(&run, k);
    let t = Instant::now();
    assert_eq!(finish(handle).await, 0);
    // The script ran (the reason is out) and then the hook hung.
    assert_eq!(hook_reason(&run).as_deref(), Some("IDLE"));
    assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test]
async fn job_output_reaches_the_hub() {
    let run = setup("logs1", "disconnect-after-job: true\n").await;
    let id = run.hub.enqueue_job(JobSpec {
        commands: vec![
            "echo one; echo two >&2".into(),
            "printf 'three\\nfour\\n'".into(),
        ],
        env: vec![],
    });
    let (_tx, handle) = spawn_agent(&run, knobs());
    assert_eq!(finish(handle).await, 0);
    let out = run.hub.job_output(&id);
    for line in ["one", "two", "three", "four"] {
        assert!(out.iter().any(|l| l == line), "{line} in {out:?}");
    }
    let pos = |l: &str| out.iter().position(|x| x == l);
    assert!(pos("three") < pos("four"), "in order: {out:?}");
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test]
async fn one_shell_session_epilogues_and_the_log() {
    let run = setup(
        "session1",
        "disconnect-after-job: true\nenv-vars: [CFG_V=c]\n",
    )
    .await;
    let id = run.hub.enqueue_job_with_epilogues(
        JobSpec {
            commands: vec![
                "export FROM_FIRST=seen; cd /".into(),
                "echo \"first: $FROM_FIRST in $PWD\"".into(),
                "false".into(),
                "echo not reached".into(),
            ],
            env: vec![("JOB_V".into(), "j w".into())],
        },
        Epilogues {
            epilogue_always_commands: vec!["echo \"always $SEMAPHORE_JOB_RESULT\"".into()],
            epilogue_on_pass_commands: vec!["echo on-pass".into()],
            epilogue_on_fail_commands: vec!["echo \"on-fail $FROM_FIRST\"".into()],
        },
    );
    let (_tx, handle) = spawn_agent(&run, knobs());
    assert_eq!(finish(handle).await, 0);
    let job = run.hub.job(&id).expect("job");
    assert_eq!(job.result.as_deref(), Some("failed"));
    assert_eq!(job.logged_result().as_deref(), Some("failed"));
    let out = &job.output;
    for line in [
        "Exporting CFG_V",
        "Exporting JOB_V",
        "Exporting SEMAPHORE_JOB_ID",
        "first: seen in /",
        "Exporting SEMAPHORE_JOB_RESULT",
        "always failed",
        "on-fail seen",
    ] {
        assert!(out.iter().any(|l| l == line), "{line} in {out:?}");
    }
    assert!(
        !out.iter().any(|l| l == "not reached" || l == "on-pass"),
        "{out:?}"
    );
    assert_eq!(
        job.logged_directives(),
        vec![
            "Exporting environment variables",
            "Injecting Files",
            "export FROM_FIRST=seen; cd /",
            "echo \"first: $FROM_FIRST in $PWD\"",
            "false",
            "Exporting environment variables",
            "echo \"always $SEMAPHORE_JOB_RESULT\"",
            "echo \"on-fail $FROM_FIRST\"",
        ]
    );
    assert_eq!(
        job.log_events.first().map(|e| e["event"].clone()),
        Some("job_started".into())
    );
    assert!(
        job.log_pushes.iter().all(|p| p.status == 200),
        "{:?}",
        job.log_pushes
    );
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test]
async fn exit_in_a_command_ends_the_shell() {
    let run = setup("exit1", "disconnect-after-job: true\n").await;
    let id = run.hub.enqueue_job_with_epilogues(
        JobSpec {
            commands: vec!["echo before; exit 0".into(), "echo after".into()],
            env: vec![],
        },
        Epilogues {
            epilogue_always_commands: vec!["echo epilogue".into()],
            ..Epilogues::default()
        },
    );
    let (_tx, handle) = spawn_agent(&run, knobs());
    assert_eq!(finish(handle).await, 0);
    let job = run.hub.job(&id).expect("job");
    assert_eq!(
        job.result.as_deref(),
        Some("failed"),
        "{:?}",
        job.log_events
    );
    assert!(job.output.iter().any(|l| l == "before"), "{:?}", job.output);
    assert!(!job.output.iter().any(|l| l == "after" || l == "epilogue"));
    let _ = std::fs::remove_dir_all(&run.dir);
}

#[tokio::test]
async fn log_token_refresh_and_log_space() {
    let run = setup("refresh1", "disconnect-after-job: true\n").await;
    run.hub.set_max_log_events(12);
    let id = run.hub.enqueue_job(JobSpec {
        commands: vec![
            "sleep 0.5; for i in $(seq 1 20); do echo line $i; done; sleep 0.5".into(),
            "echo last".into(),
        ],
        env: vec![],
    });
    let (_tx, handle) = spawn_agent(&run, knobs());
    assert!(
        run.hub
            .wait_until(Duration::from_secs(10), |h| h
                .job(&id)
                .is_some_and(|j| !j.log_events.is_empty()))
            .await
    );
    run.hub.expire_log_tokens();
    assert_eq!(finish(handle).await, 0);
    let job = run.hub.job(&id).expect("job");
    assert_eq!(job.result.as_deref(), Some("passed"));
    assert_eq!(job.log_token_refreshes, 1, "{:?}", job.log_pushes);
    assert!(job.log_trimmed);
    assert!(job.log_events.len() >= 12, "{}", job.log_events.len());
    assert!(
        job.logged_result().is_none(),
        "job_finished came after the 422"
    );
    let statuses: Vec<u16> = job.log_pushes.iter().map(|p| p.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.last(),
        Some(&422),
        "no push after the 422: {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 422).count(),
        1,
        "{statuses:?}"
    );
    let _ = std::fs::remove_dir_all(&run.dir);
}
