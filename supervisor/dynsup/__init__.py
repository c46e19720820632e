"""dynsup: an asyncio process supervisor for GPU inference stacks."""

__version__ = "0.1.0"
