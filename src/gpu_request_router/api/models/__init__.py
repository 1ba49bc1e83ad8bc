"""Wire schemas (Pydantic): what goes over HTTP, kept apart from the domain models."""
