"""Nearest-neighbour search over global descriptors: exact top-K by chunked matrix products."""
