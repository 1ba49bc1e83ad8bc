"""gpu-request-router: a GPU-aware, fair and durable router in front of a fleet of GPUs."""

__version__ = "0.1.0"
