"""Helpers shared by the test modules; the fixtures built on them are in tests/conftest.py."""
