//! Logging: tracing → journald with structured fields when the journal socket is there,
//! else human-readable lines on stderr. The agent's own output lines (target
//! [`AGENT_TARGET`]) go to the journal under their own identifier, `semaphore-agent`,
//! so `journalctl -t semaphore-agent -f` follows the agent alone.
//!
//! ## Journal fields
//!
//! tracing-journald 0.3 writes a span's fields under their own names (no span-name
//! prefix; with our `with_field_prefix(None)`, no `F_` prefix either), uppercased, on
//! every record inside the span, plus `SPAN_NAME`/`SPAN_TARGET`/`SPAN_CODE_*` per span.
//! Event fields are uppercased the same way. So, on both identifiers:
//!
//! | field | on | value |
//! |---|---|---|
//! | `INSTANCE_ID` | every record of `run` once known (root span `supervisor`); the agent's lines (event field) | `i-…` |
//! | `STACK`, `ROLE` | the supervisor's records once known (root span) | the stack name; `agent`/`scaler` |
//! | `AGENT_NAME` | the agent's lines; `agent started`, `agent exited`, `terminating this instance`, `draining…`, `drained` | `<instance id>__<hex>` |
//! | `EXIT_REASON` | `agent exited`, `terminating this instance`, `drained`, `agent shutdown hook ran` | the agent's shutdown reason (`IDLE`, `JOB_FINISHED`, `REQUESTED`, `INTERRUPTED`, `UNABLE_TO_SYNC`, `UNKNOWN`) or `none` |
//! | `TERM`, `LEADERSHIP` | leadership changes | the term; `won`, `leading`, `stepped_down`, `following`, `stopped`, `released` |
//! | `INTERRUPTION`, `WHY`, `DECREMENT` | `terminating this instance` | what ended it: `spot`, `rebalance`, `lifecycle`, `max_uptime` or `none`; the decision; whether desired capacity drops |
//! | `LIFECYCLE_HOOK`, `HEARTBEATS`, `WAITED_MS` | `lifecycle action completed` | the hook, heartbeats sent while a job finished, time held |
//! | `BOOT_STAGE`, `*_MS` | `boot timing` | `registered`/`first_job`; the phases of [`crate::boot`] |
//!
//! So `journalctl INSTANCE_ID=i-0abc…` selects one instance's records, and
//! `journalctl -t semaphore-agent INSTANCE_ID=i-0abc…` its agent's lines. The records
//! shipped to CloudWatch Logs ([`crate::logs`]) carry the same names.

use crate::logs::{Shared, ShipLayer};
use std::sync::Arc;
use tracing_subscriber::filter::{filter_fn, Targets};
use tracing_subscriber::prelude::*;

/// The tracing target under which agent output lines are forwarded.
pub const AGENT_TARGET: &str = "agent";
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Filter from `AGENT_SUPERVISOR_LOG` (e.g. `info`, `debug,aws_smithy_runtime=warn`).
fn filter() -> Targets {
    let default = || {
        "info,aws_config=warn,aws_smithy_runtime=warn,hyper=warn"
            .parse::<Targets>()
            .unwrap_or_default()
    };
    match std::env::var("AGENT_SUPERVISOR_LOG") {
        Ok(s) => s.parse().unwrap_or_else(|e| {
            eprintln!("AGENT_SUPERVISOR_LOG={s:?} is not a valid filter ({e}); using info");
            default()
        }),
        Err(_) => default(),
    }
}

/// Installs the global subscriber. `force_stderr` keeps logs on stderr even under
/// systemd (for `check`, whose output is for a person at a terminal). `ship`: the queue
/// the records also go to for CloudWatch Logs ([`crate::logs`]), behind the same filter.
pub fn init(force_stderr: bool, ship: Option<Arc<Shared>>) {
    let ship = ship.map(ShipLayer::new);
    let journal = (!force_stderr && std::path::Path::new(JOURNAL_SOCKET).exists())
        .then(|| {
            Some((
                tracing_journald::layer().ok()?,
                tracing_journald::layer().ok()?,
            ))
        })
        .flatten();
    match journal {
        Some((own, agent)) => {
            let own = own
                .with_field_prefix(None)
                .with_syslog_identifier("agent-supervisor".into())
                .with_filter(filter_fn(|m| m.target() != AGENT_TARGET));
            let agent = agent
                .with_field_prefix(None)
                .with_syslog_identifier("semaphore-agent".into())
                // No spans: two journald layers cannot both keep a span's fields (they
                // share one extension slot), so the agent's lines carry `instance_id`
                // and `agent_name` as event fields instead.
                .with_filter(filter_fn(|m| m.target() == AGENT_TARGET));
            tracing_subscriber::registry()
                .with(filter())
                .with(own)
                .with(agent)
                .with(ship)
                .init();
        }
        None => {
            tracing_subscriber::registry()
                .with(filter())
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(false)
                        .with_target(false),
                )
                .with(ship)
                .init();
        }
    }
}
