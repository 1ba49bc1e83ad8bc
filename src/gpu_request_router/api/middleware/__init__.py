"""The router API's own middleware: authentication and bad-key throttling, the header limit.

The plumbing the worker agent shares (request context, body limit, problem details, Bearer keys)
lives in :mod:`gpu_request_router.http`.
"""
