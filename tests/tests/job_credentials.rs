//! End-to-end: a job gets the job role's credentials the way the AWS CLI and SDKs find them
//! by default — the supervisor's container-credentials endpoint on loopback — and never the
//! instance's. Real `agent-supervisor` processes against moto and the fake hub, with the
//! fake agent and with the real Semaphore agent (`::real` prints one line and passes where
//! `../shared/real-agent` is absent).
//!
//! The job runs boto3 (the test bed's venv) with its default credential chain and no
//! credentials of its own: what `sts get-caller-identity` answers is who the job is.

use agent_fleet_tests::bed::{eventually, Bed, TOKEN};
use agent_fleet_tests::fleet::{real_agent, real_agent_skip_line, AgentKind, Fleet};
use agent_fleet_tests::hub::{JobSpec, JobState};
use agent_fleet_tests::moto::{repo_root, ACCOUNT_ID, REGION};
use std::sync::Arc;
use std::time::Duration;

type R = anyhow::Result<()>;

mod a_job_is_the_job_role_through_the_default_chain {
    use super::*;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fake() -> R {
        super::a_job_is_the_job_role_through_the_default_chain(AgentKind::Fake).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real() -> R {
        match real_agent()? {
            Some(path) => {
                super::a_job_is_the_job_role_through_the_default_chain(AgentKind::Real(path)).await
            }
            None => {
                println!(
                    "{}",
                    real_agent_skip_line("a_job_is_the_job_role_through_the_default_chain::real")
                );
                Ok(())
            }
        }
    }
}

/// What the job prints, one `KEY=value` per line: the variables it was given (the token
/// by its length only) and, from boto3's default chain, where its credentials came from
/// and who they make it.
fn job_commands() -> Vec<String> {
    let python = repo_root().join(".venv/bin/python");
    vec![
        r#"echo "URI=${AWS_CONTAINER_CREDENTIALS_FULL_URI:-unset}""#.into(),
        r#"echo "TOKEN_LEN=${#AWS_CONTAINER_AUTHORIZATION_TOKEN}""#.into(),
        r#"echo "REGION=${AWS_REGION:-unset}/${AWS_DEFAULT_REGION:-unset}""#.into(),
        r#"echo "CACHE=${SEMAPHORE_CACHE_BACKEND:-unset}:${SEMAPHORE_CACHE_S3_BUCKET:-unset}""#
            .into(),
        r#"echo "PROFILE_FLAG=${SEMAPHORE_CACHE_USE_EC2_INSTANCE_PROFILE:-unset}""#.into(),
        r#"echo "STATIC_KEY=${AWS_ACCESS_KEY_ID:-unset}""#.into(),
        format!(
            "{} -c 'import boto3; s = boto3.Session(); print(\"METHOD=\" + s.get_credentials().method); print(\"ARN=\" + s.client(\"sts\").get_caller_identity()[\"Arn\"])'",
            python.display()
        ),
    ]
}

/// The value of `NAME=` in the agent config's `env-vars`.
fn config_var(config: &str, name: &str) -> String {
    config
        .split(&format!("\"{name}="))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_string()
}

/// The value of the job's `KEY=` line.
fn printed(output: &[String], key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    output
        .iter()
        .find_map(|l| l.trim_end().strip_prefix(&prefix).map(str::to_string))
}

/// A stack with a job role and a cache bucket: the job's AWS identity is the job role's
/// session named after its instance; it found it through the container-credentials
/// endpoint, with no static key, no instance-profile flag for the cache CLI, and the region
/// given; the credentials' secrets and the endpoint's token are in no supervisor log.
async fn a_job_is_the_job_role_through_the_default_chain(agent: AgentKind) -> R {
    let bed = Bed::start(&format!("jobrole-{}", agent.label())).await?;
    let group = format!("{}-agents", bed.stack);
    bed.moto.create_group(&group, 0, 2, 1).await?;
    let role_arn = bed.create_job_role("job").await?;
    let mut cfg = bed.runtime_config(&group);
    cfg.job_role_arn = Some(role_arn.clone());
    cfg.cache_bucket = Some(format!("{}-cache", bed.stack));
    bed.put_config(&cfg).await?;
    let mut options = bed.fleet_options(&[&group], &[], &[]);
    options.agent = agent.clone();
    let fleet = Fleet::start(Arc::clone(&bed.moto), options);
    let result = async {
        eventually("the agent registered", Duration::from_secs(60), || async {
            (!bed.hub.live_agents().is_empty()).then_some(())
        })
        .await?;
        let id = fleet.launched()[0].clone();
        // While the agent runs, its token opens the endpoint (the test runs as the agent's
        // user and reads the config): the credentials the job will get.
        let config = fleet
            .with_instance(&id, |i| {
                std::fs::read_to_string(i.dir.join("work/config.yaml"))
            })
            .transpose()?
            .unwrap_or_default();
        let (uri, token) = (
            config_var(&config, "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
            config_var(&config, "AWS_CONTAINER_AUTHORIZATION_TOKEN"),
        );
        let http = reqwest::Client::builder().no_proxy().build()?;
        let served: serde_json::Value =
            eventually("the endpoint served", Duration::from_secs(20), || async {
                let answer = http
                    .get(&uri)
                    .header("Authorization", &token)
                    .send()
                    .await
                    .ok()?;
                answer.error_for_status().ok()?.json().await.ok()
            })
            .await?;
        let job = bed.hub.enqueue_job(JobSpec {
            commands: job_commands(),
            // The job aims its SDK at the emulator, as a job would at a VPC endpoint; and
            // reads no shared config of the machine's user.
            env: vec![
                ("AWS_ENDPOINT_URL".into(), bed.moto.endpoint()),
                ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
                ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
                ("NO_PROXY".into(), "127.0.0.1".into()),
            ],
        });
        let done = eventually("the job finished", Duration::from_secs(90), || async {
            bed.hub.job(&job).filter(|j| j.state == JobState::Finished)
        })
        .await?;
        let output = bed.hub.job_output(&job);
        let shown = output.join("");
        assert_eq!(done.result.as_deref(), Some("passed"), "{shown}");

        assert!(
            uri.starts_with("http://127.0.0.1:") && uri.ends_with("/v1/job-credentials"),
            "{uri}"
        );
        assert_eq!(token.len(), 64, "{token:?}");
        let expected = [
            ("URI", uri.clone()),
            ("TOKEN_LEN", "64".to_string()),
            ("REGION", format!("{REGION}/{REGION}")),
            ("CACHE", format!("s3:{}-cache", bed.stack)),
            // Nothing steers the default chain elsewhere: no instance-profile flag for the
            // cache CLI, no static key.
            ("PROFILE_FLAG", "unset".to_string()),
            ("STATIC_KEY", "unset".to_string()),
            ("METHOD", "container-role".to_string()),
            // The job role's session named after the instance, not the instance.
            (
                "ARN",
                format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/job/{id}"),
            ),
        ];
        for (key, want) in expected {
            assert_eq!(
                printed(&output, key).as_deref(),
                Some(want.as_str()),
                "{key}: {shown}"
            );
        }

        // The supervisor assumed the role in the emulator.
        let calls = bed.moto.calls(0).await?;
        assert!(
            calls
                .iter()
                .any(|c| c.is("sts", "AssumeRole") && c.status == Some(200)),
            "no AssumeRole in the call log"
        );
        // What the job held is in no log: the secret key, the session token, the
        // endpoint's token; nor is the registration token.
        let logs = fleet.all_output();
        assert!(!logs.contains(TOKEN), "the registration token is in a log");
        assert!(!logs.contains(&token), "the endpoint's token is in a log");
        for secret in ["SecretAccessKey", "Token"] {
            let v = served[secret].as_str().unwrap_or_default();
            assert!(v.len() > 10, "{secret} served: {served}");
            assert!(!logs.contains(v), "the {secret} is in a log");
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("{}", fleet.all_output());
    }
    fleet.shutdown().await;
    result
}
