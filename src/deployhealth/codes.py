"""Every code a section can carry: what it means and what to do about it.

`deployhealth codes` prints these; docs/codes.md has one anchor per code (a test keeps
the two in step), and the HTML report links each code to its anchor.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployhealth.model import Severity

DOCS_PATH = "docs/codes.md"


@dataclass(frozen=True)
class Code:
    code: str
    section: str
    severity: Severity
    title: str
    action: str

    @property
    def anchor(self) -> str:
        return f"{DOCS_PATH}#{self.code.lower()}"


_ALL = [
    Code(
        "EUNKNOWN", "any", Severity.ERROR,
        "The check itself failed unexpectedly, or ran past its deadline.",
        "Read the message: it names the exception. Report it if it is a deployhealth bug.",
    ),
    Code(
        "EACS01", "access_url", Severity.ERROR,
        "No access URL is configured.",
        "Set DEPLOYHEALTH_ACCESS_URL to the URL users open, e.g. https://coder.example.com.",
    ),
    Code(
        "EACS02", "access_url", Severity.ERROR,
        "The access URL is not an absolute http(s) URL.",
        "Fix DEPLOYHEALTH_ACCESS_URL: it needs a scheme and a host.",
    ),
    Code(
        "EACS03", "access_url", Severity.ERROR,
        "GET /healthz failed: DNS, connect, TLS, timeout or reading the body.",
        "The message names the phase. Check DNS, security groups, the load balancer "
        "listener and the certificate, in that order.",
    ),
    Code(
        "EACS04", "access_url", Severity.WARNING,
        "/healthz answered, but not 200.",
        "502/503/504 come from a proxy or load balancer that cannot reach Coder: check the "
        "target group's health and the Coder pods.",
    ),
    Code(
        "EACS05", "access_url", Severity.WARNING,
        "/healthz answered 200 with a body other than OK.",
        "The request reached something else: wrong DNS record, captive portal or virtual host.",
    ),
    Code(
        "EACS06", "access_url", Severity.WARNING,
        "The access URL's TLS certificate expires soon (error once expired).",
        "Renew the certificate; check that ACM or cert-manager auto-renewal works.",
    ),
    Code(
        "EDB01", "database", Severity.ERROR,
        "Connecting to the database, or a query, failed.",
        "The message tells authentication, unknown database, refused, timeout and TLS apart.",
    ),
    Code(
        "EDB02", "database", Severity.WARNING,
        "The median of five SELECT 1 round trips is at or above the threshold.",
        "Check the database's load, instance class and network path "
        "(cross-AZ, NAT); raise DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS if it is expected.",
    ),
]

CODES: dict[str, Code] = {c.code: c for c in _ALL}


def lookup(code: str) -> Code | None:
    return CODES.get(code.strip().upper())
