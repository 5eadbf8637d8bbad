//! The stack's configuration: `SEMAPHORE_*` variables from the environment, or from the
//! JSON file named by `SEMAPHORE_AGENT_STACK_CONFIG` (the environment wins), checked with
//! the reference stack's rules and ours. Every problem is reported at once, each naming
//! the variable, where its value came from and what to set instead.

use crate::vars::{self, Target, Var, VARS};
use std::collections::BTreeMap;
use std::fmt;

/// The variable naming the JSON config file.
pub const CONFIG_FILE_VAR: &str = "SEMAPHORE_AGENT_STACK_CONFIG";

/// Where a value came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Env,
    File(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Env => write!(f, "environment"),
            Origin::File(p) => write!(f, "{p}"),
        }
    }
}

/// One refused setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The variable (or the config file variable) at fault.
    pub var: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.var, self.message)
    }
}

/// All the problems found, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "the stack configuration has {n} problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

fn problem(var: &str, message: impl Into<String>) -> Problem {
    Problem {
        var: var.to_string(),
        message: message.into(),
    }
}

/// The raw values, before checks: the file's, overlaid with the environment's.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    values: BTreeMap<String, (String, Origin)>,
    /// Problems found while reading (malformed file, unknown keys).
    pub problems: Vec<Problem>,
    /// Things worth saying that are not errors (unknown `SEMAPHORE_AGENT_*` variables).
    pub warnings: Vec<String>,
}

impl Sources {
    /// From this process's environment (and the file it names).
    pub fn from_process_env() -> Self {
        Self::from_env(std::env::vars().collect())
    }

    /// From a given environment (tests use this). Empty values count as unset.
    pub fn from_env(env: BTreeMap<String, String>) -> Self {
        let mut s = Sources::default();
        if let Some(path) = env.get(CONFIG_FILE_VAR).filter(|p| !p.is_empty()) {
            s.read_file(path);
        }
        for (k, v) in env {
            if v.is_empty() || k == CONFIG_FILE_VAR {
                continue;
            }
            if vars::lookup(&k).is_some() {
                s.values.insert(k, (v, Origin::Env));
            } else if let Some(why) = vars::reference_only(&k) {
                s.warnings.push(format!("{k}={v:?} is ignored, {why}"));
            } else if k.starts_with("SEMAPHORE_AGENT_") {
                s.warnings.push(format!(
                    "{k} is not a setting of agent-fleet and is ignored{}",
                    did_you_mean(&k)
                ));
            }
        }
        s
    }

    fn read_file(&mut self, path: &str) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.problems.push(problem(
                    CONFIG_FILE_VAR,
                    format!("cannot read {path}: {e}; fix the path or unset {CONFIG_FILE_VAR}"),
                ));
                return;
            }
        };
        let doc: serde_json::Value = match serde_json::from_str(&text) {
            Ok(d) => d,
            Err(e) => {
                self.problems.push(problem(
                    CONFIG_FILE_VAR,
                    format!(
                        "{path} is not valid JSON: {} at line {}, column {}",
                        strip_position(&e.to_string()),
                        e.line(),
                        e.column()
                    ),
                ));
                return;
            }
        };
        let Some(map) = doc.as_object() else {
            self.problems.push(problem(
                CONFIG_FILE_VAR,
                format!("{path} must hold a JSON object of \"SEMAPHORE_…\": \"value\" pairs"),
            ));
            return;
        };
        for (k, v) in map {
            if let Some(why) = vars::reference_only(k) {
                self.warnings
                    .push(format!("{k} (in {path}) is ignored, {why}"));
                continue;
            }
            if vars::lookup(k).is_none() {
                self.problems.push(problem(
                    k,
                    format!(
                        "in {path}: not a setting of agent-fleet{}; remove it or correct the name",
                        did_you_mean(k)
                    ),
                ));
                continue;
            }
            let value = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Bool(b) => b.to_string(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Null => continue,
                other => {
                    self.problems.push(problem(
                        k,
                        format!(
                            "in {path}: must be a string, number or boolean, not {}",
                            json_kind(other)
                        ),
                    ));
                    continue;
                }
            };
            if !value.is_empty() {
                self.values
                    .insert(k.clone(), (value, Origin::File(path.to_string())));
            }
        }
    }

    pub fn get(&self, var: &str) -> Option<&str> {
        self.values.get(var).map(|(v, _)| v.as_str())
    }

    pub fn origin(&self, var: &str) -> Option<&Origin> {
        self.values.get(var).map(|(_, o)| o)
    }

    /// `VAR="value" (from …)`, for messages.
    fn shown(&self, var: &str) -> String {
        match self.values.get(var) {
            Some((v, Origin::Env)) => format!("{v:?}"),
            Some((v, o)) => format!("{v:?} (from {o})"),
            None => "unset".into(),
        }
    }

    /// A variable's value checked against its own rule; `Ok(None)` when unset.
    pub fn checked(&self, var: &Var) -> Result<Option<&str>, Problem> {
        let Some(v) = self.get(var.name) else {
            return Ok(None);
        };
        if let Some((_, _, why)) = vars::UNSUPPORTED_VALUES
            .iter()
            .find(|(n, value, _)| *n == var.name && *value == v)
        {
            return Err(problem(
                var.name,
                format!("{} is refused: {why}", self.shown(var.name)),
            ));
        }
        var.check
            .check(v)
            .map(|()| Some(v))
            .map_err(|why| problem(var.name, format!("{} {why}", self.shown(var.name))))
    }
}

/// serde_json's message ends in " at line L column C"; we print those ourselves.
fn strip_position(msg: &str) -> &str {
    msg.rsplit_once(" at line ").map_or(msg, |(m, _)| m)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
        _ => "this",
    }
}

/// "; did you mean X?" for a near miss (one edit, or a missing/extra prefix).
fn did_you_mean(name: &str) -> String {
    let best = VARS
        .iter()
        .map(|v| (edit_distance(name, v.name), v.name))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, n)) if d <= 4 => format!("; did you mean {n}?"),
        _ => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A checked configuration, ready to become a deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackConfig {
    pub stack_name: String,
    /// Every template parameter the variables set, defaults included (so a deploy
    /// always says the whole configuration). `ManagedPolicyArns` is filled in by
    /// [`StackConfig::resolve_policies`].
    pub parameters: BTreeMap<String, String>,
    pub tags: Vec<(String, String)>,
    pub managed_policy_names: Vec<String>,
    pub warnings: Vec<String>,
}

impl StackConfig {
    pub fn load(src: &Sources) -> Result<StackConfig, Problems> {
        let mut problems = src.problems.clone();
        let mut warnings = src.warnings.clone();
        let mut parameters = BTreeMap::new();
        let mut tags = vec![];
        let mut managed_policy_names = vec![];
        let mut stack_name = String::new();

        for var in VARS {
            let value = match src.checked(var) {
                Ok(v) => v,
                Err(p) => {
                    problems.push(p);
                    continue;
                }
            };
            match var.target {
                Target::StackName => match value {
                    Some(v) => stack_name = v.to_string(),
                    None => problems.push(problem(
                        var.name,
                        "is required: set it to the CloudFormation stack name, e.g. `export SEMAPHORE_AGENT_STACK_NAME=ci-agents`",
                    )),
                },
                Target::Param(p) => {
                    if p == "TokenParameterName" && value.is_none() {
                        problems.push(problem(
                            var.name,
                            "is required: set it to the name of the SSM SecureString that holds the registration token (store the token with `agent-fleet token set`)",
                        ));
                    }
                    let v = value.or(var.default).unwrap_or_default();
                    parameters.insert(p.to_string(), v.to_string());
                }
                Target::StackTags => {
                    for pair in value.into_iter().flat_map(|v| v.split(',')) {
                        if let Some((k, v)) = pair.split_once(':') {
                            tags.push((k.trim().to_string(), v.trim().to_string()));
                        }
                    }
                    if tags.len() > 50 {
                        problems.push(problem(
                            var.name,
                            format!("has {} tags; CloudFormation takes at most 50", tags.len()),
                        ));
                    }
                }
                Target::ManagedPolicies => {
                    managed_policy_names = value
                        .map(|v| v.split(',').map(str::to_string).collect())
                        .unwrap_or_default();
                    parameters.insert("ManagedPolicyArns".into(), String::new());
                }
                Target::Schedule => {
                    let max = parameters
                        .get("AsgMaxSize")
                        .and_then(|m| vars::parse_uint(m))
                        .unwrap_or(1);
                    match crate::schedule::parse(value.unwrap_or_default()) {
                        Ok(entries) => {
                            for (i, e) in entries.iter().enumerate() {
                                if e.max.is_none() && e.min > max {
                                    problems.push(problem(
                                        var.name,
                                        format!("entry {} ({}): min={} is above SEMAPHORE_AGENT_ASG_MAX_SIZE {max}: add max=N to the entry or raise the maximum", i + 1, e.when, e.min),
                                    ));
                                }
                            }
                            for (i, name) in vars::SCHEDULE_PARAMETERS.iter().enumerate() {
                                let v = entries.get(i).map(|e| e.parameter(max));
                                parameters.insert(name.to_string(), v.unwrap_or_default());
                            }
                        }
                        Err(why) => problems.push(problem(var.name, why)),
                    }
                }
                Target::Overrides => match value.map(parse_override).transpose() {
                    Ok(o) => {
                        let o = o.unwrap_or_default();
                        for (name, v) in vars::OVERRIDE_PARAMETERS.iter().zip(o) {
                            parameters.insert(name.to_string(), v);
                        }
                    }
                    Err(why) => problems.push(problem(
                        var.name,
                        format!("{} {why}", src.shown(var.name)),
                    )),
                },
            }
        }

        cross_checks(src, &parameters, &mut problems, &mut warnings);

        if problems.is_empty() {
            Ok(StackConfig {
                stack_name,
                parameters,
                tags,
                managed_policy_names,
                warnings,
            })
        } else {
            Err(Problems(problems))
        }
    }

    pub fn param(&self, name: &str) -> &str {
        self.parameters.get(name).map_or("", String::as_str)
    }

    /// Turns policy names into ARNs of this account (ARNs pass through).
    pub fn resolve_policies(&mut self, partition: &str, account: &str) {
        let arns: Vec<String> = self
            .managed_policy_names
            .iter()
            .map(|n| {
                if n.starts_with("arn:") {
                    n.clone()
                } else {
                    format!("arn:{partition}:iam::{account}:policy/{n}")
                }
            })
            .collect();
        self.parameters
            .insert("ManagedPolicyArns".into(), arns.join(","));
    }

    /// The SSM parameter the supervisor reads its runtime config from.
    pub fn config_parameter(&self) -> String {
        agent_supervisor::config::StackIdentity::default_config_parameter(&self.stack_name)
    }
}

/// Rules across variables (the reference's and ours).
fn cross_checks(
    src: &Sources,
    p: &BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<String>,
) {
    let get = |k: &str| p.get(k).map_or("", String::as_str);
    let num = |k: &str| vars::parse_uint(get(k));
    let shown = |v: &str| src.shown(v);

    if get("Endpoint").is_empty() && get("Organization").is_empty() {
        problems.push(problem(
            "SEMAPHORE_ORGANIZATION",
            "neither it nor SEMAPHORE_ENDPOINT is set: set SEMAPHORE_ORGANIZATION to your organization (myorg for myorg.semaphoreci.com) or SEMAPHORE_ENDPOINT to the host",
        ));
    }

    if let (Some(min), Some(max)) = (num("AsgMinSize"), num("AsgMaxSize")) {
        if min > max {
            problems.push(problem(
                "SEMAPHORE_AGENT_ASG_MIN_SIZE",
                format!(
                    "{} is above SEMAPHORE_AGENT_ASG_MAX_SIZE {}: lower the minimum or raise the maximum",
                    shown("SEMAPHORE_AGENT_ASG_MIN_SIZE"),
                    shown("SEMAPHORE_AGENT_ASG_MAX_SIZE")
                ),
            ));
        }
        if let Some(desired) = num("AsgDesired") {
            if desired < min || desired > max {
                problems.push(problem(
                    "SEMAPHORE_AGENT_ASG_DESIRED",
                    format!(
                        "{} is outside min {min} … max {max}: set it between them, or unset it",
                        shown("SEMAPHORE_AGENT_ASG_DESIRED")
                    ),
                ));
            }
        }
    }

    if !get("VpcId").is_empty() && get("Subnets").is_empty() {
        problems.push(problem(
            "SEMAPHORE_AGENT_SUBNETS",
            "is required with SEMAPHORE_AGENT_VPC_ID: list the VPC's subnet ids, comma-separated",
        ));
    }
    if get("VpcId").is_empty() && !get("Subnets").is_empty() {
        warnings.push(
            "SEMAPHORE_AGENT_SUBNETS is ignored without SEMAPHORE_AGENT_VPC_ID (the default VPC is used)"
                .into(),
        );
    }
    if !get("VpcId").is_empty() && !get("Azs").is_empty() {
        problems.push(problem(
            "SEMAPHORE_AGENT_AZS",
            "must be unset with SEMAPHORE_AGENT_VPC_ID: the subnets choose the availability zones",
        ));
    }

    if get("OverprovisionStrategy") != "none" && num("OverprovisionFactor").unwrap_or(0) < 1 {
        problems.push(problem(
            "SEMAPHORE_AGENT_OVERPROVISION_FACTOR",
            format!(
                "must be a whole number of at least 1 with SEMAPHORE_AGENT_OVERPROVISION_STRATEGY={} (it is {})",
                get("OverprovisionStrategy"),
                shown("SEMAPHORE_AGENT_OVERPROVISION_FACTOR")
            ),
        ));
    }

    if let (Some(cap), Some(uptime)) = (num("LifetimeCap"), num("MaxUptime")) {
        if uptime > 0 && cap <= uptime {
            let cap_shown = match src.get("SEMAPHORE_AGENT_LIFETIME_CAP") {
                Some(_) => shown("SEMAPHORE_AGENT_LIFETIME_CAP"),
                None => format!("{cap} (the default)"),
            };
            problems.push(problem(
                "SEMAPHORE_AGENT_LIFETIME_CAP",
                format!(
                    "{cap_shown} is not above SEMAPHORE_AGENT_MAX_UPTIME {}: the leader would end instances before they replace themselves, busy or not; raise SEMAPHORE_AGENT_LIFETIME_CAP (e.g. to {}, a day more for a running job) or lower SEMAPHORE_AGENT_MAX_UPTIME",
                    shown("SEMAPHORE_AGENT_MAX_UPTIME"),
                    uptime + 86_400
                ),
            ));
        }
    }

    if !get("SshCidr").is_empty() {
        if get("KeyName").is_empty() {
            problems.push(problem(
                "SEMAPHORE_AGENT_SSH_CIDR",
                "opens SSH only for a key pair: set SEMAPHORE_AGENT_KEY_NAME too",
            ));
        }
        if !get("SecurityGroupId").is_empty() {
            problems.push(problem(
                "SEMAPHORE_AGENT_SSH_CIDR",
                "applies to the security group the stack creates; with SEMAPHORE_AGENT_SECURITY_GROUP_ID add the rule to your own group and unset it",
            ));
        }
        if get("SshCidr").ends_with("/0") {
            problems.push(problem(
                "SEMAPHORE_AGENT_SSH_CIDR",
                "must not be open to the world",
            ));
        }
    } else if !get("KeyName").is_empty() && get("SecurityGroupId").is_empty() {
        warnings.push(
            "SEMAPHORE_AGENT_KEY_NAME is set but SEMAPHORE_AGENT_SSH_CIDR is not: no SSH ingress is opened (set the CIDR that may connect, or use Session Manager)"
                .into(),
        );
    }

    let arm = get("Arch") == "arm64";
    for (var, param) in [
        ("SEMAPHORE_AGENT_INSTANCE_TYPE", "InstanceType"),
        ("SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE", "ScalerInstanceType"),
    ] {
        let t = get(param);
        if t.is_empty() || t == "none" {
            continue;
        }
        if vars::is_arm64_instance_type(t) != arm {
            problems.push(problem(
                var,
                format!(
                    "{t:?} is {} but SEMAPHORE_AGENT_ARCH is {}: choose {} instance type (e.g. {})",
                    if arm { "x86_64" } else { "arm64" },
                    get("Arch"),
                    if arm { "an arm64" } else { "an x86_64" },
                    if arm { "t4g.micro" } else { "t3.micro" }
                ),
            ));
        }
    }

    let vtype = get("VolumeType");
    if !get("VolumeThroughput").is_empty() && vtype != "gp3" {
        problems.push(problem(
            "SEMAPHORE_AGENT_VOLUME_THROUGHPUT",
            format!("applies to gp3 volumes only (SEMAPHORE_AGENT_VOLUME_TYPE is {vtype}): unset it or use gp3"),
        ));
    }
    if !get("VolumeIops").is_empty() && !matches!(vtype, "gp3" | "io1" | "io2") {
        problems.push(problem(
            "SEMAPHORE_AGENT_VOLUME_IOPS",
            format!("applies to gp3, io1 and io2 volumes only (SEMAPHORE_AGENT_VOLUME_TYPE is {vtype}): unset it"),
        ));
    }
    if get("VolumeIops").is_empty() && matches!(vtype, "io1" | "io2") {
        problems.push(problem(
            "SEMAPHORE_AGENT_VOLUME_IOPS",
            format!("is required for {vtype} volumes: set the provisioned IOPS"),
        ));
    }

    if !get("AsgLaunchTemplateOverrideVCpuMin").is_empty()
        && get("OnDemandAllocationStrategy") == "prioritized"
    {
        problems.push(problem(
            "SEMAPHORE_AGENT_ON_DEMAND_ALLOCATION_STRATEGY",
            "cannot be `prioritized` with instance requirements in SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON: use lowest-price",
        ));
    }

    warm_pool_checks(src, p, problems);

    if get("UseDynamicScaling") == "true" && get("ScalerInstanceType") == "none" {
        warnings.push(
            "SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE=none with dynamic scaling: agents lead, so the agent role can set desired capacity, suspend processes and end other agents, and a job that is root on its agent (SEMAPHORE_AGENT_JOB_ISOLATION=vm, the default) can steer the fleet; unset SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE to have a scaler instance, which runs no jobs, lead instead"
                .into(),
        );
    }
    if get("UseDynamicScaling") == "true"
        && get("AsgMinSize") == "0"
        && get("ScalerInstanceType") == "none"
    {
        warnings.push(
            "dynamic scaling is on with SEMAPHORE_AGENT_ASG_MIN_SIZE=0 and SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE=none: with no instance running there is no leader to scale up from zero; jobs will wait until someone raises desired capacity by hand (unset SEMAPHORE_AGENT_SCALER_INSTANCE_TYPE, or set a minimum of 1)"
                .into(),
        );
    }
    if get("DisconnectAfterIdleTimeout") == "0" && get("DisconnectAfterJob") == "false" {
        warnings.push(
            "SEMAPHORE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT=0 with SEMAPHORE_AGENT_DISCONNECT_AFTER_JOB=false: agents never leave, so the fleet never scales in"
                .into(),
        );
    }
}

/// What AWS would refuse of a warm pool (`crate::warm_pool`). DISCONNECT_AFTER_JOB=false is
/// allowed: the pool only changes how an instance starts, and a used one never returns to it.
fn warm_pool_checks(src: &Sources, p: &BTreeMap<String, String>, problems: &mut Vec<Problem>) {
    let get = |k: &str| p.get(k).map_or("", String::as_str);
    let num = |k: &str| vars::parse_uint(get(k));
    let size = num("WarmPoolSize").unwrap_or(0);
    if size == 0 {
        for var in [
            "SEMAPHORE_AGENT_WARM_POOL_MAX_PREPARED",
            "SEMAPHORE_AGENT_WARM_IMAGES",
        ] {
            if src.get(var).is_some() {
                problems.push(problem(
                    var,
                    "applies to a warm pool only: set SEMAPHORE_AGENT_WARM_POOL_SIZE too, or unset it",
                ));
            }
        }
        if src.get("SEMAPHORE_AGENT_WARM_POOL_STATE").is_some() && get("WarmPoolState") != "Stopped"
        {
            problems.push(problem(
                "SEMAPHORE_AGENT_WARM_POOL_STATE",
                "applies to a warm pool only: set SEMAPHORE_AGENT_WARM_POOL_SIZE too, or unset it",
            ));
        }
        return;
    }
    if let Some(max) = num("AsgMaxSize") {
        if size > max {
            problems.push(problem(
                "SEMAPHORE_AGENT_WARM_POOL_SIZE",
                format!(
                    "{} is above SEMAPHORE_AGENT_ASG_MAX_SIZE {max}: a pool larger than the group can never be taken into service; lower it or raise the maximum",
                    src.shown("SEMAPHORE_AGENT_WARM_POOL_SIZE")
                ),
            ));
        }
    }
    let images = get("WarmImages")
        .split(',')
        .filter(|i| !i.is_empty())
        .count();
    if images > agent_supervisor::config::MAX_WARM_IMAGES {
        problems.push(problem(
            "SEMAPHORE_AGENT_WARM_IMAGES",
            format!(
                "names {images} images; the supervisor pulls at most {}: keep the ones most jobs use",
                agent_supervisor::config::MAX_WARM_IMAGES
            ),
        ));
    }
    if let Some(prepared) = num("WarmPoolMaxPrepared") {
        if prepared < size {
            problems.push(problem(
                "SEMAPHORE_AGENT_WARM_POOL_MAX_PREPARED",
                format!(
                    "{} is below SEMAPHORE_AGENT_WARM_POOL_SIZE {size}: set it to at least the pool size, or unset it for a pool of exactly that size",
                    src.shown("SEMAPHORE_AGENT_WARM_POOL_MAX_PREPARED")
                ),
            ));
        }
    }
    // Auto Scaling: no warm pool with a mixed instances policy or Spot Instances.
    let mixed = [
        (
            "SEMAPHORE_AGENT_ON_DEMAND_PERCENTAGE_ABOVE_BASE",
            get("OnDemandPercentageAboveBase") != "100",
        ),
        (
            "SEMAPHORE_AGENT_ON_DEMAND_BASE_CAPACITY",
            get("OnDemandBaseCapacity") != "0",
        ),
        (
            "SEMAPHORE_AGENT_ON_DEMAND_ALLOCATION_STRATEGY",
            !get("OnDemandAllocationStrategy").is_empty(),
        ),
        (
            "SEMAPHORE_AGENT_SPOT_ALLOCATION_STRATEGY",
            !get("SpotAllocationStrategy").is_empty(),
        ),
        (
            "SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON",
            vars::OVERRIDE_PARAMETERS.iter().any(|o| !get(o).is_empty()),
        ),
    ];
    for (var, set) in mixed {
        if set {
            problems.push(problem(
                "SEMAPHORE_AGENT_WARM_POOL_SIZE",
                format!("Auto Scaling adds no warm pool to a group with spot or a mixed instances policy, which {var} asks for: unset one of the two"),
            ));
        }
    }
    if get("WarmPoolState") == "Hibernated" {
        let volume = num("VolumeSize").unwrap_or(0);
        if let Some((var, why)) = crate::warm_pool::hibernation_problem(get("InstanceType"), volume)
        {
            problems.push(problem(
                var,
                format!("with SEMAPHORE_AGENT_WARM_POOL_STATE=Hibernated: {why}"),
            ));
        }
    }
}

/// `SEMAPHORE_AGENT_ASG_LAUNCH_TEMPLATE_OVERRIDES_JSON` → the five override parameters
/// (instance type, vCPU min/max, memory min/max; empty when absent).
fn parse_override(json: &str) -> Result<[String; 5], String> {
    let doc: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        format!(
            "is not valid JSON: {} at line {}, column {}",
            strip_position(&e.to_string()),
            e.line(),
            e.column()
        )
    })?;
    let obj = doc
        .as_object()
        .ok_or("must be one JSON object (one override)")?;
    let mut out: [String; 5] = Default::default();
    for key in obj.keys() {
        if key != "InstanceType" && key != "InstanceRequirements" {
            return Err(format!(
                "has key {key:?}; an override takes InstanceType or InstanceRequirements"
            ));
        }
    }
    match (obj.get("InstanceType"), obj.get("InstanceRequirements")) {
        (Some(_), Some(_)) => {
            Err("has both InstanceType and InstanceRequirements; give one".into())
        }
        (None, None) => Err("needs InstanceType or InstanceRequirements".into()),
        (Some(t), None) => {
            let t = t
                .as_str()
                .filter(|t| vars::valid_instance_type(t))
                .ok_or("has an InstanceType that is not an instance type such as \"m6i.large\"")?;
            out[0] = t.to_string();
            Ok(out)
        }
        (None, Some(r)) => {
            let r = r
                .as_object()
                .ok_or("InstanceRequirements must be an object")?;
            for key in r.keys() {
                if key != "VCpuCount" && key != "MemoryMiB" {
                    return Err(format!(
                        "InstanceRequirements.{key} is not supported; only VCpuCount and MemoryMiB"
                    ));
                }
            }
            let range = |name: &str| -> Result<(String, String), String> {
                let o = r.get(name).and_then(|v| v.as_object()).ok_or(format!(
                    "InstanceRequirements.{name} {{\"Min\": …}} is required"
                ))?;
                let n = |k: &str| -> Result<String, String> {
                    match o.get(k) {
                        None => Ok(String::new()),
                        Some(v) => v.as_u64().map(|n| n.to_string()).ok_or(format!(
                            "InstanceRequirements.{name}.{k} must be a whole number"
                        )),
                    }
                };
                let (min, max) = (n("Min")?, n("Max")?);
                if min.is_empty() {
                    return Err(format!("InstanceRequirements.{name}.Min is required"));
                }
                if let (Some(a), Some(b)) = (vars::parse_uint(&min), vars::parse_uint(&max)) {
                    if a > b {
                        return Err(format!(
                            "InstanceRequirements.{name}: Min {a} is above Max {b}"
                        ));
                    }
                }
                Ok((min, max))
            };
            let (vmin, vmax) = range("VCpuCount")?;
            let (mmin, mmax) = range("MemoryMiB")?;
            out[1] = vmin;
            out[2] = vmax;
            out[3] = mmin;
            out[4] = mmax;
            Ok(out)
        }
    }
}
