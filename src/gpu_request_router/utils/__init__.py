"""Helpers shared by several packages: the clock, id generation, logging set-up, serving."""
