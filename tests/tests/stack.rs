//! The operator CLI (`agent-fleet`) against the emulator: deploy creates what the template
//! promises, an update changes only what changed, destroy leaves nothing behind, a failed
//! deploy names the failing resource, the token goes in through stdin only — and a fleet
//! deployed this way scales up from zero through its scaler-role instance and back. Jobs are
//! hostile: the agent role steers nothing unless agents lead, jobs get the job role.

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::{bin_dir, Fleet};
use agent_fleet_tests::hub::JobSpec;
use agent_fleet_tests::moto::ACCOUNT_ID;
use agent_supervisor::config::Settings;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

type R = anyhow::Result<()>;

/// Runs `agent-fleet <args>` with only the emulator's AWS settings and `vars` in its
/// environment, `stdin` piped in.
async fn cli(
    bed: &Bed,
    vars: &[(&str, &str)],
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<Output> {
    let mut cmd = tokio::process::Command::new(bin_dir()?.join("agent-fleet"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(bed.moto.env())
        .envs(vars.iter().copied())
        .args(args)
        .args(["--poll-interval-ms", "100"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    if let Some(mut input) = child.stdin.take() {
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).await?;
        }
        drop(input);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await??;
    Ok(out)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts success and returns stdout.
fn ok(what: &str, out: &Output) -> String {
    let (o, e) = text(out);
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\nstdout:\n{o}\nstderr:\n{e}",
        out.status
    );
    o
}

/// The variables of a stack aimed at the bed's hub.
fn vars<'a>(
    bed: &'a Bed,
    endpoint: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![
        ("SEMAPHORE_AGENT_STACK_NAME", bed.stack.as_str()),
        (
            "SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME",
            bed.token_parameter.as_str(),
        ),
        ("SEMAPHORE_ENDPOINT", endpoint),
    ];
    v.extend_from_slice(extra);
    v
}

/// The text of the first `<tag>…</tag>` in `xml`.
fn xml<'a>(doc: &'a str, tag: &str) -> Option<&'a str> {
    xml_all(doc, tag).into_iter().next()
}

/// The texts of every `<tag>…</tag>` in `xml`, in order.
fn xml_all<'a>(doc: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut found = vec![];
    let mut rest = doc;
    while let Some(start) = rest.find(&open).map(|i| i + open.len()) {
        let Some(len) = rest[start..].find(&close) else {
            break;
        };
        found.push(&rest[start..start + len]);
        rest = &rest[start + len..];
    }
    found
}

/// The physical id of a stack resource. (Through ListStackResources: moto 5.2.5's
/// DescribeStackResource fails once it meets a resource whose condition is false, such as
/// the job role of a stack without a cache bucket.)
async fn physical_id(bed: &Bed, logical: &str) -> anyhow::Result<String> {
    let doc = bed
        .moto
        .query(
            "cloudformation",
            "ListStackResources",
            &[("StackName", &bed.stack)],
        )
        .await?;
    xml_all(&doc, "member")
        .into_iter()
        .find(|m| xml(m, "LogicalResourceId") == Some(logical))
        .and_then(|m| xml(m, "PhysicalResourceId"))
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{logical} has no physical id:\n{doc}"))
}

async fn launch_template(bed: &Bed, name: &str) -> anyhow::Result<String> {
    bed.moto
        .query(
            "ec2",
            "DescribeLaunchTemplateVersions",
            &[
                ("LaunchTemplateName", name),
                ("LaunchTemplateVersion.1", "$Latest"),
            ],
        )
        .await
}

/// Every inline policy of an IAM role (those of the role and of policy resources attached to
/// it), as the documents IAM holds, one after the other.
async fn role_policies(bed: &Bed, role: &str) -> anyhow::Result<String> {
    let listed = bed
        .moto
        .query("iam", "ListRolePolicies", &[("RoleName", role)])
        .await?;
    let mut all = String::new();
    for name in xml_all(&listed, "member") {
        let policy = bed
            .moto
            .query(
                "iam",
                "GetRolePolicy",
                &[("RoleName", role), ("PolicyName", name)],
            )
            .await?;
        all.push_str(&urlencoding_decode(
            xml(&policy, "PolicyDocument").unwrap_or_default(),
        ));
        all.push('\n');
    }
    Ok(all)
}

/// The runtime config the stack wrote, as JSON.
async fn runtime_config(bed: &Bed) -> anyhow::Result<serde_json::Value> {
    let json = bed
        .moto
        .get_parameter(&format!("/agent-fleet/{}/config", bed.stack))
        .await?
        .unwrap_or_default();
    Ok(serde_json::from_str(&json)?)
}

/// What only the leader does: the agent role holds none of it unless agents lead.
const LEADER_ACTIONS: [&str; 5] = [
    "autoscaling:SetDesiredCapacity",
    "autoscaling:SuspendProcesses",
    "cloudwatch:PutMetricData",
    "ssm:PutParameter",
    "ec2:DescribeInstances",
];

async fn parameter_version(bed: &Bed, name: &str) -> anyhow::Result<Option<i64>> {
    match bed.moto.ssm().await.get_parameter().name(name).send().await {
        Ok(o) => Ok(o.parameter().map(|p| p.version())),
        Err(e) if format!("{e:?}").contains("ParameterNotFound") => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_update_diff_and_destroy_in_the_emulator() -> R {
    let bed = Bed::start("deployed").await?;
    let endpoint = bed.hub.endpoint();
    let stack = bed.stack.clone();
    let agents = format!("{stack}-agents");
    let scaler = format!("{stack}-scaler");

    // --- create -------------------------------------------------------------------------
    let v = vars(
        &bed,
        &endpoint,
        &[
            ("SEMAPHORE_AGENT_ASG_MAX_SIZE", "3"),
            ("SEMAPHORE_AGENT_TAGS", "team:ci,cost-center:42"),
            ("SEMAPHORE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT", "120"),
        ],
    );
    let out = ok("deploy (create)", &cli(&bed, &v, &["deploy"], None).await?);
    assert!(out.contains(&format!("creating stack {stack}:")), "{out}");
    assert!(
        out.contains("+ add         AgentGroup (AWS::AutoScaling::AutoScalingGroup)"),
        "{out}"
    );
    assert!(out.contains("CREATE_COMPLETE"), "{out}");

    // Groups as configured; the scaler group exists because dynamic scaling is on.
    let g = bed.moto.group(&agents).await?;
    assert_eq!((g.min, g.max, g.desired), (0, 3, 0), "{g:?}");
    let s = bed.moto.group(&scaler).await?;
    assert_eq!((s.min, s.max, s.desired), (1, 1, 1), "{s:?}");

    // Launch template: IMDSv2 required, hop limit 1, shutdown terminates, user data names
    // the stack and the role.
    let lt = launch_template(&bed, &agents).await?;
    assert_eq!(xml(&lt, "httpTokens"), Some("required"), "{lt}");
    assert_eq!(xml(&lt, "httpPutResponseHopLimit"), Some("1"), "{lt}");
    assert_eq!(xml(&lt, "httpEndpoint"), Some("enabled"), "{lt}");
    assert_eq!(
        xml(&lt, "instanceInitiatedShutdownBehavior"),
        Some("terminate"),
        "{lt}"
    );
    assert_eq!(
        bed.moto
            .group_user_data(&agents)
            .await?
            .lines()
            .find(|l| l.starts_with("AGENT_FLEET_ROLE=")),
        Some("AGENT_FLEET_ROLE=agent")
    );
    assert_eq!(
        bed.moto
            .group_user_data(&scaler)
            .await?
            .lines()
            .find(|l| l.starts_with("AGENT_FLEET_ROLE=")),
        Some("AGENT_FLEET_ROLE=scaler")
    );
    let lt_version = xml(&lt, "versionNumber").map(str::to_string);
    // Both launch templates encrypt the root volume.
    for template in [&agents, &scaler] {
        let lt = launch_template(&bed, template).await?;
        assert!(
            lt.contains("<deviceName>/dev/sda1</deviceName>")
                && xml(&lt, "encrypted") == Some("true"),
            "{template}: root volume not encrypted:\n{lt}"
        );
    }

    // Two instance roles. The agent role reads its config and the token, decrypts only that
    // parameter, may assume the stack's job roles and steers nothing; the scaler role leads.
    let role = physical_id(&bed, "AgentRole").await?;
    let profile = physical_id(&bed, "AgentProfile").await?;
    let scaler_role = physical_id(&bed, "ScalerRole").await?;
    let security_group = physical_id(&bed, "SecurityGroup").await?;
    let sg = bed
        .moto
        .query(
            "ec2",
            "DescribeSecurityGroups",
            &[("GroupId.1", &security_group)],
        )
        .await?;
    assert!(
        !sg.contains("<fromPort>22</fromPort>"),
        "SSH open without a key and CIDR:\n{sg}"
    );
    let policy = role_policies(&bed, &role).await?;
    let token_arn = format!(":parameter{}", bed.token_parameter);
    assert!(
        policy.contains(&token_arn) && policy.contains("kms:EncryptionContext:PARAMETER_ARN"),
        "{policy}"
    );
    assert!(
        policy.contains(&format!(":role/agent-fleet/{stack}/*")),
        "{policy}"
    );
    for action in LEADER_ACTIONS
        .iter()
        .chain(&["\"ssm:GetParameters\"", "s3:"])
    {
        assert!(
            !policy.contains(action),
            "the agent role holds {action}:\n{policy}"
        );
    }
    let scaler_policy = role_policies(&bed, &scaler_role).await?;
    for action in LEADER_ACTIONS {
        assert!(scaler_policy.contains(action), "{scaler_policy}");
    }
    assert!(
        scaler_policy.contains(&format!(":parameter/agent-fleet/{stack}/leader/*"))
            && scaler_policy.contains(&token_arn),
        "{scaler_policy}"
    );
    assert!(
        !scaler_policy.contains("sts:AssumeRole") && !scaler_policy.contains("s3:"),
        "{scaler_policy}"
    );

    // The runtime config parses with the supervisor's own type and says what was deployed.
    let config_parameter = format!("/agent-fleet/{stack}/config");
    let json = bed
        .moto
        .get_parameter(&config_parameter)
        .await?
        .unwrap_or_default();
    let settings = Settings::parse(&config_parameter, &json)?;
    assert_eq!(settings.endpoint, endpoint);
    assert_eq!(settings.agent_group, agents);
    assert_eq!(settings.token_parameter, bed.token_parameter);
    assert_eq!(settings.idle_timeout, Duration::from_secs(120));
    assert!(settings.disconnect_after_job && settings.scaler.enabled);
    assert_eq!(
        settings.election.prefix,
        format!("/agent-fleet/{stack}/leader")
    );
    let doc = runtime_config(&bed).await?;
    assert_eq!(
        doc["agents_lead"], false,
        "the scaler instance leads:\n{doc}"
    );
    // Logs ship by default, to the stack's group, kept 30 days; both instance roles may
    // write streams of that group only.
    let group = format!("/agent-fleet/{stack}");
    assert_eq!(settings.log_group.as_deref(), Some(group.as_str()));
    assert_eq!(log_group_retention(&bed, &group).await?, Some(Some(30)));
    for p in [&policy, &scaler_policy] {
        assert!(p.contains(&logs_statement(&group)), "{p}");
        assert!(
            !p.contains("logs:*") && !p.contains("logs:CreateLogGroup"),
            "{p}"
        );
    }
    assert_eq!(doc["job_role_arn"], serde_json::Value::Null, "{doc}");
    assert_eq!(doc["job_isolation"], "vm", "{doc}");
    assert_eq!(doc["use_pre_signed_url"], false, "{doc}");
    assert_eq!(doc["scaler"]["agent_lifetime_cap_secs"], 93_600, "{doc}");
    let config_version = parameter_version(&bed, &config_parameter).await?;

    // Stack tags from SEMAPHORE_AGENT_TAGS.
    let described = bed
        .moto
        .query("cloudformation", "DescribeStacks", &[("StackName", &stack)])
        .await?;
    assert!(
        described.contains("<Key>team</Key>") && described.contains("<Value>ci</Value>"),
        "{described}"
    );

    // --- the same again: nothing to do -----------------------------------------------------
    let out = ok(
        "deploy (unchanged)",
        &cli(&bed, &v, &["deploy"], None).await?,
    );
    assert!(out.contains("no changes"), "{out}");

    // --- diff shows a change and makes none --------------------------------------------
    let v5 = vars(
        &bed,
        &endpoint,
        &[
            ("SEMAPHORE_AGENT_ASG_MAX_SIZE", "5"),
            ("SEMAPHORE_AGENT_TAGS", "team:ci,cost-center:42"),
            ("SEMAPHORE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT", "120"),
        ],
    );
    let out = ok("diff", &cli(&bed, &v5, &["diff"], None).await?);
    assert!(out.contains("AsgMaxSize: 3 → 5"), "{out}");
    assert_eq!(
        bed.moto.group(&agents).await?.max,
        3,
        "diff changed the group"
    );

    // --- update: only what changed changes -------------------------------------------------
    let out = ok("deploy (update)", &cli(&bed, &v5, &["deploy"], None).await?);
    assert!(out.contains(&format!("updating stack {stack}:")), "{out}");
    assert!(out.contains("AsgMaxSize: 3 → 5"), "{out}");
    assert!(out.contains("UPDATE_COMPLETE"), "{out}");
    assert_eq!(bed.moto.group(&agents).await?.max, 5);
    assert_eq!(
        physical_id(&bed, "AgentRole").await?,
        role,
        "the role was replaced"
    );
    let lt = launch_template(&bed, &agents).await?;
    assert_eq!(
        xml(&lt, "versionNumber").map(str::to_string),
        lt_version,
        "the launch template changed:\n{lt}"
    );
    assert_eq!(
        parameter_version(&bed, &config_parameter).await?,
        config_version,
        "the runtime config was rewritten"
    );
    assert_eq!(bed.moto.group(&scaler).await?.in_service().len(), 1);

    // --- destroy -------------------------------------------------------------------------
    // Leader terms are the instances' doing; destroy removes them too.
    bed.moto
        .put_parameter(
            &format!("/agent-fleet/{stack}/leader/0000000001"),
            "{}",
            false,
        )
        .await?;
    let refused = cli(&bed, &v5, &["destroy"], Some("not-the-name\n")).await?;
    assert!(
        !refused.status.success(),
        "destroy went ahead without the stack name"
    );
    assert!(
        bed.moto.group(&agents).await.is_ok(),
        "the group is gone after a refused destroy"
    );
    let out = ok(
        "destroy",
        &cli(&bed, &v5, &["destroy"], Some(&format!("{stack}\n"))).await?,
    );
    assert!(out.contains(&format!("stack {stack} is deleted")), "{out}");
    assert!(out.contains("deleted 1 leader-lease parameter(s)"), "{out}");
    assert!(
        out.contains(&format!(
            "kept the registration token parameter {}",
            bed.token_parameter
        )),
        "{out}"
    );

    let left = bed
        .moto
        .query("cloudformation", "DescribeStacks", &[("StackName", &stack)])
        .await;
    assert!(
        left.is_err() || left.as_deref().is_ok_and(|d| d.contains("DELETE_COMPLETE")),
        "{left:?}"
    );
    assert!(
        bed.moto.group(&agents).await.is_err(),
        "agents group left behind"
    );
    assert!(
        bed.moto.group(&scaler).await.is_err(),
        "scaler group left behind"
    );
    assert!(
        launch_template(&bed, &agents).await.is_err(),
        "launch template left behind"
    );
    let roles = bed.moto.query("iam", "ListRoles", &[]).await?;
    for role in [&role, &scaler_role] {
        assert!(!roles.contains(role.as_str()), "role {role} left behind");
    }
    assert!(
        bed.moto
            .query(
                "iam",
                "GetInstanceProfile",
                &[("InstanceProfileName", &profile)]
            )
            .await
            .is_err(),
        "instance profile {profile} left behind"
    );
    assert!(
        bed.moto
            .query(
                "ec2",
                "DescribeSecurityGroups",
                &[("GroupId.1", &security_group)]
            )
            .await
            .is_err(),
        "security group {security_group} left behind"
    );
    let under = bed
        .moto
        .ssm()
        .await
        .get_parameters_by_path()
        .path(format!("/agent-fleet/{stack}"))
        .recursive(true)
        .send()
        .await?;
    let names: Vec<&str> = under
        .parameters()
        .iter()
        .filter_map(|p| p.name())
        .filter(|n| *n != bed.token_parameter)
        .collect();
    assert!(names.is_empty(), "parameters left behind: {names:?}");
    assert!(
        parameter_version(&bed, &bed.token_parameter)
            .await?
            .is_some(),
        "the user's token parameter must be kept"
    );

    // Destroying again is harmless.
    let out = ok(
        "destroy (again)",
        &cli(&bed, &v5, &["destroy", "--yes"], None).await?,
    );
    assert!(out.contains("does not exist"), "{out}");
    Ok(())
}

/// IAM returns the policy document URL-encoded.
fn urlencoding_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).replace("&quot;", "\"")
}

/// Jobs are hostile. With a cache bucket the stack makes a job role, which only the agent
/// role may assume, and names it in the runtime config; the scaler instance leads at any
/// minimum; the hardening settings reach the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_get_a_job_role_and_the_scaler_leads_at_any_minimum() -> R {
    let bed = Bed::start("hostile").await?;
    let endpoint = bed.hub.endpoint();
    let stack = bed.stack.clone();
    let scaler = format!("{stack}-scaler");
    let v = vars(
        &bed,
        &endpoint,
        &[
            ("SEMAPHORE_AGENT_ASG_MIN_SIZE", "1"),
            ("SEMAPHORE_AGENT_ASG_MAX_SIZE", "2"),
            ("SEMAPHORE_AGENT_CACHE_BUCKET_NAME", "ci-cache"),
            ("SEMAPHORE_AGENT_JOB_ISOLATION", "strict"),
            ("SEMAPHORE_AGENT_LIFETIME_CAP", "7200"),
            ("SEMAPHORE_AGENT_USE_PRE_SIGNED_URL", "true"),
        ],
    );
    let out = cli(&bed, &v, &["deploy"], None).await?;
    ok("deploy", &out);
    let (_, e) = text(&out);
    assert!(!e.contains("agents lead"), "{e}");

    let s = bed.moto.group(&scaler).await?;
    assert_eq!(
        (s.min, s.max, s.desired),
        (1, 1, 1),
        "a scaler at min 1 too: {s:?}"
    );
    let doc = runtime_config(&bed).await?;
    assert_eq!(doc["agents_lead"], false, "{doc}");
    assert_eq!(doc["job_isolation"], "strict", "{doc}");
    assert_eq!(doc["use_pre_signed_url"], true, "{doc}");
    assert_eq!(doc["scaler"]["agent_lifetime_cap_secs"], 7200, "{doc}");

    // The job role: named in the config, under the stack's path, an hour at most, trusting
    // the agent role only; the cache is its, no longer the agent role's.
    let job_role = physical_id(&bed, "JobRole").await?;
    let described = bed
        .moto
        .query("iam", "GetRole", &[("RoleName", &job_role)])
        .await?;
    let arn = xml(&described, "Arn").unwrap_or_default();
    assert_eq!(doc["job_role_arn"], arn, "{doc}");
    assert!(
        arn.contains(&format!(":role/agent-fleet/{stack}/")),
        "{described}"
    );
    assert_eq!(xml(&described, "MaxSessionDuration"), Some("3600"));
    let agent_role = physical_id(&bed, "AgentRole").await?;
    let trust = urlencoding_decode(xml(&described, "AssumeRolePolicyDocument").unwrap_or_default());
    assert!(
        trust.contains(&format!(":role/{agent_role}")) && !trust.contains("ec2.amazonaws.com"),
        "{trust}"
    );
    let job_policy = role_policies(&bed, &job_role).await?;
    assert!(
        job_policy.contains("arn:aws:s3:::ci-cache/*") && job_policy.contains("s3:PutObject"),
        "{job_policy}"
    );
    let agent_policy = role_policies(&bed, &agent_role).await?;
    assert!(!agent_policy.contains("s3:"), "{agent_policy}");
    for action in LEADER_ACTIONS {
        assert!(!agent_policy.contains(action), "{agent_policy}");
    }

    // GitHub's host keys: the placeholder until a leader fetches them; both roles read them
    // (InstancePolicy), only the scaler's may write them.
    let known_hosts = format!("/agent-fleet/{stack}/known-hosts");
    assert_eq!(doc["known_hosts_parameter"], known_hosts.as_str(), "{doc}");
    assert_eq!(
        bed.moto.get_parameter(&known_hosts).await?.as_deref(),
        Some(agent_supervisor::known_hosts::PLACEHOLDER)
    );
    assert!(
        agent_policy.contains(&format!(":parameter{known_hosts}")),
        "{agent_policy}"
    );
    let scaler_policy = role_policies(&bed, &physical_id(&bed, "ScalerRole").await?).await?;
    assert!(
        scaler_policy.contains("LeaderRefreshesKnownHosts")
            && scaler_policy.contains(&format!(":parameter{known_hosts}\"")),
        "{scaler_policy}"
    );
    Ok(())
}

/// `SCALER_INSTANCE_TYPE=none` is warned about at diff and deploy; then there is no scaler
/// instance, the agents lead, and the agent role carries the leader's powers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_lead_only_when_asked_and_the_cli_says_what_that_costs() -> R {
    let bed = Bed::start("leading").await?;
    let endpoint = bed.hub.endpoint();
    let v = vars(
        &bed,
        &endpoint,
        &[
            ("SEMAPHORE_AGENT_ASG_MIN_SIZE", "1"),
            ("SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE", "none"),
        ],
    );
    let warning =
        "warning: SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE=none with dynamic scaling: agents lead";
    for command in ["diff", "deploy"] {
        let out = cli(&bed, &v, &[command], None).await?;
        ok(command, &out);
        let (_, e) = text(&out);
        assert!(
            e.contains(warning) && e.contains("can steer the fleet"),
            "{command}: {e}"
        );
    }
    assert_eq!(runtime_config(&bed).await?["agents_lead"], true);
    assert!(
        bed.moto
            .group(&format!("{}-scaler", bed.stack))
            .await
            .is_err(),
        "a scaler group although agents lead"
    );
    let agent_policy = role_policies(&bed, &physical_id(&bed, "AgentRole").await?).await?;
    for action in LEADER_ACTIONS {
        assert!(agent_policy.contains(action), "{agent_policy}");
    }
    Ok(())
}

/// The retention of a log group: `None` if it does not exist, `Some(None)` if it never
/// expires.
async fn log_group_retention(bed: &Bed, name: &str) -> anyhow::Result<Option<Option<u64>>> {
    let doc = bed
        .moto
        .logs_call(
            "DescribeLogGroups",
            serde_json::json!({"logGroupNamePrefix": name}),
        )
        .await?;
    Ok(doc["logGroups"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["logGroupName"] == name)
        .map(|g| g["retentionInDays"].as_u64()))
}

/// The instance policy's logs statement, as IAM returns it: the two actions on the group's
/// ARN (`…:log-group:<name>:*`, its streams).
fn logs_statement(group: &str) -> String {
    format!(
        "\"Action\": [\"logs:CreateLogStream\", \"logs:PutLogEvents\"], \"Resource\": \"arn:aws:logs:us-east-1:{ACCOUNT_ID}:log-group:{group}:*\""
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_shipping_is_a_stack_setting_with_a_checked_retention() -> R {
    let bed = Bed::start("logsettings").await?;
    let endpoint = bed.hub.endpoint();
    let group = format!("/agent-fleet/{}", bed.stack);
    // A retention CloudWatch Logs does not offer is refused before any AWS call.
    let since = bed.moto.last_seq().await?;
    let v = vars(&bed, &endpoint, &[("SEMAPHORE_AGENT_LOG_RETENTION", "31")]);
    let out = cli(&bed, &v, &["deploy"], None).await?;
    let (_, e) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains("SEMAPHORE_AGENT_LOG_RETENTION") && e.contains("`30`") && e.contains("`3653`"),
        "{e}"
    );
    assert!(bed.moto.calls(since).await?.is_empty());
    // Another retention.
    let v = vars(&bed, &endpoint, &[("SEMAPHORE_AGENT_LOG_RETENTION", "7")]);
    ok("deploy", &cli(&bed, &v, &["deploy"], None).await?);
    assert_eq!(log_group_retention(&bed, &group).await?, Some(Some(7)));
    assert_eq!(runtime_config(&bed).await?["log_group"], group.as_str());
    // Turned off: no group, no key, no permission. (A stack of its own: moto's change sets
    // do not see a condition turned off.)
    let bed = Bed::start("logsoff").await?;
    let group = format!("/agent-fleet/{}", bed.stack);
    let v = vars(&bed, &endpoint, &[("SEMAPHORE_AGENT_SHIP_LOGS", "false")]);
    ok("deploy", &cli(&bed, &v, &["deploy"], None).await?);
    let doc = runtime_config(&bed).await?;
    assert!(doc["log_group"].is_null(), "{doc}");
    assert_eq!(log_group_retention(&bed, &group).await?, None);
    let policy = role_policies(&bed, &physical_id(&bed, "AgentRole").await?).await?;
    assert!(!policy.contains("logs:"), "{policy}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deploy_names_the_resource_and_its_reason() -> R {
    let bed = Bed::start("rolledback").await?;
    let endpoint = bed.hub.endpoint();
    let v = vars(&bed, &endpoint, &[]);
    bed.moto
        .fail_cloudformation_resource(
            "AgentGroup",
            "You have requested more vCPU capacity than your current vCPU limit of 0 allows",
        )
        .await?;
    let out = cli(&bed, &v, &["deploy"], None).await?;
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(1), "stdout:\n{o}\nstderr:\n{e}");
    assert!(
        e.contains(&format!("stack {} ended ROLLBACK_COMPLETE", bed.stack)),
        "{e}"
    );
    assert!(
        e.contains("AgentGroup (AWS::AutoScaling::AutoScalingGroup) CREATE_FAILED: You have requested more vCPU capacity"),
        "{e}"
    );
    // The events were shown as they came.
    assert!(o.contains("CREATE_FAILED"), "{o}");
    // A stack that failed its first deploy must go before the next one.
    let again = cli(&bed, &v, &["deploy"], None).await?;
    let (_, e) = text(&again);
    assert!(!again.status.success());
    assert!(
        e.contains("ROLLBACK_COMPLETE after a failed first deploy")
            && e.contains("agent-fleet destroy"),
        "{e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_touches_nothing_and_names_the_variable() -> R {
    let bed = Bed::start("badconfig").await?;
    let endpoint = bed.hub.endpoint();
    let since = bed.moto.last_seq().await?;
    let v = vars(
        &bed,
        &endpoint,
        &[
            ("SEMAPHORE_AGENT_ASG_MIN_SIZE", "4"),
            ("SEMAPHORE_AGENT_ASG_MAX_SIZE", "2"),
        ],
    );
    let out = cli(&bed, &v, &["deploy"], None).await?;
    let (_, e) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains(
            "SEMAPHORE_AGENT_ASG_MIN_SIZE: \"4\" is above SEMAPHORE_AGENT_ASG_MAX_SIZE \"2\""
        ),
        "{e}"
    );
    let calls = bed.moto.calls(since).await?;
    assert!(calls.is_empty(), "AWS was called: {calls:?}");

    // A deploy before the token is stored is refused with the command that stores it.
    let v = vec![
        ("SEMAPHORE_AGENT_STACK_NAME", "badconfig"),
        ("SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME", "/nowhere/token"),
        ("SEMAPHORE_ENDPOINT", endpoint.as_str()),
    ];
    let out = cli(&bed, &v, &["deploy"], None).await?;
    let (_, e) = text(&out);
    assert!(!out.status.success());
    assert!(e.contains("the token parameter /nowhere/token (SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME) does not exist") && e.contains("agent-fleet token set"), "{e}");
    let stacks = bed.moto.query("cloudformation", "ListStacks", &[]).await?;
    assert!(
        !stacks.contains("<StackName>badconfig</StackName>"),
        "{stacks}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_set_reads_stdin_stores_a_secure_string_and_rotates() -> R {
    let bed = Bed::start("tokens").await?;
    let name = "/ci/tokens/registration";
    let v = [("SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME", name)];
    let secret = "tok-0123456789abcdef";
    let out = cli(&bed, &v, &["token", "set"], Some(&format!("{secret}\n"))).await?;
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(
        o.contains(&format!(
            "stored the registration token in {name} (SecureString, key alias/aws/ssm), version 1"
        )),
        "{o}"
    );
    assert!(
        !o.contains(secret) && !e.contains(secret),
        "the token was printed"
    );
    let p = bed
        .moto
        .ssm()
        .await
        .get_parameter()
        .name(name)
        .with_decryption(true)
        .send()
        .await?;
    let p = p
        .parameter()
        .cloned()
        .unwrap_or_else(|| panic!("no parameter"));
    assert_eq!(p.value(), Some(secret));
    assert_eq!(p.r#type().map(|t| t.as_str()), Some("SecureString"));

    let out = cli(&bed, &v, &["token", "set"], Some("tok-rotated\n")).await?;
    let (o, _) = text(&out);
    assert!(o.contains("version 2") && o.contains("rotated"), "{o}");

    // Nothing on stdin: refused, nothing stored.
    let out = cli(&bed, &v, &["token", "set"], Some("")).await?;
    let (_, e) = text(&out);
    assert!(
        !out.status.success() && e.contains("no token on stdin"),
        "{e}"
    );
    assert_eq!(parameter_version(&bed, name).await?, Some(2));
    // The token is never an argument.
    let out = cli(&bed, &v, &["token", "set", secret], None).await?;
    let (o, e) = text(&out);
    assert!(!out.status.success(), "a token argument was accepted");
    assert!(e.contains("read from stdin, never from arguments"), "{e}");
    assert!(
        !o.contains(secret) && !e.contains(secret),
        "the refused token was echoed: {e}"
    );
    assert_eq!(parameter_version(&bed, name).await?, Some(2));
    Ok(())
}

/// The whole path: deploy with the CLI, run the instances of the groups the template
/// made, queue a job wave → the scaler-role instance leads and raises desired capacity
/// from zero, the jobs run, the agents leave when idle, desired returns to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployed_fleet_scales_up_from_zero_and_back() -> R {
    let bed = Bed::start("wave").await?;
    let endpoint = bed.hub.endpoint();
    let stack = bed.stack.clone();
    let agents = format!("{stack}-agents");
    let scaler = format!("{stack}-scaler");
    let v = vars(
        &bed,
        &endpoint,
        &[
            ("SEMAPHORE_AGENT_ASG_MAX_SIZE", "4"),
            ("SEMAPHORE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT", "3"),
            ("SEMAPHORE_AGENT_SCALER_POLL_INTERVAL_MS", "1000"),
        ],
    );
    ok("deploy", &cli(&bed, &v, &["deploy"], None).await?);

    // The bed's hub speaks plain HTTP, and the bed wants short election timings: both are
    // keys the template leaves to the supervisor's defaults. Everything else is the
    // template's own config.
    let config_parameter = format!("/agent-fleet/{stack}/config");
    let json = bed
        .moto
        .get_parameter(&config_parameter)
        .await?
        .unwrap_or_default();
    let mut doc: serde_json::Value = serde_json::from_str(&json)?;
    doc["no_https"] = serde_json::json!(true);
    doc["election"]["lease_ms"] = serde_json::json!(2000);
    doc["election"]["renew_deadline_ms"] = serde_json::json!(1400);
    doc["election"]["retry_ms"] = serde_json::json!(500);
    bed.put_config_json(&doc.to_string()).await?;

    let fleet = Fleet::start(
        Arc::clone(&bed.moto),
        bed.template_fleet_options(&[&agents, &scaler], &[], &[]),
    );
    let result = async {
        eventually("a leader term", Duration::from_secs(30), || async {
            bed.moto
                .get_parameter(&format!("/agent-fleet/{stack}/leader/0000000001"))
                .await
                .ok()
                .flatten()
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(1600)).await;

        let jobs: Vec<String> = (0..3)
            .map(|i| {
                bed.hub.enqueue_job(JobSpec {
                    commands: vec![format!("sleep 1; echo {i}")],
                    env: vec![],
                })
            })
            .collect();
        let queued = Instant::now();
        eventually("desired 0 → 3", Duration::from_secs(15), || async {
            (bed.moto.group(&agents).await.ok()?.desired == 3).then_some(())
        })
        .await?;
        println!(
            "desired 0 → 3 {:?} after the jobs were queued",
            queued.elapsed()
        );

        // status, while the wave is on.
        let out = ok("status", &cli(&bed, &v, &["status"], None).await?);
        assert!(
            out.contains(&format!("stack {stack}: CREATE_COMPLETE")),
            "{out}"
        );
        assert!(
            out.contains(&format!("group {agents}: desired 3 (min 0, max 4)")),
            "{out}"
        );
        assert!(
            out.contains(&format!("group {scaler}: desired 1 (min 1, max 1)")),
            "{out}"
        );
        assert!(
            out.contains("leader: i-") && out.contains("(term 1,"),
            "{out}"
        );
        assert!(out.contains("last scaling decision:"), "{out}");
        assert!(out.contains("jobs: "), "{out}");
        assert!(out.contains("running") && out.contains(" age "), "{out}");
        println!("{out}");

        bed.jobs_passed(&jobs, Duration::from_secs(60)).await?;
        eventually("idle scale-in to 0", Duration::from_secs(60), || async {
            (bed.moto.group(&agents).await.ok()?.desired == 0).then_some(())
        })
        .await?;
        // The scale-from-zero instance stays.
        assert_eq!(bed.moto.group(&scaler).await?.in_service().len(), 1);
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("{}", fleet.all_output());
    }
    fleet.shutdown().await;
    result
}

/// `ami build` runs Packer with the OS, arch, region and manifest path, takes the AMI id
/// from the manifest and records it where the template looks it up; a deployed stack's
/// instances then launch from it. Packer itself cannot reach AWS here: a stand-in plays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ami_build_records_the_image_that_stacks_launch() -> R {
    let bed = Bed::start("imaged").await?;
    let dir = bed.root.join("packer");
    std::fs::create_dir_all(&dir)?;
    let template = dir.join("agent-fleet.pkr.hcl");
    std::fs::write(&template, "# stand-in\n")?;
    let args_log = dir.join("args");
    let fake = dir.join("packer");
    let ami_id = "ami-0123456789abcdef0";
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n[ \"$1\" = init ] && exec true\nprintf '%s\\n' \"$@\" > {log}\nfor a in \"$@\"; do case \"$a\" in manifest_path=*) m=\"${{a#manifest_path=}}\";; esac; done\n\
             [ \"$FAIL\" = 1 ] && exit 3\n\
             printf '{{\"builds\":[{{\"packer_run_uuid\":\"r1\",\"artifact_id\":\"us-east-1:{ami_id}\"}}],\"last_run_uuid\":\"r1\"}}' > \"$m\"\n",
            log = args_log.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))?;
    let (fake_s, template_s) = (
        fake.to_string_lossy().into_owned(),
        template.to_string_lossy().into_owned(),
    );
    let build = [
        "ami",
        "build",
        "--packer",
        &fake_s,
        "--template",
        &template_s,
        "--arch",
        "arm64",
        "--var",
        "agent_version=v2.3.0",
    ];

    // A failed build records nothing.
    let out = cli(&bed, &[("FAIL", "1")], &build, None).await?;
    let (_, e) = text(&out);
    assert!(
        !out.status.success() && e.contains("failed") && e.contains("nothing was recorded"),
        "{e}"
    );
    assert_eq!(
        parameter_version(&bed, "/agent-fleet/ami/ubuntu-noble/arm64").await?,
        None
    );

    let out = ok("ami build", &cli(&bed, &[], &build, None).await?);
    assert!(
        out.contains(&format!(
            "recorded {ami_id} in /agent-fleet/ami/ubuntu-noble/arm64"
        )),
        "{out}"
    );
    let args = std::fs::read_to_string(&args_log)?;
    for a in [
        "build",
        "os=ubuntu-noble",
        "arch=arm64",
        "region=us-east-1",
        "agent_version=v2.3.0",
        template_s.as_str(),
    ] {
        assert!(
            args.lines().any(|l| l == a),
            "packer not given {a:?}:\n{args}"
        );
    }
    let p = bed
        .moto
        .ssm()
        .await
        .get_parameter()
        .name("/agent-fleet/ami/ubuntu-noble/arm64")
        .send()
        .await?;
    assert_eq!(p.parameter().and_then(|p| p.value()), Some(ami_id));
    assert_eq!(
        p.parameter().and_then(|p| p.data_type()),
        Some("aws:ec2:image")
    );

    // A stack of that OS/arch without SEMAPHORE_AGENT_AMI launches the recorded image.
    let out = ok(
        "ami record",
        &cli(
            &bed,
            &[],
            &["ami", "record", "--arch", "x86_64", ami_id],
            None,
        )
        .await?,
    );
    assert!(
        out.contains("/agent-fleet/ami/ubuntu-noble/x86_64"),
        "{out}"
    );
    let endpoint = bed.hub.endpoint();
    ok(
        "deploy",
        &cli(
            &bed,
            &vars(
                &bed,
                &endpoint,
                &[
                    ("SEMAPHORE_AGENT_ASG_MIN_SIZE", "1"),
                    ("SEMAPHORE_AGENT_ASG_MAX_SIZE", "1"),
                ],
            ),
            &["deploy"],
            None,
        )
        .await?,
    );
    let g = bed.moto.group("imaged-agents").await?;
    let id = g
        .in_service()
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no instance: {g:?}"))?;
    let described = bed
        .moto
        .query("ec2", "DescribeInstances", &[("InstanceId.1", &id)])
        .await?;
    assert_eq!(xml(&described, "imageId"), Some(ami_id), "{described}");

    let out = ok("ami show", &cli(&bed, &[], &["ami", "show"], None).await?);
    assert!(
        out.contains(&format!("/agent-fleet/ami/ubuntu-noble/arm64: {ami_id}")),
        "{out}"
    );
    assert!(
        out.contains("/agent-fleet/ami/ubuntu-jammy/x86_64: none"),
        "{out}"
    );
    Ok(())
}

/// A warm pool and a schedule, deployed through the CLI: the group's warm pool and scheduled
/// actions say what the variables asked, the runtime config names the launch hook and the
/// images to warm, and `status` prints the pool and the next scheduled change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_pool_and_a_schedule_are_deployed_and_shown() -> R {
    let bed = Bed::start("warmpool").await?;
    let endpoint = bed.hub.endpoint();
    let agents = format!("{}-agents", bed.stack);
    let v = vars(
        &bed,
        &endpoint,
        &[
            ("SEMAPHORE_AGENT_ASG_MAX_SIZE", "5"),
            ("SEMAPHORE_AGENT_INSTANCE_TYPE", "t3.large"),
            ("SEMAPHORE_AGENT_WARM_POOL_SIZE", "2"),
            ("SEMAPHORE_AGENT_WARM_POOL_STATE", "Hibernated"),
            ("SEMAPHORE_AGENT_WARM_IMAGES", "alpine:3,ruby:3.3"),
            (
                "SEMAPHORE_AGENT_SCHEDULE",
                "Mon-Fri 08:00 min=4; Mon-Fri 19:00 min=0; Sat 10:30 min=1 max=2",
            ),
            ("SEMAPHORE_AGENT_SCHEDULE_TIMEZONE", "Europe/Berlin"),
        ],
    );
    let out = ok("deploy", &cli(&bed, &v, &["deploy"], None).await?);
    // (moto's change set lists every resource, whatever its condition.)
    assert!(
        out.contains("WarmPool (AWS::AutoScaling::WarmPool)") && out.contains("CREATE_COMPLETE"),
        "{out}"
    );

    // The pool: exactly two instances (MinSize = MaxGroupPreparedCapacity), hibernated, never reused.
    let asg = bed.moto.autoscaling().await;
    let pool = asg
        .describe_warm_pool()
        .auto_scaling_group_name(&agents)
        .send()
        .await?;
    let c = pool.warm_pool_configuration().expect("a warm pool");
    assert_eq!(c.min_size(), Some(2), "{c:?}");
    assert_eq!(c.max_group_prepared_capacity(), Some(2), "{c:?}");
    assert_eq!(
        c.pool_state().map(|s| s.as_str()),
        Some("Hibernated"),
        "{c:?}"
    );
    assert_eq!(
        c.instance_reuse_policy()
            .and_then(|r| r.reuse_on_scale_in()),
        Some(false),
        "{c:?}"
    );
    // Hibernation is configured in the agents' launch template (only there).
    let lt = launch_template(&bed, &agents).await?;
    assert!(
        xml(&lt, "hibernationOptions").is_some_and(|h| h.contains("true")),
        "{lt}"
    );

    // The schedule: one action per entry, in the time zone, max defaulting to the group's.
    let actions = asg
        .describe_scheduled_actions()
        .auto_scaling_group_name(&agents)
        .send()
        .await?;
    let mut found: Vec<(String, Option<i32>, Option<i32>)> = actions
        .scheduled_update_group_actions()
        .iter()
        .map(|a| {
            assert_eq!(a.time_zone(), Some("Europe/Berlin"), "{a:?}");
            assert_eq!(a.auto_scaling_group_name(), Some(agents.as_str()), "{a:?}");
            (
                a.recurrence().unwrap_or_default().to_string(),
                a.min_size(),
                a.max_size(),
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            ("0 19 * * 1-5".to_string(), Some(0), Some(5)),
            ("0 8 * * 1-5".to_string(), Some(4), Some(5)),
            ("30 10 * * 6".to_string(), Some(1), Some(2)),
        ]
    );

    // The runtime config: the launch hook and the images to warm; the supervisor parses it.
    let doc = runtime_config(&bed).await?;
    assert_eq!(
        doc["launch_hook"],
        serde_json::json!({"name": "agent-fleet-warm", "heartbeat_timeout_secs": 600}),
        "{doc}"
    );
    assert_eq!(
        doc["warm_images"],
        serde_json::json!(["alpine:3", "ruby:3.3"]),
        "{doc}"
    );
    Settings::parse("config", &doc.to_string())?;
    // The AMI parameter a pooled instance compares its AMI with, readable by the agent role.
    let image_parameter = "/agent-fleet/ami/ubuntu-noble/x86_64";
    assert_eq!(doc["image_parameter"], image_parameter, "{doc}");
    let policy = role_policies(&bed, &physical_id(&bed, "AgentRole").await?).await?;
    assert!(
        policy.contains(&format!(":parameter{image_parameter}")),
        "{policy}"
    );

    // The launch hook exists only with a pool.
    let hooks = asg
        .describe_lifecycle_hooks()
        .auto_scaling_group_name(&agents)
        .send()
        .await?;
    let launch: Vec<_> = hooks
        .lifecycle_hooks()
        .iter()
        .filter(|h| h.lifecycle_transition() == Some("autoscaling:EC2_INSTANCE_LAUNCHING"))
        .map(|h| {
            (
                h.lifecycle_hook_name(),
                h.heartbeat_timeout(),
                h.default_result(),
            )
        })
        .collect();
    assert_eq!(
        launch,
        vec![(Some("agent-fleet-warm"), Some(600), Some("CONTINUE"))],
        "{hooks:?}"
    );

    // status: the pool and the next change.
    let out = ok("status", &cli(&bed, &v, &["status"], None).await?);
    assert!(
        out.contains("warm pool: ")
            && out.contains("(min 2, max prepared 2), Hibernated, reuse on scale-in off"),
        "{out}"
    );
    let next = out
        .lines()
        .find(|l| l.starts_with("next scheduled change: "))
        .unwrap_or_else(|| panic!("no next scheduled change:\n{out}"));
    assert!(
        next.contains("Europe/Berlin") && next.contains("3 scheduled action(s)"),
        "{next}"
    );

    // (Removing the pool again is an update that flips conditions, which moto answers with
    // a 500: cfn/README.md, "Notes for the emulator test".)
    Ok(())
}
