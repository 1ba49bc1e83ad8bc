"""Authentication, request context and logging, error responses."""
