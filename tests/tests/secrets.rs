//! End-to-end: the registration token stays out of a job's reach and out of every log
//! (issue 6, part 6), with real `agent-supervisor` processes, the fake agent and hub.
//!
//! What these tests cover, and what they cannot:
//!
//! - **Covered**: `config.yaml` after registration (the supervisor rewrites it without
//!   the token; mode 0600 kept); everything under the instance's directory (work dir
//!   with config, hook script and socket, the supervisor's output as `supervisor.log`,
//!   the agent's log file, its events); the agent user's `$HOME`; the environment and
//!   command line of every process on the machine (`/proc/*/environ`, `/proc/*/cmdline`,
//!   the job's own `/proc/self/environ` among them); the job's output as the hub
//!   recorded it; the supervisor's and the agent's output. A job searches all of it with
//!   the token assembled inside its shell (so no command line or environment carries
//!   it), and positive controls (a canary in `$HOME`, one in its environment) prove the
//!   search finds what is there.
//! - **Not covered**: the rest of the host's file system (the tests run as root, so the
//!   "agent user" here can read everything, and other tests' beds share `/tmp`); the
//!   agent's memory (`/proc/<agent>/mem` — on Ubuntu, Yama's `ptrace_scope=1` keeps a
//!   job, a descendant, from reading its ancestors' memory); the job's working
//!   directory (the test crate's directory here); and SSM itself — a job on the host
//!   can reach IMDS and use the instance profile, which may read the token parameter
//!   (the same profile that gives jobs the S3 cache). That boundary is IAM and the
//!   network, not files, and is outside what this bed can model.

use agent_fleet_tests::bed::{eventually, Bed, TOKEN};
use agent_fleet_tests::fleet::Instance;
use agent_fleet_tests::hub::{JobSpec, JobState};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

type R = anyhow::Result<()>;

/// Canaries: planted where the job's search must find them (positive controls).
const HOME_CANARY: &str = "canary-home-3f9a1c";
const ENV_CANARY: &str = "canary-env-77b2e0";

/// `s` as `\xNN` escapes for bash's `printf '%b'`: a script that holds this has no copy
/// of `s` in its text (and so none in any command line).
fn hex_escaped(s: &str) -> String {
    s.bytes().map(|b| format!("\\x{b:02x}")).collect()
}

/// Every file under `dir` (not following symlinks).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

fn holds_token(path: &Path) -> bool {
    std::fs::read(path)
        .map(|b| b.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()))
        .unwrap_or(false)
}

/// The job's search (one bash script). It prints only paths and markers, never what it
/// looks for: `RACE`/`LEAK …` lines are failures, `CANARY …` and `CHECK …` lines are the
/// positive controls.
fn search_script(config: &Path, root: &Path) -> String {
    format!(
        r#"set +e
started_ns=$(date +%s%N)
tok=$(printf '%b' '{tok}')
can=$(printf '%b' '{can}')
can2=$(printf '%b' '{can2}')
pat() {{ printf '%s\n' "$1"; }}
cfg='{config}'
root='{root}'
# First, as early as a job can: the agent's config.
if [ -r "$cfg" ] && grep -q '^endpoint:' "$cfg"; then echo "CHECK config-readable"; fi
grep -qaF -f <(pat "$tok") "$cfg" && echo "RACE token-in-config"
echo "CHECK started_ns=$started_ns"
echo "CHECK files=$(find "$root" "$HOME" -type f 2>/dev/null | wc -l) procs=$(ls -d /proc/[0-9]* | wc -l)"
grep -rlaF -D skip -f <(pat "$tok") -- "$root" "$HOME" /tmp/agent_log 2>/dev/null | sed 's/^/LEAK file /'
grep -laF -f <(pat "$tok") /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | sed 's/^/LEAK proc /'
grep -qaF -f <(pat "$tok") /proc/self/environ && echo "LEAK self-environ"
env | grep -qF -f <(pat "$tok") && echo "LEAK env"
grep -rlaF -D skip -f <(pat "$can") -- "$root" "$HOME" 2>/dev/null | sed 's/^/CANARY file /'
grep -laF -f <(pat "$can2") /proc/self/environ /proc/$$/environ 2>/dev/null | sed 's/^/CANARY proc /'
echo "CHECK done"
true
"#,
        tok = hex_escaped(TOKEN),
        can = hex_escaped(HOME_CANARY),
        can2 = hex_escaped(ENV_CANARY),
        config = config.display(),
        root = root.display(),
    )
}

/// A job started by the agent's very first sync looks for the token everywhere the agent
/// user can look (see the module docs) and finds it nowhere; no log holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_finds_no_token_and_no_log_holds_it() -> R {
    let bed = Bed::start("secrets").await?;
    let group = "secrets-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let dir = bed.root.join(&id);
    let config = dir.join("work/config.yaml");
    let home = bed.root.join("home");
    std::fs::create_dir_all(&home)?;
    std::fs::write(home.join(".canary"), HOME_CANARY)?;
    let agent_log = dir.join("agent_log");

    // Queued before the agent exists: its first sync gets the job, so the job's first
    // look at the config races the supervisor's removal of the token.
    let job = bed.hub.enqueue_job(JobSpec {
        commands: vec![search_script(&config, &bed.root)],
        env: vec![("CANARY_ENV".into(), ENV_CANARY.into())],
    });
    let mut o = bed.instance(&id, group);
    o.env = vec![("HOME".into(), home.display().to_string())];
    o.agent_env = vec![(
        "SEMAPHORE_AGENT_LOG_FILE_PATH".into(),
        agent_log.display().to_string(),
    )];
    let inst = Instance::start(o, None).await?;

    let done = eventually(
        "the search job finished",
        Duration::from_secs(60),
        || async { bed.hub.job(&job).filter(|j| j.state == JobState::Finished) },
    )
    .await?;
    let out = bed.hub.job_output(&job);
    let text = out.join("\n");
    println!("the job's output:\n{text}");
    assert_eq!(done.result.as_deref(), Some("passed"), "{text}");
    // Positive controls first: the search works.
    assert!(out.iter().any(|l| l == "CHECK config-readable"), "{text}");
    assert!(out.iter().any(|l| l == "CHECK done"), "{text}");
    assert!(
        out.iter()
            .any(|l| l == &format!("CANARY file {}", home.join(".canary").display())),
        "the search must find the canary in $HOME: {text}"
    );
    assert!(
        out.iter().any(|l| l.starts_with("CANARY proc ")),
        "the search must find the canary in its own environment: {text}"
    );
    // Then: nothing found.
    let leaks: Vec<&String> = out
        .iter()
        .filter(|l| l.starts_with("LEAK") || l.starts_with("RACE"))
        .collect();
    assert!(leaks.is_empty(), "the job found the token: {leaks:?}");

    // The race's margin: the scrubbed config's mtime is when the token left it (the
    // kernel's coarse clock: a few ms of uncertainty).
    let started_ns: Option<i128> = out
        .iter()
        .find_map(|l| l.strip_prefix("CHECK started_ns="))
        .and_then(|v| v.trim().parse().ok());
    let meta = std::fs::metadata(&config)?;
    let scrubbed_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    if let Some(started) = started_ns {
        println!(
            "FIGURE token removed from config.yaml {:.1} ms before the first job's first command started",
            (started - scrubbed_ns) as f64 / 1e6
        );
    }
    let events = inst.agent_events();
    let at = |what: &str| {
        events
            .iter()
            .find(|e| e["event"] == what)
            .and_then(|e| e["mono_ns"].as_u64())
    };
    if let (Some(reg), Some(job_start)) = (at("registered"), at("job_started")) {
        println!(
            "FIGURE registration → job started on the agent: {:.1} ms (the window the removal must beat)",
            (job_start.saturating_sub(reg)) as f64 / 1e6
        );
    }

    // The config itself: private, no token, everything else still there.
    let cfg_text = std::fs::read_to_string(&config)?;
    assert!(!cfg_text.contains(TOKEN), "{cfg_text}");
    assert!(
        cfg_text.contains("# token: removed once the agent registered"),
        "{cfg_text}"
    );
    assert!(cfg_text.contains("shutdown-hook-path:"), "{cfg_text}");
    assert_eq!(meta.mode() & 0o777, 0o600, "config.yaml mode");

    // Logs: the supervisor's output (the agent's lines included), the agent's own log
    // file, its events, the job's recorded output — and, once more from outside, every
    // file of this bed.
    eventually(
        "the instance asked to terminate (JOB_FINISHED)",
        Duration::from_secs(30),
        || async {
            let calls = bed.moto.calls(0).await.ok()?;
            calls
                .iter()
                .any(|c| c.is("autoscaling", "TerminateInstanceInAutoScalingGroup"))
                .then_some(())
        },
    )
    .await?;
    let sup = inst.output();
    assert!(
        sup.contains("registration token removed from its config"),
        "{sup}"
    );
    assert!(
        !sup.contains(TOKEN),
        "supervisor output holds the token:\n{sup}"
    );
    let agent_text = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert!(
        agent_text.contains("Starting to poll for jobs"),
        "the agent's log file was written: {agent_text}"
    );
    assert!(!text.contains(TOKEN));
    let files = files_under(&bed.root);
    let holding: Vec<&PathBuf> = files.iter().filter(|p| holds_token(p)).collect();
    println!(
        "FIGURE files under the bed checked from outside: {} (none may hold the token)",
        files.len()
    );
    assert!(holding.is_empty(), "files holding the token: {holding:?}");
    Ok(())
}

/// The real agent's wrapper re-runs the agent in-process when its child dies from a
/// signal, reading `config.yaml` again. Once the token is gone from it, that re-run
/// cannot register a second agent behind the supervisor's back: it exits 1, the
/// supervisor counts a crash after registration, restarts the agent with backoff and
/// writes the token again; the new agent registers and the token leaves the file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_wrappers_rerun_cannot_register_and_the_supervisor_restarts() -> R {
    let bed = Bed::start("rerun").await?;
    let group = "rerun-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let config = bed.root.join(&id).join("work/config.yaml");
    let inst = Instance::start(bed.instance(&id, group), None).await?;
    eventually("registered", Duration::from_secs(20), || async {
        (!bed.hub.live_agents().is_empty()).then_some(())
    })
    .await?;
    eventually(
        "the token left config.yaml",
        Duration::from_secs(5),
        || async {
            std::fs::read_to_string(&config)
                .ok()
                .filter(|t| !t.contains(TOKEN) && t.contains("endpoint:"))
        },
    )
    .await?;

    // Kill the agent's child (not the wrapper), as an OOM kill would.
    let child = inst
        .agent_events()
        .iter()
        .find(|e| e["event"] == "child_start" && e["role"] == "child")
        .and_then(|e| e["pid"].as_i64())
        .ok_or_else(|| anyhow::anyhow!("no child_start event"))?;
    let child = i32::try_from(child)?;
    kill(Pid::from_raw(child), Signal::SIGKILL)?;

    let events = inst
        .wait_for_event(
            "the wrapper's re-run exited",
            Duration::from_secs(10),
            |e| e.iter().any(|e| e["event"] == "exit"),
        )
        .await?;
    assert!(
        events.iter().any(|e| e["event"] == "rerun"),
        "the wrapper re-ran the agent: {events:?}"
    );
    let exit = events
        .iter()
        .find(|e| e["event"] == "exit")
        .and_then(|e| e["code"].as_i64());
    assert_eq!(
        exit,
        Some(1),
        "the re-run finds no token and exits 1: {events:?}"
    );
    let wrapper = events
        .iter()
        .find(|e| e["event"] == "start")
        .and_then(|e| e["pid"].as_i64());
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "registered" && e["pid"].as_i64() == wrapper),
        "the wrapper's re-run did not register: {events:?}"
    );
    let line = inst
        .wait_for_line("agent exited unexpectedly", Duration::from_secs(5))
        .await?;
    assert!(line.contains("exit code 1"), "{line}");

    // The supervisor's restart registers a new agent, and the token leaves again.
    inst.wait_for_event(
        "the supervisor started the agent again",
        Duration::from_secs(15),
        |e| e.iter().filter(|e| e["event"] == "start").count() == 2,
    )
    .await?;
    eventually(
        "the restarted agent registered",
        Duration::from_secs(20),
        || async {
            let agents = bed.hub.agents();
            (agents.len() == 2 && agents[1].disconnected.is_none()).then_some(())
        },
    )
    .await?;
    eventually(
        "the token left config.yaml again",
        Duration::from_secs(5),
        || async {
            std::fs::read_to_string(&config)
                .ok()
                .filter(|t| !t.contains(TOKEN) && t.contains("endpoint:"))
        },
    )
    .await?;
    let agents = bed.hub.agents();
    assert_eq!(
        agents.len(),
        2,
        "two registrations: the first and the supervisor's restart — none by the wrapper: {agents:?}"
    );
    let calls = bed.moto.calls(0).await?;
    assert!(
        !calls
            .iter()
            .any(|c| c.is("autoscaling", "TerminateInstanceInAutoScalingGroup")),
        "one crash does not replace the instance"
    );
    assert!(!inst.output().contains(TOKEN));
    Ok(())
}
