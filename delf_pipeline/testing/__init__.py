"""Helpers for tests and demos: tiny models with the official signatures (no download)."""
