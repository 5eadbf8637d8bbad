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

/// The termination lifecycle hook's two calls, by instance id (no lifecycle action token:
/// the instance learns of its termination from IMDS, not from a notification).
pub trait LifecycleActions: Send + Sync {
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
    /// Whether the group has Capacity Rebalancing on (`None`: no such group).
    pub async fn capacity_rebalance(&self, group: &str) -> Result<Option<bool>, AsgError> {
        let out = self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .map_err(|e| err("DescribeAutoScalingGroups", e))?;
        Ok(out
            .auto_scaling_groups()
            .first()
            .map(|g| g.capacity_rebalance().unwrap_or(false)))
    }
}

impl LifecycleActions for SdkAutoScaling {
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
        let out = self
            .client
            .describe_auto_scaling_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| err("DescribeAutoScalingInstances", e))?;
        Ok(out
            .auto_scaling_instances()
            .iter()
            .find_map(|i| i.auto_scaling_group_name().map(str::to_string)))
    }

    async fn group(&self, name: &str) -> Result<Option<GroupSizes>, AsgError> {
        let out = self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
            .await
            .map_err(|e| err("DescribeAutoScalingGroups", e))?;
        Ok(out.auto_scaling_groups().first().map(|g| GroupSizes {
            name: g.auto_scaling_group_name().unwrap_or(name).to_string(),
            min: g.min_size().unwrap_or_default(),
            max: g.max_size().unwrap_or_default(),
            desired: g.desired_capacity().unwrap_or_default(),
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
