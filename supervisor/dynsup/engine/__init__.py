"""The engine room: reconcile desired and actual state of units."""

from .engine import Engine, UnitStatus, UnknownUnit
from .output import OutputHub
from .reload import ReloadPlan, diff_specs
from .rollout import Rollout, Step
from .states import State

__all__ = [
    "Engine",
    "OutputHub",
    "ReloadPlan",
    "Rollout",
    "State",
    "Step",
    "UnitStatus",
    "UnknownUnit",
    "diff_specs",
]
