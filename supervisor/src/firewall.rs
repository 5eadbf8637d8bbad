//! IMDS closed to the agent user. Unprivileged job code must never see the instance role:
//! one nftables table, `inet agent_fleet`, rejects every packet a process of the agent's
//! uid sends to the instance metadata service (`169.254.169.254`, `fd00:ec2::254`).
//! Root (the supervisor; on a `vm` fleet also a job through sudo, which the small agent
//! role is for) is not matched.
//!
//! Why an nftables owner match and not systemd's `IPAddressDeny=`: `IPAddressDeny=` filters
//! a unit's cgroup, and the agent runs inside the supervisor's unit, whose daemon needs IMDS;
//! the owner match follows the uid wherever its processes go — a job that leaves the
//! agent's cgroup or session, a user service, rootless Docker's network helper
//! (`slirp4netns`/`pasta` run as the agent user, so its containers are covered too). The
//! rule rejects rather than drops, so an SDK's credential chain fails at once instead of
//! waiting out its IMDS timeouts.
//!
//! The daemon applies the table before the first agent starts (it replaces the table
//! atomically, so a restart is idempotent) and `agent-supervisor check` verifies it;
//! `agent-supervisor imds-firewall` does either by hand.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The table's family and name.
pub const TABLE: &str = "inet agent_fleet";
/// The instance metadata service's addresses.
pub const IMDS_V4: &str = "169.254.169.254";
pub const IMDS_V6: &str = "fd00:ec2::254";

/// The ruleset `nft -f -` loads: the table is declared, deleted and made again in one
/// transaction, so loading it twice leaves one copy.
pub fn ruleset(uid: u32) -> String {
    format!(
        "table {TABLE}\n\
         delete table {TABLE}\n\
         table {TABLE} {{\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority filter; policy accept;\n\
         \t\tmeta skuid {uid} ip daddr {IMDS_V4} counter reject\n\
         \t\tmeta skuid {uid} ip6 daddr {IMDS_V6} counter reject\n\
         \t}}\n\
         }}\n"
    )
}

/// Loads [`ruleset`] with `nft` (a path, or a name looked up in `PATH`).
pub fn apply(nft: &Path, uid: u32) -> Result<(), String> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot run {}: {e}; fix: install nftables (the AMI does)",
                nft.display()
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset(uid).as_bytes())
            .map_err(|e| format!("writing the ruleset to {}: {e}", nft.display()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {}: {e}", nft.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} -f - failed ({}): {}",
            nft.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    verify(nft, uid)
}

/// Whether the live table rejects both IMDS addresses for `uid`.
pub fn verify(nft: &Path, uid: u32) -> Result<(), String> {
    let out = Command::new(nft)
        .args(["list", "table"])
        .args(TABLE.split(' '))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot run {}: {e}; fix: install nftables (the AMI does)",
                nft.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "no nftables table {TABLE}: IMDS is open to the agent user ({}); fix: restart agent-supervisor, which loads it",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    missing_rules(&String::from_utf8_lossy(&out.stdout), uid)
}

/// What `nft list table` output lacks; `Ok` when both rules are there.
fn missing_rules(listing: &str, uid: u32) -> Result<(), String> {
    let hook = listing.contains("hook output");
    let covers = |family: &str, addr: &str| {
        listing.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let has = |pair: [&str; 2]| words.windows(2).any(|w| w == pair);
            has(["skuid", &uid.to_string()])
                && has([family, "daddr"])
                && words.contains(&addr)
                && words.contains(&"reject")
        })
    };
    let missing: Vec<&str> = [("ip", IMDS_V4), ("ip6", IMDS_V6)]
        .into_iter()
        .filter(|(f, a)| !(hook && covers(f, a)))
        .map(|(_, a)| a)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "table {TABLE} does not reject {} for uid {uid}: IMDS is open to the agent user; fix: restart agent-supervisor, which reloads it",
            missing.join(" and ")
        ))
    }
}

/// The daemon's step before the first agent: closes IMDS to the agent user, or says why
/// it does not (`--no-imds-firewall`; an agent that runs as the supervisor's own user).
pub fn close_for(opts: &crate::startup::RunOptions) -> Result<(), crate::startup::DaemonError> {
    use crate::startup::DaemonError;
    if !opts.imds_firewall {
        tracing::warn!("IMDS firewall off (--no-imds-firewall): job code can read the instance role's credentials");
        return Ok(());
    }
    let Some(run_as) = crate::agent::RunAs::lookup(&opts.agent_user).map_err(DaemonError::Input)?
    else {
        tracing::warn!(agent_user = %opts.agent_user, "the agent runs as the supervisor's own user: IMDS cannot be closed to it");
        return Ok(());
    };
    let uid = run_as.uid.as_raw();
    apply(&opts.nft, uid).map_err(|e| {
        DaemonError::Input(format!(
            "cannot close IMDS to the agent user {} (uid {uid}): {e}; no agent starts without it (--no-imds-firewall runs one anyway, with the instance role open to jobs)",
            opts.agent_user
        ))
    })?;
    tracing::info!(agent_user = %opts.agent_user, uid, "IMDS closed to the agent user ({IMDS_V4}, {IMDS_V6})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_rejects_both_addresses_for_the_agent_uid_only() {
        let r = ruleset(1001);
        assert!(r.starts_with("table inet agent_fleet\ndelete table inet agent_fleet\n"));
        assert!(r.contains("meta skuid 1001 ip daddr 169.254.169.254 counter reject"));
        assert!(r.contains("meta skuid 1001 ip6 daddr fd00:ec2::254 counter reject"));
        assert!(r.contains("policy accept"), "everything else passes");
    }

    #[test]
    fn verification_reads_nfts_listing() {
        let listing = "table inet agent_fleet {\n\tchain output {\n\t\ttype filter hook output priority filter; policy accept;\n\t\tmeta skuid 1001 ip daddr 169.254.169.254 counter packets 3 bytes 180 reject with icmp port-unreachable\n\t\tmeta skuid 1001 ip6 daddr fd00:ec2::254 counter packets 0 bytes 0 reject with icmpv6 port-unreachable\n\t}\n}\n";
        assert_eq!(missing_rules(listing, 1001), Ok(()));
        let e = missing_rules(listing, 1002).expect_err("refused");
        assert!(
            e.contains("169.254.169.254 and fd00:ec2::254") && e.contains("uid 1002"),
            "{e}"
        );
        let v4_only: String = listing
            .lines()
            .filter(|l| !l.contains("ip6"))
            .collect::<Vec<_>>()
            .join("\n");
        let e = missing_rules(&v4_only, 1001).expect_err("refused");
        assert!(
            e.contains("fd00:ec2::254") && !e.contains("169.254.169.254 and"),
            "{e}"
        );
        let accepting = listing.replace("reject", "accept");
        assert!(missing_rules(&accepting, 1001).is_err());
    }
}
