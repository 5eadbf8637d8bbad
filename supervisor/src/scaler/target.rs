//! The size the group should have for a given demand: the reference stack's
//! `determineNewSize`, kept exactly so a migrated stack scales the same way.

use crate::config::Overprovision;

/// `jobs = queued + running`; below the group's min → min (no overprovision: min
/// already covers it); else `jobs` plus the overprovision; then at most max.
///
/// | strategy        | target before the cap        |
/// |-----------------|------------------------------|
/// | `none`          | `jobs`                       |
/// | `number` n      | `jobs + n`                   |
/// | `percentage` p  | `jobs + ceil(jobs × p / 100)` |
pub fn determine_target(jobs: u64, min: i32, max: i32, overprovision: Overprovision) -> i32 {
    let jobs = i64::try_from(jobs).unwrap_or(i64::MAX);
    let min = i64::from(min);
    let max = i64::from(max);
    let want = if jobs < min {
        min
    } else {
        match overprovision {
            Overprovision::None => jobs,
            Overprovision::Number(n) => jobs.saturating_add(i64::from(n)),
            Overprovision::Percentage(p) => {
                // ceil(jobs·p/100) in integers, without overflow for any u32 inputs.
                let extra = (i128::from(jobs) * i128::from(p) + 99) / 100;
                jobs.saturating_add(i64::try_from(extra).unwrap_or(i64::MAX))
            }
        }
    };
    // `want.min(max)` is at most an i32 by construction; the fallback is unreachable.
    i32::try_from(want.min(max)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Overprovision::*;

    #[test]
    fn reference_table() {
        // (jobs, min, max, strategy, target)
        let cases = [
            (0, 0, 10, None, 0),
            (3, 0, 10, None, 3),
            (50, 0, 10, None, 10),
            (0, 2, 10, None, 2),
            (1, 2, 10, Number(5), 2),
            (2, 2, 10, Number(1), 3),
            (3, 0, 10, Number(2), 5),
            (9, 0, 10, Number(2), 10),
            (0, 0, 10, Number(2), 2),
            (3, 0, 10, Percentage(50), 5),
            (4, 0, 10, Percentage(50), 6),
            (1, 0, 10, Percentage(10), 2),
            (10, 0, 100, Percentage(10), 11),
            (0, 0, 10, Percentage(50), 0),
            (8, 0, 10, Percentage(100), 10),
            (
                u64::from(u32::MAX) * 2,
                0,
                i32::MAX,
                Percentage(u32::MAX),
                i32::MAX,
            ),
        ];
        for (jobs, min, max, strategy, target) in cases {
            assert_eq!(
                determine_target(jobs, min, max, strategy),
                target,
                "jobs {jobs} min {min} max {max} {strategy:?}"
            );
        }
    }
}
