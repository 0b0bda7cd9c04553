"""Every code a section can carry: what it means and what to do about it.

`deployhealth codes` prints these; docs/codes.md has one anchor per code (a test keeps
the two in step), and the HTML report links each code to its anchor.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployhealth.checks import FAMILIES
from deployhealth.model import Severity

DOCS_PATH = "docs/codes.md"


@dataclass(frozen=True)
class Code:
    code: str
    section: str
    severity: Severity
    title: str
    action: str
    # For a warning that becomes an error in one stated case (an expired certificate, no
    # proxy left): the case, as the docs and `deployhealth codes` say it. Readiness acts on
    # the severity the finding carries, so both levels are documented.
    error_when: str | None = None

    @property
    def severity_text(self) -> str:
        if self.error_when:
            return f"{self.severity.value} (error when {self.error_when})"
        return self.severity.value

    def allows(self, severity: Severity) -> bool:
        """Whether a finding of this code may carry `severity`."""
        if severity is Severity.ERROR and self.error_when:
            return True
        return severity is self.severity

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
        "ENOTCHECKED", "any", Severity.WARNING,
        "Nothing was checked: nothing is configured for this section, or it cannot be "
        "checked from here.",
        "The message says what was not checked and what to configure. Not checked is not "
        "healthy: configure it, or exclude or dismiss the section on purpose.",
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
        error_when="the certificate has already expired",
    ),
    Code(
        "EDB01", "database", Severity.ERROR,
        "Connecting to the database, or a query, failed.",
        "The message tells authentication, unknown database, refused, timeout, TLS and a "
        "peer that is not PostgreSQL apart.",
    ),
    Code(
        "EDB02", "database", Severity.WARNING,
        "The median of five SELECT 1 round trips is at or above the threshold.",
        "Check the database's load, instance class and network path "
        "(cross-AZ, NAT); raise DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS if it is expected.",
    ),
]

_NETWORK = [
    Code(
        "EWS01", "websocket", Severity.ERROR,
        "The WebSocket dial or handshake to /api/v2/debug/ws failed.",
        "The message keeps the handshake's HTTP status and body. Check that the load balancer "
        "forwards Upgrade/Connection headers and that the token is valid.",
    ),
    Code(
        "EWS02", "websocket", Severity.ERROR,
        "A write or a read on the WebSocket failed.",
        "A proxy closed or reset the connection mid-exchange: check its timeouts and limits.",
    ),
    Code(
        "EWS03", "websocket", Severity.ERROR,
        "The echo was not a text frame, or not the same text.",
        "Something between deployhealth and Coder rewrites WebSocket traffic.",
    ),
    Code(
        "EWS04", "websocket", Severity.WARNING,
        "The idle WebSocket was closed before the idle window ended.",
        "A proxy idle timeout (60 s on an ALB) cuts silent sessions and no server heartbeat "
        "keeps them alive: raise the idle timeout above Coder's ping interval.",
    ),
    Code(
        "EDERP01", "derp", Severity.WARNING,
        "A DERP node worked only over the WebSocket fallback.",
        "A proxy drops `Upgrade: DERP`; allow it, or accept slower WebSocket relaying.",
    ),
    Code(
        "EDERP02", "derp", Severity.WARNING,
        "One node of a multi-node DERP region is not ok.",
        "The region still works through its other nodes; repair or remove the failing node.",
    ),
    Code(
        "EDERP03", "derp", Severity.ERROR,
        "A DERP region is unhealthy: its only node, or more than one of its nodes, failed.",
        "The message names the region, the nodes and why (cannot exchange messages, STUN "
        "failed). Clients homed in that region fall back to other regions or fail to connect.",
    ),
    Code(
        "ESTUN01", "derp", Severity.WARNING,
        "STUN is enabled somewhere and no STUN server answered.",
        "Open UDP 3478 (or the configured ports) in security groups and network ACLs.",
    ),
    Code(
        "ESTUN02", "derp", Severity.OK,
        "The NAT mapping varies by destination (hard NAT).",
        "Direct connections will rarely succeed from this network; traffic is relayed.",
    ),
]

_INVENTORY = [
    Code(
        "EWP01", "workspace_proxy", Severity.WARNING,
        "Some workspace proxies were not probed before the family deadline.",
        "The message lists them; raise DEPLOYHEALTH_WORKSPACE_PROXY_DEADLINE_SECONDS or "
        "DEPLOYHEALTH_PROXY_CONCURRENCY.",
    ),
    Code(
        "EWP02", "workspace_proxy", Severity.ERROR,
        "The workspace proxy inventory could not be read.",
        "Check the token (api), the database credentials (database) or the static lists.",
    ),
    Code(
        "EWP04", "workspace_proxy", Severity.WARNING,
        "A workspace proxy reported an error or warning, or could not be reached.",
        "The message names the proxy and what it said; try its /healthz-report by hand.",
        error_when="no workspace proxy is ok",
    ),
    Code(
        "EPD01", "provisioner_daemons", Severity.ERROR,
        "No provisioner daemon was seen within the last 90 seconds.",
        "Workspace builds will queue forever: check the provisioner deployment and its key.",
    ),
    Code(
        "EPD02", "provisioner_daemons", Severity.WARNING,
        "A provisioner daemon's version differs from the server's (major.minor).",
        "Upgrade the external provisioners together with the server.",
    ),
    Code(
        "EPD03", "provisioner_daemons", Severity.WARNING,
        "A provisioner daemon's API major version differs from the server's.",
        "Upgrade the external provisioners: they may fail to take jobs.",
    ),
    Code(
        "EPD04", "provisioner_daemons", Severity.ERROR,
        "The provisioner daemon inventory could not be read.",
        "The message names the source and the failure: check the token (api) or the "
        "database credentials and network path (database). Could not look is not none found.",
    ),
    Code(
        "EENT01", "entitlements", Severity.ERROR,
        "A blocking entitlement error, e.g. several replicas without high availability.",
        "Users cannot reach workspaces: scale to one replica or add an HA licence.",
    ),
    Code(
        "EENT02", "entitlements", Severity.WARNING,
        "The deployment reports entitlement warnings (licence expiring, seat limit).",
        "Renew the licence or review seat usage before it blocks users.",
    ),
    Code(
        "EENT03", "entitlements", Severity.WARNING,
        "A replica reports an error, e.g. it cannot dial its peers' relays.",
        "Check that replicas can reach each other's relay address (security groups).",
    ),
    Code(
        "EENT04", "entitlements", Severity.ERROR,
        "The entitlements or the replicas could not be read.",
        "The message names what failed: renew the token (a 401), or fix the inventory source "
        "(api or database). Could not look is not unlicensed.",
    ),
]

# Only the codes of families this version runs: a code nobody can emit is not documented.
CODES: dict[str, Code] = {
    c.code: c for c in [*_ALL, *_NETWORK, *_INVENTORY] if c.section in ("any", *FAMILIES)
}


def lookup(code: str) -> Code | None:
    return CODES.get(code.strip().upper())
