"""Readers and writers of files: image lists and decoding, the feature store, CSV tables."""
