"""The engine room: reconcile desired and actual state of units."""

from .engine import Engine, UnitStatus, UnknownUnit
from .output import OutputHub
from .reload import ReloadPlan, diff_specs
from .states import State

__all__ = ["Engine", "OutputHub", "ReloadPlan", "State", "UnitStatus", "UnknownUnit", "diff_specs"]
