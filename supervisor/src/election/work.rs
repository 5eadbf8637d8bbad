//! Leader work on this instance: the election and, while leading, the scaler, the
//! agents' lifetime cap ([`crate::scaler::cap`]) and GitHub's host keys
//! ([`crate::scaler::host_keys`]) — started
//! together, stopped in the order the lease's safety needs (scaler first, then release).
//! The scaler's decisions flow into the election's lease record, where operators read
//! them (`agent-fleet status`), and the group's in-service instances it reads at each
//! poll flow into the election, which names standbys from them.

use crate::aws::autoscaling::SdkAutoScaling;
use crate::aws::cloudwatch::QueryCloudWatch;
use crate::aws::ec2::QueryEc2;
use crate::aws::ssm::SdkParameterStore;
use crate::config::Settings;
use crate::election::Leadership;
use crate::election::{Elector, SsmLeaseStore};
use crate::scaler::cap::LifetimeCap;
use crate::scaler::host_keys::{HostKeys, HttpMeta};
use crate::scaler::{HttpDemand, Scaler, SsmTokenSource, Token};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The running election and scaler of this process.
pub struct LeaderWork {
    election_stop: CancellationToken,
    scaler_stop: CancellationToken,
    election: JoinHandle<Elector<SsmLeaseStore>>,
    scaler: Option<JoinHandle<()>>,
    cap: Option<JoinHandle<()>>,
    host_keys: Option<JoinHandle<()>>,
    pub leadership: watch::Receiver<Leadership>,
}

impl LeaderWork {
    /// Starts the election (and the scaler, when dynamic scaling is on). `preferred` is
    /// the scaler-only role. Returns `None` when dynamic scaling is off: no leader needed.
    pub fn start(
        sdk: &aws_config::SdkConfig,
        stack_name: &str,
        instance_id: &str,
        preferred: bool,
        settings: watch::Receiver<Settings>,
        token: &str,
    ) -> Result<Option<Self>, String> {
        let current = settings.borrow().clone();
        if !current.scaler.enabled {
            tracing::info!("dynamic scaling is off: no leader election");
            return Ok(None);
        }
        let (fleet_tx, fleet_rx) = watch::channel(Vec::new());
        let (decision_tx, decision_rx) = watch::channel(None);
        let (lead_tx, leadership) = watch::channel(Leadership::default());
        let election_stop = CancellationToken::new();
        let scaler_stop = CancellationToken::new();
        let elector = Elector::new(
            SsmLeaseStore::new(sdk),
            current.election.clone(),
            instance_id,
            preferred,
            fleet_rx,
        )
        .with_decisions(decision_rx);
        let election = tokio::spawn(
            elector
                .run(election_stop.clone(), lead_tx)
                .in_current_span(),
        );
        let demand = HttpDemand::new().map_err(|e| e.to_string())?;
        let sink = QueryCloudWatch::new(sdk).map_err(|e| e.to_string())?;
        let scaler = Scaler::new(
            stack_name.to_string(),
            settings.clone(),
            demand,
            SdkAutoScaling::for_leader(sdk, leadership.clone()),
            SsmTokenSource::new(SdkParameterStore::new(sdk), settings.clone()),
            sink,
        )
        .with_token(Token::new(token.to_string()))
        .with_decisions(decision_tx)
        .with_members(fleet_tx);
        let scaler = tokio::spawn(
            scaler
                .run(leadership.clone(), scaler_stop.clone())
                .in_current_span(),
        );
        // The cap shares the scaler's stop: both are leader work, ended before the release.
        let cap = LifetimeCap::new(
            settings.clone(),
            SdkAutoScaling::for_leader(sdk, leadership.clone()),
            QueryEc2::new(sdk).map_err(|e| e.to_string())?,
        );
        let cap = tokio::spawn(
            cap.run(leadership.clone(), scaler_stop.clone())
                .in_current_span(),
        );
        // GitHub's host keys: its own task, so a slow GitHub never delays a scaling poll.
        let host_keys = HostKeys::new(
            settings.clone(),
            SdkParameterStore::new(sdk),
            HttpMeta::new().map_err(|e| e.to_string())?,
        );
        let host_keys = tokio::spawn(
            host_keys
                .run(leadership.clone(), scaler_stop.clone())
                .in_current_span(),
        );
        Ok(Some(Self {
            host_keys: Some(host_keys),
            election_stop,
            scaler_stop,
            election,
            scaler: Some(scaler),
            cap: Some(cap),
            leadership,
        }))
    }

    /// Stops leader work, then releases the lease so a successor need not wait it out.
    pub async fn stop_and_release(mut self) {
        self.scaler_stop.cancel();
        if let Some(s) = self.scaler.take() {
            let _ = s.await;
        }
        if let Some(c) = self.cap.take() {
            let _ = c.await;
        }
        if let Some(h) = self.host_keys.take() {
            let _ = h.await;
        }
        self.election_stop.cancel();
        match (&mut self.election).await {
            Ok(mut elector) => match elector.release().await {
                Ok(Some(term)) => tracing::info!(term, "leadership released"),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not release the lease; a successor takes over when it expires")
                }
            },
            Err(e) => tracing::warn!(error = %e, "election task ended abnormally"),
        }
    }
}
