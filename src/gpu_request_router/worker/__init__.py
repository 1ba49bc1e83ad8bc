"""The worker agent (``gpurouter worker``): runs on a GPU host, reports its GPUs, executes work."""
