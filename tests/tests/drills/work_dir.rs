//! A work dir that cannot be written.

use super::{churn, figure, R};
use agent_fleet_tests::bed::Bed;
use agent_fleet_tests::fleet::{Instance, InstanceOptions};
use agent_fleet_tests::probe::starts;
use std::time::Duration;

/// Whether this process may make a mount namespace with a read-only bind mount.
fn can_remount_read_only() -> Result<(), String> {
    let probe = std::env::temp_dir().join(format!("drill-ro-probe-{}", std::process::id()));
    std::fs::create_dir_all(&probe).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" \"$0\" && mount -o remount,bind,ro \"$0\" \"$0\" && ! touch \"$0/x\" 2>/dev/null")
        .arg(&probe)
        .output();
    let _ = std::fs::remove_dir_all(&probe);
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "unshare --mount with a read-only bind mount failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run unshare: {e}")),
    }
}

/// Runs a supervisor whose work dir cannot be written; returns (exit status, output).
async fn unwritable(o: InstanceOptions) -> anyhow::Result<(i32, String, Instance)> {
    let inst = Instance::start(o, None).await?;
    let status = inst.wait_exit(Duration::from_secs(30)).await?;
    Ok((status.code().unwrap_or(-1), inst.output(), inst))
}

/// The work dir (`--work-dir`) cannot be written: (1) a file stands where it should be,
/// (2) it exists but is on a read-only mount (as root, permissions alone would not stop
/// the write, so the drill uses a read-only bind mount in a mount namespace; skipped,
/// with the reason printed, where mount namespaces are not allowed).
///
/// Must hold: a clear error that names the path, exit code 2, no agent started, no
/// registration, and no churn — nothing asked of Auto Scaling (no terminate, no
/// health change, no capacity change); a restart (as systemd's `Restart=on-failure`
/// does every 30 s) ends the same way and costs only the boot's reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_work_dir_is_refused_naming_the_path_without_churn() -> R {
    const D: &str = "workdir";
    let bed = Bed::start("workdir").await?;
    let group = "workdir-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();

    // 1. A file in the way.
    let root1 = bed.root.join("file-in-the-way");
    let work1 = root1.join(&id).join("work");
    std::fs::create_dir_all(root1.join(&id))?;
    std::fs::write(&work1, "not a directory")?;
    let mut o = bed.instance(&id, group);
    o.root = root1.clone();
    let seq = bed.moto.last_seq().await?;
    let (code, out, inst) = unwritable(o.clone()).await?;
    figure(
        D,
        format!(
            "file in the way: exit {code}: {}",
            out.lines()
                .rfind(|l| l.contains("work dir"))
                .unwrap_or_default()
        ),
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("cannot create work dir {}", work1.display())),
        "names the path: {out}"
    );
    assert_eq!(starts(&inst.agent_events()), 0, "no agent: {out}");
    let reads = bed.moto.calls(seq).await?.len();
    // A restart ends the same way.
    let (code2, out2, _) = unwritable(o).await?;
    assert_eq!(code2, 2, "{out2}");
    figure(
        D,
        format!("each attempt costs {reads} AWS calls (reads only)"),
    );

    // 2. Read-only.
    match can_remount_read_only() {
        Err(why) => println!("DRILL {D} SKIPPED read-only work dir: {why}"),
        Ok(()) => {
            let root2 = bed.root.join("read-only");
            let work2 = root2.join(&id).join("work");
            std::fs::create_dir_all(&work2)?;
            let mut o = bed.instance(&id, group);
            o.root = root2;
            o.wrapper = vec![
                "unshare".into(),
                "--mount".into(),
                "--propagation".into(),
                "private".into(),
                "sh".into(),
                "-c".into(),
                "mount --bind \"$0\" \"$0\" && mount -o remount,bind,ro \"$0\" \"$0\" && exec \"$@\"".into(),
                work2.display().to_string(),
            ];
            let (code, out, inst) = unwritable(o).await?;
            figure(
                D,
                format!(
                    "read-only: exit {code}: {}",
                    out.lines()
                        .rfind(|l| l.contains("cannot write"))
                        .unwrap_or_default()
                ),
            );
            assert_eq!(code, 2, "{out}");
            assert!(
                out.contains(&format!(
                    "cannot write {}",
                    work2.join("shutdown-hook.sh").display()
                )) && out.contains("Read-only file system"),
                "names the path and the cause: {out}"
            );
            assert_eq!(starts(&inst.agent_events()), 0, "no agent: {out}");
        }
    }

    let calls = bed.moto.calls(0).await?;
    let leader_writes = calls
        .iter()
        .filter(|c| {
            c.is("ssm", "PutParameter") && c.param("Name").is_some_and(|n| n.contains("/leader/"))
        })
        .count();
    figure(
        D,
        format!("leader-term writes by the refused supervisors: {leader_writes}"),
    );
    assert!(churn(&calls).is_empty(), "no churn: {:?}", churn(&calls));
    assert!(bed.hub.agents().is_empty(), "nothing registered");
    let g = bed.moto.group(group).await?;
    assert_eq!((g.desired, g.in_service()), (1, vec![id.clone()]));
    Ok(())
}
