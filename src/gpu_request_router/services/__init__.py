"""Integrations: GPU monitoring sources, backend clients, the simulated fleet."""
