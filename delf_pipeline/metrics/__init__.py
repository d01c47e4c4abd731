"""Metrics as pure functions: they never read files."""
