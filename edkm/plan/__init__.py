"""Memory planning: predict a recipe's training-step memory before running it (``edkm plan``).

Public API:
    make_plan(model, recipe, *, device_memory, host_memory=None, kind="gpu") -> Plan
    render(plan) -> str; parse_bytes("24GiB") -> int
    measure_step(config, recipe, *, fake=True, ...) -> StepMemory  (edkm.plan.step)

Example:
    >>> parse_bytes("1GiB")
    1073741824
"""

from __future__ import annotations

from edkm.plan.planner import Plan, make_plan, parse_bytes, render
from edkm.plan.step import StepMemory, measure_step

__all__ = ["Plan", "StepMemory", "make_plan", "measure_step", "parse_bytes", "render"]
