//! Wall-clock jumps under libfaketime ([`libfaketime`]).

use super::{figure, scalers, R};
use agent_fleet_tests::bed::{eventually, Bed, FAST_DEADLINE_MS, FAST_LEASE_MS, FAST_RETRY_MS};
use agent_fleet_tests::faults::libfaketime;
use agent_fleet_tests::probe::{actions, assert_no_overlap, leading_term, num, step_downs};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// The UTC date (`YYYY-MM-DD`) a tracing line starts with, if it does.
fn line_date(line: &str) -> Option<&str> {
    let d = line.get(..10)?;
    (d.as_bytes().get(4) == Some(&b'-') && d.as_bytes().get(7) == Some(&b'-')).then_some(d)
}

/// The wall clock of the leader jumps back a day, then forward two days; a follower's
/// jumps forward a day and back; a third candidate keeps real time. libfaketime (`LD_PRELOAD`,
/// `FAKETIME_TIMESTAMP_FILE` re-read on every call, the monotonic clock left alone)
/// changes the offset while they run.
///
/// Must hold: leadership relies on the monotonic clock only — the leader neither steps
/// down nor is replaced because of a jump (same term throughout, no `stepped down`, no
/// other candidate ever leads), and no two leaders' windows overlap. The drill checks
/// that the jumps took effect (the leader's log timestamps show the faked dates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_on_the_leader_move_no_leadership() -> R {
    const D: &str = "wall_clock";
    let lib = match libfaketime() {
        Ok(p) => p,
        Err(why) => {
            println!("DRILL {D} SKIPPED: {why}");
            return Ok(());
        }
    };
    let bed = Bed::start("clockjump").await?;
    let group = "clockjump-agents";
    bed.moto.create_group(group, 0, 5, 0).await?;
    bed.put_config(&bed.fast_runtime_config(group)).await?;
    let clock = |name: &str| -> anyhow::Result<(PathBuf, Vec<(String, String)>)> {
        let file = bed.root.join(format!("faketime-{name}"));
        std::fs::write(&file, "+0\n")?;
        let env = vec![
            ("LD_PRELOAD".to_string(), lib.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
            ("DONT_FAKE_MONOTONIC".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            // Every renew logs a (timestamped) line: the jumps show in the output.
            (
                "AGENT_SUPERVISOR_LOG".into(),
                "info,agent_supervisor::election=debug".into(),
            ),
        ];
        Ok((file, env))
    };
    let (leader_clock, leader_env) = clock("leader")?;
    let (follower_clock, follower_env) = clock("follower")?;
    let mut cands = scalers(&bed, group, &["i-0clockjumplead0"], &[leader_env]).await?;
    eventually(
        "the first candidate leads and acts",
        Duration::from_secs(20),
        || async {
            (leading_term(&cands[0].output()).is_some() && !actions(&cands[0].output()).is_empty())
                .then_some(())
        },
    )
    .await?;
    let term = leading_term(&cands[0].output());
    cands.extend(
        scalers(
            &bed,
            group,
            &["i-0clockjumpfol01", "i-0clockjumpfol02"],
            &[follower_env, vec![]],
        )
        .await?,
    );
    eventually(
        "the others follow that term",
        Duration::from_secs(10),
        || async {
            cands[1..]
                .iter()
                .all(|c| {
                    c.output()
                        .lines()
                        .rfind(|l| l.contains(" following term="))
                        .and_then(|l| num(l, "term"))
                        == term
                })
                .then_some(())
        },
    )
    .await?;
    let real_date = cands[0]
        .output()
        .lines()
        .find_map(line_date)
        .map(str::to_string)
        .unwrap_or_default();

    let hold = Duration::from_millis(FAST_LEASE_MS + FAST_DEADLINE_MS + 4 * FAST_RETRY_MS);
    let steps = [
        (&leader_clock, "-1d", "leader back a day"),
        (&leader_clock, "+2d", "leader forward two days"),
        (&follower_clock, "+1d", "follower forward a day"),
        (&leader_clock, "-3h", "leader back again"),
        (&follower_clock, "-1d", "follower back"),
    ];
    for (file, offset, what) in steps {
        std::fs::write(file, format!("{offset}\n"))?;
        tokio::time::sleep(hold).await;
        let now: Vec<Option<u64>> = cands.iter().map(|c| leading_term(&c.output())).collect();
        figure(
            D,
            format!(
                "after {what} ({offset}, then {} ms): leading terms {now:?}",
                hold.as_millis()
            ),
        );
    }
    std::fs::write(&leader_clock, "+0\n")?;
    std::fs::write(&follower_clock, "+0\n")?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let out = cands[0].output();
    let dates: BTreeSet<&str> = out.lines().filter_map(line_date).collect();
    figure(
        D,
        format!("the leader's log dates: {dates:?} (real {real_date})"),
    );
    assert!(
        dates.len() >= 3,
        "the jumps took effect on the leader's wall clock: {dates:?}"
    );
    assert_eq!(step_downs(&out), 0, "no step-down on a clock jump: {out}");
    assert_eq!(leading_term(&out), term, "still leading the same term");
    for c in &cands[1..] {
        let o = c.output();
        assert!(
            !o.contains(" leading term=") && actions(&o).is_empty(),
            "{} never led: {o}",
            c.id
        );
    }
    let all: Vec<(u64, u64, u64)> = cands.iter().flat_map(|c| actions(&c.output())).collect();
    let terms: BTreeSet<u64> = all.iter().map(|a| a.0).collect();
    assert_eq!(terms.len(), 1, "one term throughout: {terms:?}");
    assert_no_overlap(&all);
    Ok(())
}
