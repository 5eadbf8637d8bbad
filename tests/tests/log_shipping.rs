//! Logs in CloudWatch Logs, end to end: real supervisors ship to moto's CloudWatch Logs
//! (the stack's log group, a stream per instance), read back with `GetLogEvents` as an
//! operator would; the logs API's outage injected through the bed's faults.

use agent_fleet_tests::bed::{eventually, Bed, TOKEN};
use agent_fleet_tests::fleet::Fleet;
use agent_fleet_tests::hub::{JobInfo, JobSpec, JobState};
use agent_fleet_tests::moto::LogRecord;
use agent_fleet_tests::probe::terminate_calls;
use agent_supervisor::config::RuntimeConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};

type R = anyhow::Result<()>;

/// What an operator reads first: the line with which an instance ends itself.
const LAST_WORDS: &str = "terminating this instance";

fn log_group(bed: &Bed) -> String {
    format!("/agent-fleet/{}", bed.stack)
}

/// An agent group of one, its log group, a cloud-init output file; the fleet's supervisors
/// ship with a queue of `queue_kib`.
async fn start(bed: &Bed, queue_kib: &str) -> anyhow::Result<(String, Fleet)> {
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 0, 3, 1).await?;
    bed.moto.create_log_group(&log_group(bed), 30).await?;
    bed.put_config(&RuntimeConfig {
        log_group: Some(log_group(bed)),
        ..bed.runtime_config(&group)
    })
    .await?;
    let cloud_init = bed.root.join("cloud-init-output.log");
    std::fs::write(
        &cloud_init,
        "Cloud-init v. 24.1 running 'modules:final'\nagent-fleet bootstrap: done\n",
    )?;
    let cloud_init = cloud_init.display().to_string();
    let o = bed.fleet_options(
        &[&group],
        &[
            "--cloud-init-log",
            &cloud_init,
            "--log-queue-kib",
            queue_kib,
        ],
        &[],
    );
    Ok((group, Fleet::start(Arc::clone(&bed.moto), o)))
}

async fn finish(fleet: Fleet, result: R) -> R {
    if result.is_err() {
        eprintln!("{}", fleet.all_output());
    }
    fleet.shutdown().await;
    result
}

async fn stream(bed: &Bed, id: &str) -> Vec<LogRecord> {
    bed.moto
        .log_events(&log_group(bed), id)
        .await
        .unwrap_or_default()
}

/// The instance's id once its agent registered.
async fn registered(bed: &Bed, fleet: &Fleet) -> anyhow::Result<String> {
    eventually("an agent registered", Duration::from_secs(30), || async {
        (!bed.hub.live_agents().is_empty()).then_some(())
    })
    .await?;
    Ok(fleet.launched()[0].clone())
}

async fn finished(bed: &Bed, job: &str) -> anyhow::Result<JobInfo> {
    eventually("the job finished", Duration::from_secs(60), || async {
        bed.hub.job(job).filter(|j| j.state == JobState::Finished)
    })
    .await
}

async fn terminate_call(bed: &Bed, id: &str) -> R {
    eventually(
        "the instance asked to be terminated",
        Duration::from_secs(30),
        || async {
            let calls = bed.moto.calls(0).await.ok()?;
            terminate_calls(&calls)
                .into_iter()
                .find(|(i, _, _)| i == id)
        },
    )
    .await?;
    Ok(())
}

fn with_message<'a>(records: &'a [LogRecord], needle: &str) -> Option<&'a LogRecord> {
    records.iter().find(|r| {
        r.json()["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.contains(needle))
    })
}

/// A job line on the agent's stderr (the pipe its supervisor reads): what the agent would
/// print, relogged by the supervisor (`error` makes it a WARN line, which ships).
fn to_agent_stderr(line: &str) -> String {
    format!("echo \"{line}\" > /proc/$PPID/fd/2")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instances_lines_fields_and_last_words_are_in_its_stream_without_the_token() -> R {
    let bed = Bed::start("logship").await?;
    let (group, fleet) = start(&bed, "2048").await?;
    let result = async {
        let id = registered(&bed, &fleet).await?;
        // A line carrying the token reaches the supervisor as the agent's output.
        let job = bed.hub.enqueue_job(JobSpec {
            commands: vec![
                to_agent_stderr(&format!("error: config dump token={TOKEN} end")),
                "echo done".into(),
            ],
            env: vec![],
        });
        let done = finished(&bed, &job).await?;
        assert_eq!(done.result.as_deref(), Some("passed"), "{done:?}");
        terminate_call(&bed, &id).await?;
        let records = eventually(
            "the last words in the stream",
            Duration::from_secs(20),
            || async {
                let r = stream(&bed, &id).await;
                with_message(&r, LAST_WORDS).is_some().then_some(r)
            },
        )
        .await?;

        // The last words, with the journal's fields.
        let last = with_message(&records, LAST_WORDS)
            .map(LogRecord::json)
            .unwrap_or_default();
        println!("the last words as shipped: {last}");
        assert_eq!(last["INSTANCE_ID"], id.as_str(), "{last}");
        assert_eq!(last["STACK"], bed.stack.as_str(), "{last}");
        assert_eq!(last["ROLE"], "agent", "{last}");
        assert_eq!(last["EXIT_REASON"], "JOB_FINISHED", "{last}");
        assert_eq!(last["DECREMENT"], false, "{last}");
        assert_eq!(last["SYSLOG_IDENTIFIER"], "agent-supervisor", "{last}");
        assert_eq!(last["PRIORITY"], "5", "{last}");
        // They left before the terminate call: Auto Scaling may stop the instance at once.
        let calls = bed.moto.calls(0).await?;
        let terminate_seq = calls
            .iter()
            .find(|c| c.is("autoscaling", "TerminateInstanceInAutoScalingGroup"))
            .map(|c| c.seq)
            .unwrap_or_default();
        let bodies = bed.moto.bodies(0).await?;
        let carried = bodies
            .iter()
            .find(|b| b.body.contains(LAST_WORDS))
            .map(|b| b.seq)
            .unwrap_or(u64::MAX);
        assert!(
            carried < terminate_seq,
            "the last words were put at call {carried}, after the terminate call {terminate_seq}"
        );
        // The agent's own lines, under its identifier.
        let agent_lines: Vec<_> = records
            .iter()
            .map(LogRecord::json)
            .filter(|r| r["SYSLOG_IDENTIFIER"] == "semaphore-agent")
            .collect();
        assert!(
            agent_lines
                .iter()
                .any(|r| r["AGENT_NAME"].as_str().is_some_and(|n| n.starts_with(&id))),
            "{agent_lines:?}"
        );
        // cloud-init's output, one event per line.
        let cloud_init: Vec<String> = records
            .iter()
            .map(LogRecord::json)
            .filter(|r| r["SYSLOG_IDENTIFIER"] == "cloud-init")
            .map(|r| r["MESSAGE"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            cloud_init,
            [
                "Cloud-init v. 24.1 running 'modules:final'",
                "agent-fleet bootstrap: done"
            ]
        );
        // In order, as logged.
        assert!(records.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        // The token: scrubbed from the line that carried it, in no body ever sent.
        let dump = with_message(&records, "config dump")
            .map(LogRecord::json)
            .unwrap_or_default();
        // (The agent's lines are scrubbed as they are read, the shipper scrubs every
        // record again: either way, `[redacted]` in place of the token.)
        let text = dump["MESSAGE"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert_eq!(text, "error: config dump token=[redacted] end", "{dump}");
        assert_eq!(dump["PRIORITY"], "4");
        assert!(!bodies.is_empty());
        for b in &bodies {
            assert!(
                !b.body.contains(TOKEN),
                "PutLogEvents call {} carried the token",
                b.seq
            );
        }
        // Only this instance's stream, in the stack's group.
        assert!(bodies.iter().all(|b| b.action == "PutLogEvents"));
        let _ = group;
        Ok(())
    }
    .await;
    finish(fleet, result).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_logs_api_costs_the_instance_nothing_and_the_drops_are_counted() -> R {
    let bed = Bed::start("logoutage").await?;
    // The smallest queue (256 KiB), so that the job's burst overflows it during the outage.
    let (_group, fleet) = start(&bed, "256").await?;
    let result = async {
        let id = registered(&bed, &fleet).await?;
        eventually(
            "the boot's records shipped",
            Duration::from_secs(20),
            || async { (!stream(&bed, &id).await.is_empty()).then_some(()) },
        )
        .await?;
        // PutLogEvents answers 503 for 8 s; meanwhile the agent prints ~1 MB of errors.
        bed.moto
            .inject_fault(serde_json::json!({
                "service": "logs", "action": "PutLogEvents", "outage_ms": 8000
            }))
            .await?;
        let burst = format!(
            "for i in $(seq 1 3000); do echo \"error: burst line $i {}\"; done > /proc/$PPID/fd/2",
            "x".repeat(200)
        );
        let job = bed.hub.enqueue_job(JobSpec {
            commands: vec![burst, "sleep 22".into(), "echo done".into()],
            env: vec![],
        });
        // Shipping comes back after the outage and says what it lost.
        let records = eventually(
            "the drops reported in the stream",
            Duration::from_secs(40),
            || async {
                let r = stream(&bed, &id).await;
                with_message(&r, "shipping logs to CloudWatch Logs again")
                    .is_some()
                    .then_some(r)
            },
        )
        .await?;
        let report = with_message(&records, "shipping logs to CloudWatch Logs again")
            .map(LogRecord::json)
            .unwrap_or_default();
        let dropped = report["DROPPED_ENTRIES"].as_u64().unwrap_or_default();
        assert!(dropped > 0, "{report}");
        assert!(dropped < 3000, "the newest entries were kept: {report}");
        assert!(
            with_message(&records, "burst line 3000 ").is_some(),
            "the newest burst line shipped"
        );
        assert!(
            with_message(&records, "burst line 1 ").is_none(),
            "the oldest burst lines were the ones dropped"
        );

        // Down again, for good, as the job ends: the instance still ends on time.
        bed.moto
            .inject_fault(serde_json::json!({
                "service": "logs", "action": "PutLogEvents", "outage_ms": 120000
            }))
            .await?;
        let done = finished(&bed, &job).await?;
        let finished_at = Instant::now();
        assert_eq!(done.result.as_deref(), Some("passed"), "{done:?}");
        terminate_call(&bed, &id).await?;
        let took = finished_at.elapsed();
        // The flush waits 2 s at most; a supervisor that waited on its logs would hold the
        // instance for the outage (120 s) or a backoff (up to 60 s).
        assert!(
            took < Duration::from_secs(10),
            "terminating waited {took:?} on a logs API that is down (flush bound 2 s)"
        );
        // The journal has the count too.
        let out = fleet.with_instance(&id, |i| i.output()).unwrap_or_default();
        assert!(out.contains("entries were dropped meanwhile"), "{out}");
        Ok(())
    }
    .await;
    finish(fleet, result).await
}
