//! End-to-end: the supervisor's records in a real systemd journal, queried with
//! `journalctl` by the fields an operator uses (`INSTANCE_ID`, `EXIT_REASON`, `TERM`,
//! `LEADERSHIP`, `BOOT_STAGE`, `-t semaphore-agent`).
//!
//! The test runs its own `systemd-journald` in a private mount namespace (`unshare
//! --mount`), with tmpfs over `/run` and `/var/log/journal` there, so the host's `/run`
//! and journal are never touched and other tests' supervisors (which log to stderr when
//! `/run/systemd/journal/socket` is absent) never see this journal. The supervisor and
//! `journalctl` enter that namespace with `nsenter`. When that cannot be done (not root,
//! no journald, no permission to unshare) the test prints `SKIP: <reason>` and passes.

use agent_fleet_tests::bed::{eventually, Bed};
use agent_fleet_tests::fleet::Instance;
use agent_fleet_tests::hub::{JobSpec, JobState};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

type R = anyhow::Result<()>;

/// A private systemd-journald; stopped (and its namespace gone) when dropped.
struct Journal {
    child: tokio::process::Child,
    pid: u32,
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

impl Journal {
    /// `Err(reason)` when this machine cannot run one.
    async fn start() -> Result<Journal, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root to mount in a private namespace".into());
        }
        let journald = [
            "/lib/systemd/systemd-journald",
            "/usr/lib/systemd/systemd-journald",
        ]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .ok_or("systemd-journald is not installed")?;
        for tool in ["unshare", "nsenter", "journalctl", "mount"] {
            which(tool).ok_or(format!("{tool} is not installed"))?;
        }
        // Everything journald writes goes to tmpfs inside the namespace. `mount -n`: no
        // utab bookkeeping under the host's /run.
        let script = format!(
            "set -e
             mount -n -t tmpfs tmpfs /run
             mkdir -p /run/systemd/journal /run/log
             if [ -d /var/log/journal ]; then mount -n -t tmpfs tmpfs /var/log/journal; fi
             exec {journald}"
        );
        let mut child = tokio::process::Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run unshare: {e}"))?;
        let pid = child.id().ok_or("unshare exited at once")?;
        // /proc/<pid>/root is the process's view of the file system, its mounts included.
        let socket = PathBuf::from(format!("/proc/{pid}/root/run/systemd/journal/socket"));
        for _ in 0..100 {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut err).await;
                }
                return Err(format!(
                    "a private journald could not start ({status}): {}",
                    err.trim()
                ));
            }
            if socket.exists() {
                return Ok(Journal { child, pid });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("journald's socket did not appear within 5 s".into())
    }

    /// The command prefix that runs something in the journal's namespace.
    fn nsenter(&self) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--mount=/proc/{}/ns/mnt", self.pid),
            "--".into(),
        ]
    }

    /// `journalctl --no-pager -o json <args>`, one object per entry.
    async fn query(&self, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        let out = tokio::process::Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.pid))
            .args(["--", "journalctl", "--no-pager", "-o", "json"])
            .args(args)
            .output()
            .await?;
        if !out.status.success() {
            anyhow::bail!(
                "journalctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Plain `journalctl <args>` output, as an operator sees it.
    async fn text(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.pid))
            .args(["--", "journalctl", "--no-pager"])
            .args(args)
            .output()
            .await?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        let _ = self.child.start_kill();
    }
}

fn field<'a>(e: &'a Value, name: &str) -> Option<&'a str> {
    e.get(name)?.as_str()
}

fn find<'a>(entries: &'a [Value], message: &str) -> anyhow::Result<&'a Value> {
    entries
        .iter()
        .find(|e| field(e, "MESSAGE") == Some(message))
        .ok_or_else(|| anyhow::anyhow!("no entry {message:?} among {} entries", entries.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_instance_agent_exit_reason_term_and_boot_fields() -> R {
    let journal = match Journal::start().await {
        Ok(j) => j,
        Err(reason) => {
            println!("SKIP: {reason}");
            return Ok(());
        }
    };
    let bed = Bed::start("journal").await?;
    let group = "journal-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    let cfg = bed.fast_runtime_config(group);
    bed.put_config(&cfg).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let mut o = bed.instance(&id, group);
    o.wrapper = journal.nsenter();
    let inst = Instance::start(o, None).await?;

    eventually("agent registered", Duration::from_secs(30), || async {
        (!bed.hub.live_agents().is_empty()).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", inst.output()))?;
    // Leading (term 1) after the renew deadline, before the job ends the instance.
    let instance_match = format!("INSTANCE_ID={id}");
    eventually("leading", Duration::from_secs(20), || async {
        let e = journal
            .query(&[&instance_match, "LEADERSHIP=leading"])
            .await
            .ok()?;
        (!e.is_empty()).then_some(())
    })
    .await?;
    let job = bed.hub.enqueue_job(JobSpec {
        commands: vec!["echo hello from the job".into()],
        env: vec![],
    });
    eventually("job finished", Duration::from_secs(30), || async {
        bed.hub.job(&job).filter(|j| j.state == JobState::Finished)
    })
    .await?;
    // JOB_FINISHED → terminate without decrement → released lease, waiting for the end.
    eventually("termination requested", Duration::from_secs(30), || async {
        let e = journal
            .query(&[&instance_match, "LEADERSHIP=released"])
            .await
            .ok()?;
        (!e.is_empty()).then_some(())
    })
    .await?;
    inst.signal(Signal::SIGTERM);
    let status = inst.wait_exit(Duration::from_secs(20)).await?;
    assert_eq!(status.code(), Some(0), "{}", inst.output());
    assert!(
        !inst.output().contains("agent exited"),
        "under journald the records go to the journal, not stderr:\n{}",
        inst.output()
    );

    let all = journal.query(&[&instance_match]).await?;
    let mine: Vec<&Value> = all
        .iter()
        .filter(|e| field(e, "SYSLOG_IDENTIFIER") == Some("agent-supervisor"))
        .collect();
    let agents: Vec<Value> = journal
        .query(&["-t", "semaphore-agent", &instance_match])
        .await?;
    assert!(
        mine.len() >= 5 && !agents.is_empty(),
        "{} supervisor and {} agent records",
        mine.len(),
        agents.len()
    );
    // The root span's fields, once each (a string, not an array), on every record; the
    // agent's lines carry the instance id too.
    for e in &mine {
        assert_eq!(field(e, "INSTANCE_ID"), Some(id.as_str()), "{e}");
        assert_eq!(field(e, "STACK"), Some("journal"), "{e}");
        assert_eq!(field(e, "ROLE"), Some("agent"), "{e}");
    }
    for e in &agents {
        assert_eq!(field(e, "INSTANCE_ID"), Some(id.as_str()), "{e}");
    }
    let agent_name_prefix = format!("{id}__");
    assert!(
        agents
            .iter()
            .all(|e| field(e, "AGENT_NAME").is_some_and(|n| n.starts_with(&agent_name_prefix))),
        "agent lines carry AGENT_NAME"
    );
    assert!(agents
        .iter()
        .any(|e| field(e, "MESSAGE") == Some("Starting to poll for jobs")));

    let exited = find(&all, "agent exited")?;
    assert_eq!(
        field(exited, "EXIT_REASON"),
        Some("JOB_FINISHED"),
        "{exited}"
    );
    assert!(field(exited, "AGENT_NAME").is_some_and(|n| n.starts_with(&agent_name_prefix)));
    let terminating = find(&all, "terminating this instance")?;
    assert_eq!(
        field(terminating, "EXIT_REASON"),
        Some("JOB_FINISHED"),
        "{terminating}"
    );
    assert_eq!(field(terminating, "DECREMENT"), Some("false"));

    // Leader changes: TERM with LEADERSHIP.
    let leadership = journal
        .query(&[
            &instance_match,
            "LEADERSHIP=won",
            "LEADERSHIP=leading",
            "LEADERSHIP=released",
        ])
        .await?;
    let seen: Vec<(&str, &str)> = leadership
        .iter()
        .filter_map(|e| Some((field(e, "LEADERSHIP")?, field(e, "TERM")?)))
        .collect();
    assert_eq!(
        seen,
        [("won", "1"), ("leading", "1"), ("released", "1")],
        "{leadership:?}"
    );

    // Boot timing: both stages, every phase at the first job.
    let boot = journal
        .query(&[&instance_match, "BOOT_STAGE=first_job"])
        .await?;
    assert_eq!(boot.len(), 1, "{boot:?}");
    for f in [
        "LAUNCH_TO_START_MS",
        "START_TO_CONFIG_MS",
        "CONFIG_TO_TOKEN_MS",
        "TOKEN_TO_SPAWN_MS",
        "SPAWN_TO_REGISTERED_MS",
        "REGISTERED_TO_JOB_MS",
        "LAUNCH_TO_REGISTERED_MS",
        "LAUNCH_TO_JOB_MS",
    ] {
        assert!(
            field(&boot[0], f).is_some_and(|v| v.parse::<u64>().is_ok()),
            "{f}: {}",
            boot[0]
        );
    }
    assert_eq!(
        journal
            .query(&[&instance_match, "BOOT_STAGE=registered"])
            .await?
            .len(),
        1
    );

    // The README's operator lines ("Reading the journal"), as an operator types them
    // (without -f).
    let boot_fields = "LAUNCH_TO_START_MS,START_TO_CONFIG_MS,CONFIG_TO_TOKEN_MS,TOKEN_TO_SPAWN_MS,\
                       SPAWN_TO_REGISTERED_MS,REGISTERED_TO_JOB_MS,LAUNCH_TO_JOB_MS";
    let readme: [(&[&str], Vec<String>); 5] = [
        (
            &["-t", "semaphore-agent"],
            vec!["Starting to poll for jobs".into()],
        ),
        (
            &[
                "-t",
                "agent-supervisor",
                "MESSAGE=terminating this instance",
                "-o",
                "verbose",
                "--output-fields=INSTANCE_ID,AGENT_NAME,EXIT_REASON,WHY,DECREMENT",
            ],
            vec![
                format!("INSTANCE_ID={id}"),
                format!("AGENT_NAME={id}__"),
                "EXIT_REASON=JOB_FINISHED".into(),
                "WHY=job finished".into(),
                "DECREMENT=false".into(),
            ],
        ),
        (
            &["-t", "agent-supervisor", "-F", "EXIT_REASON"],
            vec!["JOB_FINISHED".into()],
        ),
        (
            &[
                "-t",
                "agent-supervisor",
                "LEADERSHIP=won",
                "LEADERSHIP=leading",
                "LEADERSHIP=stepped_down",
                "LEADERSHIP=released",
                "-o",
                "verbose",
                "--output-fields=MESSAGE,TERM,HOLDER,REASON",
            ],
            vec![
                "MESSAGE=leading".into(),
                "MESSAGE=released the lease".into(),
                "TERM=1".into(),
            ],
        ),
        (
            &[
                "-t",
                "agent-supervisor",
                "BOOT_STAGE=first_job",
                "-o",
                "verbose",
                &format!("--output-fields={}", boot_fields.replace(' ', "")),
            ],
            boot_fields
                .replace(' ', "")
                .split(',')
                .map(|f| format!("{f}="))
                .collect(),
        ),
    ];
    for (args, wanted) in readme {
        let out = journal.text(args).await?;
        println!("$ journalctl {}\n{out}", args.join(" "));
        for w in wanted {
            assert!(out.contains(&w), "journalctl {args:?}: no {w:?} in:\n{out}");
        }
    }
    drop(inst);
    drop(journal);
    Ok(())
}
