//! The variable table against the reference, the template and the README: every
//! `SEMAPHORE_*` variable maps to a template parameter and to a README row with its
//! default and meaning, and the defaults and allowed values agree with the template's.

use agent_fleet::vars::{Check, Target, VARS};
use std::collections::{BTreeMap, BTreeSet};

/// The reference stack's variables (shared/reference/agent-aws-stack.md and the seed page).
const REFERENCE: &[&str] = &[
    "SEMAPHORE_AGENT_STACK_NAME",
    "SEMAPHORE_AGENT_TOKEN_PARAMETER_NAME",
    "SEMAPHORE_ORGANIZATION",
    "SEMAPHORE_ENDPOINT",
    "SEMAPHORE_AGENT_INSTANCE_TYPE",
    "SEMAPHORE_AGENT_ASG_MIN_SIZE",
    "SEMAPHORE_AGENT_ASG_MAX_SIZE",
    "SEMAPHORE_AGENT_ASG_DESIRED",
    "SEMAPHORE_AGENT_USE_DYNAMIC_SCALING",
    "SEMAPHORE_AGENT_SECURITY_GROUP_ID",
    "SEMAPHORE_AGENT_KEY_NAME",
    "SEMAPHORE_AGENT_DISCONNECT_AFTER_JOB",
    "SEMAPHORE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT",
    "SEMAPHORE_AGENT_CACHE_BUCKET_NAME",
    "SEMAPHORE_AGENT_TOKEN_KMS_KEY",
    "SEMAPHORE_AGENT_VPC_ID",
    "SEMAPHORE_AGENT_SUBNETS",
    "SEMAPHORE_AGENT_AMI",
    "SEMAPHORE_AGENT_OS",
    "SEMAPHORE_AGENT_ARCH",
    "SEMAPHORE_AGENT_MANAGED_POLICY_NAMES",
    "SEMAPHORE_AGENT_VOLUME_NAME",
    "SEMAPHORE_AGENT_VOLUME_TYPE",
    "SEMAPHORE_AGENT_VOLUME_SIZE",
    "SEMAPHORE_AGENT_VOLUME_IOPS",
    "SEMAPHORE_AGENT_VOLUME_THROUGHPUT",
    "SEMAPHORE_AGENT_TAGS",
    "SEMAPHORE_AGENT_AZS",
    "SEMAPHORE_AGENT_USE_PRE_SIGNED_URL",
    "SEMAPHORE_AGENT_OVERPROVISION_STRATEGY",
    "SEMAPHORE_AGENT_OVERPROVISION_FACTOR",
    "SEMAPHORE_AGENT_USE_IPV6",
    "SEMAPHORE_AGENT_ASG_MAX_INSTANCE_LIFETIME",
    "SEMAPHORE_AGENT_ASG_METRICS",
    "SEMAPHORE_AGENT_ON_DEMAND_BASE_CAPACITY",
    "SEMAPHORE_AGENT_ON_DEMAND_PERCENTAGE_ABOVE_BASE",
    "SEMAPHORE_AGENT_ON_DEMAND_ALLOCATION_STRATEGY",
    "SEMAPHORE_AGENT_SPOT_ALLOCATION_STRATEGY",
    "SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON",
    "SEMAPHORE_AGENT_ASG_CAPACITY_REBALANCE",
    "SEMAPHORE_AGENT_ASG_NEW_INSTANCES_PROTECTED_FROM_SCALE_IN",
];

struct TemplateParam {
    default: Option<String>,
    allowed: Option<Vec<String>>,
}

fn template_parameters() -> BTreeMap<String, TemplateParam> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(agent_fleet::TEMPLATE).expect("the template parses as YAML");
    let params = doc
        .get("Parameters")
        .and_then(|p| p.as_mapping())
        .expect("Parameters");
    params
        .iter()
        .map(|(k, v)| {
            let name = k.as_str().expect("name").to_string();
            let default = v.get("Default").map(|d| match d {
                serde_yaml::Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other)
                    .expect("yaml")
                    .trim()
                    .to_string(),
            });
            let allowed = v
                .get("AllowedValues")
                .and_then(|a| a.as_sequence())
                .map(|seq| {
                    // Strings, or numbers (a Number parameter's, e.g. LogRetention's days).
                    seq.iter()
                        .map(|x| match x {
                            serde_yaml::Value::Number(n) => n.to_string(),
                            other => other.as_str().expect("string or number").to_string(),
                        })
                        .collect()
                });
            (name, TemplateParam { default, allowed })
        })
        .collect()
}

#[test]
fn every_reference_variable_is_supported() {
    let ours: BTreeSet<&str> = VARS.iter().map(|v| v.name).collect();
    for r in REFERENCE {
        assert!(ours.contains(r), "{r} (a reference variable) is missing");
    }
    for v in VARS {
        assert_eq!(
            !REFERENCE.contains(&v.name),
            v.ours,
            "{}: `ours` must be set exactly for variables the reference lacks",
            v.name
        );
    }
}

#[test]
fn every_variable_maps_to_template_parameters_and_every_parameter_is_reachable() {
    let tpl = template_parameters();
    let mut reached = BTreeSet::new();
    for v in VARS {
        let ps = v.target.parameters();
        match v.target {
            Target::StackName | Target::StackTags => assert!(ps.is_empty()),
            _ => assert!(!ps.is_empty(), "{} maps to no parameter", v.name),
        }
        for p in ps {
            assert!(
                tpl.contains_key(*p),
                "{} maps to {p}, which the template lacks",
                v.name
            );
            reached.insert(p.to_string());
        }
    }
    let unreached: Vec<&String> = tpl.keys().filter(|k| !reached.contains(*k)).collect();
    assert!(
        unreached.is_empty(),
        "template parameters no variable sets: {unreached:?}"
    );
}

#[test]
fn defaults_agree_with_the_template() {
    let tpl = template_parameters();
    for v in VARS {
        let Target::Param(p) = v.target else { continue };
        let t = &tpl[p];
        let ours = v.default.unwrap_or("");
        match &t.default {
            Some(d) => assert_eq!(d, ours, "{}: default differs from {p}'s", v.name),
            None => assert_eq!(p, "TokenParameterName", "{p} has no template default"),
        }
    }
}

#[test]
fn allowed_values_agree_with_the_template() {
    let tpl = template_parameters();
    for v in VARS {
        let Target::Param(p) = v.target else { continue };
        let Some(allowed) = &tpl[p].allowed else {
            continue;
        };
        for a in allowed.iter().filter(|a| !a.is_empty()) {
            assert!(
                v.check.check(a).is_ok(),
                "{}: refuses {a:?}, which {p} allows",
                v.name
            );
        }
        assert!(
            v.check.check("not-a-value").is_err(),
            "{} accepts anything",
            v.name
        );
        if let Check::OneOf(ours) = v.check {
            for o in ours {
                assert!(
                    allowed.iter().any(|a| a == o),
                    "{}: accepts {o:?}, which {p} refuses",
                    v.name
                );
            }
        }
    }
}

#[test]
fn the_readme_table_is_the_variable_table() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let table = agent_fleet::vars::markdown_table();
    for (line, v) in table.lines().skip(2).zip(VARS) {
        assert!(
            readme.contains(line),
            "README.md lacks the row of {} (regenerate with `agent-fleet vars --markdown`):\n{line}",
            v.name
        );
    }
    assert!(readme.contains(&table), "README.md's configuration table is out of date: regenerate it with `agent-fleet vars --markdown`");
}

#[test]
fn the_template_fits_in_a_request_body() {
    let body = agent_fleet::template::body();
    assert!(
        body.len() <= agent_fleet::TEMPLATE_BODY_LIMIT,
        "the template body is {} bytes without comments; CloudFormation takes at most {} inline",
        body.len(),
        agent_fleet::TEMPLATE_BODY_LIMIT
    );
}
