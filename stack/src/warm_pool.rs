//! What AWS refuses for a warm pool, checked before a deploy so the operator reads the
//! variable and the fix instead of a failed stack.
//!
//! - Auto Scaling: a warm pool cannot be added to a group with a mixed instances policy or
//!   that launches Spot Instances (every `SEMAPHORE_AGENT_ON_DEMAND_*`/`SPOT_*`/override
//!   setting that makes one).
//! - EC2 hibernation prerequisites (`Hibernated`): a supported instance family, at most
//!   150 GiB of RAM, no bare metal, an encrypted EBS root volume (the template always
//!   encrypts it) large enough to hold the RAM besides what is on it. RAM is known here for
//!   the common families with a fixed memory-per-vCPU ratio; other types are refused under
//!   `Hibernated` with a message saying so.

/// AWS's ceiling for a hibernated instance's RAM.
pub const MAX_HIBERNATION_RAM_GIB: f64 = 150.0;

/// Root volume beyond the RAM: the AMI's own files, Docker images and the job's checkout.
pub const ROOT_MARGIN_GIB: u64 = 16;

/// Burstable families (hibernation supported): RAM by size.
const BURSTABLE: &[&str] = &["t2", "t3", "t3a", "t4g"];
const BURSTABLE_SIZES: &[(&str, f64)] = &[
    ("nano", 0.5),
    ("micro", 1.0),
    ("small", 2.0),
    ("medium", 4.0),
    ("large", 8.0),
    ("xlarge", 16.0),
    ("2xlarge", 32.0),
];

/// Families that support hibernation with a fixed GiB per vCPU.
const FIXED_RATIO: &[(&[&str], f64)] = &[
    (
        &[
            "m4", "m5", "m5a", "m5ad", "m5d", "m6a", "m6g", "m6gd", "m6i", "m6id", "m7a", "m7g",
            "m7gd", "m7i", "m7i-flex", "m8g",
        ],
        4.0,
    ),
    (
        &[
            "c5", "c5a", "c5ad", "c5d", "c6a", "c6g", "c6gd", "c6i", "c6id", "c7a", "c7g", "c7gd",
            "c7i", "c7i-flex", "c8g",
        ],
        2.0,
    ),
    (
        &[
            "r5", "r5a", "r5ad", "r5b", "r5d", "r6a", "r6g", "r6gd", "r6i", "r6id", "r7a", "r7g",
            "r7gd", "r7i", "r8g",
        ],
        8.0,
    ),
];

/// vCPUs of a size: `medium` 1, `large` 2, `xlarge` 4, `Nxlarge` 4N.
fn vcpus(size: &str) -> Option<f64> {
    match size {
        "medium" => Some(1.0),
        "large" => Some(2.0),
        "xlarge" => Some(4.0),
        _ => size
            .strip_suffix("xlarge")
            .and_then(crate::vars::parse_uint)
            .map(|n| 4.0 * n as f64),
    }
}

/// RAM in GiB of a type whose family supports hibernation, if this table knows it.
pub fn hibernation_ram_gib(instance_type: &str) -> Option<f64> {
    let (family, size) = instance_type.split_once('.')?;
    if BURSTABLE.contains(&family) {
        return BURSTABLE_SIZES
            .iter()
            .find(|(s, _)| *s == size)
            .map(|(_, gib)| *gib);
    }
    let ratio = FIXED_RATIO
        .iter()
        .find(|(families, _)| families.contains(&family))
        .map(|(_, r)| *r)?;
    vcpus(size).map(|v| v * ratio)
}

/// The refusal for hibernating `instance_type` with a root volume of `volume_gib`, if any.
pub fn hibernation_problem(instance_type: &str, volume_gib: u64) -> Option<(&'static str, String)> {
    const TYPE: &str = "SEMAPHORE_AGENT_INSTANCE_TYPE";
    if instance_type.ends_with(".metal") || instance_type.contains(".metal-") {
        return Some((
            TYPE,
            format!("{instance_type:?} is bare metal, which EC2 cannot hibernate: choose a virtualized type or SEMAPHORE_AGENT_WARM_POOL_STATE=Stopped"),
        ));
    }
    let Some(ram) = hibernation_ram_gib(instance_type) else {
        return Some((
            TYPE,
            format!("{instance_type:?} is not a type agent-fleet knows EC2 can hibernate (families t2, t3, t3a, t4g and the m, c, r families of generation 5 and later; see EC2's hibernation prerequisites): choose one of those or set SEMAPHORE_AGENT_WARM_POOL_STATE=Stopped"),
        ));
    };
    if ram > MAX_HIBERNATION_RAM_GIB {
        return Some((
            TYPE,
            format!("{instance_type:?} has {ram} GiB of RAM; EC2 hibernates at most {MAX_HIBERNATION_RAM_GIB} GiB: choose a smaller type or SEMAPHORE_AGENT_WARM_POOL_STATE=Stopped"),
        ));
    }
    let need = ram.ceil() as u64 + ROOT_MARGIN_GIB;
    if volume_gib < need {
        return Some((
            "SEMAPHORE_AGENT_VOLUME_SIZE",
            format!("{volume_gib} GiB cannot hold the {ram} GiB of RAM of {instance_type:?} that hibernation writes to the root volume, besides its {ROOT_MARGIN_GIB} GiB of files: set it to at least {need}, or SEMAPHORE_AGENT_WARM_POOL_STATE=Stopped"),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_of_common_types() {
        assert_eq!(hibernation_ram_gib("t3.micro"), Some(1.0));
        assert_eq!(hibernation_ram_gib("t4g.2xlarge"), Some(32.0));
        assert_eq!(hibernation_ram_gib("m6i.large"), Some(8.0));
        assert_eq!(hibernation_ram_gib("c5.9xlarge"), Some(72.0));
        assert_eq!(hibernation_ram_gib("r7g.4xlarge"), Some(128.0));
        assert_eq!(hibernation_ram_gib("c7i-flex.xlarge"), Some(8.0));
        assert_eq!(hibernation_ram_gib("c5n.large"), None, "not a fixed ratio");
        assert_eq!(hibernation_ram_gib("p4d.24xlarge"), None);
    }

    #[test]
    fn refusals_name_the_variable_and_the_fix() {
        assert_eq!(hibernation_problem("m6i.large", 64), None);
        let (var, why) = hibernation_problem("r6i.8xlarge", 512).expect("256 GiB");
        assert_eq!(var, "SEMAPHORE_AGENT_INSTANCE_TYPE");
        assert!(why.contains("at most 150 GiB"), "{why}");
        let (var, why) = hibernation_problem("m6i.4xlarge", 64).expect("64 GiB RAM on 64 GiB");
        assert_eq!(var, "SEMAPHORE_AGENT_VOLUME_SIZE");
        assert!(why.contains("at least 80"), "{why}");
        let (_, why) = hibernation_problem("x2iedn.xlarge", 200).expect("unknown");
        assert!(
            why.contains("not a type agent-fleet knows") && why.contains("WARM_POOL_STATE=Stopped"),
            "{why}"
        );
        let (_, why) = hibernation_problem("m5.metal", 999).expect("metal");
        assert!(why.contains("bare metal"), "{why}");
    }
}
