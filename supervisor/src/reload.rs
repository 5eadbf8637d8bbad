//! The config reloader: the runtime config parameter re-read every [`RELOAD_EVERY`] and
//! on SIGHUP, published on a watch channel (scaler knobs apply at once, agent knobs at the
//! next agent start); and the refresh of config and token before an agent restarts.

use crate::aws::ssm::ParameterStore;
use crate::config::Settings;
use crate::startup::{get_parameter, read_token};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the runtime config is re-read.
pub const RELOAD_EVERY: Duration = Duration::from_secs(60);

/// The reloader task: re-reads every [`RELOAD_EVERY`] and on SIGHUP, until aborted.
pub struct Reloader<P> {
    pub ssm: P,
    pub settings: Arc<watch::Sender<Settings>>,
    pub backoff: Duration,
}

impl<P: ParameterStore> Reloader<P> {
    pub async fn run(self) {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let hup_recv = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = hup_recv => tracing::info!("SIGHUP: re-reading the runtime config"),
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            reload_once(&self.ssm, &self.settings, self.backoff).await;
        }
    }
}

/// Re-reads config and token before an agent restart, so a rotated token or a changed
/// agent knob applies without a new instance. On failure the last good values stay.
pub async fn refresh<P: ParameterStore>(
    ssm: &P,
    settings: &watch::Sender<Settings>,
    token: &mut String,
    backoff: Duration,
) {
    reload_once(ssm, settings, backoff).await;
    let current = settings.borrow().clone();
    match read_token(ssm, &current, backoff).await {
        Ok(t) => *token = t,
        Err(e) => tracing::error!(error = %e, "keeping the previous registration token"),
    }
}

/// Reads the runtime config parameter again; publishes it when it changed.
pub async fn reload_once<P: ParameterStore>(
    ssm: &P,
    settings: &watch::Sender<Settings>,
    backoff: Duration,
) {
    let parameter = settings.borrow().config_parameter.clone();
    match get_parameter(ssm, &parameter, backoff).await {
        Ok(p) => match Settings::parse(&parameter, &p.value) {
            Ok(s) => {
                settings.send_if_modified(|cur| {
                    let changed = *cur != s;
                    if changed {
                        if s.ignored_keys != cur.ignored_keys {
                            crate::startup::warn_ignored_keys(&s);
                        }
                        tracing::info!(parameter = %parameter, "runtime config changed: scaler knobs apply now, agent knobs at the next agent start");
                        *cur = s;
                    }
                    changed
                });
            }
            Err(e) => tracing::error!(error = %e, "keeping the previous runtime config"),
        },
        Err(e) => tracing::warn!(error = %e, "keeping the previous runtime config"),
    }
}
