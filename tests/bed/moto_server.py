#!/usr/bin/env python3
"""moto's standalone server for the agent-fleet test bed.

What this adds to `moto_server`:

1. Auto Scaling strictness moto 5.2.5 lacks (see `apply_patches`); each patch cites the AWS
   behaviour it mirrors. Tests match error *codes*, never messages. With a termination
   lifecycle hook, an instance leaving the group (TerminateInstanceInAutoScalingGroup, a lower
   SetDesiredCapacity, UpdateAutoScalingGroup lowering MaxSize) waits in Terminating:Wait until
   CompleteLifecycleAction, its heartbeat timeout (heartbeats restart it) or the global timeout;
   LifecycleHookSpecificationList of a CloudFormation group creates its hooks. Warm pools
   (PutWarmPool, AWS::AutoScaling::WarmPool) move instances through their lifecycle, launch
   hooks hold launches in Pending:Wait / Warmed:Pending:Wait (see `apply_warm_pool_patches`).
   CloudFormation and CloudWatch Logs as AWS where the template depends on it: a LogGroup's
   `GetAtt Arn` ends in ":*" (`apply_logs_patches`), `!Ref AWS::NoValue` removes a list element
   (`apply_novalue_in_lists_patch`). CloudWatch Logs itself (service `logs`, awsJson1_1) is
   moto's own.
2. A WSGI middleware (`Bed`) in front of moto that
   - serialises AWS requests into moto (moto's backends check-then-insert without locks; the
     leader election relies on PutParameter(Overwrite=false) being atomic, as it is in AWS),
   - logs every AWS request (service, action, a whitelist of key params, CLOCK_MONOTONIC
     timestamps, status, error code) for `GET /_bed/calls?since=<seq>`,
   - injects faults (`POST /_bed/faults`) in the error shape of the request's protocol.

Usage: moto_server.py [--port N] [--exit-on-stdin-eof]
Binds 127.0.0.1 (port 0 = ephemeral), prints exactly one line `LISTENING <port>` on stdout
once the socket accepts connections and the patches are in place, then serves forever.
With --exit-on-stdin-eof it exits when stdin closes (the Rust harness holds the pipe, so a
test process that dies for any reason takes its moto with it).

Control API (JSON in, JSON out; never logged as AWS calls):
  GET    /_bed/health                  -> {"ok": true, "moto": "5.2.5"}
  GET    /_bed/calls?since=<seq>       -> {"calls": [...seq > since...], "last_seq": N}
  POST   /_bed/calls/clear             -> {"cleared": n}      (seq numbers keep increasing)
  GET    /_bed/bodies?since=<seq>      -> {"bodies": [{"seq", "action", "body"}]}  (whole request
                                           bodies of BODY_ACTIONS, e.g. PutLogEvents, faulted
                                           ones included)
  POST   /_bed/faults  {...}           -> {"id": n}
  GET    /_bed/faults                  -> {"faults": [...]}
  DELETE /_bed/faults                  -> {"cleared": n}
  GET    /_bed/user_data?group=<asg>   -> {"group", "launch_template_id", "launch_template_name",
                                           "version": n, "user_data": "<text>" | null}
  POST   /_bed/launch_time {"instance_id": "i-…", "launch_time": "2024-03-01T10:15:30.000Z"}
                        or {"instance_id": "i-…", "ago_secs": 93600}
                                        -> {"instance_id", "launch_time"}  (ages an instance:
                                           DescribeInstances then shows that launch time)
  GET    /_bed/warm_pool?group=<asg>  -> {"group", "configured", "pool_state", "min_size",
                                           "max_group_prepared_capacity", "target", "desired",
                                           "instances": [{"instance_id", "lifecycle_state",
                                           "ec2_state", "launch_template_version"}]}
                                          (the warm pool as the launcher needs it; moves
                                           lifecycle waits on like an Auto Scaling call, unlogged)
  POST   /_bed/cfn_failure {"resource": "AgentGroup", "reason": "..."}
                                        -> {"armed": true}  (the next change set execution that
                                           touches that resource fails and rolls back)

A call: {"seq", "t_ns" (arrival, time.monotonic_ns()), "end_ns" (response done or null),
"service" (SigV4 signing name: "ssm", "autoscaling", "ec2", "s3", "monitoring", "logs",
"cloudformation", "sts", ...), "action", "params" (whitelisted, strings or lists of strings;
parameter *values* are never logged), "status" (HTTP status or null), "error" (AWS error code
or null), "fault" (null | "error" | "reset" | "delay")}.

A fault: {"service": "ssm", "action": "PutParameter" (optional: all actions),
  "error": "ThrottlingException", "status": 400, "message": "...",
  "count": 5 (optional: how many matching requests; default unlimited until cleared/expired),
  "outage_ms": 3000 (optional: active for this long from now; alone it means 503
                     ServiceUnavailable),
  "delay_ms": 500 (optional: sleep this long before answering, outside moto's lock),
  "mode": "error" | "reset" | "delay"}
mode defaults to "error" when error or outage_ms is given, else "delay" (when only delay_ms is
given: the request then goes through to moto, late). "reset" closes the connection without a
response. The first active fault that matches a request applies.

user_data: what an instance the group launches now would find at IMDS /latest/user-data, for
the test bed's EC2 launcher: the base64-decoded UserData of the launch template the group names
(its LaunchTemplate, or MixedInstancesPolicy.LaunchTemplate.LaunchTemplateSpecification), at
the version the group names ($Default, $Latest or a number; none = $Default). 404 with
{"error"} for an unknown group, a group with a launch configuration, or an unknown template or
version. Optional `region` (default us-east-1). Reads moto's backends in-process.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from typing import Any, Callable, Iterable

EXPECTED_MOTO_VERSION = "5.2.5"
DEFAULT_REGION = "us-east-1"

# --------------------------------------------------------------------------------------------
# Auto Scaling strictness
# --------------------------------------------------------------------------------------------


def apply_patches() -> None:
    """Patch moto's Auto Scaling to answer like AWS where our supervisor depends on it.

    Validation sits in the API handlers (AutoScalingResponse), not the backend, so moto's own
    internal uses of the backend (e.g. DeleteAutoScalingGroup scaling to 0, CloudFormation)
    keep working.
    """
    import moto
    from moto.autoscaling import models as M
    from moto.autoscaling import responses as R
    from moto.autoscaling.exceptions import ValidationError
    from moto.core.responses import ActionResult, EmptyResult

    if moto.__version__ != EXPECTED_MOTO_VERSION:
        raise RuntimeError(
            f"moto {moto.__version__} installed, these patches target {EXPECTED_MOTO_VERSION}: "
            "run `make venv` (tests/bed/requirements.txt pins it)"
        )

    def find_instance(backend: Any, instance_id: str | None) -> tuple[Any, Any]:
        """(group, state) of an instance in a group or in its warm pool; (None, None)."""
        for group in backend.autoscaling_groups.values():
            for state in list(group.instance_states) + pool_of(group):
                if state.instance.id == instance_id:
                    return group, state
        return None, None

    def not_found(instance_id: str | None) -> Exception:
        # AWS answers an instance id that no Auto Scaling group manages with ValidationError
        # "Instance Id not found - No managed instance found for instance ID: i-..."
        # (TerminateInstanceInAutoScalingGroup, SetInstanceHealth, lifecycle calls). moto 5.2.5
        # raises StopIteration -> HTTP 500.
        return ValidationError(
            f"Instance Id not found - No managed instance found for instance ID: {instance_id}"
        )

    def group_or_error(backend: Any, name: str | None) -> Any:
        # AWS: ValidationError "AutoScalingGroup name not found - ..." for an unknown group
        # name; moto 5.2.5 raises KeyError -> HTTP 500 in SetDesiredCapacity.
        group = backend.autoscaling_groups.get(name)
        if group is None:
            raise ValidationError(f"AutoScalingGroup name not found - AutoScalingGroup {name} not found")
        return group

    def terminating_hooks(backend: Any, group_name: str) -> list[Any]:
        return [
            h
            for h in backend.lifecycle_hooks.values()
            if h.auto_scaling_group_name == group_name
            and h.lifecycle_transition == "autoscaling:EC2_INSTANCE_TERMINATING"
        ]

    def finish_termination(backend: Any, group: Any, state: Any) -> None:
        group.instance_states = [x for x in group.instance_states if x is not state]
        backend.ec2_backend.terminate_instances([state.instance.id])

    def begin_termination_wait(state: Any, hook: Any) -> None:
        # User Guide, "How lifecycle hooks work": a terminating instance "is first
        # deregistered from the load balancer" and "the lifecycle hook puts the instance into
        # a wait state (Terminating:Wait)"; it stays in the group (DescribeAutoScalingGroups
        # lists it) until the action completes or times out.
        state.lifecycle_state = "Terminating:Wait"
        state.bed_hook = hook
        state.bed_heartbeat = time.time()
        state.bed_wait_started = state.bed_heartbeat

    def global_timeout(hook: Any) -> float:
        # LifecycleHook.GlobalTimeout: "The maximum time, in seconds, that an instance can
        # remain in a wait state. The maximum is 172800 seconds (48 hours) or 100 times
        # HeartbeatTimeout, whichever is smaller."
        return min(172800, 100 * hook.heartbeat_timeout)

    def wait_expired(state: Any, now: float) -> bool:
        hook = getattr(state, "bed_hook", None)
        return (
            hook is None
            or now >= state.bed_heartbeat + hook.heartbeat_timeout
            or now >= state.bed_wait_started + global_timeout(hook)
        )

    def expire_lifecycle_actions(backend: Any) -> None:
        # PutLifecycleHook, HeartbeatTimeout: "If the lifecycle hook times out, Amazon EC2 Auto
        # Scaling performs the action that you specified in the DefaultResult property." For
        # the terminating transition both CONTINUE and ABANDON end in termination. Heartbeats
        # restart the timeout, never past the global timeout. Checked lazily, before and after
        # every Auto Scaling API call; launch waits (warm pools) are advanced the same way.
        now = time.time()
        for group in list(backend.autoscaling_groups.values()):
            for state in list(group.instance_states):
                if state.lifecycle_state == "Terminating:Wait" and wait_expired(state, now):
                    finish_termination(backend, group, state)
            advance_launches(backend, group, now)

    # -- Scale-in through a termination lifecycle hook --------------------------------------
    # With a hook for autoscaling:EC2_INSTANCE_TERMINATING, an instance Auto Scaling removes on
    # scale-in (SetDesiredCapacity lower, UpdateAutoScalingGroup lowering MaxSize below the
    # instance count, a scaling policy) goes to Terminating:Wait like one terminated through
    # TerminateInstanceInAutoScalingGroup (User Guide, "Amazon EC2 Auto Scaling lifecycle
    # hooks": "Scale-in events ... the lifecycle hook puts the instance into a wait state").
    # Instances protected from scale in are never picked ("Use instance scale-in protection":
    # "Auto Scaling does not terminate protected instances during scale in"). moto 5.2.5
    # terminates at once. Only for these API actions: DeleteAutoScalingGroup (whose
    # ForceDelete "deletes any outstanding lifecycle actions") and CloudFormation keep moto's
    # immediate termination.
    scale_in_actions = {"SetDesiredCapacity", "UpdateAutoScalingGroup", "ExecutePolicy"}
    api_action = threading.local()
    _orig_group_set_desired_capacity = M.FakeAutoScalingGroup.set_desired_capacity

    def group_set_desired_capacity(self: Any, new_capacity: Any) -> None:
        if bed_managed(self):
            bed_set_desired_capacity(self, new_capacity)
            return
        hooks = (
            terminating_hooks(self.autoscaling_backend, self.name)
            if getattr(api_action, "name", None) in scale_in_actions
            else []
        )
        overrides = ((self.mixed_instances_policy or {}).get("LaunchTemplate") or {}).get("Overrides")
        desired = self.min_size if new_capacity is None else new_capacity
        excess = len(self.active_instances()) - (desired or 0)
        if not hooks or overrides or excess <= 0:
            _orig_group_set_desired_capacity(self, new_capacity)
            return
        self.desired_capacity = desired
        # moto's own choice of victims (the oldest unprotected first), into the wait.
        for state in [s for s in self.active_instances() if not s.protected_from_scale_in][:excess]:
            begin_termination_wait(state, hooks[0])

    M.FakeAutoScalingGroup.set_desired_capacity = group_set_desired_capacity

    # -- Lifecycle hooks from CloudFormation --------------------------------------------------
    # AWS::AutoScaling::AutoScalingGroup LifecycleHookSpecificationList: "One or more lifecycle
    # hooks to add to the Auto Scaling group before instances are launched." (LifecycleHookName,
    # LifecycleTransition, HeartbeatTimeout, DefaultResult). moto 5.2.5 ignores the property.
    # Deleting a group deletes its hooks (moto keeps them).
    _orig_cfn_create = M.FakeAutoScalingGroup.create_from_cloudformation_json.__func__

    def cfn_create(cls: Any, resource_name: str, cloudformation_json: Any, account_id: str, region_name: str, **kwargs: Any) -> Any:
        group = _orig_cfn_create(cls, resource_name, cloudformation_json, account_id, region_name, **kwargs)
        backend = M.autoscaling_backends[account_id][region_name]
        for spec in cloudformation_json.get("Properties", {}).get("LifecycleHookSpecificationList") or []:
            timeout = spec.get("HeartbeatTimeout")
            backend.create_lifecycle_hook(
                name=spec["LifecycleHookName"],
                as_name=group.name,
                transition=spec["LifecycleTransition"],
                timeout=int(timeout) if timeout is not None else None,
                result=spec.get("DefaultResult"),
            )
        hold_launched(group)
        return group

    M.FakeAutoScalingGroup.create_from_cloudformation_json = classmethod(cfn_create)

    _orig_delete_group = M.AutoScalingBackend.delete_auto_scaling_group

    def delete_auto_scaling_group(self: Any, group_name: str) -> None:
        _orig_delete_group(self, group_name)
        for key in [k for k, h in self.lifecycle_hooks.items() if h.auto_scaling_group_name == group_name]:
            del self.lifecycle_hooks[key]

    M.AutoScalingBackend.delete_auto_scaling_group = delete_auto_scaling_group

    # -- SetDesiredCapacity ---------------------------------------------------------------
    # AWS (Auto Scaling User Guide, "Set scaling limits for your Auto Scaling group"): "The
    # desired capacity must be equal to or greater than the minimum group size, and equal to or
    # less than the maximum group size." SetDesiredCapacity outside [min, max] is answered with
    # ValidationError "New SetDesiredCapacity value N is above max value M for the
    # AutoScalingGroup." (resp. "below min value"). moto 5.2.5 accepts any value.
    def set_desired_capacity(self: Any) -> Any:
        name = self._get_param("AutoScalingGroupName")
        desired = self._get_int_param("DesiredCapacity")
        if desired is None:
            # API reference: DesiredCapacity is Required.
            raise ValidationError("DesiredCapacity is required")
        group = group_or_error(self.autoscaling_backend, name)
        if desired > group.max_size:
            raise ValidationError(
                f"New SetDesiredCapacity value {desired} is above max value {group.max_size} for the AutoScalingGroup."
            )
        if desired < group.min_size:
            raise ValidationError(
                f"New SetDesiredCapacity value {desired} is below min value {group.min_size} for the AutoScalingGroup."
            )
        self.autoscaling_backend.set_desired_capacity(name, desired)
        return EmptyResult()

    # -- TerminateInstanceInAutoScalingGroup ----------------------------------------------
    # API reference: "ShouldDecrementDesiredCapacity - Indicates whether terminating the
    # instance also decrements the size of the Auto Scaling group. Required: Yes." and "If you
    # do not specify the option to decrement the desired capacity, Amazon EC2 Auto Scaling
    # launches instances to replace the ones that are terminated."
    # With decrement at min size AWS answers ValidationError "Currently, desiredSize equals
    # minSize (N). Terminating instance without replacement will violate group's min size
    # constraint. Either set shouldDecrementDesiredCapacity flag to false or lower group's min
    # size." moto 5.2.5 decrements below min.
    # With a termination lifecycle hook (User Guide, "Amazon EC2 Auto Scaling lifecycle
    # hooks"), the instance moves to Terminating:Wait and stays in the group until
    # CompleteLifecycleAction or the heartbeat timeout; moto 5.2.5 has no Terminating:Wait.
    def terminate_instance_in_auto_scaling_group(self: Any) -> Any:
        backend = self.autoscaling_backend
        instance_id = self._get_param("InstanceId")
        raw_decrement = self._get_param("ShouldDecrementDesiredCapacity")
        if raw_decrement is None:
            raise ValidationError(
                "1 validation error detected: Value null at 'shouldDecrementDesiredCapacity' "
                "failed to satisfy constraint: Member must not be null"
            )
        should_decrement = self._get_bool_param("ShouldDecrementDesiredCapacity", False)
        group, state = find_instance(backend, instance_id)
        if group is None:
            raise not_found(instance_id)
        original = group.desired_capacity
        if state in pool_of(group):
            # A warm pool instance: terminated at once (Warmed:Terminated), never counted in
            # desired capacity; the pool refills (User Guide, "Warm pools": Auto Scaling
            # "maintains" the pool's size). ShouldDecrementDesiredCapacity does not apply.
            terminate_pool_instance(backend, group, state)
            fill_pool(group)
            return ActionResult({"Activity": M.TerminateInstanceActivity(state.instance, original)})
        if state.lifecycle_state.startswith("Terminating"):
            # Not documented by AWS; we answer a repeated request as a no-op (no second
            # decrement, no second replacement) rather than inventing an error.
            return ActionResult({"Activity": M.TerminateInstanceActivity(state.instance, original)})
        if should_decrement and group.desired_capacity <= group.min_size:
            raise ValidationError(
                f"Currently, desiredSize equals minSize ({group.min_size}). Terminating instance "
                "without replacement will violate group's min size constraint. Either set "
                "shouldDecrementDesiredCapacity flag to false or lower group's min size."
            )
        hooks = terminating_hooks(backend, group.name)
        if hooks:
            begin_termination_wait(state, hooks[0])
            if should_decrement:
                group.desired_capacity = original - 1
            # Launches the replacement when not decrementing: the waiting instance no longer
            # counts as active (moto counts only InService instances).
            if bed_managed(group):
                bed_set_desired_capacity(group, group.desired_capacity)
            else:
                _orig_group_set_desired_capacity(group, group.desired_capacity)
            activity = M.TerminateInstanceActivity(state.instance, original)
        else:
            activity = backend.terminate_instance(instance_id, should_decrement)
        return ActionResult({"Activity": activity})

    # -- SetInstanceHealth ----------------------------------------------------------------
    # Same "Instance Id not found" ValidationError for an instance no group manages (moto:
    # StopIteration / InvalidInstanceID -> wrong code). HealthStatus: "Healthy | Unhealthy".
    _orig_set_instance_health = R.AutoScalingResponse.set_instance_health

    def set_instance_health(self: Any) -> Any:
        instance_id = self._get_param("InstanceId")
        if self._get_param("HealthStatus") not in ("Healthy", "Unhealthy"):
            raise ValidationError("Valid instance health states are: [Healthy, Unhealthy]")
        group, _ = find_instance(self.autoscaling_backend, instance_id)
        if group is None:
            raise not_found(instance_id)
        return _orig_set_instance_health(self)

    # -- CompleteLifecycleAction / RecordLifecycleActionHeartbeat ---------------------------
    # API reference, CompleteLifecycleAction: "Completes the lifecycle action for the specified
    # token or instance with the specified result." LifecycleActionResult: "The action for the
    # group to take. You can specify either CONTINUE or ABANDON." For a terminating instance
    # either result terminates it. RecordLifecycleActionHeartbeat: "Records a heartbeat for the
    # lifecycle action associated with the specified token or instance. This extends the
    # timeout by the length of time defined using the PutLifecycleHook API call."
    # moto 5.2.5 implements neither (NotImplementedError -> 500).
    # We identify the action by InstanceId (LifecycleActionToken is not supported).
    def pending_action(self: Any) -> tuple[Any, Any, Any]:
        backend = self.autoscaling_backend
        group_name = self._get_param("AutoScalingGroupName")
        hook_name = self._get_param("LifecycleHookName")
        instance_id = self._get_param("InstanceId")
        hook = backend.lifecycle_hooks.get(f"{group_name}_{hook_name}")
        if hook is None:
            raise ValidationError(f"No Lifecycle Hook found with name {hook_name} for group {group_name}")
        group, state = find_instance(backend, instance_id)
        waiting_for = getattr(state, "bed_hook", None) if state is not None else None
        if (
            group is None
            or group.name != group_name
            or not state.lifecycle_state.endswith(":Wait")
            or (
                waiting_for is not None
                and waiting_for.lifecycle_transition != hook.lifecycle_transition
            )
        ):
            raise ValidationError(f"No active Lifecycle Action found with instance ID {instance_id}")
        return backend, group, state

    def complete_lifecycle_action(self: Any) -> Any:
        result = self._get_param("LifecycleActionResult")
        if result not in ("CONTINUE", "ABANDON"):
            raise ValidationError("LifecycleActionResult must be CONTINUE or ABANDON")
        backend, group, state = pending_action(self)
        if state.lifecycle_state == "Terminating:Wait":
            finish_termination(backend, group, state)
        else:
            end_launch_wait(backend, group, state, result)
        return EmptyResult()

    def record_lifecycle_action_heartbeat(self: Any) -> Any:
        _, _, state = pending_action(self)
        state.bed_heartbeat = time.time()
        return EmptyResult()

    _orig_call_action = R.AutoScalingResponse.call_action

    def call_action(self: Any) -> Any:
        expire_lifecycle_actions(self.autoscaling_backend)
        api_action.name = self._get_action()
        try:
            return _orig_call_action(self)
        finally:
            api_action.name = None
            expire_lifecycle_actions(self.autoscaling_backend)

    R.AutoScalingResponse.set_desired_capacity = set_desired_capacity
    R.AutoScalingResponse.terminate_instance_in_auto_scaling_group = (
        terminate_instance_in_auto_scaling_group
    )
    R.AutoScalingResponse.set_instance_health = set_instance_health
    R.AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action
    R.AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat
    R.AutoScalingResponse.call_action = call_action

    warm_pools = apply_warm_pool_patches(
        M,
        R,
        ValidationError,
        EmptyResult,
        ActionResult,
        {
            "terminating_hooks": terminating_hooks,
            "finish_termination": finish_termination,
            "begin_termination_wait": begin_termination_wait,
            "wait_expired": wait_expired,
            "scale_in_actions": scale_in_actions,
            "api_action": api_action,
            "group_or_error": group_or_error,
        },
    )
    pool_of = warm_pools["pool_of"]
    bed_managed = warm_pools["bed_managed"]
    bed_set_desired_capacity = warm_pools["bed_set_desired_capacity"]
    advance_launches = warm_pools["advance_launches"]
    end_launch_wait = warm_pools["end_launch_wait"]
    terminate_pool_instance = warm_pools["terminate_pool_instance"]
    fill_pool = warm_pools["fill_pool"]
    hold_launched = warm_pools["hold_launched"]
    WARM_POOLS.update(warm_pools, advance=expire_lifecycle_actions)

    apply_ec2_patches()


# Handles the /_bed/ control API uses (pool_of, fill_pool...), filled by apply_patches.
WARM_POOLS: dict[str, Any] = {}

# Where an instance in a warm pool stays once warmed, per PoolState.
WARMED_STATES = ("Warmed:Stopped", "Warmed:Running", "Warmed:Hibernated")
LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"


def apply_warm_pool_patches(
    M: Any, R: Any, ValidationError: Any, EmptyResult: Any, ActionResult: Any, h: dict[str, Any]
) -> dict[str, Any]:
    """Warm pools as Auto Scaling runs them; moto 5.2.5 stores PutWarmPool and nothing more.

    User Guide, "Warm pools for Amazon EC2 Auto Scaling" and "Use lifecycle hooks with a warm
    pool": a warm pool is "a pool of pre-initialized EC2 instances that sits alongside the Auto
    Scaling group". What is emulated:

    - Size: PutWarmPool's MaxGroupPreparedCapacity: "If a value for MaxGroupPreparedCapacity is
      not specified, Amazon EC2 Auto Scaling launches and maintains the difference between the
      group's maximum capacity and its desired capacity. If you specify a value ..., Amazon EC2
      Auto Scaling uses the difference between the MaxGroupPreparedCapacity and the desired
      capacity instead." "If the desired capacity ... is higher than the
      MaxGroupPreparedCapacity, the capacity of the warm pool is 0, unless you specify a value
      for MinSize" (-1 removes a value). So: max(MinSize, max(0, (MGPC or MaxSize) - desired)),
      kept filled before and after every Auto Scaling call.
    - A pool instance launches as Warmed:Pending; with a launch hook
      (autoscaling:EC2_INSTANCE_LAUNCHING) it "pause[s] ... when it reaches the
      Warmed:Pending:Wait state" until CompleteLifecycleAction or the heartbeat timeout
      (DefaultResult; ABANDON terminates it), then Warmed:Pending:Proceed, then Warmed:Stopped,
      Warmed:Hibernated or Warmed:Running per PoolState (its EC2 state stopped for the first
      two). Without a hook it goes there at once ("As soon as an instance finishes launching
      into the warm pool, Amazon EC2 Auto Scaling stops or hibernates the instance").
    - Scale-out draws on the pool first: a warmed instance leaves it for Pending (EC2: started),
      then with a launch hook "again when the instance restarts and reaches the Pending:Wait
      state", then Pending:Proceed, InService; "If the demand on your application depletes the
      warm pool, Amazon EC2 Auto Scaling can launch instances directly into your Auto Scaling
      group" (those pause only in Pending:Wait). Instances still warming are not drawn on.
    - Scale-in terminates (InstanceReusePolicy.ReuseOnScaleIn false, the default: "The default
      is to terminate instances in the Auto Scaling group when the group scales in"); with
      ReuseOnScaleIn true the instance returns to the pool (Warmed:Pending:Wait for a
      termination hook, then the pool state).
    - DescribeWarmPool lists "the instances that are currently in the warm pool";
      DescribeAutoScalingGroups lists only the group's own instances (and WarmPoolSize); the
      pool never counts in desired capacity. DescribeAutoScalingInstances lists both.
    - PutWarmPool "cannot be called on an Auto Scaling group that has a mixed instances policy
      or a launch template or launch configuration that requests Spot Instances" (API
      reference); DeleteWarmPool and DeleteAutoScalingGroup terminate the pool's instances.
    - CloudFormation AWS::AutoScaling::WarmPool (AutoScalingGroupName, MinSize,
      MaxGroupPreparedCapacity, PoolState, InstanceReusePolicy) calls PutWarmPool.

    A group with a warm pool or a launch hook ("bed-managed") has its capacity kept here: moto
    counts only InService instances and would launch extra ones for every Pending:Wait. Groups
    with neither keep moto's behaviour (and the termination-hook patches) unchanged.
    Each instance records the launch template version it was launched from (an Auto Scaling
    instance's LaunchTemplate.Version), so a pooled instance can tell it is stale.
    """
    terminating_hooks = h["terminating_hooks"]
    finish_termination = h["finish_termination"]
    begin_termination_wait = h["begin_termination_wait"]
    wait_expired = h["wait_expired"]
    group_or_error = h["group_or_error"]

    def pool_of(group: Any) -> list[Any]:
        pool = getattr(group, "bed_pool", None)
        if pool is None:
            pool = []
            group.bed_pool = pool
        return pool

    def launching_hooks(backend: Any, group_name: str) -> list[Any]:
        return [
            hk
            for hk in backend.lifecycle_hooks.values()
            if hk.auto_scaling_group_name == group_name and hk.lifecycle_transition == LAUNCHING
        ]

    def bed_managed(group: Any) -> bool:
        if getattr(group, "warm_pool", None) is not None or getattr(group, "bed_pool", None):
            return True
        backend = group.autoscaling_backend
        return bool(launching_hooks(backend, group.name))

    def pool_target(group: Any) -> int:
        wp = group.warm_pool
        if wp is None:
            return 0
        ceiling = wp.max_group_prepared_capacity
        if ceiling is None or int(ceiling) < 0:
            ceiling = group.max_size or 0
        return max(int(wp.min_size or 0), max(0, int(ceiling) - int(group.desired_capacity or 0)))

    def launched_version(group: Any) -> Any:
        template = group.ec2_launch_template
        if template is None:
            return None
        try:
            return template.get_version(group.launch_template_version or "$Default").number
        except Exception:  # an unknown version: moto launched anyway
            return None

    def launch(group: Any, count: int) -> list[Any]:
        """Launches `count` instances as moto does and returns their states, taken out of the
        group's list (the caller puts them where they belong)."""
        before = {id(s) for s in group.instance_states}
        group.replace_autoscaling_group_instances(count, group.get_propagated_tags())
        new = [s for s in group.instance_states if id(s) not in before]
        group.instance_states = [s for s in group.instance_states if id(s) in before]
        version = launched_version(group)
        for s in new:
            s.bed_lt_version = version
        return new

    def begin_wait(state: Any, lifecycle_state: str, hook: Any) -> None:
        state.lifecycle_state = lifecycle_state
        state.bed_hook = hook
        state.bed_heartbeat = time.time()
        state.bed_wait_started = state.bed_heartbeat

    def enter_group(group: Any, state: Any) -> None:
        """An instance joins the group (launched into it, or out of the pool)."""
        state.bed_hook = None
        hooks = launching_hooks(group.autoscaling_backend, group.name)
        if hooks:
            begin_wait(state, "Pending:Wait", hooks[0])
        else:
            state.lifecycle_state = "InService"
        group.instance_states.append(state)

    def enter_pool(group: Any, state: Any, hooks: list[Any]) -> None:
        state.bed_hook = None
        if hooks:
            begin_wait(state, "Warmed:Pending:Wait", hooks[0])
        else:
            warmed(group, state)
        pool_of(group).append(state)

    def warmed(group: Any, state: Any) -> None:
        pool_state = (group.warm_pool.pool_state if group.warm_pool is not None else None) or "Stopped"
        state.lifecycle_state = f"Warmed:{pool_state}"
        state.bed_hook = None
        if pool_state in ("Stopped", "Hibernated") and state.instance.is_running():
            state.instance.stop()

    def terminate_pool_instance(backend: Any, group: Any, state: Any) -> None:
        group.bed_pool = [x for x in pool_of(group) if x is not state]
        backend.ec2_backend.terminate_instances([state.instance.id])

    def fill_pool(group: Any) -> None:
        pool = pool_of(group)
        if group.warm_pool is None:
            return
        missing = pool_target(group) - len(pool)
        if missing > 0:
            hooks = launching_hooks(group.autoscaling_backend, group.name)
            for state in launch(group, missing):
                enter_pool(group, state, hooks)
        elif missing < 0:
            # The newest go first.
            for state in list(reversed(pool))[: -missing]:
                terminate_pool_instance(group.autoscaling_backend, group, state)

    def scale_in(group: Any, state: Any, hooks: list[Any]) -> None:
        wp = group.warm_pool
        reuse = wp is not None and str((wp.instance_reuse_policy or {}).get("ReuseOnScaleIn", "false")).lower() == "true"
        if reuse:
            group.instance_states = [x for x in group.instance_states if x is not state]
            enter_pool(group, state, hooks)
        elif hooks:
            begin_termination_wait(state, hooks[0])
        else:
            finish_termination(group.autoscaling_backend, group, state)

    def bed_set_desired_capacity(group: Any, new_capacity: Any) -> None:
        backend = group.autoscaling_backend
        group.desired_capacity = group.min_size if new_capacity is None else new_capacity
        desired = int(group.desired_capacity or 0)
        live = [s for s in group.instance_states if not s.lifecycle_state.startswith("Terminating")]
        excess = len(live) - desired
        if excess > 0:
            hooks = (
                terminating_hooks(backend, group.name)
                if getattr(h["api_action"], "name", None) in h["scale_in_actions"]
                else []
            )
            for state in [s for s in live if not s.protected_from_scale_in][:excess]:
                scale_in(group, state, hooks)
        elif excess < 0:
            need = -excess
            ready = [s for s in pool_of(group) if s.lifecycle_state in WARMED_STATES][:need]
            for state in ready:
                group.bed_pool = [x for x in pool_of(group) if x is not state]
                state.lifecycle_state = "Pending"
                if not state.instance.is_running():
                    state.instance.start()
                enter_group(group, state)
            if need > len(ready):
                for state in launch(group, need - len(ready)):
                    enter_group(group, state)
        fill_pool(group)
        if group.name in backend.autoscaling_groups:
            backend.update_attached_elbs(group.name)
            backend.update_attached_target_groups(group.name)

    def end_launch_wait(backend: Any, group: Any, state: Any, result: str) -> None:
        """A launch wait (Pending:Wait or Warmed:Pending:Wait) ends with `result`."""
        in_pool = state in pool_of(group)
        hook = getattr(state, "bed_hook", None)
        returning = hook is not None and hook.lifecycle_transition != LAUNCHING
        if result == "ABANDON" and not returning:
            # API reference, CompleteLifecycleAction: for a launching instance "ABANDON ...
            # terminates the instance"; Auto Scaling launches a replacement.
            if in_pool:
                terminate_pool_instance(backend, group, state)
                fill_pool(group)
            else:
                finish_termination(backend, group, state)
                bed_set_desired_capacity(group, group.desired_capacity)
            return
        state.bed_hook = None
        state.lifecycle_state = "Warmed:Pending:Proceed" if in_pool else "Pending:Proceed"

    def advance_launches(backend: Any, group: Any, now: float) -> None:
        """Moves launches on: expired waits take the hook's DefaultResult, :Proceed states
        their next state; then keeps the pool filled."""
        if not bed_managed(group):
            return
        for state in list(group.instance_states) + list(pool_of(group)):
            if state.lifecycle_state in ("Pending:Wait", "Warmed:Pending:Wait") and wait_expired(state, now):
                hook = state.bed_hook
                end_launch_wait(backend, group, state, (hook.default_result if hook else None) or "ABANDON")
            elif state.lifecycle_state == "Pending:Proceed" or state.lifecycle_state == "Pending":
                state.lifecycle_state = "InService"
            elif state.lifecycle_state in ("Warmed:Pending:Proceed", "Warmed:Pending"):
                warmed(group, state)
        fill_pool(group)

    # -- The API ------------------------------------------------------------------------------
    def int_or_none(v: Any) -> int | None:
        if v is None or v == "":
            return None
        return int(v)

    def put_pool(group: Any, max_prepared: Any, min_size: Any, pool_state: Any, reuse: Any) -> None:
        if group.mixed_instances_policy:
            raise ValidationError(
                "You can't add a warm pool to an Auto Scaling group that has a mixed instances policy "
                "or a launch template or launch configuration that requests Spot Instances."
            )
        pool_state = pool_state or "Stopped"
        if pool_state not in ("Stopped", "Running", "Hibernated"):
            raise ValidationError(f"PoolState must be Stopped, Running or Hibernated, not {pool_state}")
        max_prepared = int_or_none(max_prepared)
        min_size = int_or_none(min_size)
        if min_size is not None and min_size < 0:
            raise ValidationError("MinSize must be 0 or more")
        if max_prepared is not None and max_prepared < -1:
            raise ValidationError("MaxGroupPreparedCapacity must be -1 or more")
        if max_prepared is not None and max_prepared >= 0 and min_size is not None and min_size > max_prepared:
            raise ValidationError("MinSize can't be greater than MaxGroupPreparedCapacity")
        if isinstance(reuse, dict):
            reuse = {"ReuseOnScaleIn": str(reuse.get("ReuseOnScaleIn", "false")).lower() == "true"}
        group.put_warm_pool(
            max_group_prepared_capacity=None if max_prepared == -1 else max_prepared,
            min_size=min_size,
            pool_state=pool_state,
            instance_reuse_policy=reuse or None,
        )
        fill_pool(group)

    def delete_pool(group: Any) -> None:
        for state in list(pool_of(group)):
            terminate_pool_instance(group.autoscaling_backend, group, state)
        group.warm_pool = None

    def put_warm_pool(self: Any) -> Any:
        params = self._get_params()
        group = group_or_error(self.autoscaling_backend, params.get("AutoScalingGroupName"))
        put_pool(
            group,
            params.get("MaxGroupPreparedCapacity"),
            params.get("MinSize"),
            params.get("PoolState"),
            params.get("InstanceReusePolicy"),
        )
        return EmptyResult()

    def describe_warm_pool(self: Any) -> Any:
        group = group_or_error(self.autoscaling_backend, self._get_param("AutoScalingGroupName"))
        return ActionResult({"WarmPoolConfiguration": group.warm_pool, "Instances": list(pool_of(group))})

    def delete_warm_pool(self: Any) -> Any:
        group = group_or_error(self.autoscaling_backend, self._get_param("AutoScalingGroupName"))
        delete_pool(group)
        return EmptyResult()

    R.AutoScalingResponse.put_warm_pool = put_warm_pool
    R.AutoScalingResponse.describe_warm_pool = describe_warm_pool
    R.AutoScalingResponse.delete_warm_pool = delete_warm_pool

    # DescribeAutoScalingGroups: WarmPoolSize ("The current size of the warm pool").
    M.FakeAutoScalingGroup.warm_pool_size = property(
        lambda self: len(pool_of(self)) if self.warm_pool is not None else None
    )

    # An instance's LaunchTemplate.Version: the version it was launched from (moto: the
    # template's default version, whatever the instance was launched from).
    _orig_lt = M.InstanceState.launch_template

    def instance_launch_template(self: Any) -> Any:
        lt = _orig_lt.fget(self)
        version = getattr(self, "bed_lt_version", None)
        if lt is not None and version is not None:
            lt = dict(lt, Version=str(version))
        return lt

    M.InstanceState.launch_template = property(instance_launch_template)

    _orig_describe_instances = M.AutoScalingBackend.describe_auto_scaling_instances

    def describe_auto_scaling_instances(self: Any, instance_ids: list[str]) -> list[Any]:
        states = _orig_describe_instances(self, instance_ids)
        for group in self.autoscaling_groups.values():
            states.extend(s for s in pool_of(group) if not instance_ids or s.instance.id in instance_ids)
        return states

    M.AutoScalingBackend.describe_auto_scaling_instances = describe_auto_scaling_instances

    _orig_delete_group = M.AutoScalingBackend.delete_auto_scaling_group

    def delete_auto_scaling_group(self: Any, group_name: str) -> None:
        group = self.autoscaling_groups.get(group_name)
        if group is not None:
            delete_pool(group)
        _orig_delete_group(self, group_name)

    M.AutoScalingBackend.delete_auto_scaling_group = delete_auto_scaling_group

    # -- CloudFormation: AWS::AutoScaling::WarmPool -------------------------------------------
    def backend_of(account_id: str, region_name: str) -> Any:
        return M.autoscaling_backends[account_id][region_name]

    def cfn_group(account_id: str, region_name: str, props: dict[str, Any]) -> Any:
        return group_or_error(backend_of(account_id, region_name), props.get("AutoScalingGroupName"))

    def cfn_put(group: Any, props: dict[str, Any]) -> None:
        put_pool(
            group,
            props.get("MaxGroupPreparedCapacity"),
            props.get("MinSize"),
            props.get("PoolState"),
            props.get("InstanceReusePolicy"),
        )

    def cfn_create(cls: Any, resource_name: str, cloudformation_json: Any, account_id: str, region_name: str, **kwargs: Any) -> Any:
        props = cloudformation_json.get("Properties", {})
        group = cfn_group(account_id, region_name, props)
        cfn_put(group, props)
        group.warm_pool.bed_group_name = group.name
        return group.warm_pool

    def cfn_update(cls: Any, original_resource: Any, new_resource_name: str, cloudformation_json: Any, account_id: str, region_name: str) -> Any:
        return cfn_create(cls, new_resource_name, cloudformation_json, account_id, region_name)

    def cfn_delete(cls: Any, resource_name: str, cloudformation_json: Any, account_id: str, region_name: str) -> None:
        # Properties are unresolved here ({"Ref": ...}): the resource's name is its physical id,
        # the group's name.
        name = cloudformation_json.get("Properties", {}).get("AutoScalingGroupName")
        if not isinstance(name, str):
            name = resource_name
        group = backend_of(account_id, region_name).autoscaling_groups.get(name)
        if group is not None:
            delete_pool(group)

    W = M.FakeWarmPool
    W.cloudformation_type = staticmethod(lambda: "AWS::AutoScaling::WarmPool")
    W.cloudformation_name_type = staticmethod(lambda: "")
    W.create_from_cloudformation_json = classmethod(cfn_create)
    W.update_from_cloudformation_json = classmethod(cfn_update)
    W.delete_from_cloudformation_json = classmethod(cfn_delete)
    W.physical_resource_id = property(lambda self: getattr(self, "bed_group_name", "warm-pool"))
    from moto.cloudformation import parsing

    for cached in (parsing.get_model_list, parsing.get_model_map, parsing.get_name_type_map):
        cached.cache_clear()

    def hold_launched(group: Any) -> None:
        """Instances a group launched before its launch hook existed (CloudFormation creates
        LifecycleHookSpecificationList's hooks "before instances are launched") wait as if the
        hook had been there."""
        hooks = launching_hooks(group.autoscaling_backend, group.name)
        version = launched_version(group)
        for state in group.instance_states:
            if hooks and state.lifecycle_state == "InService":
                begin_wait(state, "Pending:Wait", hooks[0])
                state.bed_lt_version = version

    return {
        "hold_launched": hold_launched,
        "pool_of": pool_of,
        "bed_managed": bed_managed,
        "bed_set_desired_capacity": bed_set_desired_capacity,
        "advance_launches": advance_launches,
        "end_launch_wait": end_launch_wait,
        "terminate_pool_instance": terminate_pool_instance,
        "fill_pool": fill_pool,
        "pool_target": pool_target,
    }


def apply_ec2_patches() -> None:
    """Patch moto's EC2 where launching from a CloudFormation-made launch template needs it."""
    from moto.ec2.models import instances as I
    from moto.ssm.models import ssm_backends

    # -- resolve:ssm: image ids -----------------------------------------------------------
    # EC2 User Guide, "Use a Systems Manager parameter instead of an AMI ID" / the ImageId of
    # RequestLaunchTemplateData: "resolve:ssm:parameter-name", "resolve:ssm:parameter-name:
    # version-number" or "...:label" (or a parameter ARN); "The Systems Manager parameter will
    # resolve to the ID of the AMI at instance launch." The instance then carries the AMI id.
    # moto 5.2.5 launches with the literal "resolve:ssm:..." string as the image id.
    # Only resolved when the parameter exists. AWS would refuse earlier: "You must create a
    # Systems Manager parameter before you can use it in a launch template" (the launch
    # template's creation validates it), and a launch whose parameter is gone fails. moto's
    # CloudFormation validates nothing, so a stack made without the parameter keeps launching
    # with the literal string (moto does not validate image ids either), as before this patch.
    _orig_run_instances = I.InstanceBackend.run_instances

    def run_instances(
        self: Any, image_id: Any, count: int, user_data: Any, security_group_names: Any, **kwargs: Any
    ) -> Any:
        if isinstance(image_id, str) and image_id.startswith("resolve:ssm:"):
            reference = image_id[len("resolve:ssm:") :]
            try:
                param = ssm_backends[self.account_id][self.region_name].get_parameter(reference)
            except Exception:  # ParameterVersionNotFound, malformed references: keep literal
                param = None
            if param is not None and param.value:
                image_id = param.value
        return _orig_run_instances(self, image_id, count, user_data, security_group_names, **kwargs)

    I.InstanceBackend.run_instances = run_instances


# --------------------------------------------------------------------------------------------
# CloudFormation resource failures (POST /_bed/cfn_failure)
# --------------------------------------------------------------------------------------------

# moto 5.2.5 never fails a stack operation ("TODO: handle execution errors and implement
# rollback"). AWS, when a resource fails during ExecuteChangeSet, reports that resource
# CREATE_FAILED/UPDATE_FAILED with a reason, rolls the stack back, and leaves it
# ROLLBACK_COMPLETE (a failed create) or UPDATE_ROLLBACK_COMPLETE (a failed update). The test
# bed can arm one such failure; it is used once.
CFN_FAILURE: dict[str, str] = {}


def apply_logs_patches() -> None:
    """CloudWatch Logs where the stack's IAM statement depends on it.

    AWS::Logs::LogGroup's `Fn::GetAtt Arn` is "arn:aws:logs:<region>:<account>:log-group:<name>:*"
    (CloudFormation User Guide, AWS::Logs::LogGroup, Return values: "such as
    arn:aws:logs:us-west-1:123456789012:log-group:/mystack-testgroup-12ABC1AHYI2NN:*"), which as
    an IAM resource covers the group's streams; moto 5.2.5 returns it without the ":*".
    """
    from moto.logs.models import LogGroup

    _orig = LogGroup.get_cfn_attribute

    def get_cfn_attribute(self: Any, attribute_name: str) -> Any:
        if attribute_name == "Arn":
            return f"{self.arn}:*"
        return _orig(self, attribute_name)

    LogGroup.get_cfn_attribute = get_cfn_attribute


def apply_novalue_in_lists_patch() -> None:
    """`!Ref AWS::NoValue` as a list element removes the element, as in CloudFormation
    ("AWS::NoValue: Removes the corresponding resource property when specified as a return
    value in the Fn::If intrinsic function" — in a list, the element: the template's
    optional IAM statements); moto 5.2.5 leaves a null there, which IAM then refuses
    (MalformedPolicyDocument)."""
    from moto.cloudformation import parsing

    _orig = parsing.clean_json

    def clean_json(resource_json: Any, resources_map: Any) -> Any:
        cleaned = _orig(resource_json, resources_map)
        if isinstance(resource_json, list) and isinstance(cleaned, list):
            return [v for v in cleaned if v is not None]
        return cleaned

    parsing.clean_json = clean_json


def patch_cloudformation_failures() -> None:
    from moto.cloudformation import models as CF

    original = CF.CloudFormationBackend.execute_change_set

    def execute_change_set(self, change_set_name, stack_name=None):  # type: ignore[no-untyped-def]
        failure = dict(CFN_FAILURE)
        change_set = self.change_sets.get(change_set_name) or next(
            (cs for cs in self.change_sets.values() if cs.change_set_name == change_set_name), None
        )
        resources = (getattr(change_set, "template_dict", None) or {}).get("Resources", {})
        if not failure or change_set is None or failure["resource"] not in resources:
            return original(self, change_set_name, stack_name)
        CFN_FAILURE.clear()
        stack = self.stacks[change_set.stack_id]
        create = change_set.change_set_type == "CREATE"
        verb = "CREATE" if create else "UPDATE"
        logical = failure["resource"]

        def resource_event(status: str, reason: str | None) -> None:
            stack.events.append(
                CF.Event(
                    stack_id=stack.stack_id,
                    stack_name=stack.name,
                    logical_resource_id=logical,
                    physical_resource_id="",
                    resource_type=resources[logical].get("Type", "AWS::CloudFormation::CustomResource"),
                    resource_status=status,
                    resource_status_reason=reason,
                    resource_properties=None,
                )
            )

        stack._add_stack_event(f"{verb}_IN_PROGRESS", resource_status_reason="User Initiated")
        resource_event(f"{verb}_IN_PROGRESS", None)
        resource_event(f"{verb}_FAILED", failure["reason"])
        rollback = "ROLLBACK" if create else "UPDATE_ROLLBACK"
        stack._add_stack_event(
            f"{rollback}_IN_PROGRESS",
            resource_status_reason=f"The following resource(s) failed to {verb.lower()}: [{logical}].",
        )
        stack._add_stack_event(f"{rollback}_COMPLETE")
        stack.status = f"{rollback}_COMPLETE"
        change_set.execution_status = "EXECUTE_FAILED"

    CF.CloudFormationBackend.execute_change_set = execute_change_set


# --------------------------------------------------------------------------------------------
# Launch template user data (GET /_bed/user_data)
# --------------------------------------------------------------------------------------------


def group_user_data(group_name: str, region: str) -> tuple[int, dict[str, Any]]:
    """(status, doc) for GET /_bed/user_data; the caller holds the moto lock."""
    import base64

    from moto.autoscaling.models import autoscaling_backends
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.core.exceptions import ServiceException

    try:
        backend = autoscaling_backends[DEFAULT_ACCOUNT_ID][region]
    except KeyError:
        return 404, {"error": f"unknown region {region}"}
    group = backend.autoscaling_groups.get(group_name)
    if group is None:
        return 404, {"error": f"no Auto Scaling group named {group_name} in {region}"}

    # Which template and version the group names. moto keeps the mixed instances policy's
    # specification as given (rewritten with both id and name); a plain LaunchTemplate only as
    # the resolved template plus the version string ("$Default" when none was given).
    policy = group.mixed_instances_policy or {}
    spec = (policy.get("LaunchTemplate") or {}).get("LaunchTemplateSpecification") if policy else None
    if spec:
        lt_id, lt_name = spec.get("LaunchTemplateId"), spec.get("LaunchTemplateName")
        version = str(spec.get("Version") or "$Default")
    elif group.ec2_launch_template is not None:
        lt_id, lt_name = group.ec2_launch_template.id, group.ec2_launch_template.name
        version = str(group.launch_template_version or "$Default")
    else:
        return 404, {"error": f"Auto Scaling group {group_name} has no launch template (launch configuration?)"}

    # Looked up again (not moto's cached object) so a deleted template answers 404.
    ec2 = backend.ec2_backend
    try:
        template = ec2.get_launch_template(lt_id) if lt_id else ec2.get_launch_template_by_name(lt_name)
    except ServiceException:
        return 404, {"error": f"launch template {lt_id or lt_name} of group {group_name} not found"}
    unknown_version = {"error": f"launch template {template.name} has no version {version}"}
    if version.lower() not in ("$latest", "$default") and not (
        version.isdigit() and 1 <= int(version) <= len(template.versions)
    ):
        return 404, unknown_version
    try:
        lt_version = template.get_version(version)
    except ServiceException:
        return 404, unknown_version

    # The raw field, not `.user_data`: moto 5.2.5 stores CreateLaunchTemplateVersion's UserData
    # as a plain str, which that property rejects (AssertionError); CloudFormation's as a
    # Base64EncodedString. str() of either is the base64 text.
    encoded = lt_version.data.get("UserData")
    text = (
        base64.b64decode(str(encoded)).decode("utf-8", "replace") if encoded is not None else None
    )
    return 200, {
        "group": group_name,
        "launch_template_id": template.id,
        "launch_template_name": template.name,
        "version": lt_version.number,
        "user_data": text,
    }


# --------------------------------------------------------------------------------------------
# Warm pool for the launcher (GET /_bed/warm_pool)
# --------------------------------------------------------------------------------------------


def warm_pool_doc(group_name: str, region: str) -> tuple[int, dict[str, Any]]:
    """(status, doc) for GET /_bed/warm_pool; the caller holds the moto lock. Moves lifecycle
    waits and the pool on first, as an Auto Scaling call would, without being logged as one."""
    from moto.autoscaling.models import autoscaling_backends
    from moto.core import DEFAULT_ACCOUNT_ID

    try:
        backend = autoscaling_backends[DEFAULT_ACCOUNT_ID][region]
    except KeyError:
        return 404, {"error": f"unknown region {region}"}
    WARM_POOLS["advance"](backend)
    group = backend.autoscaling_groups.get(group_name)
    if group is None:
        return 404, {"error": f"no Auto Scaling group named {group_name} in {region}"}
    wp = group.warm_pool
    pool = WARM_POOLS["pool_of"](group)
    return 200, {
        "group": group_name,
        "configured": wp is not None,
        "pool_state": wp.pool_state if wp is not None else None,
        "min_size": wp.min_size if wp is not None else None,
        "max_group_prepared_capacity": wp.max_group_prepared_capacity if wp is not None else None,
        "target": WARM_POOLS["pool_target"](group),
        "desired": group.desired_capacity,
        "instances": [
            {
                "instance_id": s.instance.id,
                "lifecycle_state": s.lifecycle_state,
                "ec2_state": s.instance.state,
                "launch_template_version": getattr(s, "bed_lt_version", None),
            }
            for s in pool
        ],
    }


# --------------------------------------------------------------------------------------------
# Call log and faults
# --------------------------------------------------------------------------------------------

# Only these request params are logged (never parameter values, user data, tokens...).
LOGGED_PARAMS: dict[str, tuple[str, ...]] = {
    "TerminateInstanceInAutoScalingGroup": ("InstanceId", "ShouldDecrementDesiredCapacity"),
    "SetDesiredCapacity": ("AutoScalingGroupName", "DesiredCapacity", "HonorCooldown"),
    "SetInstanceHealth": ("InstanceId", "HealthStatus", "ShouldRespectGracePeriod"),
    "CompleteLifecycleAction": (
        "AutoScalingGroupName",
        "LifecycleHookName",
        "InstanceId",
        "LifecycleActionResult",
    ),
    "RecordLifecycleActionHeartbeat": ("AutoScalingGroupName", "LifecycleHookName", "InstanceId"),
    "SuspendProcesses": ("AutoScalingGroupName",),
    "UpdateAutoScalingGroup": ("AutoScalingGroupName", "MinSize", "MaxSize", "DesiredCapacity"),
    "PutLifecycleHook": ("AutoScalingGroupName", "LifecycleHookName", "LifecycleTransition", "HeartbeatTimeout"),
    "ResumeProcesses": ("AutoScalingGroupName",),
    "PutWarmPool": ("AutoScalingGroupName", "MinSize", "MaxGroupPreparedCapacity", "PoolState"),
    "DescribeWarmPool": ("AutoScalingGroupName",),
    "DeleteWarmPool": ("AutoScalingGroupName",),
    "PutParameter": ("Name", "Overwrite", "Type"),
    "GetParameter": ("Name", "WithDecryption"),
    "GetParameters": ("Names",),
    "DeleteParameter": ("Name",),
    "DeleteParameters": ("Names",),
    "GetParametersByPath": ("Path",),
    "PutMetricData": ("Namespace",),
    "CreateLogStream": ("logGroupName", "logStreamName"),
    "PutLogEvents": ("logGroupName", "logStreamName"),
}

# Actions whose request bodies are kept whole for `GET /_bed/bodies` (what a shipper sent,
# for tests that search it, e.g. for the registration token, and count its bytes).
BODY_ACTIONS = {"PutLogEvents"}

# Names a test may use in a fault's "service" for a SigV4 signing name.
SERVICE_ALIASES = {"cloudwatch": "monitoring", "asg": "autoscaling", "cloudwatch-logs": "logs"}

FAULT_KEYS = {"service", "action", "error", "status", "message", "count", "outage_ms", "delay_ms", "mode"}


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _norm(v: Any) -> Any:
    if isinstance(v, list):
        return [_scalar(x) for x in v]
    return _scalar(v)


class Fault:
    def __init__(self, fid: int, spec: dict[str, Any]):
        unknown = set(spec) - FAULT_KEYS
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        service = spec.get("service")
        if not isinstance(service, str) or not service:
            raise ValueError("fault needs a 'service'")
        self.id = fid
        self.service = SERVICE_ALIASES.get(service.lower(), service.lower())
        self.action: str | None = spec.get("action")
        self.count: int | None = spec.get("count")
        outage_ms = spec.get("outage_ms")
        self.until_ns: int | None = (
            time.monotonic_ns() + int(outage_ms) * 1_000_000 if outage_ms is not None else None
        )
        self.delay_ms = int(spec.get("delay_ms") or 0)
        default_mode = "error" if ("error" in spec or outage_ms is not None) else "delay"
        self.mode: str = spec.get("mode", default_mode)
        if self.mode not in ("error", "reset", "delay"):
            raise ValueError("mode must be error, reset or delay")
        if self.mode == "delay" and not self.delay_ms:
            raise ValueError("a fault needs error, outage_ms, mode=reset or delay_ms")
        if outage_ms is not None and "error" not in spec:
            self.error, self.status = "ServiceUnavailable", int(spec.get("status", 503))
        else:
            self.error = spec.get("error", "InternalFailure")
            self.status = int(spec.get("status", 500 if self.error == "InternalFailure" else 400))
        self.message: str = spec.get("message", f"injected by the test bed: {self.error}")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 1):
            raise ValueError("count must be a positive integer")

    def active(self, now_ns: int) -> bool:
        if self.count is not None and self.count <= 0:
            return False
        return self.until_ns is None or now_ns < self.until_ns

    def matches(self, service: str, action: str | None) -> bool:
        return self.service == service and (self.action is None or self.action == action)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "service": self.service,
            "action": self.action,
            "mode": self.mode,
            "error": self.error if self.mode == "error" else None,
            "status": self.status if self.mode == "error" else None,
            "remaining": self.count,
            "remaining_ms": (
                max(0, (self.until_ns - time.monotonic_ns()) // 1_000_000)
                if self.until_ns is not None
                else None
            ),
            "delay_ms": self.delay_ms,
        }


def _cbor_text(s: str) -> bytes:
    b = s.encode("utf-8")
    n = len(b)
    if n < 24:
        head = bytes([0x60 | n])
    elif n < 256:
        head = bytes([0x78, n])
    else:
        head = bytes([0x79]) + n.to_bytes(2, "big")
    return head + b


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def error_response(
    service: str, protocol: str, code: str, message: str, status: int
) -> tuple[str, list[tuple[str, str]], bytes]:
    """An AWS error in the shape the request's protocol expects, so the SDK parses the code."""
    request_id = str(uuid.uuid4())
    reason = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests",
              500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    status_line = f"{status} {reason}"
    headers = [("x-amzn-RequestId", request_id)]
    if protocol == "json":
        body = json.dumps({"__type": code, "message": message}).encode()
        headers += [("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-ErrorType", code)]
    elif protocol == "cbor":
        body = bytes([0xA2]) + _cbor_text("__type") + _cbor_text(code) + _cbor_text("message") + _cbor_text(message)
        headers += [("Content-Type", "application/cbor"), ("smithy-protocol", "rpc-v2-cbor")]
    elif service == "ec2":
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
            f"<Code>{_xml_escape(code)}</Code><Message>{_xml_escape(message)}</Message>"
            f"</Error></Errors><RequestID>{request_id}</RequestID></Response>"
        ).encode()
        headers += [("Content-Type", "text/xml")]
    elif service == "s3":
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
            f"<Code>{_xml_escape(code)}</Code><Message>{_xml_escape(message)}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        headers += [("Content-Type", "application/xml")]
    else:  # awsQuery: autoscaling, cloudformation, sts, monitoring (query)
        kind = "Receiver" if status >= 500 else "Sender"
        body = (
            f'<ErrorResponse xmlns="https://{service}.amazonaws.com/doc/"><Error>'
            f"<Type>{kind}</Type><Code>{_xml_escape(code)}</Code>"
            f"<Message>{_xml_escape(message)}</Message></Error>"
            f"<RequestId>{request_id}</RequestId></ErrorResponse>"
        ).encode()
        headers += [("Content-Type", "text/xml")]
    headers.append(("Content-Length", str(len(body))))
    return status_line, headers, body


_XML_CODE = re.compile(rb"<Code>([^<]+)</Code>")


def error_code_of(headers: list[tuple[str, str]], body: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == "x-amzn-errortype":
            return v.split(":", 1)[0].rsplit("#", 1)[-1]
    m = _XML_CODE.search(body)
    if m:
        return m.group(1).decode("utf-8", "replace")
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if isinstance(doc, dict):
        code = doc.get("__type") or doc.get("code")
        if isinstance(code, str):
            return code.rsplit("#", 1)[-1]
    return None


class Bed:
    """WSGI middleware: /_bed/ control API, call log, faults, serialised access to moto."""

    def __init__(self, app: Callable[..., Any]):
        self.app = app
        self.moto_lock = threading.Lock()
        self.lock = threading.Lock()
        self.calls: list[dict[str, Any]] = []
        self.bodies: list[dict[str, Any]] = []
        self.seq = 0
        self.faults: list[Fault] = []
        self.fault_seq = 0

    # -- WSGI entry ---------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_bed/"):
            return self.control(environ, start_response)
        if path.startswith("/moto-api"):
            with self.moto_lock:
                return list(self.app(environ, start_response))
        return self.aws(environ, start_response)

    # -- AWS requests ---------------------------------------------------------------------
    def aws(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        t_ns = time.monotonic_ns()
        service = self.service_of(environ)
        body = self.read_body(environ)
        protocol, action, params = self.parse(environ, body)
        record = {
            "seq": 0,
            "t_ns": t_ns,
            "end_ns": None,
            "service": service,
            "action": action,
            "params": params,
            "status": None,
            "error": None,
            "fault": None,
        }
        with self.lock:
            self.seq += 1
            record["seq"] = self.seq
            self.calls.append(record)
            if action in BODY_ACTIONS:
                self.bodies.append(
                    {"seq": self.seq, "action": action, "body": body.decode("utf-8", "replace")}
                )
            fault = None
            for f in self.faults:
                if f.active(t_ns) and f.matches(service, action):
                    fault = f
                    if f.count is not None:
                        f.count -= 1
                    break
            self.faults = [f for f in self.faults if f.active(t_ns)]

        if fault is not None:
            if fault.delay_ms:
                time.sleep(fault.delay_ms / 1000)
            if fault.mode == "reset":
                self.finish(record, None, None, "reset")
                sock = environ.get("werkzeug.socket")
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                start_response("500 Internal Server Error", [("Content-Length", "0")])
                return [b""]
            if fault.mode == "error":
                status_line, headers, out = error_response(
                    service, protocol, fault.error, fault.message, fault.status
                )
                self.finish(record, fault.status, fault.error, "error")
                start_response(status_line, headers)
                return [out]
            record["fault"] = "delay"

        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"] = status
            captured["headers"] = headers
            return start_response(status, headers, exc_info)

        with self.moto_lock:
            result = self.app(environ, capture)
            try:
                out = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        status = int(str(captured.get("status", "500")).split(" ", 1)[0])
        code = error_code_of(captured.get("headers", []), out) if status >= 400 else None
        self.finish(record, status, code, record["fault"])
        return [out]

    def finish(self, record: dict[str, Any], status: int | None, error: str | None, fault: str | None) -> None:
        with self.lock:
            record["end_ns"] = time.monotonic_ns()
            record["status"] = status
            record["error"] = error
            record["fault"] = fault

    @staticmethod
    def service_of(environ: dict[str, Any]) -> str:
        auth = environ.get("HTTP_AUTHORIZATION", "")
        # SigV4: "AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/ssm/aws4_request, ..."
        m = re.search(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/", auth)
        if m:
            return m.group(1).lower()
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target.startswith("AmazonSSM."):
            return "ssm"
        return "unknown"

    @staticmethod
    def read_body(environ: dict[str, Any]) -> bytes:
        ctype = environ.get("CONTENT_TYPE", "")
        if not (
            ctype.startswith("application/x-www-form-urlencoded")
            or "json" in ctype
            or "cbor" in ctype
        ):
            return b""
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return b""
        if length <= 0:
            return b""
        body = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(body)
        return body

    @staticmethod
    def parse(environ: dict[str, Any], body: bytes) -> tuple[str, str, dict[str, Any]]:
        """(protocol, action, whitelisted params) of an AWS request."""
        target = environ.get("HTTP_X_AMZ_TARGET")
        if target:
            action = target.rsplit(".", 1)[-1]
            try:
                doc = json.loads(body or b"{}")
            except ValueError:
                doc = {}
            src = doc if isinstance(doc, dict) else {}
            params = {k: _norm(src[k]) for k in LOGGED_PARAMS.get(action, ()) if k in src}
            return "json", action, params
        path = environ.get("PATH_INFO", "")
        if environ.get("HTTP_SMITHY_PROTOCOL", "").startswith("rpc-v2-cbor"):
            # POST /service/<Service>/operation/<Operation>
            return "cbor", path.rstrip("/").rsplit("/", 1)[-1] or "?", {}
        form: dict[str, list[str]] = {}
        if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded") and body:
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        action_values = form.get("Action") or query.get("Action")
        if action_values:
            action = action_values[0]
            params = {
                k: form.get(k, query.get(k, [""]))[0]
                for k in LOGGED_PARAMS.get(action, ())
                if k in form or k in query
            }
            return "query", action, params
        # REST protocols (S3): "<METHOD> <path>" is the best name we have.
        return "rest", f"{environ.get('REQUEST_METHOD', '?')} {path}", {}

    # -- control API ----------------------------------------------------------------------
    def control(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "").rstrip("/")
        try:
            status, doc = self.route(method, path, environ)
        except (ValueError, TypeError) as e:  # bad JSON, unknown keys, wrong types
            status, doc = 400, {"error": str(e)}
        out = json.dumps(doc).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[status]
        start_response(
            f"{status} {reason}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(out)))],
        )
        return [out]

    def route(self, method: str, path: str, environ: dict[str, Any]) -> tuple[int, Any]:
        if path == "/_bed/health" and method == "GET":
            import moto

            return 200, {"ok": True, "moto": moto.__version__}
        if path == "/_bed/calls" and method == "GET":
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            since = int(query.get("since", ["0"])[0])
            with self.lock:
                calls = [dict(c) for c in self.calls if c["seq"] > since]
                last = self.seq
            return 200, {"calls": calls, "last_seq": last}
        if path == "/_bed/calls/clear" and method == "POST":
            with self.lock:
                n = len(self.calls)
                self.calls = []
                self.bodies = []
            return 200, {"cleared": n}
        if path == "/_bed/bodies" and method == "GET":
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            since = int(query.get("since", ["0"])[0])
            with self.lock:
                bodies = [dict(b) for b in self.bodies if b["seq"] > since]
            return 200, {"bodies": bodies}
        if path == "/_bed/cfn_failure" and method == "POST":
            spec = json.loads(Bed.read_body(environ) or b"null")
            if not isinstance(spec, dict) or not spec.get("resource") or not spec.get("reason"):
                raise ValueError('cfn_failure needs {"resource": <logical id>, "reason": <text>}')
            with self.moto_lock:
                CFN_FAILURE.clear()
                CFN_FAILURE.update(resource=str(spec["resource"]), reason=str(spec["reason"]))
            return 200, {"armed": True}
        if path == "/_bed/launch_time" and method == "POST":
            spec = json.loads(Bed.read_body(environ) or b"null")
            if not isinstance(spec, dict) or not spec.get("instance_id") or not (spec.get("launch_time") or spec.get("ago_secs")):
                raise ValueError('launch_time needs {"instance_id": "i-...", "launch_time": "<ISO 8601 UTC>" or "ago_secs": n}')
            from moto.ec2.models import ec2_backends

            region = str(spec.get("region", DEFAULT_REGION))
            with self.moto_lock:
                for account in list(ec2_backends.keys()):
                    backend = ec2_backends[account][region]
                    for reservation in backend.reservations.values():
                        for instance in reservation.instances:
                            if instance.id == spec["instance_id"]:
                                import datetime

                                if spec.get("ago_secs"):
                                    now = datetime.datetime.now(datetime.timezone.utc)
                                    at = now - datetime.timedelta(seconds=int(spec["ago_secs"]))
                                else:
                                    at = datetime.datetime.fromisoformat(str(spec["launch_time"]).replace("Z", "+00:00"))
                                # moto keeps naive UTC datetimes (moto.core.utils.utcnow).
                                at = at.astimezone(datetime.timezone.utc).replace(tzinfo=None)
                                instance.launch_time = at
                                return 200, {"instance_id": instance.id, "launch_time": at.isoformat() + "Z"}
            return 404, {"error": f"no instance {spec['instance_id']} in {region}"}
        if path == "/_bed/user_data" and method == "GET":
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            group = query.get("group", [""])[0]
            if not group:
                raise ValueError("user_data needs ?group=<Auto Scaling group name>")
            region = query.get("region", [DEFAULT_REGION])[0]
            # moto's backends are not thread-safe: read them as an AWS request would.
            with self.moto_lock:
                return group_user_data(group, region)
        if path == "/_bed/warm_pool" and method == "GET":
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            group = query.get("group", [""])[0]
            if not group:
                raise ValueError("warm_pool needs ?group=<Auto Scaling group name>")
            region = query.get("region", [DEFAULT_REGION])[0]
            with self.moto_lock:
                return warm_pool_doc(group, region)
        if path == "/_bed/faults":
            if method == "POST":
                spec = json.loads(Bed.read_body(environ) or b"null")
                if not isinstance(spec, dict):
                    raise ValueError("fault must be a JSON object (Content-Type: application/json)")
                with self.lock:
                    self.fault_seq += 1
                    fault = Fault(self.fault_seq, spec)
                    self.faults.append(fault)
                return 200, {"id": fault.id}
            if method == "GET":
                now = time.monotonic_ns()
                with self.lock:
                    return 200, {"faults": [f.to_json() for f in self.faults if f.active(now)]}
            if method == "DELETE":
                with self.lock:
                    n = len(self.faults)
                    self.faults = []
                return 200, {"cleared": n}
            return 405, {"error": f"{method} not allowed"}
        return 404, {"error": f"no such bed endpoint: {method} {path}"}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = ephemeral)")
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    args = parser.parse_args(argv)

    # Dummy credentials for anything moto does with boto3 internally.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    from werkzeug.serving import make_server

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )

    apply_patches()
    patch_cloudformation_failures()
    apply_logs_patches()
    apply_novalue_in_lists_patch()

    server = make_server(
        "127.0.0.1",
        args.port,
        Bed(DomainDispatcherApplication(create_backend_app)),
        threaded=True,
        request_handler=MotoRequestHandler,
    )
    port = server.server_address[1]
    # moto uses MOTO_PORT when it has to address itself.
    os.environ["MOTO_PORT"] = str(port)

    if args.exit_on_stdin_eof:

        def watch_stdin() -> None:
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            finally:
                os._exit(0)

        threading.Thread(target=watch_stdin, name="stdin-eof", daemon=True).start()

    # os._exit: nothing to flush, and a clean interpreter shutdown would trip over the daemon
    # thread blocked on stdin.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    print(f"LISTENING {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
