"""deployhealth: outside-in health and readiness checks for a Coder deployment."""

__version__ = "0.1.0"
