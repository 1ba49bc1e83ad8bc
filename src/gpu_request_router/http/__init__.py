"""HTTP plumbing shared by the router's API (``api/``) and the worker agent (``worker/``).

Both applications answer errors as the same problem details, limit bodies the same way, tag
every call with a request id and the security headers, read Bearer keys alike and write
timestamps in one format; that lives here, so ``worker/`` needs nothing from ``api/``.
"""
