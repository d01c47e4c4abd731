"""Test support: synthetic photos and stores, tiny models with the official signatures, a
headless browser, and where the shared real photos are.

``SHARED_DATA`` is ``../shared/data`` beside the repository (never copied into it); the
``shared_data`` fixture of conftest.py gives a folder of it or skips the test, naming the path.
"""
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
