"""The scheduling core: a sans-I/O state machine fed events, returning decisions."""
