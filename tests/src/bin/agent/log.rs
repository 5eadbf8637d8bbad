//! The agent's own log (the real agent's line format, on stdout and in
//! `SEMAPHORE_AGENT_LOG_FILE_PATH`) and the test bed's event file (`FAKE_AGENT_EVENTS`).

use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::is_request_uri;

static LOG_NAME: Mutex<String> = Mutex::new(String::new());
static LAST_REASON: Mutex<Option<String>> = Mutex::new(None);

/// The name in log lines: the agent's name, or `[host]` while it is a URL (as the
/// real agent's formatter does until the server names the agent).
pub(crate) fn set_log_name(name: &str) {
    let shown = if is_request_uri(name) {
        reqwest::Url::parse(name)
            .ok()
            .and_then(|u| u.host_str().map(|h| format!("[{h}]")))
            .unwrap_or_else(|| "[]".to_string())
    } else {
        name.to_string()
    };
    *LOG_NAME.lock().unwrap_or_else(PoisonError::into_inner) = shown;
}

fn log_name() -> String {
    LOG_NAME
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

pub(crate) fn set_last_reason(reason: &str) {
    *LAST_REASON.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.to_string());
}

pub(crate) fn last_reason() -> Option<String> {
    LAST_REASON
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Go layout `Jan _2 15:04:05.000`, UTC.
pub(crate) fn timestamp(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let month_name = MONTHS
        .get(usize::try_from(month - 1).unwrap_or(0))
        .copied()
        .unwrap_or("Jan");
    format!(
        "{month_name} {day:>2} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn write_out(text: &str) {
    // The test harness only captures `print!`; the binary must not panic on EPIPE.
    #[cfg(test)]
    print!("{text}");
    #[cfg(not(test))]
    {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

pub(crate) fn log(msg: &str) {
    let name = log_name();
    let ts = timestamp(SystemTime::now());
    let prefix = if name.is_empty() {
        format!("{ts} :")
    } else {
        format!("{ts} {name} :")
    };
    let mut text = String::new();
    for line in msg.lines() {
        text.push_str(&format!("{prefix} {line}\n"));
    }
    if msg.is_empty() {
        text.push_str(&format!("{prefix} \n"));
    }
    write_out(&text);
    if let Some(path) = std::env::var_os("SEMAPHORE_AGENT_LOG_FILE_PATH") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(text.as_bytes());
        }
    }
}

/// The real agent's hello message (stdout only, not in the log file).
pub(crate) fn banner() {
    const LINES: [&str; 13] = [
        "                                      ",
        "                 00000000000          ",
        "               0000000000000000       ",
        "             00000000000000000000     ",
        "          00000000000    0000000000   ",
        "   11     00000000    11   000000000  ",
        " 111111   000000   1111111   000000   ",
        "111111111   00   111111111     00     ",
        "  111111111    1111111111             ",
        "    1111111111111111111               ",
        "      111111111111111                 ",
        "         111111111                    ",
        "                                      ",
    ];
    let mut text = String::new();
    for l in LINES {
        text.push_str(l);
        text.push('\n');
    }
    write_out(&text);
}

/// Go's `time.Duration` string for whole milliseconds: `200ms`, `4.5s`, `1m0.5s`.
pub(crate) fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = |ms: u128| {
        let s = format!("{}.{:03}", ms / 1000, ms % 1000);
        let s = s.trim_end_matches('0').trim_end_matches('.').to_string();
        format!("{s}s")
    };
    if ms < 60_000 {
        return secs(ms);
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    if h > 0 {
        format!("{h}h{m}m{}", secs(rest))
    } else {
        format!("{m}m{}", secs(rest))
    }
}

fn mono_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(ts.tv_nsec()).unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// Appends one JSON line to `$FAKE_AGENT_EVENTS` (if set).
pub(crate) fn event(kind: &str, extra: serde_json::Value) {
    let Some(path) = std::env::var_os("FAKE_AGENT_EVENTS") else {
        return;
    };
    let mut obj = serde_json::Map::new();
    obj.insert("event".into(), kind.into());
    obj.insert("pid".into(), std::process::id().into());
    obj.insert("mono_ns".into(), mono_ns().into());
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
        .unwrap_or(0);
    obj.insert("unix_ms".into(), unix_ms.into());
    let name = log_name();
    if !name.is_empty() {
        obj.insert("name".into(), name.into());
    }
    if let serde_json::Value::Object(extra) = extra {
        obj.extend(extra);
    }
    let mut line = serde_json::Value::Object(obj).to_string();
    line.push('\n');
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        // One write(2) per line, O_APPEND: lines from several processes don't interleave.
        let _ = f.write_all(line.as_bytes());
    }
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0)
}
