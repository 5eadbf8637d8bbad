//! `SEMAPHORE_AGENT_SCHEDULE`: recurring changes of the agents group's minimum (and
//! maximum), e.g. business hours without cold starts:
//!
//! ```text
//! Mon-Fri 08:00 min=4; Mon-Fri 19:00 min=0
//! ```
//!
//! Entries are separated by `;`. Each is days (`Mon-Fri`, `Sat,Sun`, `daily`), a 24-hour
//! `HH:MM` in `SEMAPHORE_AGENT_SCHEDULE_TIMEZONE` (IANA, default UTC), `min=N` and optionally
//! `max=N` (default: `SEMAPHORE_AGENT_ASG_MAX_SIZE`). Each entry becomes an
//! `AWS::AutoScaling::ScheduledAction` (Recurrence cron `M H * * D`, TimeZone) in one of
//! [`SLOTS`] template slots. Scheduled actions cannot change a warm pool, so there is no
//! `pool=`. `status` shows the next change, computed here from the recurrence and time zone.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ZonedDateTime};
use std::fmt;

/// Template slots (`Schedule1` … `Schedule6`).
pub const SLOTS: usize = 6;

/// An example for messages.
pub const EXAMPLE: &str = "Mon-Fri 08:00 min=4; Mon-Fri 19:00 min=0";

const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

/// When an entry fires: days of the week (bit 0 = Sunday) at a local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recurrence {
    pub days: u8,
    pub hour: u8,
    pub minute: u8,
}

/// One scheduled change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub when: Recurrence,
    pub min: u64,
    /// `None`: the stack's maximum.
    pub max: Option<u64>,
}

impl Entry {
    /// The template parameter value: `cron|min|max`.
    pub fn parameter(&self, stack_max: u64) -> String {
        format!(
            "{}|{}|{}",
            self.when.cron(),
            self.min,
            self.max.unwrap_or(stack_max)
        )
    }
}

impl Recurrence {
    /// Auto Scaling's Recurrence: `minute hour day-of-month month day-of-week`.
    pub fn cron(&self) -> String {
        format!("{} {} * * {}", self.minute, self.hour, day_field(self.days))
    }

    /// Our own crons back (what `DescribeScheduledActions` returns); `None` for other shapes.
    pub fn from_cron(cron: &str) -> Option<Recurrence> {
        let f: Vec<&str> = cron.split_whitespace().collect();
        let [minute, hour, "*", "*", dow] = f.as_slice() else {
            return None;
        };
        let minute: u8 = minute.parse().ok().filter(|m| *m < 60)?;
        let hour: u8 = hour.parse().ok().filter(|h| *h < 24)?;
        let mut days = 0u8;
        for part in dow.split(',') {
            let day = |s: &str| s.parse::<u8>().ok().filter(|d| *d <= 7).map(|d| d % 7);
            match part.split_once('-') {
                _ if part == "*" => days = 0x7f,
                Some((a, b)) => {
                    let (a, b) = (day(a)?, day(b)?);
                    if a > b {
                        return None;
                    }
                    (a..=b).for_each(|d| days |= 1 << d);
                }
                None => days |= 1 << day(part)?,
            }
        }
        Some(Recurrence { days, hour, minute })
    }

    /// The first time after `now` it fires in `tz`. (A local time a DST change skips fires
    /// at the time the zone's compatible disambiguation gives.)
    pub fn next_after(&self, now: Timestamp, tz: &TimeZone) -> Option<ZonedDateTime> {
        let mut date: Date = now.to_zoned_datetime(tz.clone()).date();
        for _ in 0..8 {
            let weekday = date.weekday().to_sunday_zero_offset();
            if self.days & (1 << weekday) != 0 {
                let at = date
                    .at(self.hour as i8, self.minute as i8, 0, 0)
                    .to_zoned_datetime(tz.clone())
                    .ok()?;
                if at.timestamp() > now {
                    return Some(at);
                }
            }
            date = date.tomorrow().ok()?;
        }
        None
    }
}

impl fmt::Display for Recurrence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = if self.days == 0x7f {
            "daily".to_string()
        } else {
            runs(self.days)
                .into_iter()
                .map(|(a, b)| match b - a {
                    0 => DAYS[a].to_string(),
                    1 => format!("{},{}", DAYS[a], DAYS[b]),
                    _ => format!("{}-{}", DAYS[a], DAYS[b]),
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(f, "{days} {:02}:{:02}", self.hour, self.minute)
    }
}

/// Runs of consecutive days (Sunday = 0), first and last of each.
fn runs(days: u8) -> Vec<(usize, usize)> {
    let mut out = vec![];
    let mut d = 0;
    while d < 7 {
        if days & (1 << d) == 0 {
            d += 1;
            continue;
        }
        let start = d;
        while d + 1 < 7 && days & (1 << (d + 1)) != 0 {
            d += 1;
        }
        out.push((start, d));
        d += 1;
    }
    out
}

/// `1-5`, `0,6`: the cron's day-of-week field.
fn day_field(days: u8) -> String {
    runs(days)
        .into_iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn day_index(name: &str) -> Option<u8> {
    DAYS.iter()
        .position(|d| d.eq_ignore_ascii_case(name))
        .map(|i| i as u8)
}

/// `Mon-Fri`, `Sat,Sun`, `Fri-Mon` (wraps), `daily`.
fn parse_days(s: &str) -> Result<u8, String> {
    if s.eq_ignore_ascii_case("daily") {
        return Ok(0x7f);
    }
    let mut days = 0u8;
    for part in s.split(',') {
        let day = |n: &str| {
            day_index(n).ok_or(format!(
                "{n:?} is not a day: use Mon, Tue, Wed, Thu, Fri, Sat, Sun, a range such as Mon-Fri, or daily"
            ))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (mut d, b) = (day(a)?, day(b)?);
                loop {
                    days |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days |= 1 << day(part)?,
        }
    }
    Ok(days)
}

fn parse_time(s: &str) -> Result<(u8, u8), String> {
    let bad = || format!("{s:?} is not a time: use 24-hour HH:MM, e.g. 08:00 or 19:30");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if m.len() != 2 || h.is_empty() || h.len() > 2 {
        return Err(bad());
    }
    let h: u8 = h.parse().map_err(|_| bad())?;
    let m: u8 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok((h, m))
}

/// Parses the whole setting; errors name the entry, what is wrong and show an example.
pub fn parse(s: &str) -> Result<Vec<Entry>, String> {
    let texts: Vec<&str> = s
        .split(';')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if texts.len() > SLOTS {
        return Err(format!(
            "has {} entries; the template has room for {SLOTS}",
            texts.len()
        ));
    }
    let mut entries: Vec<Entry> = vec![];
    for (i, text) in texts.iter().enumerate() {
        let n = i + 1;
        let entry = parse_entry(text).map_err(|why| {
            format!("entry {n} ({text:?}): {why}; e.g. SEMAPHORE_AGENT_SCHEDULE='{EXAMPLE}'")
        })?;
        if let Some(j) = entries.iter().position(|e| e.when == entry.when) {
            return Err(format!(
                "entries {} and {n} both fire at {}: merge them",
                j + 1,
                entry.when
            ));
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn parse_entry(text: &str) -> Result<Entry, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let [days, time, settings @ ..] = words.as_slice() else {
        return Err("needs days, a time and min=N".into());
    };
    let days = parse_days(days)?;
    let (hour, minute) = parse_time(time)?;
    let (mut min, mut max) = (None, None);
    for s in settings {
        let (k, v) = s
            .split_once('=')
            .ok_or(format!("{s:?} is not a setting: use min=N or max=N"))?;
        let value = || {
            crate::vars::parse_uint(v)
                .filter(|n| *n <= 9999)
                .ok_or(format!("{k}={v:?} must be a whole number, 0-9999"))
        };
        match k {
            "min" if min.is_none() => min = Some(value()?),
            "max" if max.is_none() => max = Some(value()?),
            "min" | "max" => return Err(format!("{k} is given twice")),
            "pool" | "warm_pool" => return Err(
                "scheduled actions cannot change a warm pool's size: drop pool= (the pool is SEMAPHORE_AGENT_WARM_POOL_SIZE)".into(),
            ),
            "desired" => return Err(
                "desired= is not supported: the leader sets desired capacity from job demand; set min= instead".into(),
            ),
            other => return Err(format!("{other:?} is not a setting: use min=N or max=N")),
        }
    }
    let min = min.ok_or("needs min=N")?;
    if let Some(max) = max {
        if min > max {
            return Err(format!("min={min} is above max={max}"));
        }
    }
    Ok(Entry {
        when: Recurrence { days, hour, minute },
        min,
        max,
    })
}

/// Checks an IANA time zone name against the bundled database.
pub fn time_zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|_| {
        format!("{name:?} is not an IANA time zone name: use e.g. UTC, Europe/Berlin or America/New_York")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn business_hours_become_crons() {
        let e = parse(EXAMPLE).expect("valid");
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].parameter(10), "0 8 * * 1-5|4|10");
        assert_eq!(e[1].parameter(10), "0 19 * * 1-5|0|10");
        let e = parse("Sat,Sun 09:30 min=1 max=3; daily 00:05 min=0; Fri-Mon 7:00 min=2")
            .expect("valid");
        assert_eq!(e[0].parameter(10), "30 9 * * 0,6|1|3");
        assert_eq!(e[1].parameter(10), "5 0 * * 0-6|0|10");
        assert_eq!(e[2].when.cron(), "0 7 * * 0-1,5-6");
    }

    #[test]
    fn crons_read_back_as_written() {
        for text in [
            "Mon-Fri 08:00 min=1",
            "Sat,Sun 09:30 min=1",
            "daily 23:59 min=1",
            "Fri-Mon 07:00 min=1",
        ] {
            let r = parse(text).expect("valid")[0].when;
            assert_eq!(Recurrence::from_cron(&r.cron()), Some(r), "{text}");
        }
        assert_eq!(Recurrence::from_cron("0 8 1 * *"), None);
        assert_eq!(Recurrence::from_cron("*/5 * * * *"), None);
        assert_eq!(
            Recurrence::from_cron("0 8 * * 7")
                .map(|r| r.to_string())
                .as_deref(),
            Some("Sun 08:00")
        );
    }

    #[test]
    fn mistakes_name_the_entry_and_show_an_example() {
        for (text, says) in [
            ("Mon-Fri 8am min=4", "entry 1 (\"Mon-Fri 8am min=4\"): \"8am\" is not a time"),
            ("Mon-Fri 08:00 min=4; Mo-Fr 19:00 min=0", "entry 2 (\"Mo-Fr 19:00 min=0\"): \"Mo\" is not a day"),
            ("Mon-Fri 08:00", "entry 1 (\"Mon-Fri 08:00\"): needs min=N"),
            ("Mon-Fri 08:00 min=4 pool=2", "cannot change a warm pool"),
            ("Mon-Fri 08:00 min=5 max=2", "min=5 is above max=2"),
            ("Mon-Fri 24:00 min=1", "is not a time"),
            ("Mon-Fri 08:00 min=-1", "must be a whole number"),
            ("Mon 08:00 min=1; Mon 08:00 min=2", "entries 1 and 2 both fire at Mon 08:00"),
            ("daily 01:00 min=1; daily 02:00 min=1; daily 03:00 min=1; daily 04:00 min=1; daily 05:00 min=1; daily 06:00 min=1; daily 07:00 min=1", "room for 6"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
        let e = parse("Mon-Fri 8am min=4").expect_err("bad");
        assert!(e.contains(EXAMPLE), "{e}");
    }

    #[test]
    fn the_next_change_is_computed_in_the_time_zone() {
        let tz = time_zone("Europe/Berlin").expect("zone");
        let r = parse("Mon-Fri 08:00 min=4").expect("valid")[0].when;
        // Friday 2026-12-04 10:00 UTC = 11:00 in Berlin: next is Monday 08:00 CET = 07:00 UTC.
        let now: Timestamp = "2026-12-04T10:00:00Z".parse().expect("ts");
        let next = r.next_after(now, &tz).expect("next");
        assert_eq!(next.timestamp().to_string(), "2026-12-07T07:00:00Z");
        // Before 08:00 local on a weekday: the same day.
        let now: Timestamp = "2026-12-03T06:30:00Z".parse().expect("ts");
        assert_eq!(
            r.next_after(now, &tz)
                .expect("next")
                .timestamp()
                .to_string(),
            "2026-12-03T07:00:00Z"
        );
        assert!(time_zone("Mars/Olympus").is_err());
        assert!(time_zone("UTC").is_ok());
    }
}
