"""CloudFormation resources moto 5.2.5 stores through the API but not through a stack.

`apply()` teaches moto's CloudFormation `AWS::AutoScaling::WarmPool`: moto has PutWarmPool and
a `FakeWarmPool` model, but no `cloudformation_type` for it, so a stack skipped the resource
with "No Moto CloudFormation support". Creating it calls the backend's `put_warm_pool` (so any
patch of that method, e.g. the bed's warm pool lifecycle, applies to stacks too); deleting it
(or the stack) calls `delete_warm_pool`; an update puts the new configuration.

(`AWS::AutoScaling::ScheduledAction` needs nothing: moto creates it from a stack, named after
its logical id.)

Call `apply()` once, before the first stack is created.
"""

from __future__ import annotations

from typing import Any


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def apply() -> None:
    from moto.autoscaling import models as M
    from moto.cloudformation import parsing

    def put(group: str, props: dict[str, Any], account_id: str, region_name: str) -> Any:
        backend = M.autoscaling_backends[account_id][region_name]
        reuse = props.get("InstanceReusePolicy")
        backend.put_warm_pool(
            group_name=group,
            max_group_prepared_capacity=_int(props.get("MaxGroupPreparedCapacity")),
            min_size=_int(props.get("MinSize")),
            pool_state=props.get("PoolState"),
            instance_reuse_policy=(
                {"ReuseOnScaleIn": str(reuse.get("ReuseOnScaleIn")).lower() == "true"}
                if reuse
                else None
            ),
        )
        pool = backend.describe_warm_pool(group_name=group)
        # The stack's physical id of a warm pool is its group's name (as in AWS).
        pool.physical_resource_id = group
        pool.auto_scaling_group_name = group
        return pool

    def create(cls: Any, resource_name: str, cloudformation_json: Any, account_id: str, region_name: str, **kwargs: Any) -> Any:
        props = cloudformation_json.get("Properties", {})
        return put(props["AutoScalingGroupName"], props, account_id, region_name)

    def update(cls: Any, original_resource: Any, new_resource_name: str, cloudformation_json: Any, account_id: str, region_name: str) -> Any:
        props = cloudformation_json.get("Properties", {})
        return put(props["AutoScalingGroupName"], props, account_id, region_name)

    def delete(cls: Any, resource_name: str, cloudformation_json: Any, account_id: str, region_name: str) -> None:
        props = cloudformation_json.get("Properties", {})
        backend = M.autoscaling_backends[account_id][region_name]
        try:
            backend.delete_warm_pool(group_name=props["AutoScalingGroupName"])
        except Exception:  # the group may be gone already (stack deletion order)
            pass

    W = M.FakeWarmPool
    W.cloudformation_type = staticmethod(lambda: "AWS::AutoScaling::WarmPool")
    W.cloudformation_name_type = staticmethod(lambda: "")
    W.has_cfn_attr = classmethod(lambda cls, attr: False)
    W.create_from_cloudformation_json = classmethod(create)
    W.update_from_cloudformation_json = classmethod(update)
    W.delete_from_cloudformation_json = classmethod(delete)
    if not hasattr(W, "is_created"):
        W.is_created = lambda self: True
    # The model map is cached on first use; make it see the new type.
    parsing.get_model_map.cache_clear()
    parsing.get_name_type_map.cache_clear()
