"""Neural-network building blocks. ``gpunet.nn.functional`` holds the stateless functions."""

from . import functional

__all__ = ["functional"]
