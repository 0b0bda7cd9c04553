"""Loopback-only simulation of a deployment's moving parts, for tests and ``deployhealth demo``."""
