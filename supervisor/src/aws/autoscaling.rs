//! Auto Scaling: terminating this instance, marking it unhealthy, reading its group,
//! (for the leader's scaler) raising the group's desired capacity and suspending processes,
//! and (see [`LifecycleActions`]) answering the termination lifecycle hook.

use super::{classify, describe, Retry};
use std::future::Future;

#[derive(Debug, thiserror::Error)]
pub enum AsgError {
    /// AWS refused the request as invalid. For a terminate with decrement this is how it
    /// says the group is at its min size.
    #[error("{op}: refused by Auto Scaling (ValidationError): {detail}")]
    Validation { op: &'static str, detail: String },
    #[error("{op}: {detail}")]
    Call {
        op: &'static str,
        retry: Retry,
        detail: String,
    },
}

impl AsgError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Call {
                retry: Retry::Transient,
                ..
            }
        )
    }
}

/// A group's sizes, as Auto Scaling reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSizes {
    pub name: String,
    pub min: i32,
    pub max: i32,
    pub desired: i32,
    /// The instances in `InService`, as the same `DescribeAutoScalingGroups` lists them
    /// (the leader names its standbys from them: no second call for the list).
    pub in_service: Vec<String>,
}

pub trait AutoScaling: Send + Sync {
    fn terminate_instance(
        &self,
        instance_id: &str,
        decrement: bool,
    ) -> impl Future<Output = Result<(), AsgError>> + Send;
    fn set_unhealthy(&self, instance_id: &str)
        -> impl Future<Output = Result<(), AsgError>> + Send;
    /// The group this instance belongs to, if any.
    fn group_of(
        &self,
        instance_id: &str,
    ) -> impl Future<Output = Result<Option<String>, AsgError>> + Send;
    fn group(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<GroupSizes>, AsgError>> + Send;
    /// `SetDesiredCapacity` with `HonorCooldown=false`: demand, not a cooldown, decides.
    /// Auto Scaling answers ValidationError outside `[min, max]`.
    fn set_desired_capacity(
        &self,
        group: &str,
        desired: i32,
    ) -> impl Future<Output = Result<(), AsgError>> + Send;
    /// `SuspendProcesses` for the named processes (e.g. `AZRebalance`, which would
    /// otherwise terminate instances mid-job to even out zones).
    fn suspend_processes(
        &self,
        group: &str,
        processes: &[&str],
    ) -> impl Future<Output = Result<(), AsgError>> + Send;
}

/// How an instance's group ends it: whether Capacity Rebalancing replaces it, and the
/// termination lifecycle hook's two calls, by instance id (no lifecycle action token: the
/// instance learns of its termination from IMDS, not from a notification).
pub trait LifecycleActions: Send + Sync {
    /// Whether the group has Capacity Rebalancing on (`None`: no such group).
    fn capacity_rebalance(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Option<bool>, AsgError>> + Send;
    /// `CompleteLifecycleAction` with `result` (`CONTINUE` or `ABANDON`; for a terminating
    /// instance both end in termination). ValidationError when no action is pending.
    fn complete_lifecycle_action(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
        result: &str,
    ) -> impl Future<Output = Result<(), AsgError>> + Send;
    /// `RecordLifecycleActionHeartbeat`: restarts the hook's heartbeat timeout.
    fn record_lifecycle_action_heartbeat(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
    ) -> impl Future<Output = Result<(), AsgError>> + Send;
}

/// A launch template as a group or an instance names it (`LaunchTemplateSpecification`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TemplateRef {
    pub id: Option<String>,
    pub name: Option<String>,
    /// A number, `$Latest` or `$Default`.
    pub version: Option<String>,
}

impl TemplateRef {
    /// The name, else the id.
    pub fn label(&self) -> &str {
        self.name
            .as_deref()
            .or(self.id.as_deref())
            .unwrap_or("(unnamed)")
    }
}

/// A group's warm pool, as `DescribeWarmPool` tells it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WarmPool {
    /// `Stopped`, `Running` or `Hibernated`.
    pub pool_state: Option<String>,
    pub min_size: Option<i32>,
    pub max_prepared: Option<i32>,
    /// (instance id, lifecycle state such as `Warmed:Stopped`), in the pool.
    pub instances: Vec<(String, String)>,
}

/// What a pooled instance and the leader read about launches: the launch template the
/// group launches with now, the one an instance came from, and the warm pool.
pub trait LaunchTemplates: Send + Sync {
    /// The group's launch template (plain or in a mixed instances policy).
    fn group_template(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Option<TemplateRef>, AsgError>> + Send;
    /// The launch template this instance was launched from.
    fn instance_template(
        &self,
        instance_id: &str,
    ) -> impl Future<Output = Result<Option<TemplateRef>, AsgError>> + Send;
    /// The group's warm pool (`None`: it has none).
    fn warm_pool(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Option<WarmPool>, AsgError>> + Send;
}

#[derive(Clone)]
pub struct SdkAutoScaling {
    client: aws_sdk_autoscaling::Client,
}

impl SdkAutoScaling {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self {
            client: aws_sdk_autoscaling::Client::new(config),
        }
    }

    /// The client the leader's scaler calls through.
    ///
    /// Auto Scaling takes no fencing token, so a call a valid leader decided can still land
    /// after its lease ended: the process may pause between its validity check and the
    /// send (a SIGSTOP, a stalled VM), and the SDK's own retries re-send a call without
    /// asking whether it still leads. This window cannot be closed, only narrowed: every
    /// request is checked again against `leadership` just before it is transmitted (an
    /// interceptor, `LeaseFence`) and dropped if the lease has lapsed, and the SDK does
    /// not retry (a retry is a new decision: the next poll makes it after a fresh check).
    /// What remains — a pause after the request left — is bounded in cost: the leader only
    /// ever raises desired capacity, so a stale raise means instances that idle out.
    pub fn for_leader(
        config: &aws_config::SdkConfig,
        leadership: tokio::sync::watch::Receiver<crate::election::Leadership>,
    ) -> Self {
        Self::fenced(
            aws_sdk_autoscaling::config::Builder::from(config),
            leadership,
        )
    }

    fn fenced(
        builder: aws_sdk_autoscaling::config::Builder,
        leadership: tokio::sync::watch::Receiver<crate::election::Leadership>,
    ) -> Self {
        let config = builder
            .retry_config(aws_sdk_autoscaling::config::retry::RetryConfig::disabled())
            .interceptor(LeaseFence { leadership })
            .build();
        Self {
            client: aws_sdk_autoscaling::Client::from_conf(config),
        }
    }
}

/// Drops a leader's request whose lease lapsed before it was transmitted (see
/// [`SdkAutoScaling::for_leader`]).
#[derive(Debug)]
struct LeaseFence {
    leadership: tokio::sync::watch::Receiver<crate::election::Leadership>,
}

impl aws_sdk_autoscaling::config::Intercept for LeaseFence {
    fn name(&self) -> &'static str {
        "LeaseFence"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_sdk_autoscaling::config::interceptors::BeforeTransmitInterceptorContextRef<
            '_,
        >,
        _runtime_components: &aws_sdk_autoscaling::config::RuntimeComponents,
        _cfg: &mut aws_sdk_autoscaling::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let now = tokio::time::Instant::now();
        match self.leadership.borrow().valid_term(now) {
            Some(_) => Ok(()),
            None => Err(
                "this process's leader lease lapsed before the request was sent; not sent".into(),
            ),
        }
    }
}

fn err<E>(
    op: &'static str,
    e: aws_sdk_autoscaling::error::SdkError<E, aws_sdk_autoscaling::config::http::HttpResponse>,
) -> AsgError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata
        + std::error::Error
        + Send
        + Sync
        + 'static,
{
    if super::code(&e) == Some("ValidationError") {
        AsgError::Validation {
            op,
            detail: describe(&e),
        }
    } else {
        AsgError::Call {
            op,
            retry: classify(&e),
            detail: describe(&e),
        }
    }
}

impl SdkAutoScaling {
    /// `DescribeAutoScalingGroups` for one group (`None`: no such group).
    async fn describe_group(
        &self,
        group: &str,
    ) -> Result<Option<aws_sdk_autoscaling::types::AutoScalingGroup>, AsgError> {
        let out = self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .map_err(|e| err("DescribeAutoScalingGroups", e))?;
        Ok(out.auto_scaling_groups().first().cloned())
    }

    /// `DescribeAutoScalingInstances` for one instance (`None`: in no group).
    async fn describe_instance(
        &self,
        instance_id: &str,
    ) -> Result<Option<aws_sdk_autoscaling::types::AutoScalingInstanceDetails>, AsgError> {
        let out = self
            .client
            .describe_auto_scaling_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| err("DescribeAutoScalingInstances", e))?;
        Ok(out.auto_scaling_instances().first().cloned())
    }
}

impl LifecycleActions for SdkAutoScaling {
    async fn capacity_rebalance(&self, group: &str) -> Result<Option<bool>, AsgError> {
        Ok(self
            .describe_group(group)
            .await?
            .map(|g| g.capacity_rebalance().unwrap_or(false)))
    }

    async fn complete_lifecycle_action(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
        result: &str,
    ) -> Result<(), AsgError> {
        self.client
            .complete_lifecycle_action()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .instance_id(instance_id)
            .lifecycle_action_result(result)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| err("CompleteLifecycleAction", e))
    }

    async fn record_lifecycle_action_heartbeat(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
    ) -> Result<(), AsgError> {
        self.client
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .instance_id(instance_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| err("RecordLifecycleActionHeartbeat", e))
    }
}

fn template_ref(t: &aws_sdk_autoscaling::types::LaunchTemplateSpecification) -> TemplateRef {
    TemplateRef {
        id: t.launch_template_id().map(str::to_string),
        name: t.launch_template_name().map(str::to_string),
        version: t.version().map(str::to_string),
    }
}

/// Pages of `DescribeWarmPool` followed before giving up.
const WARM_POOL_PAGES: usize = 50;

impl LaunchTemplates for SdkAutoScaling {
    async fn group_template(&self, group: &str) -> Result<Option<TemplateRef>, AsgError> {
        Ok(self.describe_group(group).await?.and_then(|g| {
            g.launch_template().map(template_ref).or_else(|| {
                g.mixed_instances_policy()
                    .and_then(|m| m.launch_template())
                    .and_then(|l| l.launch_template_specification())
                    .map(template_ref)
            })
        }))
    }

    async fn instance_template(&self, instance_id: &str) -> Result<Option<TemplateRef>, AsgError> {
        Ok(self
            .describe_instance(instance_id)
            .await?
            .and_then(|i| i.launch_template().map(template_ref)))
    }

    async fn warm_pool(&self, group: &str) -> Result<Option<WarmPool>, AsgError> {
        let mut pool: Option<WarmPool> = None;
        let mut token: Option<String> = None;
        for _ in 0..WARM_POOL_PAGES {
            let out = self
                .client
                .describe_warm_pool()
                .auto_scaling_group_name(group)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| err("DescribeWarmPool", e))?;
            let Some(c) = out.warm_pool_configuration() else {
                return Ok(None);
            };
            let p = pool.get_or_insert_with(|| WarmPool {
                pool_state: c.pool_state().map(|s| s.as_str().to_string()),
                min_size: c.min_size(),
                max_prepared: c.max_group_prepared_capacity(),
                instances: vec![],
            });
            p.instances.extend(out.instances().iter().filter_map(|i| {
                Some((
                    i.instance_id()?.to_string(),
                    i.lifecycle_state()
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                ))
            }));
            match out.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(pool)
    }
}

impl AutoScaling for SdkAutoScaling {
    async fn terminate_instance(&self, instance_id: &str, decrement: bool) -> Result<(), AsgError> {
        self.client
            .terminate_instance_in_auto_scaling_group()
            .instance_id(instance_id)
            .should_decrement_desired_capacity(decrement)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| err("TerminateInstanceInAutoScalingGroup", e))
    }

    async fn set_unhealthy(&self, instance_id: &str) -> Result<(), AsgError> {
        self.client
            .set_instance_health()
            .instance_id(instance_id)
            .health_status("Unhealthy")
            .should_respect_grace_period(false)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| err("SetInstanceHealth", e))
    }

    async fn group_of(&self, instance_id: &str) -> Result<Option<String>, AsgError> {
        Ok(self
            .describe_instance(instance_id)
            .await?
            .and_then(|i| i.auto_scaling_group_name().map(str::to_string)))
    }

    async fn group(&self, name: &str) -> Result<Option<GroupSizes>, AsgError> {
        Ok(self.describe_group(name).await?.map(|g| GroupSizes {
            name: g.auto_scaling_group_name().unwrap_or(name).to_string(),
            min: g.min_size().unwrap_or_default(),
            max: g.max_size().unwrap_or_default(),
            desired: g.desired_capacity().unwrap_or_default(),
            in_service: g
                .instances()
                .iter()
                .filter(|i| {
                    i.lifecycle_state()
                        .is_some_and(|s| s.as_str() == "InService")
                })
                .filter_map(|i| i.instance_id().map(str::to_string))
                .collect(),
        }))
    }

    async fn set_desired_capacity(&self, group: &str, desired: i32) -> Result<(), AsgError> {
        self.client
            .set_desired_capacity()
            .auto_scaling_group_name(group)
            .desired_capacity(desired)
            .honor_cooldown(false)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| err("SetDesiredCapacity", e))
    }

    async fn suspend_processes(&self, group: &str, processes: &[&str]) -> Result<(), AsgError> {
        self.client
            .suspend_processes()
            .auto_scaling_group_name(group)
            .set_scaling_processes(Some(processes.iter().map(|p| p.to_string()).collect()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| err("SuspendProcesses", e))
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod fence_tests {
    use super::*;
    use crate::election::Leadership;
    use aws_sdk_autoscaling::config::{
        interceptors::BeforeSerializationInterceptorContextRef, BehaviorVersion, ConfigBag,
        Credentials, Intercept, Region, RuntimeComponents,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A pause injected between the leader's validity check (already done by the caller)
    /// and the send: the first hook of every request sleeps.
    #[derive(Debug)]
    struct Pause(Duration);

    impl Intercept for Pause {
        fn name(&self) -> &'static str {
            "Pause"
        }
        fn read_before_serialization(
            &self,
            _: &BeforeSerializationInterceptorContextRef<'_>,
            _: &RuntimeComponents,
            _: &mut ConfigBag,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            std::thread::sleep(self.0);
            Ok(())
        }
    }

    /// A loopback "emulator" that counts the requests reaching it (and answers none).
    fn counting_endpoint() -> (String, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut buf = [0u8; 4096];
                if std::io::Read::read(&mut conn, &mut buf).unwrap_or(0) > 0 {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        (url, seen)
    }

    async fn raise_after_pause(valid_for: Duration, pause: Duration) -> usize {
        let (url, seen) = counting_endpoint();
        let (_tx, leadership) = tokio::sync::watch::channel(Leadership::Leader {
            term: 7,
            valid_until: tokio::time::Instant::now() + valid_for,
        });
        let builder = aws_sdk_autoscaling::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
            .endpoint_url(url)
            .timeout_config(
                aws_sdk_autoscaling::config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_millis(500))
                    .build(),
            )
            .interceptor(Pause(pause));
        let asg = SdkAutoScaling::fenced(builder, leadership);
        let result = asg.set_desired_capacity("g", 26).await;
        assert!(result.is_err(), "nothing answers: {result:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen.load(Ordering::SeqCst)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_whose_lease_lapsed_during_a_pause_never_reaches_the_emulator() {
        assert_eq!(
            raise_after_pause(Duration::from_millis(100), Duration::from_millis(300)).await,
            0,
            "sent after the lease lapsed"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_valid_leaders_request_is_sent_once_and_never_retried_by_the_sdk() {
        assert_eq!(
            raise_after_pause(Duration::from_secs(30), Duration::from_millis(10)).await,
            1,
            "sent once: a failed leader call is not re-sent by the SDK"
        );
    }
}
