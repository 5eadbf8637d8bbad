//! Every validation rule, with the message a user sees.

use agent_fleet::config::{Sources, StackConfig};
use std::collections::BTreeMap;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = [
        ("SEMAPHORE_AGENT_STACK_NAME", "ci-agents"),
        ("SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME", "/ci/token"),
        ("SEMAPHORE_ORGANIZATION", "myorg"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in pairs {
        m.insert(k.to_string(), v.to_string());
    }
    m
}

fn load(pairs: &[(&str, &str)]) -> Result<StackConfig, String> {
    StackConfig::load(&Sources::from_env(env(pairs))).map_err(|p| p.to_string())
}

/// The one problem `pairs` causes, as printed.
fn refused(pairs: &[(&str, &str)]) -> String {
    match load(pairs) {
        Ok(c) => panic!("{pairs:?} was accepted: {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn defaults_fill_every_parameter() {
    let c = load(&[]).expect("minimal config");
    assert_eq!(c.stack_name, "ci-agents");
    assert_eq!(c.param("InstanceType"), "t2.micro");
    assert_eq!(c.param("AsgMinSize"), "0");
    assert_eq!(c.param("AsgMaxSize"), "1");
    assert_eq!(
        c.param("AsgDesired"),
        "",
        "desired stays unset unless given"
    );
    assert_eq!(c.param("TokenKmsKey"), "alias/aws/ssm");
    assert_eq!(c.param("AsgNewInstancesProtectedFromScaleIn"), "true");
    assert_eq!(c.param("Organization"), "myorg");
    assert_eq!(c.param("JobIsolation"), "vm");
    assert_eq!(
        c.param("LifetimeCap"),
        "93600",
        "26 h, above Semaphore's 24 h job limit"
    );
    assert_eq!(c.param("UsePreSignedUrl"), "false");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn hardening_settings_are_passed_through() {
    let c = load(&[
        ("SEMAPHORE_AGENT_USE_PRE_SIGNED_URL", "true"),
        ("SEMAPHORE_AGENT_JOB_ISOLATION", "strict"),
        ("SEMAPHORE_AGENT_MAX_UPTIME", "86400"),
        ("SEMAPHORE_AGENT_LIFETIME_CAP", "86401"),
    ])
    .expect("valid");
    assert_eq!(c.param("UsePreSignedUrl"), "true");
    assert_eq!(c.param("JobIsolation"), "strict");
    assert_eq!(c.param("LifetimeCap"), "86401");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

/// Settings that break one rule, and what the message must contain.
type Rule = (
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
);

const RULES: &[Rule] = &[
    (&[("SEMAPHORE_AGENT_STACK_NAME", "")], &["SEMAPHORE_AGENT_STACK_NAME: is required", "export SEMAPHORE_AGENT_STACK_NAME="]),
    (&[("SEMAPHORE_AGENT_STACK_NAME", "9lives")], &["SEMAPHORE_AGENT_STACK_NAME: \"9lives\" must be a letter, then letters, digits and dashes"]),
    (&[("SEMAPHORE_AGENT_STACK_NAME", "ci_agents")], &["SEMAPHORE_AGENT_STACK_NAME: \"ci_agents\" must be"]),
    (&[("SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME", "")], &["SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME: is required", "agent-fleet token set"]),
    (&[("SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME", "ci/token")], &["SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME: \"ci/token\" must be an SSM parameter name"]),
    (&[("SEMAPHORE_ORGANIZATION", "")], &["SEMAPHORE_ORGANIZATION: neither it nor SEMAPHORE_ENDPOINT is set"]),
    (&[("SEMAPHORE_ENDPOINT", "https://x.semaphoreci.com/")], &["SEMAPHORE_ENDPOINT: \"https://x.semaphoreci.com/\" must be a host name with an optional :port (1-65535), without https://, user@, a path, ?query or #fragment"]),
    (&[("SEMAPHORE_ENDPOINT", "myorg.semaphoreci.com@evil.example")], &["SEMAPHORE_ENDPOINT: \"myorg.semaphoreci.com@evil.example\" must be a host name", "without https://, user@"]),
    (&[("SEMAPHORE_ENDPOINT", "user:pw@myorg.semaphoreci.com")], &["SEMAPHORE_ENDPOINT: \"user:pw@myorg.semaphoreci.com\" must be a host name"]),
    (&[("SEMAPHORE_ENDPOINT", "myorg.semaphoreci.com/api")], &["SEMAPHORE_ENDPOINT: \"myorg.semaphoreci.com/api\" must be a host name"]),
    (&[("SEMAPHORE_ENDPOINT", "myorg.semaphoreci.com?x=evil.example")], &["SEMAPHORE_ENDPOINT: \"myorg.semaphoreci.com?x=evil.example\" must be a host name"]),
    (&[("SEMAPHORE_ENDPOINT", "myorg.semaphoreci.com#x")], &["SEMAPHORE_ENDPOINT: \"myorg.semaphoreci.com#x\" must be a host name"]),
    (&[("SEMAPHORE_ENDPOINT", "myorg.semaphoreci.com:0")], &["SEMAPHORE_ENDPOINT: \"myorg.semaphoreci.com:0\" must be a host name with an optional :port (1-65535)"]),
    (&[("SEMAPHORE_ENDPOINT", "myorg.semaphoreci.com:65536")], &["SEMAPHORE_ENDPOINT: \"myorg.semaphoreci.com:65536\" must be a host name with an optional :port (1-65535)"]),
    (&[("SEMAPHORE_ENDPOINT", "myorg.semaphoreci.com:443:1")], &["SEMAPHORE_ENDPOINT: \"myorg.semaphoreci.com:443:1\" must be a host name"]),
    (&[("SEMAPHORE_ENDPOINT", "myorg..semaphoreci.com")], &["SEMAPHORE_ENDPOINT: \"myorg..semaphoreci.com\" must be a host name"]),
    (&[("SEMAPHORE_ENDPOINT", "myorg-.semaphoreci.com")], &["SEMAPHORE_ENDPOINT: \"myorg-.semaphoreci.com\" must be a host name"]),
    (&[("SEMAPHORE_ENDPOINT", "[::1]:8080")], &["SEMAPHORE_ENDPOINT: \"[::1]:8080\" must be a host name"]),
    (&[("SEMAPHORE_AGENT_ASG_MIN_SIZE", "-1")], &["SEMAPHORE_AGENT_ASG_MIN_SIZE: \"-1\" must be a whole number, 0-9999"]),
    (&[("SEMAPHORE_AGENT_ASG_MAX_SIZE", "0")], &["SEMAPHORE_AGENT_ASG_MAX_SIZE: \"0\" must be between 1 and 9999"]),
    (&[("SEMAPHORE_AGENT_ASG_MIN_SIZE", "3"), ("SEMAPHORE_AGENT_ASG_MAX_SIZE", "2")], &["SEMAPHORE_AGENT_ASG_MIN_SIZE: \"3\" is above SEMAPHORE_AGENT_ASG_MAX_SIZE \"2\""]),
    (&[("SEMAPHORE_AGENT_ASG_DESIRED", "5"), ("SEMAPHORE_AGENT_ASG_MAX_SIZE", "4")], &["SEMAPHORE_AGENT_ASG_DESIRED: \"5\" is outside min 0 … max 4"]),
    (&[("SEMAPHORE_AGENT_ASG_MIN_SIZE", "2"), ("SEMAPHORE_AGENT_ASG_MAX_SIZE", "4"), ("SEMAPHORE_AGENT_ASG_DESIRED", "1")], &["SEMAPHORE_AGENT_ASG_DESIRED: \"1\" is outside min 2 … max 4"]),
    (&[("SEMAPHORE_AGENT_USE_DYNAMIC_SCALING", "yes")], &["SEMAPHORE_AGENT_USE_DYNAMIC_SCALING: \"yes\" must be `true` or `false`"]),
    (&[("SEMAPHORE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT", "604801")], &["SEMAPHORE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT: \"604801\" must be between 0 and 604800"]),
    (&[("SEMAPHORE_AGENT_VPC_ID", "vpc-0123456789abcdef0")], &["SEMAPHORE_AGENT_SUBNETS: is required with SEMAPHORE_AGENT_VPC_ID"]),
    (&[("SEMAPHORE_AGENT_VPC_ID", "vpc-01234567"), ("SEMAPHORE_AGENT_SUBNETS", "subnet-01234567"), ("SEMAPHORE_AGENT_AZS", "eu-central-1a")], &["SEMAPHORE_AGENT_AZS: must be unset with SEMAPHORE_AGENT_VPC_ID"]),
    (&[("SEMAPHORE_AGENT_SUBNETS", "subnet-01234567, subnet-89abcdef")], &["SEMAPHORE_AGENT_SUBNETS: \"subnet-01234567, subnet-89abcdef\" item \" subnet-89abcdef\" is not valid; expected subnet ids, comma-separated, no spaces"]),
    (&[("SEMAPHORE_AGENT_OVERPROVISION_STRATEGY", "number")], &["SEMAPHORE_AGENT_OVERPROVISION_FACTOR: must be a whole number of at least 1 with SEMAPHORE_AGENT_OVERPROVISION_STRATEGY=number (it is unset)"]),
    (&[("SEMAPHORE_AGENT_OVERPROVISION_STRATEGY", "percentage"), ("SEMAPHORE_AGENT_OVERPROVISION_FACTOR", "1.5")], &["SEMAPHORE_AGENT_OVERPROVISION_FACTOR: \"1.5\" must be a whole number"]),
    (&[("SEMAPHORE_AGENT_OVERPROVISION_STRATEGY", "lots")], &["SEMAPHORE_AGENT_OVERPROVISION_STRATEGY: \"lots\" must be one of `none`, `number`, `percentage`"]),
    (&[("SEMAPHORE_AGENT_OS", "ubuntu-focal")], &["SEMAPHORE_AGENT_OS: \"ubuntu-focal\" is refused: Ubuntu 20.04 is out of standard support and has no agent-fleet AMI: use `ubuntu-jammy` (22.04) or `ubuntu-noble` (24.04)"]),
    (&[("SEMAPHORE_AGENT_OS", "ubuntu-bionic")], &["SEMAPHORE_AGENT_OS: \"ubuntu-bionic\" must be one of `ubuntu-jammy`, `ubuntu-noble`"]),
    (&[("SEMAPHORE_AGENT_ARCH", "arm64")], &["SEMAPHORE_AGENT_INSTANCE_TYPE: \"t2.micro\" is x86_64 but SEMAPHORE_AGENT_ARCH is arm64", "t4g.micro"]),
    (&[("SEMAPHORE_AGENT_INSTANCE_TYPE", "c7g.large")], &["SEMAPHORE_AGENT_INSTANCE_TYPE: \"c7g.large\" is arm64 but SEMAPHORE_AGENT_ARCH is x86_64"]),
    (&[("SEMAPHORE_AGENT_INSTANCE_TYPE", "large")], &["SEMAPHORE_AGENT_INSTANCE_TYPE: \"large\" must be an EC2 instance type"]),
    (&[("SEMAPHORE_AGENT_USE_PRE_SIGNED_URL", "yes")], &["SEMAPHORE_AGENT_USE_PRE_SIGNED_URL: \"yes\" must be `true` or `false`"]),
    (&[("SEMAPHORE_AGENT_JOB_ISOLATION", "none")], &["SEMAPHORE_AGENT_JOB_ISOLATION: \"none\" must be one of `vm`, `strict`"]),
    (&[("SEMAPHORE_AGENT_LIFETIME_CAP", "600")], &["SEMAPHORE_AGENT_LIFETIME_CAP: \"600\" must be between 3600 and 999999999"]),
    (&[("SEMAPHORE_AGENT_LIFETIME_CAP", "26h")], &["SEMAPHORE_AGENT_LIFETIME_CAP: \"26h\" must be a whole number, 3600-999999999"]),
    (&[("SEMAPHORE_AGENT_MAX_UPTIME", "86400"), ("SEMAPHORE_AGENT_LIFETIME_CAP", "86400")], &["SEMAPHORE_AGENT_LIFETIME_CAP: \"86400\" is not above SEMAPHORE_AGENT_MAX_UPTIME \"86400\"", "raise SEMAPHORE_AGENT_LIFETIME_CAP (e.g. to 172800", "or lower SEMAPHORE_AGENT_MAX_UPTIME"]),
    (&[("SEMAPHORE_AGENT_MAX_UPTIME", "100000")], &["SEMAPHORE_AGENT_LIFETIME_CAP: 93600 (the default) is not above SEMAPHORE_AGENT_MAX_UPTIME \"100000\"", "e.g. to 186400"]),
    (&[("SEMAPHORE_AGENT_SSH_CIDR", "203.0.113.0/24")], &["SEMAPHORE_AGENT_SSH_CIDR: opens SSH only for a key pair: set SEMAPHORE_AGENT_KEY_NAME"]),
    (&[("SEMAPHORE_AGENT_SSH_CIDR", "0.0.0.0/0"), ("SEMAPHORE_AGENT_KEY_NAME", "ops")], &["SEMAPHORE_AGENT_SSH_CIDR: \"0.0.0.0/0\" must be an IPv4 CIDR such as 203.0.113.0/24 (not /0)"]),
    (&[("SEMAPHORE_AGENT_SSH_CIDR", "10.0.0.0/8"), ("SEMAPHORE_AGENT_KEY_NAME", "ops"), ("SEMAPHORE_AGENT_SECURITY_GROUP_ID", "sg-01234567")], &["SEMAPHORE_AGENT_SSH_CIDR: applies to the security group the stack creates"]),
    (&[("SEMAPHORE_AGENT_SECURITY_GROUP_ID", "default")], &["SEMAPHORE_AGENT_SECURITY_GROUP_ID: \"default\" must be sg-"]),
    (&[("SEMAPHORE_AGENT_VOLUME_THROUGHPUT", "250")], &["SEMAPHORE_AGENT_VOLUME_THROUGHPUT: applies to gp3 volumes only (SEMAPHORE_AGENT_VOLUME_TYPE is gp2)"]),
    (&[("SEMAPHORE_AGENT_VOLUME_IOPS", "3000")], &["SEMAPHORE_AGENT_VOLUME_IOPS: applies to gp3, io1 and io2 volumes only"]),
    (&[("SEMAPHORE_AGENT_VOLUME_TYPE", "io2")], &["SEMAPHORE_AGENT_VOLUME_IOPS: is required for io2 volumes"]),
    (&[("SEMAPHORE_AGENT_VOLUME_SIZE", "4")], &["SEMAPHORE_AGENT_VOLUME_SIZE: \"4\" must be between 8 and 16384"]),
    (&[("SEMAPHORE_AGENT_TAGS", "team=ci")], &["SEMAPHORE_AGENT_TAGS: \"team=ci\" item \"team=ci\" is not valid; expected Key:Value pairs"]),
    (&[("SEMAPHORE_AGENT_TAGS", "team:ci,:orphan")], &["SEMAPHORE_AGENT_TAGS: \"team:ci,:orphan\" item \":orphan\" is not valid"]),
    (&[("SEMAPHORE_AGENT_ASG_MAX_INSTANCE_LIFETIME", "3600")], &["SEMAPHORE_AGENT_ASG_MAX_INSTANCE_LIFETIME: \"3600\" must be 0, or a whole number of seconds of at least 86400"]),
    (&[("SEMAPHORE_AGENT_ASG_METRICS", "GroupDesiredCapacity,Cpu")], &["SEMAPHORE_AGENT_ASG_METRICS: \"GroupDesiredCapacity,Cpu\" item \"Cpu\" is not valid"]),
    (&[("SEMAPHORE_AGENT_ON_DEMAND_PERCENTAGE_ABOVE_BASE", "101")], &["SEMAPHORE_AGENT_ON_DEMAND_PERCENTAGE_ABOVE_BASE: \"101\" must be between 0 and 100"]),
    (&[("SEMAPHORE_AGENT_SPOT_ALLOCATION_STRATEGY", "cheapest")], &["SEMAPHORE_AGENT_SPOT_ALLOCATION_STRATEGY: \"cheapest\" must be one of"]),
    (&[("SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON", "{\"InstanceType\": \"m6i.large\",}")], &["SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON:", "is not valid JSON: trailing comma at line 1, column 30"]),
    (&[("SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON", "{\"InstanceType\": \"m6i.large\", \"InstanceRequirements\": {}}")], &["has both InstanceType and InstanceRequirements"]),
    (&[("SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON", "{\"InstanceRequirements\": {\"VCpuCount\": {\"Min\": 4, \"Max\": 2}, \"MemoryMiB\": {\"Min\": 1024}}}")], &["InstanceRequirements.VCpuCount: Min 4 is above Max 2"]),
    (&[("SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON", "{\"InstanceRequirements\": {\"VCpuCount\": {\"Min\": 2}}}")], &["InstanceRequirements.MemoryMiB {\"Min\": …} is required"]),
    (&[("SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON", "{\"InstanceRequirements\": {\"VCpuCount\": {\"Min\": 2}, \"MemoryMiB\": {\"Min\": 4096}}}"), ("SEMAPHORE_AGENT_ON_DEMAND_ALLOCATION_STRATEGY", "prioritized")], &["SEMAPHORE_AGENT_ON_DEMAND_ALLOCATION_STRATEGY: cannot be `prioritized` with instance requirements"]),
    (&[("SEMAPHORE_AGENT_TOKEN_KMS_KEY", "my-key")], &["SEMAPHORE_AGENT_TOKEN_KMS_KEY: \"my-key\" must be a KMS key id, key ARN, alias/name or alias ARN"]),
    (&[("SEMAPHORE_AGENT_CACHE_BUCKET_NAME", "My_Bucket")], &["SEMAPHORE_AGENT_CACHE_BUCKET_NAME: \"My_Bucket\" must be an S3 bucket name"]),
    (&[("SEMAPHORE_AGENT_AMI", "ubuntu")], &["SEMAPHORE_AGENT_AMI: \"ubuntu\" must be ami-… or resolve:ssm:<parameter>"]),
    (&[("SEMAPHORE_AGENT_SCALER_POLL_INTERVAL_MS", "500")], &["SEMAPHORE_AGENT_SCALER_POLL_INTERVAL_MS: \"500\" must be between 1000 and 300000"]),
    (&[("SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE", "t4g.nano")], &["SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE: \"t4g.nano\" is arm64 but SEMAPHORE_AGENT_ARCH is x86_64"]),
];

#[test]
fn every_rule_refuses_with_a_message_naming_the_variable_and_the_fix() {
    for (pairs, needles) in RULES {
        let msg = refused(pairs);
        for n in *needles {
            assert!(msg.contains(n), "for {pairs:?} expected {n:?} in:\n{msg}");
        }
    }
}

/// The endpoint rule is the supervisor's: what the CLI lets through, every instance takes.
#[test]
fn endpoints_agree_with_the_supervisor() {
    for ok in [
        "myorg.semaphoreci.com",
        "myorg.semaphoreci.com:8443",
        "127.0.0.1:3000",
        "localhost",
        "a",
    ] {
        let c = load(&[("SEMAPHORE_ENDPOINT", ok)]).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(c.param("Endpoint"), ok);
        assert!(agent_supervisor::config::valid_endpoint(ok), "{ok}");
    }
    for bad in [
        "myorg.semaphoreci.com@evil.example",
        "https://myorg.semaphoreci.com",
        "myorg.semaphoreci.com/",
        "myorg.semaphoreci.com:",
        "myorg.semaphoreci.com:99999",
        "myorg semaphoreci.com",
        ".myorg.semaphoreci.com",
    ] {
        assert!(load(&[("SEMAPHORE_ENDPOINT", bad)]).is_err(), "{bad}");
        assert!(!agent_supervisor::config::valid_endpoint(bad), "{bad}");
    }
}

#[test]
fn stack_name_length_leaves_room_for_resource_names() {
    let ok = format!("a{}", "b".repeat(120));
    assert!(load(&[("SEMAPHORE_AGENT_STACK_NAME", &ok)]).is_ok());
    let long = format!("a{}", "b".repeat(121));
    let msg = refused(&[("SEMAPHORE_AGENT_STACK_NAME", &long)]);
    assert!(msg.contains("at most 121 characters"), "{msg}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let msg = refused(&[
        ("SEMAPHORE_AGENT_ASG_MIN_SIZE", "x"),
        ("SEMAPHORE_AGENT_OS", "windows"),
        ("SEMAPHORE_ORGANIZATION", ""),
    ]);
    assert!(
        msg.starts_with("the stack configuration has 3 problems:"),
        "{msg}"
    );
}

#[test]
fn a_good_spot_and_override_config_is_translated() {
    let c = load(&[
        ("SEMAPHORE_AGENT_ON_DEMAND_PERCENTAGE_ABOVE_BASE", "0"),
        ("SEMAPHORE_AGENT_SPOT_ALLOCATION_STRATEGY", "price-capacity-optimized"),
        (
            "SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON",
            r#"{"InstanceRequirements": {"VCpuCount": {"Min": 2, "Max": 8}, "MemoryMiB": {"Min": 4096}}}"#,
        ),
        ("SEMAPHORE_AGENT_TAGS", "team:ci,cost-center:42"),
    ])
    .expect("valid");
    assert_eq!(c.param("AsgLaunchTemplateOverrideVCpuMin"), "2");
    assert_eq!(c.param("AsgLaunchTemplateOverrideVCpuMax"), "8");
    assert_eq!(c.param("AsgLaunchTemplateOverrideMemoryMiBMin"), "4096");
    assert_eq!(c.param("AsgLaunchTemplateOverrideMemoryMiBMax"), "");
    assert_eq!(c.param("AsgLaunchTemplateOverrideInstanceType"), "");
    assert_eq!(
        c.tags,
        vec![
            ("team".to_string(), "ci".to_string()),
            ("cost-center".to_string(), "42".to_string())
        ]
    );
}

#[test]
fn managed_policy_names_become_arns_of_the_account() {
    let mut c = load(&[(
        "SEMAPHORE_AGENT_MANAGED_POLICY_NAMES",
        "ci-extra,arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess",
    )])
    .expect("valid");
    c.resolve_policies("aws", "123456789012");
    assert_eq!(
        c.param("ManagedPolicyArns"),
        "arn:aws:iam::123456789012:policy/ci-extra,arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"
    );
}

/// Agents leading is a trade the operator must hear about at every deploy and diff, whatever
/// the minimum; without dynamic scaling nobody leads, so there is nothing to say.
#[test]
fn agents_leading_is_warned_about_with_any_minimum() {
    let c = load(&[
        ("SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE", "none"),
        ("SEMAPHORE_AGENT_ASG_MIN_SIZE", "1"),
    ])
    .expect("a warning is not an error");
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("a job that is root on its agent")
            && c.warnings[0].contains("unset SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE"),
        "{:?}",
        c.warnings
    );
    let c = load(&[
        ("SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE", "none"),
        ("SEMAPHORE_AGENT_USE_DYNAMIC_SCALING", "false"),
    ])
    .expect("valid");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn warnings_for_scale_from_zero_off_ssh_key_alone_and_typos() {
    let c = load(&[
        ("SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE", "none"),
        ("SEMAPHORE_AGENT_KEY_NAME", "ops"),
        ("SEMAPHORE_AGENT_INSTANCE_TPYE", "t3.large"),
    ])
    .expect("warnings are not errors");
    let all = c.warnings.join("\n");
    assert!(all.contains("no leader to scale up from zero"), "{all}");
    assert!(
        all.contains("SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE=none with dynamic scaling: agents lead")
            && all.contains("can steer the fleet"),
        "{all}"
    );
    assert!(all.contains("no SSH ingress is opened"), "{all}");
    assert!(
        all.contains("SEMAPHORE_AGENT_INSTANCE_TPYE is not a setting of agent-fleet and is ignored; did you mean SEMAPHORE_AGENT_INSTANCE_TYPE?"),
        "{all}"
    );
}

/// A config written for the reference stack: its settings that mean nothing here are
/// accepted, each with why (never a guess at a similar name), and change nothing.
#[test]
fn the_reference_stacks_other_settings_are_accepted_and_said_not_applicable() {
    let base = load(&[]).expect("minimal");
    let c = load(&[
        ("SEMAPHORE_AGENT_ALLOW_PUBLIC_SUBNET", "true"),
        ("SEMAPHORE_AGENT_MAC_FAMILY", "mac2"),
        ("SEMAPHORE_AGENT_MAC_DEDICATED_HOSTS", "h-0123456789abcdef0"),
        ("SEMAPHORE_AGENT_AUTO_ALLOCATE_HOST", "true"),
        ("SEMAPHORE_AGENT_AUTO_RELEASE_HOST", "true"),
        (
            "SEMAPHORE_AGENT_LICENSE_CONFIGURATION_ARN",
            "arn:aws:license-manager:us-east-1:123456789012:license-configuration:lic-0123",
        ),
    ])
    .expect("accepted");
    assert_eq!(c.parameters, base.parameters, "they change nothing");
    let all = c.warnings.join("\n");
    assert!(!all.contains("did you mean"), "{all}");
    assert!(
        all.contains("SEMAPHORE_AGENT_ALLOW_PUBLIC_SUBNET=\"true\" is ignored, not applicable: it lets the reference stack place its scaling Lambda in a public subnet; agent-fleet has no Lambda"),
        "{all}"
    );
    for mac in [
        "SEMAPHORE_AGENT_MAC_FAMILY",
        "SEMAPHORE_AGENT_MAC_DEDICATED_HOSTS",
        "SEMAPHORE_AGENT_AUTO_ALLOCATE_HOST",
        "SEMAPHORE_AGENT_AUTO_RELEASE_HOST",
        "SEMAPHORE_AGENT_LICENSE_CONFIGURATION_ARN",
    ] {
        assert!(
            c.warnings.iter().any(|w| w.starts_with(mac)
                && w.contains("is ignored, not supported: it configures the reference stack's macOS agents on dedicated hosts")),
            "{mac}: {all}"
        );
    }
}

/// The reference's Windows and macOS fleets are refused with the reason, not a list.
#[test]
fn windows_and_macos_agents_are_refused_as_not_supported() {
    assert!(refused(&[("SEMAPHORE_AGENT_OS", "windows")]).contains(
        "SEMAPHORE_AGENT_OS: \"windows\" is refused: Windows agents are not supported: agent-fleet runs Linux agents (`ubuntu-jammy` or `ubuntu-noble`); keep Windows fleets on the reference stack"
    ));
    assert!(refused(&[("SEMAPHORE_AGENT_OS", "macos")])
        .contains("\"macos\" is refused: macOS agents are not supported"));
    assert!(refused(&[("SEMAPHORE_AGENT_OS", "ubuntu-focal")])
        .contains("Ubuntu 20.04 is out of standard support and has no agent-fleet AMI"));
}

mod file {
    use super::*;

    fn with_file(
        json: &str,
        pairs: &[(&str, &str)],
    ) -> (Result<StackConfig, String>, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("stack.json");
        std::fs::write(&path, json).expect("write");
        let mut e: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        e.insert(
            "SEMAPHORE_AGENT_STACK_CONFIG".into(),
            path.to_string_lossy().into_owned(),
        );
        (
            StackConfig::load(&Sources::from_env(e)).map_err(|p| p.to_string()),
            dir,
        )
    }

    #[test]
    fn the_file_is_read_and_the_environment_wins() {
        let (c, _d) = with_file(
            r#"{"SEMAPHORE_AGENT_STACK_NAME": "from-file", "SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME": "/t",
                "SEMAPHORE_ORGANIZATION": "org", "SEMAPHORE_AGENT_ASG_MAX_SIZE": 4,
                "SEMAPHORE_AGENT_DISCONNECT_AFTER_JOB": false}"#,
            &[("SEMAPHORE_AGENT_STACK_NAME", "from-env")],
        );
        let c = c.expect("valid");
        assert_eq!(c.stack_name, "from-env");
        assert_eq!(c.param("AsgMaxSize"), "4");
        assert_eq!(c.param("DisconnectAfterJob"), "false");
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let (c, d) = with_file(
            "{\n  \"SEMAPHORE_AGENT_STACK_NAME\": \"x\"\n  \"SEMAPHORE_ORGANIZATION\": \"o\"\n}\n",
            &[],
        );
        let msg = c.expect_err("malformed");
        let path = d.0.join("stack.json");
        assert!(
            msg.contains(&format!(
                "SEMAPHORE_AGENT_STACK_CONFIG: {} is not valid JSON: expected `,` or `}}` at line 3, column 3",
                path.display()
            )),
            "{msg}"
        );
    }

    #[test]
    fn reference_only_keys_in_the_file_are_accepted_and_said_not_applicable() {
        let (c, d) = with_file(
            r#"{"SEMAPHORE_AGENT_STACK_NAME": "s", "SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME": "/t",
                "SEMAPHORE_ORGANIZATION": "org", "SEMAPHORE_AGENT_ALLOW_PUBLIC_SUBNET": "false",
                "SEMAPHORE_AGENT_MAC_FAMILY": "mac2"}"#,
            &[],
        );
        let c = c.expect("accepted");
        let path = d.0.join("stack.json").display().to_string();
        let all = c.warnings.join("\n");
        assert!(
            all.contains(&format!(
                "SEMAPHORE_AGENT_ALLOW_PUBLIC_SUBNET (in {path}) is ignored, not applicable"
            )),
            "{all}"
        );
        assert!(
            all.contains(&format!(
                "SEMAPHORE_AGENT_MAC_FAMILY (in {path}) is ignored, not supported"
            )),
            "{all}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_in_the_file_name_the_file() {
        let (c, d) = with_file(
            r#"{"SEMAPHORE_AGENT_STACK_NAME": "s", "SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME": "/t",
                "SEMAPHORE_ORGANIZATION": "org", "SEMAPHORE_AGENT_MAX_SIZE": "3",
                "SEMAPHORE_AGENT_ASG_MIN_SIZE": "many", "SEMAPHORE_AGENT_SUBNETS": ["subnet-01234567"]}"#,
            &[],
        );
        let msg = c.expect_err("refused");
        let path = d.0.join("stack.json").display().to_string();
        for needle in [
            format!("SEMAPHORE_AGENT_MAX_SIZE: in {path}: not a setting of agent-fleet; did you mean SEMAPHORE_AGENT_ASG_MAX_SIZE?"),
            format!("SEMAPHORE_AGENT_ASG_MIN_SIZE: \"many\" (from {path}) must be a whole number"),
            format!("SEMAPHORE_AGENT_SUBNETS: in {path}: must be a string, number or boolean, not an array"),
        ] {
            assert!(msg.contains(&needle), "expected {needle:?} in:\n{msg}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let e: BTreeMap<String, String> = [(
            "SEMAPHORE_AGENT_STACK_CONFIG".to_string(),
            "/nonexistent/stack.json".to_string(),
        )]
        .into_iter()
        .collect();
        let msg = StackConfig::load(&Sources::from_env(e))
            .map_err(|p| p.to_string())
            .expect_err("missing file");
        assert!(
            msg.contains("SEMAPHORE_AGENT_STACK_CONFIG: cannot read /nonexistent/stack.json"),
            "{msg}"
        );
    }
}

/// A directory removed on drop.
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "agent-fleet-config-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default()
            ));
            std::fs::create_dir_all(&p).expect("mkdir");
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any value of any variable gives a config or a list of problems, never a panic,
        /// and every problem names a variable.
        #[test]
        fn any_values_are_checked_without_panics(
            picks in prop::collection::vec((0..agent_fleet::vars::VARS.len(), ".{0,40}"), 0..12)
        ) {
            let pairs: Vec<(String, String)> = picks
                .into_iter()
                .map(|(i, v)| (agent_fleet::vars::VARS[i].name.to_string(), v))
                .collect();
            let mut e = env(&[]);
            e.extend(pairs);
            if let Err(p) = StackConfig::load(&Sources::from_env(e)) {
                for problem in &p.0 {
                    prop_assert!(problem.var.starts_with("SEMAPHORE_"), "{}", problem);
                }
            }
        }

        /// Overrides JSON, nearly valid or not, never panics.
        #[test]
        fn any_override_json_is_checked(s in r#"\{("(InstanceType|InstanceRequirements|VCpuCount|MemoryMiB|Min|Max)": ?(\{|[0-9]{1,3}|"[a-z0-9.]{0,8}"|\}|,)){0,8}\}?"#) {
            let _ = load(&[("SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON", &s)]);
        }
    }
}

#[test]
fn a_warm_pool_and_a_schedule_become_parameters() {
    let c = load(&[
        ("SEMAPHORE_AGENT_ASG_MAX_SIZE", "10"),
        ("SEMAPHORE_AGENT_WARM_POOL_SIZE", "3"),
        ("SEMAPHORE_AGENT_WARM_IMAGES", "alpine:3,ruby:3.3"),
        (
            "SEMAPHORE_AGENT_SCHEDULE",
            "Mon-Fri 08:00 min=4; Mon-Fri 19:00 min=0",
        ),
        ("SEMAPHORE_AGENT_SCHEDULE_TIMEZONE", "Europe/Berlin"),
    ])
    .expect("valid");
    assert_eq!(c.param("WarmPoolSize"), "3");
    assert_eq!(c.param("WarmPoolState"), "Stopped");
    assert_eq!(c.param("WarmPoolMaxPrepared"), "");
    assert_eq!(c.param("WarmImages"), "alpine:3,ruby:3.3");
    assert_eq!(c.param("Schedule1"), "0 8 * * 1-5|4|10");
    assert_eq!(c.param("Schedule2"), "0 19 * * 1-5|0|10");
    assert_eq!(c.param("Schedule3"), "");
    assert_eq!(c.param("ScheduleTimeZone"), "Europe/Berlin");
    let c = load(&[]).expect("defaults");
    assert_eq!(c.param("WarmPoolSize"), "0");
    assert_eq!(c.param("ScheduleTimeZone"), "UTC");
    assert_eq!(c.param("Schedule1"), "");
}

#[test]
fn what_aws_refuses_of_a_warm_pool_is_refused_with_the_variable() {
    for (pairs, says) in [
        (
            &[("SEMAPHORE_AGENT_WARM_POOL_SIZE", "2"), ("SEMAPHORE_AGENT_ON_DEMAND_PERCENTAGE_ABOVE_BASE", "0")][..],
            "SEMAPHORE_AGENT_WARM_POOL_SIZE: Auto Scaling adds no warm pool to a group with spot or a mixed instances policy, which SEMAPHORE_AGENT_ON_DEMAND_PERCENTAGE_ABOVE_BASE asks for",
        ),
        (&[("SEMAPHORE_AGENT_WARM_POOL_SIZE", "2")][..], "is above SEMAPHORE_AGENT_ASG_MAX_SIZE 1"),
        (
            &[("SEMAPHORE_AGENT_ASG_MAX_SIZE", "5"), ("SEMAPHORE_AGENT_WARM_POOL_SIZE", "3"), ("SEMAPHORE_AGENT_WARM_POOL_MAX_PREPARED", "2")][..],
            "SEMAPHORE_AGENT_WARM_POOL_MAX_PREPARED: \"2\" is below SEMAPHORE_AGENT_WARM_POOL_SIZE 3",
        ),
        (&[("SEMAPHORE_AGENT_WARM_IMAGES", "alpine:3")][..], "SEMAPHORE_AGENT_WARM_IMAGES: applies to a warm pool only"),
        (
            &[("SEMAPHORE_AGENT_WARM_POOL_SIZE", "1"), ("SEMAPHORE_AGENT_WARM_POOL_STATE", "Hibernated"), ("SEMAPHORE_AGENT_INSTANCE_TYPE", "x2iedn.xlarge")][..],
            "SEMAPHORE_AGENT_INSTANCE_TYPE: with SEMAPHORE_AGENT_WARM_POOL_STATE=Hibernated: \"x2iedn.xlarge\" is not a type agent-fleet knows EC2 can hibernate",
        ),
        (
            &[("SEMAPHORE_AGENT_WARM_POOL_SIZE", "1"), ("SEMAPHORE_AGENT_WARM_POOL_STATE", "Hibernated"), ("SEMAPHORE_AGENT_INSTANCE_TYPE", "m6i.4xlarge")][..],
            "SEMAPHORE_AGENT_VOLUME_SIZE: with SEMAPHORE_AGENT_WARM_POOL_STATE=Hibernated: 64 GiB cannot hold the 64 GiB of RAM",
        ),
        (
            &[("SEMAPHORE_AGENT_WARM_POOL_SIZE", "1"), ("SEMAPHORE_AGENT_WARM_POOL_STATE", "Hibernated"), ("SEMAPHORE_AGENT_INSTANCE_TYPE", "r6i.8xlarge"), ("SEMAPHORE_AGENT_VOLUME_SIZE", "512")][..],
            "EC2 hibernates at most 150 GiB",
        ),
        (&[("SEMAPHORE_AGENT_SCHEDULE", "Mon-Fri 8am min=4")][..], "SEMAPHORE_AGENT_SCHEDULE: entry 1 (\"Mon-Fri 8am min=4\"): \"8am\" is not a time"),
        (&[("SEMAPHORE_AGENT_SCHEDULE", "Mon-Fri 08:00 min=4")][..], "min=4 is above SEMAPHORE_AGENT_ASG_MAX_SIZE 1: add max=N"),
        (&[("SEMAPHORE_AGENT_SCHEDULE_TIMEZONE", "Mars/Olympus")][..], "SEMAPHORE_AGENT_SCHEDULE_TIMEZONE: \"Mars/Olympus\" must be an IANA time zone name"),
    ] {
        let e = refused(pairs);
        assert!(e.contains(says), "{pairs:?}:\n{e}");
    }
    load(&[
        ("SEMAPHORE_AGENT_WARM_POOL_SIZE", "1"),
        ("SEMAPHORE_AGENT_WARM_POOL_STATE", "Hibernated"),
        ("SEMAPHORE_AGENT_INSTANCE_TYPE", "t3.large"),
    ])
    .expect("t3.large (8 GiB) hibernates on the default 64 GiB root volume");
}
