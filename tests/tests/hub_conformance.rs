//! Conformance of the fakes: the REAL Semaphore agent (`shared/real-agent`, found with
//! [`real_agent`]) and the fake agent (`tests/src/bin/agent/`) run directly — no
//! supervisor — against the fake hub, through the same checks. What the real agent
//! does here is what the fake hub must accept and the fake agent must do:
//! registration, a job's commands in one shell session (an `export` seen by the next
//! command), a failing command failing the job (the rest skipped, the on-fail epilogue
//! run), job logs pushed as JSON events with `start_from` (none twice), an expired log
//! token refreshed (`POST /refresh`), a used-up log space (422: no more pushes, the job
//! still finishes), the server's idle shutdown with its reason, the real 4–6 s sync
//! interval, and a SIGTERM before registration (the wrapper runs the agent again).
//!
//! Each test runs the fake, then the real agent (each against its own hub); without a
//! real agent the real half prints [`real_agent_skip_line`] and is skipped. Every agent
//! gets its own directory: its `config.yaml`, `SEMAPHORE_AGENT_LOG_FILE_PATH`, `TMPDIR`
//! (the real agent's job files), its shutdown hook's output. Its process group is
//! killed at the end.

use agent_fleet_tests::bed::eventually;
use agent_fleet_tests::fleet::{bin_dir, real_agent, real_agent_skip_line};
use agent_fleet_tests::hub::{Epilogues, Hub, HubOptions, JobInfo, JobSpec, JobState};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

type R = anyhow::Result<()>;

/// The agents to check: the fake always, the real one when there is one.
fn agents(test: &str) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let mut v = vec![("fake", bin_dir()?.join("agent"))];
    match real_agent()? {
        Some(p) => v.push(("real", p)),
        None => println!("{}", real_agent_skip_line(test)),
    }
    Ok(v)
}

/// An agent process (the wrapper, leader of its own process group).
struct Agent {
    child: tokio::process::Child,
    pgid: Option<Pid>,
    dir: PathBuf,
    out: Arc<Mutex<String>>,
    label: &'static str,
}

impl Agent {
    /// Starts `bin` against `hub` with `extra` config lines.
    async fn start(
        label: &'static str,
        bin: &Path,
        hub: &Hub,
        test: &str,
        extra: &str,
    ) -> anyhow::Result<Agent> {
        let dir = std::env::temp_dir().join(format!(
            "hub-conformance-{test}-{label}-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(dir.join("tmp"))?;
        let hook = dir.join("hook.sh");
        std::fs::write(
            &hook,
            format!(
                "echo \"$SEMAPHORE_AGENT_SHUTDOWN_REASON\" > {}\n",
                dir.join("hook.out").display()
            ),
        )?;
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "endpoint: {}\ntoken: reg-token\nno-https: true\nname: {label}-{test}-agent\n\
                 shutdown-hook-path: {}\nupload-job-logs: never\n{extra}",
                hub.endpoint(),
                hook.display()
            ),
        )?;
        let mut child = tokio::process::Command::new(bin)
            .arg("start")
            .arg("--config-file")
            .arg(&config)
            .env("SEMAPHORE_AGENT_LOG_FILE_PATH", dir.join("agent_log"))
            .env("TMPDIR", dir.join("tmp"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw);
        let out = Arc::new(Mutex::new(String::new()));
        let streams: [Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>; 2] = [
            child.stdout.take().map(|s| Box::new(s) as _),
            child.stderr.take().map(|s| Box::new(s) as _),
        ];
        for s in streams.into_iter().flatten() {
            let out = out.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(s).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                    o.push_str(&l);
                    o.push('\n');
                }
            });
        }
        Ok(Agent {
            child,
            pgid,
            dir,
            out,
            label,
        })
    }

    fn output(&self) -> String {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn pid(&self) -> Option<i64> {
        self.pgid.map(|p| i64::from(p.as_raw()))
    }

    fn hook_reason(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("hook.out"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(st) => Ok(st?),
            Err(_) => anyhow::bail!(
                "{} agent still running after {timeout:?}:\n{}",
                self.label,
                self.output()
            ),
        }
    }

    fn signal_group(&self, sig: Signal) {
        if let Some(pg) = self.pgid {
            let _ = killpg(pg, sig);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.signal_group(Signal::SIGKILL);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn finished(hub: &Hub, id: &str, timeout: Duration) -> anyhow::Result<JobInfo> {
    eventually("the job finished", timeout, || async {
        hub.job(id).filter(|j| j.state == JobState::Finished)
    })
    .await
}

/// Every push that got a 200 started where the stored log ended: no event twice, no
/// gap; the events stored are exactly the ones appended.
fn assert_log_whole(label: &str, job: &JobInfo) {
    let mut have = 0u64;
    for p in &job.log_pushes {
        if p.status == 200 {
            assert!(
                p.start_from.is_some_and(|s| s <= have),
                "{label}: push past the stored log: {:?}",
                job.log_pushes
            );
            have += p.appended;
        }
    }
    assert_eq!(have, job.log_events.len() as u64, "{label}");
    assert!(
        job.log_pushes.iter().all(|p| p.start_from.is_some()),
        "{label}: {:?}",
        job.log_pushes
    );
}

fn has(out: &[String], line: &str) -> bool {
    out.iter().any(|l| l == line)
}

/// Registration; a job whose commands share one shell (an `export` is seen by the next
/// command), with env vars from the job and the config and an epilogue; its log as
/// JSON events with `start_from`; a single-job agent's shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_in_one_shell_session_and_its_log_arrives_whole() -> R {
    let test = "session";
    for (label, bin) in agents(test)? {
        let hub = Hub::start(HubOptions::default()).await?;
        let id = hub.enqueue_job_with_epilogues(
            JobSpec {
                commands: vec![
                    "export FROM_FIRST=exported-by-the-first-command".into(),
                    "echo \"seen: $FROM_FIRST $CFG_V $JOB_V\"".into(),
                    "for i in 1 2 3; do echo \"line $i\"; done".into(),
                ],
                env: vec![("JOB_V".into(), "job value".into())],
            },
            Epilogues {
                epilogue_always_commands: vec!["echo \"epilogue: $SEMAPHORE_JOB_RESULT\"".into()],
                epilogue_on_pass_commands: vec!["echo on-pass".into()],
                epilogue_on_fail_commands: vec!["echo on-fail".into()],
            },
        );
        let mut agent = Agent::start(
            label,
            &bin,
            &hub,
            test,
            "disconnect-after-job: true\nenv-vars: [CFG_V=config-value]\n",
        )
        .await?;
        let job = finished(&hub, &id, Duration::from_secs(60)).await?;
        let status = agent.wait_exit(Duration::from_secs(30)).await?;
        let text = agent.output();
        let out = &job.output;
        assert_eq!(job.result.as_deref(), Some("passed"), "{label}: {out:?}");
        assert_eq!(job.logged_result().as_deref(), Some("passed"), "{label}");
        for line in [
            "seen: exported-by-the-first-command config-value job value",
            "line 1",
            "line 3",
            "Exporting CFG_V",
            "Exporting JOB_V",
            "Exporting SEMAPHORE_JOB_ID",
            "Exporting SEMAPHORE_JOB_RESULT",
            "epilogue: passed",
            "on-pass",
        ] {
            assert!(has(out, line), "{label}: {line:?} in {out:?}");
        }
        assert!(!has(out, "on-fail"), "{label}: {out:?}");
        let directives = job.logged_directives();
        for d in [
            "Exporting environment variables",
            "Injecting Files",
            "export FROM_FIRST=exported-by-the-first-command",
            "echo on-pass",
        ] {
            assert!(
                directives.iter().any(|x| x == d),
                "{label}: {d} in {directives:?}"
            );
        }
        assert_eq!(
            job.log_events.first().map(|e| e["event"].clone()),
            Some("job_started".into()),
            "{label}"
        );
        assert_log_whole(label, &job);
        assert!(
            job.log_pushes.iter().all(|p| p.status == 200),
            "{label}: {:?}",
            job.log_pushes
        );

        let a = &hub.agents()[0];
        assert_eq!(a.name, format!("{label}-{test}-agent"));
        assert!(a.single_job, "{label}");
        assert_eq!(a.disconnected.as_deref(), Some("job-finished"), "{label}");
        assert_eq!(status.code(), Some(0), "{label}:\n{text}");
        assert_eq!(agent.hook_reason().as_deref(), Some("JOB_FINISHED"));
        for line in [
            "Starting to poll for jobs",
            &format!("SYNC response (action: run-job, job: {id})"),
            "Agent shutdown requested by Semaphore due to: job-finished",
            "Disconnecting the Agent from Semaphore",
            "Agent shutting down due to: JOB_FINISHED",
        ] {
            assert!(text.contains(line), "{label}: {line:?} in:\n{text}");
        }
        assert!(
            !text.contains("Agent has been idle for the past"),
            "{label}: the real agent never says that"
        );
    }
    Ok(())
}

/// A failing command fails the job: the commands after it do not run, the on-fail
/// epilogue does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_fails_the_job() -> R {
    let test = "failing";
    for (label, bin) in agents(test)? {
        let hub = Hub::start(HubOptions::default()).await?;
        let id = hub.enqueue_job_with_epilogues(
            JobSpec {
                commands: vec![
                    "echo before".into(),
                    "false".into(),
                    "echo not-reached".into(),
                ],
                env: vec![],
            },
            Epilogues {
                epilogue_on_pass_commands: vec!["echo on-pass".into()],
                epilogue_on_fail_commands: vec!["echo \"on-fail $SEMAPHORE_JOB_RESULT\"".into()],
                ..Epilogues::default()
            },
        );
        let mut agent =
            Agent::start(label, &bin, &hub, test, "disconnect-after-job: true\n").await?;
        let job = finished(&hub, &id, Duration::from_secs(60)).await?;
        let status = agent.wait_exit(Duration::from_secs(30)).await?;
        let out = &job.output;
        assert_eq!(job.result.as_deref(), Some("failed"), "{label}: {out:?}");
        assert_eq!(job.logged_result().as_deref(), Some("failed"), "{label}");
        assert!(
            has(out, "before") && has(out, "on-fail failed"),
            "{label}: {out:?}"
        );
        assert!(
            !has(out, "not-reached") && !has(out, "on-pass"),
            "{label}: {out:?}"
        );
        let codes: Vec<i64> = job
            .log_events
            .iter()
            .filter(|e| e["event"] == "cmd_finished" && e["directive"] == "false")
            .filter_map(|e| e["exit_code"].as_i64())
            .collect();
        assert_eq!(codes, vec![1], "{label}");
        assert_eq!(status.code(), Some(0), "{label}");
    }
    Ok(())
}

/// An expired log token: the push gets 401, the agent calls `POST /refresh` and pushes
/// again with the new token; the log still arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_log_token_is_refreshed_and_the_log_still_arrives() -> R {
    let test = "refresh";
    for (label, bin) in agents(test)? {
        let hub = Hub::start(HubOptions::default()).await?;
        let id = hub.enqueue_job(JobSpec {
            commands: vec![
                "echo before-expiry".into(),
                "sleep 5".into(),
                "echo after-expiry".into(),
            ],
            env: vec![],
        });
        let mut agent =
            Agent::start(label, &bin, &hub, test, "disconnect-after-job: true\n").await?;
        eventually("the first log push", Duration::from_secs(30), || async {
            hub.job(&id)
                .filter(|j| j.log_pushes.iter().any(|p| p.status == 200))
        })
        .await?;
        hub.expire_log_tokens();
        let job = finished(&hub, &id, Duration::from_secs(60)).await?;
        agent.wait_exit(Duration::from_secs(30)).await?;
        let statuses: Vec<u16> = job.log_pushes.iter().map(|p| p.status).collect();
        assert!(statuses.contains(&401), "{label}: {statuses:?}");
        assert!(job.log_token_refreshes >= 1, "{label}: {statuses:?}");
        assert_eq!(statuses.last(), Some(&200), "{label}: {statuses:?}");
        assert!(
            has(&job.output, "before-expiry") && has(&job.output, "after-expiry"),
            "{label}: {:?}",
            job.output
        );
        assert_eq!(job.logged_result().as_deref(), Some("passed"), "{label}");
        assert_log_whole(label, &job);
        let text = agent.output();
        assert!(
            text.contains("Successfully refreshed token for current job logs."),
            "{label}:\n{text}"
        );
    }
    Ok(())
}

/// The log space used up: the push after the limit gets 422, the agent pushes no more,
/// and the job still finishes (passed, reported to the hub).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_log_space_stops_the_pushes_not_the_job() -> R {
    let test = "logspace";
    for (label, bin) in agents(test)? {
        let hub = Hub::start(HubOptions {
            max_log_events_per_job: 8,
            ..HubOptions::default()
        })
        .await?;
        let id = hub.enqueue_job(JobSpec {
            commands: vec![
                "for i in $(seq 1 30); do echo \"line $i\"; done".into(),
                "sleep 4".into(),
                "echo late".into(),
            ],
            env: vec![],
        });
        let mut agent =
            Agent::start(label, &bin, &hub, test, "disconnect-after-job: true\n").await?;
        let job = finished(&hub, &id, Duration::from_secs(60)).await?;
        agent.wait_exit(Duration::from_secs(30)).await?;
        // Nothing more arrives after the job was reported.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let job = hub.job(&id).unwrap_or(job);
        let statuses: Vec<u16> = job.log_pushes.iter().map(|p| p.status).collect();
        assert_eq!(job.result.as_deref(), Some("passed"), "{label}");
        assert!(job.log_trimmed, "{label}: {statuses:?}");
        assert_eq!(
            statuses.iter().filter(|s| **s == 422).count(),
            1,
            "{label}: one 422, then no more pushes: {statuses:?}"
        );
        assert_eq!(statuses.last(), Some(&422), "{label}: {statuses:?}");
        assert!(!has(&job.output, "late"), "{label}: {:?}", job.output);
        assert!(job.logged_result().is_none(), "{label}");
        assert_log_whole(label, &job);
    }
    Ok(())
}

/// The server's idle shutdown: reason `idle`, the hook gets `IDLE`, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_is_shut_down_with_its_reason() -> R {
    let test = "idle";
    for (label, bin) in agents(test)? {
        let hub = Hub::start(HubOptions::default()).await?;
        let t = Instant::now();
        let mut agent = Agent::start(
            label,
            &bin,
            &hub,
            test,
            "disconnect-after-idle-timeout: \"1\"\ninterruption-grace-period: 30\n",
        )
        .await?;
        let status = agent.wait_exit(Duration::from_secs(30)).await?;
        let text = agent.output();
        assert_eq!(status.code(), Some(0), "{label}:\n{text}");
        assert!(t.elapsed() >= Duration::from_secs(1), "{label}");
        assert_eq!(agent.hook_reason().as_deref(), Some("IDLE"), "{label}");
        let a = &hub.agents()[0];
        assert_eq!(a.idle_timeout, 1, "{label}: a quoted number is read as one");
        assert_eq!(a.interruption_grace_period, 30, "{label}");
        assert_eq!(a.disconnected.as_deref(), Some("idle"), "{label}");
        for line in [
            "Agent shutdown requested by Semaphore due to: idle",
            "Agent shutting down due to: IDLE",
        ] {
            assert!(text.contains(line), "{label}: {line:?} in:\n{text}");
        }
    }
    Ok(())
}

/// The real server's sync interval, a random 4–6 s per answer: the agent keeps to it
/// and still runs a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_sync_interval_works() -> R {
    let test = "realsync";
    for (label, bin) in agents(test)? {
        let hub = Hub::start(HubOptions::real_sync()).await?;
        let mut agent =
            Agent::start(label, &bin, &hub, test, "disconnect-after-job: true\n").await?;
        let first = eventually("the first sync", Duration::from_secs(30), || async {
            hub.agents()
                .first()
                .filter(|a| a.syncs >= 1)
                .map(|_| Instant::now())
        })
        .await?;
        eventually("the third sync", Duration::from_secs(20), || async {
            hub.agents().first().filter(|a| a.syncs >= 3).map(|_| ())
        })
        .await?;
        let took = first.elapsed();
        assert!(
            took >= Duration::from_millis(7_500) && took <= Duration::from_millis(13_000),
            "{label}: two syncs took {took:?}"
        );
        let id = hub.enqueue_job(JobSpec {
            commands: vec!["echo slow sync".into()],
            env: vec![],
        });
        let job = finished(&hub, &id, Duration::from_secs(30)).await?;
        assert_eq!(job.result.as_deref(), Some("passed"), "{label}");
        assert!(has(&job.output, "slow sync"), "{label}: {:?}", job.output);
        let status = agent.wait_exit(Duration::from_secs(20)).await?;
        assert_eq!(status.code(), Some(0), "{label}");
    }
    Ok(())
}

/// A SIGTERM to the agent's group before it registered kills the agent process; the
/// wrapper runs the agent again in its own process, which registers from attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_before_registration_makes_the_wrapper_run_the_agent_again() -> R {
    let test = "rerun";
    for (label, bin) in agents(test)? {
        let hub = Hub::start(HubOptions::default()).await?;
        hub.set_api_outage(true);
        let agent = Agent::start(label, &bin, &hub, test, "").await?;
        eventually(
            "a failed registration attempt",
            Duration::from_secs(20),
            || async {
                agent
                    .output()
                    .contains("[Register] attempt [1] failed")
                    .then_some(())
            },
        )
        .await?;
        agent.signal_group(Signal::SIGTERM);
        // Started again and registering from attempt 1: its first attempt fails too, as
        // the outage lasts until that is seen (lifting it earlier races that attempt).
        eventually(
            "the agent started again from attempt 1",
            Duration::from_secs(20),
            || async {
                let out = agent.output();
                (out.matches("Registering Agent").count() >= 2
                    && out.matches("[Register] attempt [1] failed").count() >= 2)
                    .then_some(())
            },
        )
        .await?;
        hub.set_api_outage(false);
        let a = eventually("registered", Duration::from_secs(20), || async {
            hub.live_agents().first().cloned()
        })
        .await?;
        assert_eq!(
            Some(a.pid),
            agent.pid(),
            "{label}: the wrapper's own process registered"
        );
        assert_eq!(hub.agents().len(), 1, "{label}");
        let text = agent.output();
        assert_eq!(
            text.matches("[Register] attempt [1] failed").count(),
            2,
            "{label}: registration from attempt 1 again:\n{text}"
        );
    }
    Ok(())
}
