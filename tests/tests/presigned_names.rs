//! End-to-end: agent names the server verifies (`use_pre_signed_url`, the stack's
//! `SEMAPHORE_AGENT_USE_PRE_SIGNED_URL`), with each agent (`::fake`, `::real`).
//!
//! The instance gets what EC2 gives it: role-session credentials whose session name is
//! its instance id (here from moto's `AssumeRole`, passed by environment). The supervisor
//! signs a `GetCallerIdentity` URL with them and writes it as the agent's name; the hub
//! checks the URL, GETs it from moto and names the agent after the identity moto answers
//! with. What that check proves, and what it cannot (moto checks no signature): the
//! hub's `sts` module docs.
//!
//! The assertions are what a user sees: the hub's record of the agent (its name and the
//! verified ARN), the job it ran, the supervisor's log (the run's label, never the URL:
//! it carries the session token), the one-job marker and the instance's end.

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::{real_agent, real_agent_skip_line, AgentKind, Instance};
use agent_fleet_tests::hub::{JobSpec, JobState, VerifiedIdentity};
use agent_fleet_tests::probe::field;
use agent_supervisor::agent::config_file::read_value;
use agent_supervisor::aws::sts::{QuerySts, SessionCredentials, Sts};
use agent_supervisor::config::RuntimeConfig;
use std::time::Duration;

type R = anyhow::Result<()>;

/// `mod <scenario> { fake, real }`: the scenario with each agent (as in `agents.rs`).
macro_rules! both_agents {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fake() -> R {
                super::$scenario(AgentKind::Fake).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn real() -> R {
                match real_agent()? {
                    Some(path) => super::$scenario(AgentKind::Real(path)).await,
                    None => {
                        println!("{}", real_agent_skip_line(concat!(stringify!($scenario), "::real")));
                        Ok(())
                    }
                }
            }
        }
    )*};
}

both_agents!(an_agent_with_a_signed_name_registers_verified_and_runs_its_job);

/// The agents' instance role (moto takes any ARN).
const ROLE: &str = "arn:aws:iam::123456789012:role/agent-fleet-agents";

/// What no line of the supervisor's log may hold: the signed URL's query.
const URL_PARTS: &[&str] = &[
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "X-Amz-Credential",
    "Action=GetCallerIdentity",
];

/// The SDK's environment variables for `session`: how the bed gives an instance its
/// instance profile's credentials (its fake IMDS serves none).
fn sdk_env(session: &SessionCredentials) -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", &session.access_key_id),
        ("AWS_SECRET_ACCESS_KEY", &session.secret_access_key),
        ("AWS_SESSION_TOKEN", &session.session_token),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect()
}

async fn an_agent_with_a_signed_name_registers_verified_and_runs_its_job(agent: AgentKind) -> R {
    let bed = Bed::start(&format!("presigned-{}", agent.label())).await?;
    bed.hub.verify_sts_names_with(Some(&bed.moto.endpoint()))?;
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 0, 1, 1).await?;
    bed.put_config(&RuntimeConfig {
        use_pre_signed_url: true,
        ..bed.runtime_config(&group)
    })
    .await?;
    let id = bed.moto.group(&group).await?.in_service()[0].clone();
    let sts = QuerySts::new(&bed.moto.sdk_config().await)?;
    let session = sts
        .assume_role(ROLE, &id, Duration::from_secs(3600))
        .await?;

    let mut o = bed.instance(&id, &group);
    o.agent = agent.clone();
    o.aws_env
        .retain(|(k, _)| k != "AWS_ACCESS_KEY_ID" && k != "AWS_SECRET_ACCESS_KEY");
    o.aws_env.extend(sdk_env(&session));
    // Every line the agent prints reaches the log, DEBUG ones included.
    o.env
        .push(("AGENT_SUPERVISOR_LOG".into(), "info,agent=debug".into()));
    let config = o.root.join(&id).join("work/config.yaml");
    let inst = Instance::start(o, None).await?;

    let result = async {
        let registered = eventually("the agent registered", Duration::from_secs(40), || async {
            bed.hub.live_agents().into_iter().next()
        })
        .await?;
        // Once the agent registered, the signed URL leaves config.yaml with the token (it
        // proves the instance's identity to whoever holds it, for 15 minutes; jobs can
        // read the file).
        eventually(
            "the signed name removed from config.yaml",
            Duration::from_secs(10),
            || async {
                let written = std::fs::read_to_string(&config).ok()?;
                (read_value(&written, "name").is_none() && !written.contains("X-Amz-"))
                    .then_some(())
            },
        )
        .await?;
        // The hub verified it with STS and named the agent after the instance's identity.
        assert_eq!(
            registered.verified,
            Some(VerifiedIdentity {
                arn: format!("arn:aws:sts::123456789012:assumed-role/agent-fleet-agents/{id}"),
                account: "123456789012".into(),
            })
        );
        assert!(
            registered.name.starts_with(&format!("{id}__")),
            "{}",
            registered.name
        );

        // The agent works under the name the hub gave it.
        let job = bed.hub.enqueue_job(JobSpec {
            commands: vec!["echo verified-agent-ran-me".into()],
            env: vec![],
        });
        let done = eventually("the job finished", Duration::from_secs(60), || async {
            bed.hub.job(&job).filter(|j| j.state == JobState::Finished)
        })
        .await?;
        assert_eq!(done.result.as_deref(), Some("passed"), "{done:?}");
        assert_eq!(done.agent.as_deref(), Some(registered.name.as_str()));

        // The supervisor calls the run `<instance id>__sts` everywhere, and its end works
        // as for any other name: the one-job marker, then the instance ends.
        let label = format!("{id}__sts");
        let ending = inst
            .wait_for_line("terminating this instance", Duration::from_secs(30))
            .await?;
        assert_eq!(
            field(&ending, "agent_name"),
            Some(label.clone()),
            "{ending}"
        );
        let marker = std::fs::read_to_string(inst.dir.join("work/job-taken"))?;
        assert_eq!(marker, format!("agent {label} job {job}\n"));
        let out = inst.output();
        let started = out
            .lines()
            .find(|l| l.contains("agent started"))
            .unwrap_or_default();
        assert_eq!(field(started, "agent_name"), Some(label), "{out}");
        for part in URL_PARTS {
            assert!(
                !out.contains(part),
                "the signed URL ({part}) reached the supervisor's log"
            );
        }
        assert!(
            !out.contains(&session.session_token),
            "the session token reached the supervisor's log"
        );
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("{}", inst.output());
    }
    drop(inst);
    result
}
