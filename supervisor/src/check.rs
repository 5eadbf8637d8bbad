//! `agent-supervisor check`: a preflight a person runs on an instance. One line per
//! item, with the fix when it fails; exit 1 if anything failed. Never prints the token.

use crate::aws::autoscaling::{AutoScaling, SdkAutoScaling};
use crate::aws::ssm::{ParameterStore, SdkParameterStore, SsmError};
use crate::startup::{prepare, RunOptions};

struct Report {
    failed: bool,
}

impl Report {
    fn ok(&mut self, item: &str, msg: impl std::fmt::Display) {
        println!("ok    {item}: {msg}");
    }
    fn fail(&mut self, item: &str, msg: impl std::fmt::Display) {
        self.failed = true;
        println!("FAIL  {item}: {msg}");
    }
}

pub async fn run(opts: &RunOptions) -> i32 {
    let mut r = Report { failed: false };
    let mut opts = opts.clone();
    opts.imds_attempts = opts.imds_attempts.min(3);
    let p = match prepare(&opts).await {
        Ok(p) => p,
        Err(e) => {
            r.fail("instance, stack and runtime config", e);
            return 1;
        }
    };
    r.ok("imds", format!("instance {}", p.instance_id));
    r.ok(
        "stack",
        format!(
            "{} (config parameter {})",
            p.identity.stack_name, p.identity.config_parameter
        ),
    );
    r.ok(
        "runtime config",
        format!(
            "endpoint {}, group {}",
            p.settings.endpoint, p.settings.agent_group
        ),
    );
    r.ok(
        "job isolation",
        match p.settings.job_isolation {
            crate::config::JobIsolation::Vm => {
                "vm: jobs get passwordless sudo and Docker; the VM is the boundary"
            }
            crate::config::JobIsolation::Strict => {
                "strict: no sudo, rootless Docker as the agent user"
            }
        },
    );
    if p.settings.agents_lead && p.settings.scaler.enabled {
        println!(
            "WARN  leadership: agent instances stand for leader, so a job that is root on its VM (job isolation vm) can use the leader's powers to steer the fleet (desired capacity, suspended processes, the lease); fix: deploy with the scaler instance (leave SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE unset, not none)"
        );
    }
    if !p.settings.ignored_keys.is_empty() {
        println!(
            "WARN  runtime config: keys this agent-supervisor does not know are ignored: {}; fix: rebuild the AMI (agent-fleet ami build) if the stack template is newer, or correct the key",
            p.settings.ignored_keys.join(", ")
        );
    }

    let ssm = SdkParameterStore::new(&p.sdk);
    match ssm.get(&p.settings.token_parameter).await {
        Ok(t) if t.value.trim().is_empty() => r.fail("token parameter", format!("{} is empty; fix: agent-fleet token set", p.settings.token_parameter)),
        Ok(t) if !t.secure => r.fail("token parameter", format!("{} is readable but not a SecureString; fix: store it encrypted with agent-fleet token set", p.settings.token_parameter)),
        Ok(_) => r.ok("token parameter", format!("{} readable and decrypted (value not shown)", p.settings.token_parameter)),
        Err(SsmError::NotFound { name }) => r.fail("token parameter", format!("{name} does not exist; fix: agent-fleet token set")),
        Err(e) => r.fail("token parameter", format!("{e}; fix: the instance role needs ssm:GetParameter on it and kms:Decrypt on its key")),
    }

    let asg = SdkAutoScaling::new(&p.sdk);
    match asg.group_of(&p.instance_id).await {
        Ok(Some(g)) if g == p.settings.agent_group => r.ok("group", format!("instance is in {g}")),
        Ok(Some(g)) => r.ok("group", format!("instance is in {g} (agents' group: {})", p.settings.agent_group)),
        Ok(None) => r.fail("group", format!("instance is in no Auto Scaling group; it cannot terminate itself; fix: launch it through the group {}", p.settings.agent_group)),
        Err(e) => r.fail("group", format!("{e}; fix: the instance role needs autoscaling:DescribeAutoScalingInstances")),
    }

    check_job_role(&mut r, &p).await;

    match crate::agent::RunAs::lookup(&opts.agent_user) {
        Ok(_) => r.ok("agent user", &opts.agent_user),
        Err(e) => r.fail("agent user", e),
    }
    match crate::shutdown_hook::socket_path(&opts.work_dir) {
        Ok(socket) => r.ok(
            "work dir",
            format!(
                "{} (hook socket {})",
                opts.work_dir.display(),
                socket.display()
            ),
        ),
        Err(e) => r.fail("work dir", e),
    }
    check_agent_cgroup(&mut r, &opts);
    check_imds_firewall(&mut r, &opts);
    let marker = opts.work_dir.join(crate::coordinator::USED_MARKER);
    if marker.exists() {
        println!(
            "WARN  one job per VM: {} exists, so this instance ran a job; a supervisor that starts now ends the instance",
            marker.display()
        );
    }
    if opts.agent_binary.exists() {
        r.ok("agent binary", opts.agent_binary.display());
    } else {
        r.fail(
            "agent binary",
            format!(
                "{} not found; fix: bake it into the AMI or pass --agent-binary",
                opts.agent_binary.display()
            ),
        );
    }
    i32::from(r.failed)
}

/// The job role, assumed as the supervisor does for jobs, and the cache bucket reached
/// with its credentials (the agent role has no S3 access of its own).
async fn check_job_role(r: &mut Report, p: &crate::startup::Prepared) {
    use crate::jobcreds::{CredentialSource, JobRole};
    let bucket = p.settings.cache_bucket.as_deref();
    let Some(arn) = &p.settings.job_role_arn else {
        if let Some(b) = bucket {
            r.fail("cache bucket", format!("{b} is named but the runtime config has no job role, so jobs have no credentials for it; fix: update the stack (agent-fleet deploy), which gives jobs a job role with the bucket"));
        }
        return;
    };
    let sts = match crate::aws::sts::QuerySts::new(&p.sdk) {
        Ok(s) => s,
        Err(e) => return r.fail("job role", e),
    };
    let creds = match JobRole::new(sts, arn, &p.instance_id).fetch().await {
        Ok(c) => {
            r.ok(
                "job role",
                format!("{arn} assumed (jobs get its credentials on loopback)"),
            );
            c
        }
        Err(e) => {
            return r.fail("job role", format!("{arn}: {e}; fix: the agent role may sts:AssumeRole the job role, and the job role trusts the agent role (agent-fleet deploy sets both)"));
        }
    };
    let Some(bucket) = bucket else { return };
    let as_job = p
        .sdk
        .to_builder()
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_credential_types::Credentials::new(
                    creds.access_key_id.clone(),
                    creds.secret_access_key.clone(),
                    Some(creds.session_token.clone()),
                    Some(creds.expiration),
                    "job-role",
                ),
            ),
        )
        .build();
    match crate::aws::s3::head_bucket(&as_job, bucket).await {
        Ok(()) => r.ok(
            "cache bucket",
            format!("{bucket} (reached with the job role)"),
        ),
        Err(e) => r.fail(
            "cache bucket",
            format!(
                "{bucket}: {e}; fix: create the bucket, or grant the job role s3:ListBucket on it"
            ),
        ),
    }
}

/// Whether IMDS is closed to the agent user (see [`crate::firewall`]).
fn check_imds_firewall(r: &mut Report, opts: &RunOptions) {
    if !opts.imds_firewall {
        println!("WARN  imds firewall: off (--no-imds-firewall): job code can read the instance role's credentials");
        return;
    }
    match crate::agent::RunAs::lookup(&opts.agent_user) {
        Ok(Some(run_as)) => match crate::firewall::verify(&opts.nft, run_as.uid.as_raw()) {
            Ok(()) => r.ok(
                "imds firewall",
                format!(
                    "{} and {} rejected for {} (uid {})",
                    crate::firewall::IMDS_V4,
                    crate::firewall::IMDS_V6,
                    opts.agent_user,
                    run_as.uid
                ),
            ),
            Err(e) => r.fail("imds firewall", e),
        },
        Ok(None) => println!(
            "WARN  imds firewall: the agent runs as this process's own user; IMDS cannot be closed to it"
        ),
        // The agent-user line already names the problem.
        Err(_) => {}
    }
}

/// Whether the agent gets a cgroup of its own (see [`crate::agent::cgroup`]).
fn check_agent_cgroup(r: &mut Report, opts: &RunOptions) {
    use crate::agent::cgroup::AgentCgroup;
    let explicit = opts.agent_cgroup.is_some();
    let Some(base) = opts.agent_cgroup.clone().or_else(AgentCgroup::own_base) else {
        println!("WARN  agent cgroup: no cgroup v2 on this system; processes a job moves out of the agent's process group outlive the agent");
        return;
    };
    match AgentCgroup::create(&base) {
        Ok(c) => r.ok(
            "agent cgroup",
            format!("{} (emptied after every agent run)", c.dir().display()),
        ),
        Err(e) if explicit => r.fail(
            "agent cgroup",
            format!("{e}; fix: --agent-cgroup names a cgroup v2 directory the supervisor may manage"),
        ),
        Err(e) => println!(
            "WARN  agent cgroup: {e}; processes a job moves out of the agent's process group outlive the agent; fix: Delegate=yes in the supervisor's unit"
        ),
    }
}
