#!/usr/bin/env python3
"""Self-check of moto_server.py with boto3 (no pytest): every Auto Scaling patch, the call log
and the faults. Run: .venv/bin/python tests/bed/selfcheck.py  (exit 0 = all good).
The real assertions live in Rust (tests/src/moto.rs); this one exists to check the patches
against the pinned moto quickly when bumping it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import boto3
import botocore.config
import botocore.exceptions

HERE = os.path.dirname(os.path.abspath(__file__))


def start() -> tuple[subprocess.Popen[bytes], str]:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "moto_server.py"), "--exit-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    assert line.startswith("LISTENING "), line
    print(f"started in {time.monotonic() - t0:.2f}s: {line}")
    return proc, f"http://127.0.0.1:{line.split()[1]}"


def bed(endpoint: str, method: str, path: str, doc: object | None = None) -> object:
    data = json.dumps(doc).encode() if doc is not None else None
    req = urllib.request.Request(endpoint + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        return json.loads(resp.read())


def code_of(fn, *args, **kwargs) -> str | None:
    try:
        fn(*args, **kwargs)
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
    return None


def main() -> None:
    proc, endpoint = start()
    cfg = botocore.config.Config(retries={"total_max_attempts": 1}, proxies={})
    kw = dict(
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=cfg,
    )
    asg = boto3.client("autoscaling", **kw)
    ssm = boto3.client("ssm", **kw)
    try:
        asg.create_launch_configuration(
            LaunchConfigurationName="lc", ImageId="ami-12c6146b", InstanceType="t3.micro"
        )
        asg.create_auto_scaling_group(
            AutoScalingGroupName="g",
            LaunchConfigurationName="lc",
            MinSize=1,
            MaxSize=3,
            DesiredCapacity=2,
            AvailabilityZones=["us-east-1a"],
        )

        def group() -> dict:
            return asg.describe_auto_scaling_groups(AutoScalingGroupNames=["g"])["AutoScalingGroups"][0]

        ids = [i["InstanceId"] for i in group()["Instances"]]
        assert len(ids) == 2 and all(i["LifecycleState"] == "InService" for i in group()["Instances"])

        # desired outside [min, max]
        assert code_of(asg.set_desired_capacity, AutoScalingGroupName="g", DesiredCapacity=4) == "ValidationError"
        assert code_of(asg.set_desired_capacity, AutoScalingGroupName="g", DesiredCapacity=0) == "ValidationError"
        assert code_of(asg.set_desired_capacity, AutoScalingGroupName="nope", DesiredCapacity=1) == "ValidationError"
        asg.set_desired_capacity(AutoScalingGroupName="g", DesiredCapacity=3)
        assert len(group()["Instances"]) == 3
        asg.set_desired_capacity(AutoScalingGroupName="g", DesiredCapacity=2)
        ids = [i["InstanceId"] for i in group()["Instances"]]
        assert len(ids) == 2

        # terminate without decrement: replaced
        asg.terminate_instance_in_auto_scaling_group(InstanceId=ids[0], ShouldDecrementDesiredCapacity=False)
        g = group()
        assert g["DesiredCapacity"] == 2 and len(g["Instances"]) == 2, g
        assert ids[0] not in [i["InstanceId"] for i in g["Instances"]]
        # terminate with decrement above min: ok; then at min: ValidationError
        ids = [i["InstanceId"] for i in g["Instances"]]
        asg.terminate_instance_in_auto_scaling_group(InstanceId=ids[0], ShouldDecrementDesiredCapacity=True)
        g = group()
        assert g["DesiredCapacity"] == 1 and len(g["Instances"]) == 1, g
        last = g["Instances"][0]["InstanceId"]
        assert code_of(asg.terminate_instance_in_auto_scaling_group, InstanceId=last, ShouldDecrementDesiredCapacity=True) == "ValidationError"
        assert group()["DesiredCapacity"] == 1
        # unknown instance
        assert code_of(asg.terminate_instance_in_auto_scaling_group, InstanceId="i-0123456789abcdef0", ShouldDecrementDesiredCapacity=False) == "ValidationError"
        assert code_of(asg.set_instance_health, InstanceId="i-0123456789abcdef0", HealthStatus="Unhealthy") == "ValidationError"
        asg.set_instance_health(InstanceId=last, HealthStatus="Unhealthy")
        assert group()["Instances"][0]["HealthStatus"] == "Unhealthy"

        # lifecycle hook: Terminating:Wait, heartbeat, complete
        asg.put_lifecycle_hook(
            AutoScalingGroupName="g",
            LifecycleHookName="drain",
            LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
            HeartbeatTimeout=30,
        )
        asg.set_desired_capacity(AutoScalingGroupName="g", DesiredCapacity=2)
        ids = [i["InstanceId"] for i in group()["Instances"]]
        asg.terminate_instance_in_auto_scaling_group(InstanceId=ids[0], ShouldDecrementDesiredCapacity=True)
        g = group()
        states = {i["InstanceId"]: i["LifecycleState"] for i in g["Instances"]}
        assert g["DesiredCapacity"] == 1 and states[ids[0]] == "Terminating:Wait", g
        # repeated terminate: no second decrement
        asg.terminate_instance_in_auto_scaling_group(InstanceId=ids[0], ShouldDecrementDesiredCapacity=True)
        assert group()["DesiredCapacity"] == 1
        asg.record_lifecycle_action_heartbeat(AutoScalingGroupName="g", LifecycleHookName="drain", InstanceId=ids[0])
        assert code_of(asg.record_lifecycle_action_heartbeat, AutoScalingGroupName="g", LifecycleHookName="drain", InstanceId=ids[1]) == "ValidationError"
        assert code_of(asg.complete_lifecycle_action, AutoScalingGroupName="g", LifecycleHookName="nope", InstanceId=ids[0], LifecycleActionResult="CONTINUE") == "ValidationError"
        asg.complete_lifecycle_action(AutoScalingGroupName="g", LifecycleHookName="drain", InstanceId=ids[0], LifecycleActionResult="CONTINUE")
        g = group()
        assert [i["InstanceId"] for i in g["Instances"]] == [ids[1]], g
        # without decrement: waiting instance plus a replacement
        asg.terminate_instance_in_auto_scaling_group(InstanceId=ids[1], ShouldDecrementDesiredCapacity=False)
        g = group()
        states = {i["InstanceId"]: i["LifecycleState"] for i in g["Instances"]}
        assert len(states) == 2 and states[ids[1]] == "Terminating:Wait", g
        asg.complete_lifecycle_action(AutoScalingGroupName="g", LifecycleHookName="drain", InstanceId=ids[1], LifecycleActionResult="ABANDON")
        assert len(group()["Instances"]) == 1

        # group deletion still works at min > 0 (validation is API-only)
        asg.create_auto_scaling_group(
            AutoScalingGroupName="g2", LaunchConfigurationName="lc", MinSize=1, MaxSize=1, AvailabilityZones=["us-east-1a"]
        )
        asg.delete_auto_scaling_group(AutoScalingGroupName="g2", ForceDelete=True)

        # SSM + conditional create
        ssm.put_parameter(Name="/t/leader/0001", Value="x", Type="String", Overwrite=False)
        assert code_of(ssm.put_parameter, Name="/t/leader/0001", Value="y", Type="String", Overwrite=False) == "ParameterAlreadyExists"

        # faults
        bed(endpoint, "POST", "/_bed/faults", {"service": "ssm", "action": "GetParameter", "error": "ThrottlingException", "count": 2})
        assert code_of(ssm.get_parameter, Name="/t/leader/0001") == "ThrottlingException"
        assert code_of(ssm.get_parameter, Name="/t/leader/0001") == "ThrottlingException"
        assert ssm.get_parameter(Name="/t/leader/0001")["Parameter"]["Value"] == "x"
        bed(endpoint, "POST", "/_bed/faults", {"service": "autoscaling", "error": "Throttling", "count": 1})
        assert code_of(asg.describe_auto_scaling_groups) == "Throttling"
        bed(endpoint, "POST", "/_bed/faults", {"service": "ssm", "outage_ms": 300})
        assert code_of(ssm.get_parameter, Name="/t/leader/0001") == "ServiceUnavailable"
        time.sleep(0.35)
        assert ssm.get_parameter(Name="/t/leader/0001")["Parameter"]["Value"] == "x"
        bed(endpoint, "POST", "/_bed/faults", {"service": "ssm", "mode": "reset", "count": 1})
        try:
            ssm.get_parameter(Name="/t/leader/0001")
            raise AssertionError("reset fault did not fail the call")
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError):
            pass
        bed(endpoint, "POST", "/_bed/faults", {"service": "ssm", "delay_ms": 300, "count": 1})
        t = time.monotonic()
        ssm.get_parameter(Name="/t/leader/0001")
        assert time.monotonic() - t >= 0.3
        bed(endpoint, "POST", "/_bed/faults", {"service": "ssm", "error": "InternalServerError", "status": 500})
        assert len(bed(endpoint, "GET", "/_bed/faults")["faults"]) == 1
        bed(endpoint, "DELETE", "/_bed/faults")
        assert ssm.get_parameter(Name="/t/leader/0001")["Parameter"]["Value"] == "x"

        # call log
        log = bed(endpoint, "GET", "/_bed/calls?since=0")
        calls = log["calls"]
        terms = [c for c in calls if c["action"] == "TerminateInstanceInAutoScalingGroup"]
        assert terms and terms[0]["params"] == {"InstanceId": terms[0]["params"]["InstanceId"], "ShouldDecrementDesiredCapacity": "false"}, terms[0]
        assert any(c["error"] == "ValidationError" for c in terms)
        puts = [c for c in calls if c["action"] == "PutParameter"]
        assert puts[0]["service"] == "ssm" and puts[0]["params"] == {"Name": "/t/leader/0001", "Overwrite": "false", "Type": "String"}, puts
        assert puts[1]["error"] == "ParameterAlreadyExists"
        faulted = [c["fault"] for c in calls if c["fault"]]
        assert faulted == ["error", "error", "error", "error", "reset", "delay"], faulted
        assert all(c["end_ns"] >= c["t_ns"] for c in calls)
        assert "Value" not in json.dumps(calls)
        last = log["last_seq"]
        assert bed(endpoint, "GET", f"/_bed/calls?since={last}")["calls"] == []
        bed(endpoint, "POST", "/_bed/calls/clear")
        assert bed(endpoint, "GET", "/_bed/calls")["calls"] == []
        print(f"selfcheck ok ({len(calls)} calls logged)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
