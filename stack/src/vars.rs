//! The `SEMAPHORE_*` variables: one table says, for each, which template parameter it
//! feeds, its default, what it means and how it is checked. The README's configuration
//! table is printed from it (`agent-fleet vars --markdown`) and a test keeps the two equal.

/// Where a variable's value goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The CloudFormation stack name (and the prefix of every resource).
    StackName,
    /// A template parameter of the same value.
    Param(&'static str),
    /// `Key:Value,…` pairs passed as stack tags.
    StackTags,
    /// Policy names turned into ARNs for `ManagedPolicyArns`.
    ManagedPolicies,
    /// One launch-template override (JSON) spread over the `AsgLaunchTemplateOverride*` parameters.
    Overrides,
    /// Scheduled changes (`crate::schedule`), one per `ScheduleN` slot.
    Schedule,
}

impl Target {
    /// The template parameters this variable sets.
    pub fn parameters(self) -> &'static [&'static str] {
        match self {
            Target::StackName | Target::StackTags => &[],
            Target::Param(p) => match PARAM_NAMES.iter().find(|n| **n == p) {
                Some(n) => std::slice::from_ref(n),
                None => &[],
            },
            Target::ManagedPolicies => &["ManagedPolicyArns"],
            Target::Overrides => &OVERRIDE_PARAMETERS,
            Target::Schedule => &SCHEDULE_PARAMETERS,
        }
    }
}

pub const OVERRIDE_PARAMETERS: [&str; 5] = [
    "AsgLaunchTemplateOverrideInstanceType",
    "AsgLaunchTemplateOverrideVCpuMin",
    "AsgLaunchTemplateOverrideVCpuMax",
    "AsgLaunchTemplateOverrideMemoryMiBMin",
    "AsgLaunchTemplateOverrideMemoryMiBMax",
];

pub const SCHEDULE_PARAMETERS: [&str; crate::schedule::SLOTS] = [
    "Schedule1",
    "Schedule2",
    "Schedule3",
    "Schedule4",
    "Schedule5",
    "Schedule6",
];

/// How a value is checked (before any deploy; the template re-checks the same shapes).
#[derive(Debug, Clone, Copy)]
pub enum Check {
    /// Anything non-empty.
    Any,
    /// `true` or `false`.
    Bool,
    /// A whole number in `min..=max`.
    Int { min: u64, max: u64 },
    /// One of these.
    OneOf(&'static [&'static str]),
    /// A predicate, with what a valid value looks like (for the message).
    Shape(fn(&str) -> bool, &'static str),
    /// A comma list whose every item passes the predicate.
    List(fn(&str) -> bool, &'static str),
}

#[derive(Debug, Clone, Copy)]
pub struct Var {
    pub name: &'static str,
    pub target: Target,
    /// The default as the README shows it; `None` = unset.
    pub default: Option<&'static str>,
    pub meaning: &'static str,
    pub check: Check,
    /// Not in the reference stack: added by agent-fleet.
    pub ours: bool,
}

const fn var(
    name: &'static str,
    target: Target,
    default: Option<&'static str>,
    check: Check,
    meaning: &'static str,
) -> Var {
    Var {
        name,
        target,
        default,
        meaning,
        check,
        ours: false,
    }
}

const fn ours(
    name: &'static str,
    target: Target,
    default: Option<&'static str>,
    check: Check,
    meaning: &'static str,
) -> Var {
    Var {
        ours: true,
        ..var(name, target, default, check, meaning)
    }
}

use Check::*;
use Target::*;

/// Every variable, in the README's order.
pub const VARS: &[Var] = &[
    var("SEMAPHORE_AGENT_STACK_NAME", StackName, None, Shape(valid_stack_name, "a letter, then letters, digits and dashes, at most 121 characters (the launch templates are named `<stack>-agents`/`<stack>-scaler`, 128 at most)"),
        "**required**; CloudFormation stack name and prefix of every resource"),
    var("SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME", Param("TokenParameterName"), None, Shape(valid_ssm_name, "an SSM parameter name: a /full/path or a flat name of letters, digits, `_.-`"),
        "**required**; SSM SecureString holding the agent type's registration token (`agent-fleet token set` stores it)"),
    var("SEMAPHORE_ORGANIZATION", Param("Organization"), None, Shape(valid_organization, "letters, digits and dashes"),
        "endpoint becomes `<org>.semaphoreci.com`; this or `SEMAPHORE_ENDPOINT` is required"),
    var("SEMAPHORE_ENDPOINT", Param("Endpoint"), None, Shape(valid_endpoint, "a host name with an optional :port (1-65535), without https://, user@, a path, ?query or #fragment"),
        "Semaphore host[:port]; wins over the organization"),
    var("SEMAPHORE_AGENT_INSTANCE_TYPE", Param("InstanceType"), Some("t2.micro"), Shape(valid_instance_type, "an EC2 instance type such as t3.medium"),
        "agents' instance type (an arm64 type with `SEMAPHORE_AGENT_ARCH=arm64`)"),
    var("SEMAPHORE_AGENT_ASG_MIN_SIZE", Param("AsgMinSize"), Some("0"), Int { min: 0, max: 9999 },
        "group minimum"),
    var("SEMAPHORE_AGENT_ASG_MAX_SIZE", Param("AsgMaxSize"), Some("1"), Int { min: 1, max: 9999 },
        "group maximum; the scaler never goes above it"),
    var("SEMAPHORE_AGENT_ASG_DESIRED", Param("AsgDesired"), None, Int { min: 0, max: 9999 },
        "desired capacity at deploy; set only if given, so an update never resets live capacity"),
    var("SEMAPHORE_AGENT_USE_DYNAMIC_SCALING", Param("UseDynamicScaling"), Some("true"), Bool,
        "the elected leader raises desired capacity from job demand"),
    var("SEMAPHORE_AGENT_SECURITY_GROUP_ID", Param("SecurityGroupId"), None, Shape(|s| valid_aws_id(s, "sg-"), "sg- and 8 or 17 hex digits"),
        "existing security group; else one is created (all egress, SSH only with a key **and** `SEMAPHORE_AGENT_SSH_CIDR`)"),
    var("SEMAPHORE_AGENT_KEY_NAME", Param("KeyName"), None, Shape(valid_key_name, "an EC2 key pair name (printable ASCII, at most 255)"),
        "EC2 key pair for SSH; opens nothing by itself"),
    var("SEMAPHORE_AGENT_DISCONNECT_AFTER_JOB", Param("DisconnectAfterJob"), Some("true"), Bool,
        "one job per instance"),
    var("SEMAPHORE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT", Param("DisconnectAfterIdleTimeout"), Some("300"), Int { min: 0, max: 604_800 },
        "seconds idle before an agent's instance ends; `0` = never scale in"),
    var("SEMAPHORE_AGENT_CACHE_BUCKET_NAME", Param("CacheBucketName"), None, Shape(valid_bucket, "an S3 bucket name: 3-63 of a-z 0-9 . -"),
        "existing S3 bucket for the job cache, reached with the job role's credentials"),
    var("SEMAPHORE_AGENT_TOKEN_KMS_KEY", Param("TokenKmsKey"), Some("alias/aws/ssm"), Shape(valid_kms_key, "a KMS key id, key ARN, alias/name or alias ARN"),
        "KMS key of the token parameter"),
    var("SEMAPHORE_AGENT_VPC_ID", Param("VpcId"), None, Shape(|s| valid_aws_id(s, "vpc-"), "vpc- and 8 or 17 hex digits"),
        "existing VPC; unset = the default VPC"),
    var("SEMAPHORE_AGENT_SUBNETS", Param("Subnets"), None, List(|s| valid_aws_id(s, "subnet-"), "subnet ids, comma-separated, no spaces"),
        "subnets of the VPC; required with `SEMAPHORE_AGENT_VPC_ID`, ignored without"),
    var("SEMAPHORE_AGENT_AMI", Param("Ami"), None, Shape(valid_ami, "ami-… or resolve:ssm:<parameter>"),
        "AMI; unset = `resolve:ssm:/agent-fleet/ami/<os>/<arch>`, which the AMI build writes"),
    var("SEMAPHORE_AGENT_OS", Param("Os"), Some("ubuntu-noble"), OneOf(&["ubuntu-jammy", "ubuntu-noble"]),
        "`ubuntu-jammy` (22.04) or `ubuntu-noble` (24.04); the reference's `ubuntu-focal` is out of support"),
    var("SEMAPHORE_AGENT_ARCH", Param("Arch"), Some("x86_64"), OneOf(&["x86_64", "arm64"]),
        "`x86_64` or `arm64`"),
    var("SEMAPHORE_AGENT_MANAGED_POLICY_NAMES", ManagedPolicies, None, List(valid_policy, "IAM policy names (or ARNs), comma-separated"),
        "customer-managed policies attached to the job role, whose short-lived credentials jobs get (never to the instance roles)"),
    var("SEMAPHORE_AGENT_VOLUME_NAME", Param("VolumeName"), Some("/dev/sda1"), Shape(valid_device, "a device name such as /dev/sda1"),
        "root device name"),
    var("SEMAPHORE_AGENT_VOLUME_TYPE", Param("VolumeType"), Some("gp2"), OneOf(&["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"]),
        "root volume type"),
    var("SEMAPHORE_AGENT_VOLUME_SIZE", Param("VolumeSize"), Some("64"), Int { min: 8, max: 16_384 },
        "root volume size, GiB"),
    var("SEMAPHORE_AGENT_VOLUME_IOPS", Param("VolumeIops"), None, Int { min: 100, max: 256_000 },
        "root volume IOPS (gp3, io1, io2; required for io1/io2)"),
    var("SEMAPHORE_AGENT_VOLUME_THROUGHPUT", Param("VolumeThroughput"), None, Int { min: 125, max: 2000 },
        "root volume throughput, MiB/s (gp3 only)"),
    var("SEMAPHORE_AGENT_TAGS", StackTags, None, List(valid_tag, "Key:Value pairs, comma-separated"),
        "tags on the stack, which CloudFormation passes on to the resources"),
    var("SEMAPHORE_AGENT_AZS", Param("Azs"), None, List(valid_az, "availability zone names, comma-separated"),
        "availability zones of the default VPC; with a VPC the subnets decide"),
    var("SEMAPHORE_AGENT_USE_PRE_SIGNED_URL", Param("UsePreSignedUrl"), Some("false"), Bool,
        "agent name = pre-signed STS GetCallerIdentity URL, which Semaphore verifies"),
    var("SEMAPHORE_AGENT_OVERPROVISION_STRATEGY", Param("OverprovisionStrategy"), Some("none"), OneOf(&["none", "number", "percentage"]),
        "extra agents beyond the jobs: `none`, `number`, `percentage`"),
    var("SEMAPHORE_AGENT_OVERPROVISION_FACTOR", Param("OverprovisionFactor"), Some("0"), Int { min: 0, max: 999_999_999 },
        "agents (number) or percent of jobs (percentage); at least 1 unless the strategy is `none`"),
    var("SEMAPHORE_AGENT_USE_IPV6", Param("UseIpv6"), Some("false"), Bool,
        "one IPv6 address per instance"),
    var("SEMAPHORE_AGENT_ASG_MAX_INSTANCE_LIFETIME", Param("AsgMaxInstanceLifetime"), Some("0"), Shape(valid_lifetime, "0, or a whole number of seconds of at least 86400"),
        "seconds; `0` = unset. Auto Scaling's replacement by age, busy or not: see `SEMAPHORE_AGENT_MAX_UPTIME`"),
    var("SEMAPHORE_AGENT_ASG_METRICS", Param("AsgMetrics"), None, List(valid_metric, "Auto Scaling group metric names, comma-separated"),
        "group metrics to collect (1-minute granularity)"),
    var("SEMAPHORE_AGENT_ON_DEMAND_BASE_CAPACITY", Param("OnDemandBaseCapacity"), Some("0"), Int { min: 0, max: 9999 },
        "mixed instances policy: on-demand instances before any spot"),
    var("SEMAPHORE_AGENT_ON_DEMAND_PERCENTAGE_ABOVE_BASE", Param("OnDemandPercentageAboveBase"), Some("100"), Int { min: 0, max: 100 },
        "below 100, the rest is spot"),
    var("SEMAPHORE_AGENT_ON_DEMAND_ALLOCATION_STRATEGY", Param("OnDemandAllocationStrategy"), None, OneOf(&["lowest-price", "prioritized"]),
        "`lowest-price` or `prioritized`"),
    var("SEMAPHORE_AGENT_SPOT_ALLOCATION_STRATEGY", Param("SpotAllocationStrategy"), None, OneOf(&["lowest-price", "capacity-optimized", "capacity-optimized-prioritized", "price-capacity-optimized"]),
        "e.g. `price-capacity-optimized`"),
    var("SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON", Overrides, None, Any,
        "one override: `{\"InstanceType\": \"…\"}` or `{\"InstanceRequirements\": {\"VCpuCount\": {\"Min\": 2}, \"MemoryMiB\": {\"Min\": 4096}}}`"),
    var("SEMAPHORE_AGENT_ASG_CAPACITY_REBALANCE", Param("AsgCapacityRebalance"), Some("false"), Bool,
        "Capacity Rebalancing for spot"),
    var("SEMAPHORE_AGENT_ASG_NEW_INSTANCES_PROTECTED_FROM_SCALE_IN", Param("AsgNewInstancesProtectedFromScaleIn"), Some("true"), Bool,
        "Auto Scaling never picks a busy agent to scale in (the reference defaults to `false`)"),
    ours("SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE", Param("ScalerInstanceType"), None, Shape(valid_scaler_type, "an EC2 instance type, or `none`"),
        "the scaler instance (the fleet's leader, no jobs) with dynamic scaling; unset = `t3.nano`/`t4g.nano`; `none` = agents lead, which trades away the protection: a root job on an agent can then steer the fleet"),
    ours("SEMAPHORE_AGENT_SSH_CIDR", Param("SshCidr"), None, Shape(valid_ssh_cidr, "an IPv4 CIDR such as 203.0.113.0/24 (not /0)"),
        "who may SSH in (port 22); needs a key; never open by default"),
    ours("SEMAPHORE_AGENT_SCALER_POLL_INTERVAL_MS", Param("ScalerPollIntervalMs"), Some("5000"), Int { min: 1000, max: 300_000 },
        "how often the leader asks Semaphore for job demand"),
    ours("SEMAPHORE_AGENT_MAX_UPTIME", Param("MaxUptime"), Some("0"), Shape(valid_max_uptime, "0, or a whole number of seconds from 3600 to 999999999"),
        "seconds after launch at which an instance replaces itself (idle: at once; busy: after its job); `0` = never"),
    ours("SEMAPHORE_AGENT_JOB_ISOLATION", Param("JobIsolation"), Some("vm"), OneOf(&["vm", "strict"]),
        "`vm`: jobs get passwordless sudo and Docker, as in the reference (the VM is the boundary); `strict`: no sudo, rootless Docker"),
    ours("SEMAPHORE_AGENT_LIFETIME_CAP", Param("LifetimeCap"), Some("93600"), Int { min: 3600, max: 999_999_999 },
        "seconds: the leader ends (without decrementing) any agent in service longer, so a job that kills its supervisor cannot keep its VM; above Semaphore's 24 h job limit and `SEMAPHORE_AGENT_MAX_UPTIME`"),
    ours("SEMAPHORE_AGENT_WARM_POOL_SIZE", Param("WarmPoolSize"), Some("0"), Int { min: 0, max: 9999 },
        "instances kept warmed (Docker up, `SEMAPHORE_AGENT_WARM_IMAGES` pulled, no token, no agent) in a warm pool, at most the group maximum; they start in seconds instead of booting; `0` = no pool. Not with spot or a mixed instances policy"),
    ours("SEMAPHORE_AGENT_WARM_POOL_STATE", Param("WarmPoolState"), Some("Stopped"), OneOf(&["Stopped", "Hibernated", "Running"]),
        "pooled instances: `Stopped` (disk only is paid), `Hibernated` (memory kept on disk: supported types, RAM ≤ 150 GiB, a root volume of RAM + 16 GiB), `Running`"),
    ours("SEMAPHORE_AGENT_WARM_POOL_MAX_PREPARED", Param("WarmPoolMaxPrepared"), None, Int { min: 0, max: 9999 },
        "Auto Scaling's MaxGroupPreparedCapacity: in service + warm; the pool grows into it above `SEMAPHORE_AGENT_WARM_POOL_SIZE`; unset = the pool is exactly that size"),
    ours("SEMAPHORE_AGENT_WARM_IMAGES", Param("WarmImages"), None, List(valid_image, "container image references, comma-separated, no spaces"),
        "images a pooled instance pulls while warming (runtime config `warm_images`)"),
    ours("SEMAPHORE_AGENT_SHIP_LOGS", Param("ShipLogs"), Some("true"), Bool,
        "instances ship the supervisor's and the agent's records and cloud-init's output to the log group `/agent-fleet/<stack>`, a stream per instance; `false`: the journal only"),
    ours("SEMAPHORE_AGENT_LOG_RETENTION", Param("LogRetention"), Some("30"), OneOf(&LOG_RETENTION_DAYS),
        "days CloudWatch Logs keeps them"),
    ours("SEMAPHORE_AGENT_SCHEDULE", Schedule, None, Any,
        "recurring minimum (and maximum) changes, e.g. `Mon-Fri 08:00 min=4; Mon-Fri 19:00 min=0`: up to 6 `;`-separated entries of days (`Mon-Fri`, `Sat,Sun`, `daily`), `HH:MM`, `min=N` and optionally `max=N` (default: the group maximum); scheduled actions; `status` shows the next"),
    ours("SEMAPHORE_AGENT_SCHEDULE_TIMEZONE", Param("ScheduleTimeZone"), Some("UTC"), Shape(valid_time_zone, "an IANA time zone name such as Europe/Berlin"),
        "time zone of `SEMAPHORE_AGENT_SCHEDULE` (daylight saving followed)"),
];

/// Every template parameter a variable can set (the table's `Param` targets plus the
/// derived ones), so `Target::parameters` can hand out `'static` slices.
const PARAM_NAMES: &[&str] = &[
    "TokenParameterName",
    "Organization",
    "Endpoint",
    "InstanceType",
    "AsgMinSize",
    "AsgMaxSize",
    "AsgDesired",
    "UseDynamicScaling",
    "SecurityGroupId",
    "KeyName",
    "DisconnectAfterJob",
    "DisconnectAfterIdleTimeout",
    "CacheBucketName",
    "TokenKmsKey",
    "VpcId",
    "Subnets",
    "Ami",
    "Os",
    "Arch",
    "VolumeName",
    "VolumeType",
    "VolumeSize",
    "VolumeIops",
    "VolumeThroughput",
    "Azs",
    "UsePreSignedUrl",
    "OverprovisionStrategy",
    "OverprovisionFactor",
    "UseIpv6",
    "AsgMaxInstanceLifetime",
    "AsgMetrics",
    "OnDemandBaseCapacity",
    "OnDemandPercentageAboveBase",
    "OnDemandAllocationStrategy",
    "SpotAllocationStrategy",
    "AsgCapacityRebalance",
    "AsgNewInstancesProtectedFromScaleIn",
    "ScalerInstanceType",
    "SshCidr",
    "ScalerPollIntervalMs",
    "MaxUptime",
    "JobIsolation",
    "LifetimeCap",
    "WarmPoolSize",
    "WarmPoolState",
    "WarmPoolMaxPrepared",
    "WarmImages",
    "ScheduleTimeZone",
    "ShipLogs",
    "LogRetention",
];

/// The retention periods CloudWatch Logs allows, in days (`RetentionInDays`).
pub const LOG_RETENTION_DAYS: [&str; 22] = [
    "1", "3", "5", "7", "14", "30", "60", "90", "120", "150", "180", "365", "400", "545", "731",
    "1096", "1827", "2192", "2557", "2922", "3288", "3653",
];

pub fn lookup(name: &str) -> Option<&'static Var> {
    VARS.iter().find(|v| v.name == name)
}

const MACOS: &str = "not supported: it configures the reference stack's macOS agents on \
    dedicated hosts; agent-fleet runs Linux agents only (keep macOS fleets on the reference stack)";

/// The reference stack's settings that mean nothing to agent-fleet, and why: a value is
/// accepted with that said (a warning, not a guess at a similar name) and ignored.
pub const REFERENCE_ONLY: &[(&str, &str)] = &[
    (
        "SEMAPHORE_AGENT_ALLOW_PUBLIC_SUBNET",
        "not applicable: it lets the reference stack place its scaling Lambda in a public \
         subnet; agent-fleet has no Lambda (the leader is an instance of the stack, in the \
         stack's subnets)",
    ),
    ("SEMAPHORE_AGENT_MAC_FAMILY", MACOS),
    ("SEMAPHORE_AGENT_MAC_DEDICATED_HOSTS", MACOS),
    ("SEMAPHORE_AGENT_AUTO_ALLOCATE_HOST", MACOS),
    ("SEMAPHORE_AGENT_AUTO_RELEASE_HOST", MACOS),
    ("SEMAPHORE_AGENT_LICENSE_CONFIGURATION_ARN", MACOS),
];

/// Why `name` is one of [`REFERENCE_ONLY`], if it is.
pub fn reference_only(name: &str) -> Option<&'static str> {
    REFERENCE_ONLY
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| *why)
}

/// Values the reference stack accepts for one of our settings and agent-fleet does not
/// support: `(variable, value, why)`. Refused with the reason instead of the list of
/// allowed values.
pub const UNSUPPORTED_VALUES: &[(&str, &str, &str)] = &[
    (
        "SEMAPHORE_AGENT_OS",
        "windows",
        "Windows agents are not supported: agent-fleet runs Linux agents \
         (`ubuntu-jammy` or `ubuntu-noble`); keep Windows fleets on the reference stack",
    ),
    (
        "SEMAPHORE_AGENT_OS",
        "macos",
        "macOS agents are not supported: agent-fleet runs Linux agents \
         (`ubuntu-jammy` or `ubuntu-noble`); keep macOS fleets on the reference stack",
    ),
    (
        "SEMAPHORE_AGENT_OS",
        "ubuntu-focal",
        "Ubuntu 20.04 is out of standard support and has no agent-fleet AMI: \
         use `ubuntu-jammy` (22.04) or `ubuntu-noble` (24.04)",
    ),
];

/// The README's configuration table.
pub fn markdown_table() -> String {
    let mut s =
        String::from("| variable | template parameter | default | meaning |\n|---|---|---|---|\n");
    for v in VARS {
        let target = match v.target {
            StackName => "*(stack name)*".to_string(),
            StackTags => "*(stack tags)*".to_string(),
            other => other
                .parameters()
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let default = v.default.map_or("—".to_string(), |d| format!("`{d}`"));
        let name = if v.ours {
            format!("`{}` *(agent-fleet)*", v.name)
        } else {
            format!("`{}`", v.name)
        };
        s.push_str(&format!(
            "| {name} | {target} | {default} | {} |\n",
            v.meaning
        ));
    }
    s
}

impl Check {
    /// `Err` says what a valid value looks like.
    pub fn check(&self, value: &str) -> Result<(), String> {
        match *self {
            Any => Ok(()),
            Bool => match value {
                "true" | "false" => Ok(()),
                _ => Err("must be `true` or `false`".into()),
            },
            Int { min, max } => match parse_uint(value) {
                Some(n) if (min..=max).contains(&n) => Ok(()),
                Some(_) => Err(format!("must be between {min} and {max}")),
                None => Err(format!("must be a whole number, {min}-{max}")),
            },
            OneOf(allowed) => {
                if allowed.contains(&value) {
                    Ok(())
                } else {
                    let list: Vec<String> = allowed.iter().map(|a| format!("`{a}`")).collect();
                    Err(format!("must be one of {}", list.join(", ")))
                }
            }
            Shape(ok, what) => {
                if ok(value) {
                    Ok(())
                } else {
                    Err(format!("must be {what}"))
                }
            }
            List(ok, what) => match value.split(',').find(|item| !ok(item)) {
                None => Ok(()),
                Some(bad) => Err(format!("item {bad:?} is not valid; expected {what}")),
            },
        }
    }
}

/// Digits only, no sign, no leading zero (what the template's patterns accept).
pub fn parse_uint(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

fn valid_stack_name(s: &str) -> bool {
    agent_supervisor::config::valid_stack_name(s) && s.len() <= 121
}

fn valid_ssm_name(s: &str) -> bool {
    let segment = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    };
    s.len() <= 1011
        && match s.strip_prefix('/') {
            Some(path) => path.split('/').all(segment),
            None => segment(s),
        }
}

fn valid_organization(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The supervisor's rule ([`agent_supervisor::config::check_endpoint`]: host\[:port\] and
/// nothing else, so a value like `org.semaphoreci.com@evil.example` never reaches a
/// stack), without the bracketed IPv6 form the template's pattern does not take.
fn valid_endpoint(s: &str) -> bool {
    !s.starts_with('[') && agent_supervisor::config::valid_endpoint(s)
}

pub fn valid_instance_type(s: &str) -> bool {
    match s.split_once('.') {
        Some((family, size)) => {
            family.starts_with(|c: char| c.is_ascii_lowercase())
                && family
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !size.is_empty()
                && size
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        }
        None => false,
    }
}

fn valid_scaler_type(s: &str) -> bool {
    s == "none" || valid_instance_type(s)
}

/// Graviton (arm64) instance families: `a1`, and a generation digit followed by `g`
/// (`t4g`, `m7gd`, `c8gn`, …).
pub fn is_arm64_instance_type(s: &str) -> bool {
    let family = s.split('.').next().unwrap_or_default();
    if family == "a1" {
        return true;
    }
    let letters = family.trim_start_matches(|c: char| c.is_ascii_lowercase());
    let rest = letters.trim_start_matches(|c: char| c.is_ascii_digit());
    rest.len() < letters.len() && rest.starts_with('g')
}

fn valid_aws_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|hex| {
        matches!(hex.len(), 8 | 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

fn valid_key_name(s: &str) -> bool {
    (1..=255).contains(&s.len()) && s.bytes().all(|b| (b' '..=b'~').contains(&b))
}

fn valid_bucket(s: &str) -> bool {
    (3..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn valid_kms_key(s: &str) -> bool {
    let alias_name = |a: &str| {
        !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-'))
    };
    let key_id = |k: &str| {
        let k = k.strip_prefix("mrk-").unwrap_or(k);
        let hex: String = k.chars().filter(|c| *c != '-').collect();
        hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    };
    if let Some(a) = s.strip_prefix("alias/") {
        return alias_name(a);
    }
    if let Some(rest) = s.strip_prefix("arn:") {
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        return parts.len() == 5
            && parts[0].starts_with("aws")
            && parts[1] == "kms"
            && parts[3].len() == 12
            && parts[3].bytes().all(|b| b.is_ascii_digit())
            && (parts[4].strip_prefix("key/").is_some_and(|k| !k.is_empty())
                || parts[4].strip_prefix("alias/").is_some_and(alias_name));
    }
    key_id(s)
}

fn valid_ami(s: &str) -> bool {
    valid_aws_id(s, "ami-")
        || s.strip_prefix("resolve:ssm:").is_some_and(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | ':' | '-'))
        })
}

fn valid_policy(s: &str) -> bool {
    if s.starts_with("arn:") {
        return s.contains(":iam::") && s.contains(":policy/");
    }
    (1..=128).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
}

fn valid_device(s: &str) -> bool {
    s.strip_prefix("/dev/").is_some_and(|d| {
        !d.is_empty()
            && d.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

fn valid_tag(s: &str) -> bool {
    match s.split_once(':') {
        Some((k, v)) => {
            !k.trim().is_empty() && k.len() <= 128 && v.len() <= 256 && !k.starts_with("aws:")
        }
        None => false,
    }
}

fn valid_az(s: &str) -> bool {
    // e.g. eu-central-1a, us-gov-west-1b
    let Some(last) = s.chars().last() else {
        return false;
    };
    let body = &s[..s.len() - last.len_utf8()];
    last.is_ascii_lowercase()
        && body.split('-').count() >= 3
        && body
            .rsplit('-')
            .next()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && body
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The supervisor's rule for `warm_images` (which the template's pattern also states).
fn valid_image(s: &str) -> bool {
    agent_supervisor::config::valid_image_reference(s)
}

fn valid_time_zone(s: &str) -> bool {
    crate::schedule::time_zone(s).is_ok()
}

fn valid_max_uptime(s: &str) -> bool {
    parse_uint(s).is_some_and(|n| n == 0 || (3600..=999_999_999).contains(&n))
}

fn valid_lifetime(s: &str) -> bool {
    parse_uint(s).is_some_and(|n| n == 0 || (86_400..=999_999_999).contains(&n))
}

const METRICS: &[&str] = &[
    "GroupMinSize",
    "GroupMaxSize",
    "GroupDesiredCapacity",
    "GroupInServiceInstances",
    "GroupPendingInstances",
    "GroupStandbyInstances",
    "GroupTerminatingInstances",
    "GroupTotalInstances",
    "GroupInServiceCapacity",
    "GroupPendingCapacity",
    "GroupStandbyCapacity",
    "GroupTerminatingCapacity",
    "GroupTotalCapacity",
    "WarmPoolDesiredCapacity",
    "WarmPoolWarmedCapacity",
    "WarmPoolPendingCapacity",
    "WarmPoolTerminatingCapacity",
    "WarmPoolTotalCapacity",
    "GroupAndWarmPoolDesiredCapacity",
    "GroupAndWarmPoolTotalCapacity",
];

fn valid_metric(s: &str) -> bool {
    METRICS.contains(&s)
}

fn valid_ssh_cidr(s: &str) -> bool {
    let Some((ip, len)) = s.split_once('/') else {
        return false;
    };
    let octets: Vec<&str> = ip.split('.').collect();
    octets.len() == 4
        && octets
            .iter()
            .all(|o| parse_uint(o).is_some_and(|n| n <= 255))
        && parse_uint(len).is_some_and(|n| (1..=32).contains(&n))
}
