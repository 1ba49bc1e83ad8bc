"""Benchmarks and their fixtures: a fast OpenAI-compatible stand-in backend."""
