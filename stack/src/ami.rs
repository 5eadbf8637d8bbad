//! `ami build | record | show`: the AMI the stacks launch, recorded where their launch
//! templates look it up at every launch: `/agent-fleet/ami/<os>/<arch>` (an SSM String
//! parameter of data type `aws:ec2:image`).

use crate::describe;
use anyhow::{bail, Context};
use std::io::Write;
use std::path::PathBuf;

pub const OSES: &[&str] = &["ubuntu-noble", "ubuntu-jammy"];
pub const ARCHES: &[&str] = &["x86_64", "arm64"];

/// The parameter a stack of this OS and arch resolves its image from.
pub fn parameter(os: &str, arch: &str) -> String {
    format!("/agent-fleet/ami/{os}/{arch}")
}

pub fn check_target(os: &str, arch: &str) -> anyhow::Result<()> {
    if !OSES.contains(&os) {
        bail!(
            "SEMAPHORE_AGENT_OS {os:?} must be one of {}",
            OSES.join(", ")
        );
    }
    if !ARCHES.contains(&arch) {
        bail!(
            "SEMAPHORE_AGENT_ARCH {arch:?} must be one of {}",
            ARCHES.join(", ")
        );
    }
    Ok(())
}

/// `ami-…` with 8 or 17 lowercase hex digits.
pub fn valid_ami_id(s: &str) -> bool {
    s.strip_prefix("ami-").is_some_and(|h| {
        matches!(h.len(), 8 | 17)
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The AMI id of the last build in a Packer manifest (`packer-manifest.json`): builds
/// append, `last_run_uuid` names the newest; `artifact_id` is `region:ami-…[,region:ami-…]`.
pub fn ami_from_manifest(json: &str, region: &str) -> anyhow::Result<String> {
    let doc: serde_json::Value =
        serde_json::from_str(json).context("the Packer manifest is not JSON")?;
    let last = doc
        .get("last_run_uuid")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let builds = doc
        .get("builds")
        .and_then(|b| b.as_array())
        .context("the Packer manifest has no builds")?;
    let build = builds
        .iter()
        .rev()
        .find(|b| {
            last.is_empty() || b.get("packer_run_uuid").and_then(|u| u.as_str()) == Some(last)
        })
        .context("the Packer manifest has no build of the last run")?;
    let artifact = build
        .get("artifact_id")
        .and_then(|a| a.as_str())
        .context("the Packer manifest's build has no artifact_id")?;
    let mut fallback = None;
    for part in artifact.split(',') {
        let (r, id) = part.split_once(':').unwrap_or(("", part));
        if !valid_ami_id(id) {
            continue;
        }
        if r == region {
            return Ok(id.to_string());
        }
        fallback.get_or_insert_with(|| id.to_string());
    }
    fallback.with_context(|| format!("no AMI id in the manifest's artifact_id {artifact:?}"))
}

/// Writes (or moves) the pointer to `ami`. Returns the parameter's new version.
pub async fn record(
    ssm: &aws_sdk_ssm::Client,
    os: &str,
    arch: &str,
    ami: &str,
) -> anyhow::Result<i64> {
    check_target(os, arch)?;
    if !valid_ami_id(ami) {
        bail!("{ami:?} is not an AMI id (ami- and 8 or 17 hex digits)");
    }
    let name = parameter(os, arch);
    let out = ssm
        .put_parameter()
        .name(&name)
        .value(ami)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .data_type("aws:ec2:image")
        .overwrite(true)
        .description(format!("agent-fleet AMI for {os} {arch}"))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot record {ami} in {name}: {}", describe(&e)))?;
    Ok(out.version())
}

/// Every recorded AMI: (os, arch, ami or None).
pub async fn show(ssm: &aws_sdk_ssm::Client, out: &mut impl Write) -> anyhow::Result<()> {
    for os in OSES {
        for arch in ARCHES {
            let name = parameter(os, arch);
            let got = ssm.get_parameter().name(&name).send().await;
            let line = match got {
                Ok(o) => {
                    let p = o.parameter();
                    format!(
                        "{} (version {})",
                        p.and_then(|p| p.value()).unwrap_or("?"),
                        p.map(|p| p.version()).unwrap_or_default()
                    )
                }
                Err(e)
                    if aws_smithy_types::error::metadata::ProvideErrorMetadata::code(&e)
                        == Some("ParameterNotFound") =>
                {
                    "none (build one with `agent-fleet ami build`)".to_string()
                }
                Err(e) => format!("unreadable: {}", describe(&e)),
            };
            writeln!(out, "{name}: {line}")?;
        }
    }
    Ok(())
}

/// What `ami build` runs.
#[derive(Debug, Clone)]
pub struct Build {
    pub packer: PathBuf,
    pub template: PathBuf,
    pub os: String,
    pub arch: String,
    pub region: String,
    /// Extra `-var name=value` for the template.
    pub vars: Vec<String>,
    pub manifest: PathBuf,
}

impl Build {
    /// `packer build` arguments (the template's variables `os`, `arch`, `region`,
    /// `manifest_path`, then the user's).
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["build".to_string()];
        for (k, v) in [
            ("os", self.os.as_str()),
            ("arch", self.arch.as_str()),
            ("region", self.region.as_str()),
            ("manifest_path", &self.manifest.to_string_lossy()),
        ] {
            a.push("-var".into());
            a.push(format!("{k}={v}"));
        }
        for v in &self.vars {
            a.push("-var".into());
            a.push(v.clone());
        }
        a.push(self.template.to_string_lossy().into_owned());
        a
    }

    /// Runs Packer (its output goes straight to the terminal) and returns the AMI id.
    pub async fn run(&self) -> anyhow::Result<String> {
        check_target(&self.os, &self.arch)?;
        if !self.template.exists() {
            bail!(
                "no Packer template at {}: run from the repository root or pass --template",
                self.template.display()
            );
        }
        let _ = std::fs::remove_file(&self.manifest);
        // `packer init` installs the Amazon plugin the template pins (idempotent).
        let init = vec![
            "init".to_string(),
            self.template.to_string_lossy().into_owned(),
        ];
        for (what, args) in [("init", init), ("build", self.args())] {
            let status = tokio::process::Command::new(&self.packer)
                .args(&args)
                .status()
                .await
                .with_context(|| {
                    format!(
                        "cannot run {} (install Packer 1.10+, or pass --packer <path>)",
                        self.packer.display()
                    )
                })?;
            if !status.success() {
                bail!("packer {what} failed ({status}); nothing was recorded");
            }
        }
        let manifest = std::fs::read_to_string(&self.manifest).with_context(|| {
            format!(
                "packer succeeded but wrote no manifest at {}",
                self.manifest.display()
            )
        })?;
        ami_from_manifest(&manifest, &self.region)
    }
}

/// The default template: the `packer/` folder under the current directory (the template
/// and its plugin pins).
pub fn default_template() -> PathBuf {
    PathBuf::from("packer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_runs_ami_in_the_region_is_taken() {
        let m = r#"{"builds":[
            {"packer_run_uuid":"old","artifact_id":"us-east-1:ami-0aaaaaaaaaaaaaaaa"},
            {"packer_run_uuid":"new","artifact_id":"eu-west-1:ami-0bbbbbbbbbbbbbbbb,us-east-1:ami-0cccccccccccccccc"}
        ],"last_run_uuid":"new"}"#;
        assert_eq!(
            ami_from_manifest(m, "us-east-1").ok().as_deref(),
            Some("ami-0cccccccccccccccc")
        );
        assert_eq!(
            ami_from_manifest(m, "ap-south-1").ok().as_deref(),
            Some("ami-0bbbbbbbbbbbbbbbb"),
            "another region's id rather than none"
        );
        assert_eq!(
            ami_from_manifest(m, "eu-west-1").ok().as_deref(),
            Some("ami-0bbbbbbbbbbbbbbbb")
        );
        assert!(ami_from_manifest("{}", "us-east-1").is_err());
        assert!(ami_from_manifest("not json", "us-east-1").is_err());
    }

    #[test]
    fn parameter_names_match_the_template_lookup() {
        assert_eq!(
            parameter("ubuntu-noble", "arm64"),
            "/agent-fleet/ami/ubuntu-noble/arm64"
        );
        assert!(check_target("ubuntu-focal", "x86_64").is_err());
        assert!(valid_ami_id("ami-0123456789abcdef0"));
        assert!(!valid_ami_id("ami-XYZ"));
    }
}
