"""Utilities every stage shares: atomic artifacts and manifests, numbered blocks, progress."""
