//! End-to-end: GitHub's SSH host keys. The leader (a scaler-role supervisor) keeps the
//! stack's known-hosts parameter filled from the fake GitHub meta API the runtime config
//! names; a new agent instance adds the keys to its agent user's known_hosts before the
//! agent starts, so its job sees them; a failed or malformed answer keeps the last good
//! set and is said once; with no keys in the parameter an instance takes the AMI's file.
//!
//! The launcher points every supervisor's `--known-hosts-file` into the instance's own
//! directory (`AGENT_SUPERVISOR_KNOWN_HOSTS_FILE`): nothing here writes to this machine's
//! `~/.ssh`.

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::{real_agent, real_agent_skip_line, AgentKind, Fleet, Instance};
use agent_fleet_tests::github::{FakeGithub, MetaAnswer};
use agent_fleet_tests::hub::{JobSpec, JobState};
use agent_fleet_tests::probe::actions;
use agent_supervisor::config::RuntimeConfig;
use agent_supervisor::known_hosts::{parse_stored, HostKey, PLACEHOLDER};
use std::sync::Arc;
use std::time::Duration;

type R = anyhow::Result<()>;

const WITHIN: Duration = Duration::from_secs(45);
/// What the leader says the first time a refresh fails (and never again while it fails).
const FAILED: &str = "GitHub host keys not refreshed";

fn lines_of(keys: &[String]) -> Vec<String> {
    keys.iter().map(|k| format!("github.com {k}")).collect()
}

/// Agents at 0 (the leader raises them), the leader a scaler-role instance.
async fn setup(stack: &str, refresh_secs: u64) -> anyhow::Result<(Bed, String, Instance)> {
    let (bed, group) = stack_without_leader(stack, refresh_secs).await?;
    let scaler = start_scaler(&bed).await?;
    Ok((bed, group, scaler))
}

async fn stack_without_leader(stack: &str, refresh_secs: u64) -> anyhow::Result<(Bed, String)> {
    let bed = Bed::start(stack).await?;
    let group = format!("{stack}-agents");
    bed.moto.create_group(&group, 0, 2, 0).await?;
    bed.put_config(&RuntimeConfig {
        agents_lead: false,
        known_hosts_refresh_secs: refresh_secs,
        ..bed.fast_runtime_config(&group)
    })
    .await?;
    Ok((bed, group))
}

async fn start_scaler(bed: &Bed) -> anyhow::Result<Instance> {
    let mut o = bed.instance("i-0scaler00000kh01", &format!("{}-scaler", bed.stack));
    o.args = vec!["--role".into(), "scaler".into()];
    Instance::start(o, None).await
}

/// The keys in the parameter now.
async fn stored(bed: &Bed) -> anyhow::Result<Vec<HostKey>> {
    let value = bed
        .moto
        .get_parameter(&bed.known_hosts_parameter)
        .await?
        .unwrap_or_default();
    Ok(parse_stored(&value).keys)
}

async fn parameter_holds(bed: &Bed, keys: &[String]) -> R {
    let want: Vec<HostKey> = keys
        .iter()
        .map(|k| HostKey::parse(k).map_err(anyhow::Error::msg))
        .collect::<Result<_, _>>()?;
    eventually("the parameter holds the keys", WITHIN, || async {
        (stored(bed).await.ok()? == want).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instances_job_sees_the_keys_the_leader_fetched_fake() -> R {
    job_sees_the_keys(AgentKind::Fake).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instances_job_sees_the_keys_the_leader_fetched_real() -> R {
    match real_agent()? {
        Some(path) => job_sees_the_keys(AgentKind::Real(path)).await,
        None => {
            println!(
                "{}",
                real_agent_skip_line("a_new_instances_job_sees_the_keys_the_leader_fetched_real")
            );
            Ok(())
        }
    }
}

/// The template's placeholder is replaced by the leader as soon as it leads, once; the
/// instance the leader then raises for a job writes the keys before its agent starts, and
/// the job (`cat` of the agent user's known_hosts) prints every one as a `github.com` line.
async fn job_sees_the_keys(agent: AgentKind) -> R {
    let (bed, group, scaler) = setup(&format!("khjob-{}", agent.label()), 86_400).await?;
    assert_eq!(
        bed.moto.get_parameter(&bed.known_hosts_parameter).await?,
        Some(PLACEHOLDER.to_string())
    );
    let mut o = bed.fleet_options(&[&group], &[], &[]);
    o.agent = agent.clone();
    let fleet = Fleet::start(Arc::clone(&bed.moto), o);
    let result = async {
        parameter_holds(&bed, &FakeGithub::keys())
            .await
            .inspect_err(|_| eprintln!("scaler:\n{}", scaler.output()))?;
        let job = bed.hub.enqueue_job(JobSpec {
            commands: vec!["cat \"$AGENT_FLEET_BED_INSTANCE/known_hosts\"".into()],
            env: vec![],
        });
        let done = eventually("the job finished", WITHIN, || async {
            bed.hub.job(&job).filter(|j| j.state == JobState::Finished)
        })
        .await?;
        assert_eq!(done.result.as_deref(), Some("passed"), "{done:?}");
        let printed = eventually(
            "the job's output at the hub",
            Duration::from_secs(10),
            || async {
                let out = bed.hub.job_output(&job);
                lines_of(&FakeGithub::keys())
                    .iter()
                    .all(|l| out.iter().any(|o| o.trim() == l))
                    .then_some(out)
            },
        )
        .await?;
        let keys_printed = printed
            .iter()
            .filter(|l| l.starts_with("github.com "))
            .count();
        assert_eq!(keys_printed, 3, "each key once: {printed:?}");
        // The agent's supervisor says where the keys came from.
        let id = fleet.launched()[0].clone();
        let out = fleet.with_instance(&id, |i| i.output()).unwrap_or_default();
        let line = out
            .lines()
            .find(|l| l.contains("GitHub host keys in the agent user's known_hosts"))
            .unwrap_or_default();
        assert!(
            line.contains(&format!("parameter {}", bed.known_hosts_parameter))
                && line.contains("keys=3"),
            "{out}"
        );
        let mode = fleet
            .with_instance(&id, |i| std::fs::metadata(i.dir.join("known_hosts")))
            .transpose()?
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
        assert_eq!(mode, Some(0o644));
        assert_eq!(bed.github.calls(), 1, "one fetch for a fresh set");
        // The write is a leader action, checked against the lease like the scaler's.
        let writes: Vec<_> = scaler
            .output()
            .lines()
            .filter(|l| l.contains("leader action") && l.contains("put_known_hosts"))
            .map(str::to_string)
            .collect();
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert_eq!(
            actions(&writes[0]).len(),
            1,
            "term and validity window: {writes:?}"
        );
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("{}\nscaler:\n{}", fleet.all_output(), scaler.output());
    }
    fleet.shutdown().await;
    result
}

/// Refreshing every 2 s (failures retried at the same pace): a malformed body, a 500 and a
/// set with a key of an unknown algorithm each leave the parameter as it was, and the
/// leader warns once for the whole outage; the next good answer (new keys) replaces the set,
/// said with one info line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_answer_keeps_the_last_good_set_and_is_said_once() -> R {
    let (bed, _group, scaler) = setup("khbad", 2).await?;
    let result = async {
        parameter_holds(&bed, &FakeGithub::keys()).await?;
        let good = bed.moto.get_parameter(&bed.known_hosts_parameter).await?;
        let mut bad_rsa = FakeGithub::keys();
        bad_rsa[2] = bad_rsa[2].replace("ssh-rsa", "ssh-dss");
        for bad in [
            MetaAnswer::Body("{\"ssh_keys\": [\"ssh-ed25519".into()),
            MetaAnswer::Status(500),
            MetaAnswer::Keys(bad_rsa),
        ] {
            let before = bed.github.calls();
            bed.github.set(bad.clone());
            eventually("two refreshes of that answer", WITHIN, || async {
                (bed.github.calls() >= before + 2).then_some(())
            })
            .await?;
            assert_eq!(
                bed.moto.get_parameter(&bed.known_hosts_parameter).await?,
                good,
                "{bad:?}: the last good set stays"
            );
        }
        let out = scaler.output();
        assert_eq!(out.matches(FAILED).count(), 1, "said once:\n{out}");
        let warning = out.lines().find(|l| l.contains(FAILED)).unwrap_or_default();
        assert!(
            warning.contains("WARN") && warning.contains("JSON"),
            "{warning}"
        );

        let rotated = FakeGithub::keys_with(9);
        bed.github.set(MetaAnswer::Keys(rotated.clone()));
        parameter_holds(&bed, &rotated).await?;
        let out = scaler.output();
        assert_eq!(
            out.matches("GitHub host keys refreshed again").count(),
            1,
            "{out}"
        );
        assert_eq!(out.matches(FAILED).count(), 1, "{out}");
        assert_eq!(out.matches("GitHub host keys updated").count(), 2, "{out}");
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("scaler:\n{}", scaler.output());
    }
    result
}

/// No leader has filled the parameter yet (it holds the template's placeholder): the
/// instance takes the keys the AMI was baked with, adds them to a known_hosts that already
/// has lines of its own (kept, and a key it had already not written twice), and its job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_in_the_parameter_an_instance_takes_the_amis_file() -> R {
    let bed = Bed::start("khami").await?;
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 0, 2, 0).await?;
    bed.put_config(&RuntimeConfig {
        agents_lead: false,
        ..bed.fast_runtime_config(&group)
    })
    .await?;
    let id = "i-0amikeys00000001";
    let dir = bed.root.join(id);
    std::fs::create_dir_all(&dir)?;
    let ami = lines_of(&FakeGithub::keys_with(5));
    std::fs::write(dir.join("github_known_hosts"), ami.join("\n") + "\n")?;
    let own = format!("gitlab.example {}", FakeGithub::keys_with(7)[0]);
    std::fs::write(dir.join("known_hosts"), format!("{own}\n{}\n", ami[0]))?;
    let instance = Instance::start(bed.instance(id, &group), None).await?;
    let result = async {
        eventually("the agent registered", WITHIN, || async {
            (!bed.hub.live_agents().is_empty()).then_some(())
        })
        .await?;
        let text = std::fs::read_to_string(dir.join("known_hosts"))?;
        let mut want = vec![own.clone()];
        want.extend(ami.iter().cloned());
        assert_eq!(text.lines().collect::<Vec<_>>(), want, "{text}");
        let out = instance.output();
        assert!(
            out.contains("GitHub host keys from the AMI's file"),
            "{out}"
        );
        assert!(out.contains("holds none yet"), "{out}");
        assert_eq!(bed.github.calls(), 0, "no leader, no fetch");
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("{}", instance.output());
    }
    result
}

/// A GitHub that does not answer holds up nothing: with the leader's fetch hanging, a queued
/// job still gets its instance at the scaler's pace; the fetch is given up at its 15 s bound,
/// said once, and the parameter keeps the placeholder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_that_hangs_never_holds_up_scaling() -> R {
    let (bed, group) = stack_without_leader("khslow", 86_400).await?;
    bed.github.set(MetaAnswer::Slow(
        Duration::from_secs(120),
        Box::new(MetaAnswer::Keys(FakeGithub::keys())),
    ));
    let scaler = start_scaler(&bed).await?;
    let result = async {
        eventually("the leader asked GitHub", WITHIN, || async {
            (bed.github.calls() == 1).then_some(())
        })
        .await?;
        let asked = std::time::Instant::now();
        bed.hub.enqueue_job(JobSpec {
            commands: vec!["true".into()],
            env: vec![],
        });
        eventually("the leader raised desired capacity", WITHIN, || async {
            (bed.moto.group(&group).await.ok()?.desired >= 1).then_some(())
        })
        .await?;
        let raised = asked.elapsed();
        assert!(
            raised < Duration::from_secs(10),
            "raised {raised:?} after GitHub was asked: it waited on GitHub"
        );
        assert_eq!(
            bed.moto.get_parameter(&bed.known_hosts_parameter).await?,
            Some(PLACEHOLDER.to_string())
        );
        let warned = eventually("the fetch given up at its bound", WITHIN, || async {
            scaler.output().contains(FAILED).then_some(asked.elapsed())
        })
        .await?;
        assert!(
            (Duration::from_secs(13)..Duration::from_secs(30)).contains(&warned),
            "given up after {warned:?}"
        );
        let out = scaler.output();
        assert_eq!(out.matches(FAILED).count(), 1, "{out}");
        assert!(out.contains("no answer within 15s"), "{out}");
        assert_eq!(
            bed.moto.get_parameter(&bed.known_hosts_parameter).await?,
            Some(PLACEHOLDER.to_string())
        );
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("scaler:\n{}", scaler.output());
    }
    result
}
