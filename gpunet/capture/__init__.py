"""Step capture and replay (``gpunet.capture``): the public names."""

from .program import CapturedStep, CaptureError, capture, graph_support, refuse

__all__ = ["CaptureError", "CapturedStep", "capture", "graph_support", "refuse"]
