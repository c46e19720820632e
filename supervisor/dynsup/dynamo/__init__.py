"""The dynamo room: model units and stack settings → the services of a Dynamo stack."""

from .expand import StackContext, component_slug, expand_stack, router_mode
from .flags import to_flags

__all__ = ["StackContext", "component_slug", "expand_stack", "router_mode", "to_flags"]
