//! End-to-end: the supervisor as a systemd `Type=notify` service. Each test binds the
//! notification socket systemd would (a Unix datagram socket named by `NOTIFY_SOCKET`),
//! runs a real `agent-supervisor` against moto, a fake IMDS, the fake hub and the fake
//! agent, and reads what it announces: `READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`.
//! The agent-role test also checks the boot timing, in the log and in CloudWatch.

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::Instance;
use agent_fleet_tests::hub::{JobSpec, JobState};
use agent_fleet_tests::moto::monotonic_ns;
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type R = anyhow::Result<()>;

/// What systemd would receive: each datagram with its CLOCK_MONOTONIC arrival.
struct NotifySocket {
    path: PathBuf,
    got: Arc<Mutex<Vec<(u64, String)>>>,
    /// What `on_ready` said the moment `READY=1` arrived.
    at_ready: Arc<Mutex<Option<bool>>>,
    task: tokio::task::JoinHandle<()>,
}

impl NotifySocket {
    /// Binds `<dir>/notify.sock`; `on_ready` runs as soon as a `READY=1` arrives.
    fn bind(dir: &Path, on_ready: impl Fn() -> bool + Send + 'static) -> anyhow::Result<Self> {
        let path = dir.join("notify.sock");
        let sock = tokio::net::UnixDatagram::bind(&path)?;
        let got = Arc::new(Mutex::new(Vec::new()));
        let at_ready = Arc::new(Mutex::new(None));
        let (sink, ready_sink) = (got.clone(), at_ready.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf).await {
                let at = monotonic_ns();
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == "READY=1") {
                    if let Ok(mut r) = ready_sink.lock() {
                        r.get_or_insert(on_ready());
                    }
                }
                if let Ok(mut g) = sink.lock() {
                    g.push((at, msg));
                }
            }
        });
        Ok(Self {
            path,
            got,
            at_ready,
            task,
        })
    }

    fn env(&self, watchdog_usec: Option<&str>) -> Vec<(String, String)> {
        let mut env = vec![("NOTIFY_SOCKET".to_string(), self.path.display().to_string())];
        if let Some(usec) = watchdog_usec {
            env.push(("WATCHDOG_USEC".into(), usec.into()));
        }
        env
    }

    fn messages(&self) -> Vec<(u64, String)> {
        self.got.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Arrival times of datagrams that assign `key=value`.
    fn times_of(&self, assignment: &str) -> Vec<u64> {
        self.messages()
            .into_iter()
            .filter(|(_, m)| m.lines().any(|l| l == assignment))
            .map(|(t, _)| t)
            .collect()
    }

    fn statuses(&self) -> Vec<String> {
        self.messages()
            .iter()
            .flat_map(|(_, m)| {
                m.lines()
                    .filter_map(|l| l.strip_prefix("STATUS=").map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Waits for a datagram containing `needle`; returns it with its arrival.
    async fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<(u64, String)> {
        eventually(
            &format!("a notification with {needle:?}"),
            timeout,
            || async {
                self.messages()
                    .into_iter()
                    .find(|(_, m)| m.contains(needle))
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}; got: {:?}", self.messages()))
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a live process runs `… start --config-file <config>` (the agent of one
/// simulated instance: each has its own work dir).
fn agent_running(config: &Path) -> bool {
    let want = config.display().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.get(1) == Some(&&b"start"[..]) && args.contains(&want.as_bytes())
        })
}

/// `name=value` fields of a supervisor log line (quotes stripped).
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

fn ms(f: &BTreeMap<String, String>, key: &str) -> anyhow::Result<u64> {
    f.get(key)
        .ok_or_else(|| anyhow::anyhow!("no {key} in {f:?}"))?
        .parse()
        .map_err(|e| anyhow::anyhow!("{key}: {e}"))
}

const PHASES: [&str; 6] = [
    "launch_to_start_ms",
    "start_to_config_ms",
    "config_to_token_ms",
    "token_to_spawn_ms",
    "spawn_to_registered_ms",
    "registered_to_job_ms",
];

/// The `Phase` dimension values of `BootPhaseMs` in the emulator's CloudWatch.
async fn boot_phases_in_cloudwatch(bed: &Bed) -> anyhow::Result<Vec<String>> {
    let body = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .post(bed.moto.endpoint())
        .header(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/monitoring/aws4_request, \
             SignedHeaders=host, Signature=0",
        )
        .form(&[
            ("Action", "ListMetrics"),
            ("Version", "2010-08-01"),
            ("Namespace", "Semaphore"),
            ("MetricName", "BootPhaseMs"),
        ])
        .send()
        .await?
        .text()
        .await?;
    // <Dimensions><member><Name>Phase</Name><Value>launch_to_start</Value></member>…
    let mut phases: Vec<String> = body
        .split("<Name>Phase</Name>")
        .skip(1)
        .filter_map(|rest| {
            let v = rest.split_once("<Value>")?.1;
            Some(v.split_once("</Value>")?.0.to_string())
        })
        .collect();
    phases.sort();
    Ok(phases)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_role_is_ready_once_the_agent_runs_feeds_the_watchdog_and_says_stopping() -> R {
    let bed = Bed::start("sdnotify").await?;
    let group = "sdnotify-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    let mut cfg = bed.runtime_config(group);
    cfg.interruption_grace_secs = 2;
    // No election: the only CloudWatch data is then the boot timing.
    cfg.scaler.enabled = false;
    bed.put_config(&cfg).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let config_yaml = bed.root.join(&id).join("work/config.yaml");
    let notify = NotifySocket::bind(&bed.root, move || agent_running(&config_yaml))?;
    let mut o = bed.instance(&id, group);
    o.env = notify.env(Some("1000000")); // WatchdogSec=1s: a ping every 500 ms
    let launched_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64 - 42_000;
    o.launch_time_unix_ms = Some(launched_ms);
    let inst = Instance::start(o, None).await?;

    // READY=1 once the agent process runs, with a status naming it.
    let (ready_ns, ready) = notify.wait_for("READY=1", Duration::from_secs(30)).await?;
    assert!(
        ready.contains(&format!("STATUS=agent running (agent name {id}__")),
        "{ready:?}"
    );
    assert_eq!(
        *notify.at_ready.lock().map_err(|e| anyhow::anyhow!("{e}"))?,
        Some(true),
        "READY=1 came before the agent process ran"
    );
    assert_eq!(notify.times_of("READY=1").len(), 1);

    eventually("agent registered", Duration::from_secs(20), || async {
        (!bed.hub.live_agents().is_empty()).then_some(())
    })
    .await?;
    notify
        .wait_for("waiting for jobs", Duration::from_secs(10))
        .await?;
    let env_file = bed.root.join("job-env.txt");
    let job = bed.hub.enqueue_job(JobSpec {
        commands: vec![format!("env > {}; sleep 60", env_file.display())],
        env: vec![],
    });
    eventually("job running", Duration::from_secs(20), || async {
        bed.hub.job(&job).filter(|j| j.state == JobState::Running)
    })
    .await?;
    notify
        .wait_for(&format!(", job {job}"), Duration::from_secs(10))
        .await?;

    // Boot timing: one line at registration, one at the first job with every phase.
    let line = eventually(
        "the first-job boot timing line",
        Duration::from_secs(10),
        || async {
            inst.output()
                .lines()
                .find(|l| l.contains("boot timing") && l.contains("first_job"))
                .map(str::to_string)
        },
    )
    .await?;
    let f = fields(&line);
    let phases: Vec<u64> = PHASES
        .iter()
        .map(|p| ms(&f, p))
        .collect::<anyhow::Result<_>>()?;
    let total = ms(&f, "launch_to_job_ms")?;
    // pendingTime has whole seconds: the launch looks up to 1 s earlier than it was.
    assert!(
        (42_000..44_500).contains(&phases[0]),
        "launch_to_start {line}"
    );
    let sum: u64 = phases.iter().sum();
    assert!(
        total >= sum && total - sum <= PHASES.len() as u64,
        "phases add up to the total: {sum} vs {total}: {line}"
    );
    let registered_line = inst
        .wait_for_line("boot timing", Duration::from_secs(1))
        .await?;
    assert!(
        registered_line.contains("registered") && !registered_line.contains("registered_to_job"),
        "{registered_line}"
    );
    println!("BOOT fake environment: {line}");

    // The watchdog is fed every WATCHDOG_USEC / 2 all along.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pings: Vec<u64> = notify
        .times_of("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t >= ready_ns)
        .collect();
    // At least one per WatchdogSec (else systemd would have killed it), and no more than
    // one per half of it (no busy loop).
    let window_ms = (monotonic_ns() - ready_ns) / 1_000_000;
    let n = pings.len() as u64;
    assert!(
        n >= window_ms / 1000 && n <= window_ms / 500 + 2,
        "{n} pings in {window_ms} ms"
    );
    let max_gap_ms = pings
        .windows(2)
        .map(|w| (w[1] - w[0]) / 1_000_000)
        .max()
        .unwrap_or(0);
    assert!(
        max_gap_ms < 1000,
        "a ping gap of {max_gap_ms} ms: systemd's watchdog (1 s) would have fired"
    );
    println!("WATCHDOG: {n} pings in {window_ms} ms, longest gap {max_gap_ms} ms");

    // SIGTERM: STOPPING=1 at once, then the drain.
    let t0 = monotonic_ns();
    inst.signal(Signal::SIGTERM);
    let (stop_ns, stopping) = notify
        .wait_for("STOPPING=1", Duration::from_secs(5))
        .await?;
    assert!(stop_ns - t0 < 1_000_000_000, "STOPPING=1 was late");
    assert!(stopping.contains("STATUS=draining"), "{stopping:?}");
    let status = inst.wait_exit(Duration::from_secs(20)).await?;
    assert_eq!(status.code(), Some(0), "{}", inst.output());

    // Nothing of systemd's reaches the agent or its jobs.
    let job_env = std::fs::read_to_string(&env_file)?;
    assert!(job_env.contains("PATH="), "{job_env}");
    for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        assert!(
            !job_env.contains(var),
            "{var} leaked into the job: {job_env}"
        );
    }

    // Every phase was published once to CloudWatch.
    let published = eventually(
        "boot phases in CloudWatch",
        Duration::from_secs(10),
        || async {
            boot_phases_in_cloudwatch(&bed)
                .await
                .ok()
                .filter(|p| p.len() >= 8)
        },
    )
    .await?;
    assert_eq!(
        published,
        [
            "config_to_token",
            "launch_to_job",
            "launch_to_registered",
            "launch_to_start",
            "registered_to_job",
            "spawn_to_registered",
            "start_to_config",
            "token_to_spawn"
        ]
    );
    println!("STATUS lines: {:?}", notify.statuses());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaler_role_is_ready_once_standing_for_leader_and_a_foreign_watchdog_is_ignored() -> R {
    let bed = Bed::start("sdscaler").await?;
    let group = "sdscaler-agents";
    bed.moto.create_group(group, 0, 2, 0).await?;
    let cfg = bed.fast_runtime_config(group);
    bed.put_config(&cfg).await?;
    let notify = NotifySocket::bind(&bed.root, || true)?;
    let mut o = bed.instance("i-0sdscaler000001", group);
    o.args = vec!["--role".into(), "scaler".into()];
    o.env = notify.env(Some("200000"));
    // The watchdog is another process's (sd_watchdog_enabled): no pings from us.
    o.env.push(("WATCHDOG_PID".into(), "1".into()));
    let inst = Instance::start(o, None).await?;

    let (_, ready) = notify.wait_for("READY=1", Duration::from_secs(30)).await?;
    assert!(
        ready.contains("STATUS=scaler-only role: standing for leader"),
        "{ready:?}"
    );
    let t0 = Instant::now();
    notify
        .wait_for(
            "STATUS=scaler-only role: fleet leader, term 1",
            Duration::from_secs(20),
        )
        .await?;
    println!("leader status after {:?}", t0.elapsed());

    inst.signal(Signal::SIGTERM);
    let (_, stopping) = notify
        .wait_for("STOPPING=1", Duration::from_secs(5))
        .await?;
    assert!(stopping.contains("handing leadership on"), "{stopping:?}");
    let status = inst.wait_exit(Duration::from_secs(20)).await?;
    assert_eq!(status.code(), Some(0), "{}", inst.output());
    assert!(
        notify.times_of("WATCHDOG=1").is_empty(),
        "pinged a watchdog meant for pid 1: {:?}",
        notify.messages()
    );
    Ok(())
}
