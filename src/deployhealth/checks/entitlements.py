"""entitlements (deployhealth's own section): is the licence blocking users?

Inputs: `GET <access_url>/api/v2/entitlements` with the Coder token, and the live replicas
from the inventory (primary, not stopped, updated within 15 s; see `Replica.is_live`).

- EENT01 (error): each entitlement error the deployment reports (several replicas without
  high availability: users cannot reach workspaces), and, checked independently of what
  the deployment says, more than one live primary while `high_availability` is
  `not_entitled`.
- EENT02 (warning): each entitlement warning the deployment reports (licence expiring,
  seat limit, ...).
- EENT03 (warning): a live replica reports an error (it cannot dial its peers' relays).
- EENT04 (error): the entitlements or the replicas could not be read (a rejected token, a
  refused connection, a database error, an answer without a `features` object).

Decisions:

- **No token** is ENOTCHECKED at *warning*, not an error and not a silent `ok`: without a
  token the entitlements cannot be read, so the section cannot vouch for the licence (hence
  not `ok`), but a deployment is not broken because its watcher lacks a credential, and an
  error would fail readiness for every deployment that chooses not to give one (hence not
  an error). The message says what is not checked and how to fix it; the replicas are
  still read and reported (EENT03 still applies) when an inventory source is available.
- **The entitlements or the replicas cannot be read** (401, a refused connection, a
  database error) is EENT04 at error, naming the source: a token was given, so the check
  was meant to run,
  and a licence that cannot be seen cannot be vouched for. An entitlements answer without
  a `features` object is the same: reading a missing `high_availability` as not_entitled
  would turn "could not look" into a licence verdict.
- **No licence** is not a problem in itself: Coder answers the entitlements (never gated)
  with `has_license` false and every feature not_entitled, and a single live replica needs
  none of them, so the section is ok. Several live replicas still make EENT01.
- `replicas` lists the live replicas, sorted by host name. With the `api` inventory source
  their `version` and `updated_at` are null: Coder's replicas API does not expose them.
- Coder's entitlement warnings appear as EENT02 entries in `warnings` (the section's own
  key), and its errors both in `errors` (Coder's strings) and as EENT01 in `error`.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import closing
from typing import Any

from deployhealth.deadline import Deadline
from deployhealth.inventory import (
    CoderAPI,
    InventoryError,
    NothingConfigured,
    Replica,
    live_replicas,
    open_inventory,
)
from deployhealth.model import Finding, Section, Severity, rfc3339
from deployhealth.settings import Settings, SettingsError


def probe(settings: Settings, deadline: Deadline) -> Section:
    findings: list[Finding] = []
    details: dict[str, Any] = {
        "has_license": None,
        "replicas": [],
        "errors": [],
        "high_availability": {"entitlement": None, "enabled": None},
    }

    live = _live_replicas(settings, deadline, findings)
    if live is not None:
        details["replicas"] = [_replica(r) for r in live]

    entitlements = _entitlements(settings, deadline, findings, live)
    if entitlements is not None and not isinstance(entitlements.get("features"), Mapping):
        findings.append(
            Finding(
                "EENT04",
                "cannot judge the entitlements: GET /api/v2/entitlements answered without a "
                "features object",
                Severity.ERROR,
            )
        )
        entitlements = None
    if entitlements is not None:
        errors = _strings(entitlements.get("errors"))
        warnings = _strings(entitlements.get("warnings"))
        ha = _feature(entitlements, "high_availability")
        details.update(
            has_license=bool(entitlements.get("has_license", False)),
            errors=errors,
            high_availability={
                "entitlement": str(ha.get("entitlement") or "not_entitled"),
                "enabled": bool(ha.get("enabled", False)),
            },
        )
        findings += [Finding("EENT01", e, Severity.ERROR) for e in errors]
        findings += [Finding("EENT02", w, Severity.WARNING) for w in warnings]
        not_entitled = details["high_availability"]["entitlement"] == "not_entitled"
        if live is not None and len(live) > 1 and not_entitled:
            hosts = ", ".join(r.hostname for r in live)
            findings.append(
                Finding(
                    "EENT01",
                    f"{len(live)} live primary replicas ({hosts}) while high_availability is "
                    "not_entitled: users will be unable to connect to workspaces; scale to "
                    "one replica or add a licence with high availability",
                    Severity.ERROR,
                )
            )

    for replica in live or []:
        if replica.error.strip():
            findings.append(
                Finding(
                    "EENT03",
                    f"replica {replica.hostname} reports: {replica.error.strip()}",
                    Severity.WARNING,
                )
            )
    return Section.from_findings(findings, details)


def _live_replicas(
    settings: Settings, deadline: Deadline, findings: list[Finding]
) -> list[Replica] | None:
    source = settings.inventory_source
    try:
        with closing(open_inventory(settings)) as inventory:
            replicas = inventory.replicas(deadline)
    except NothingConfigured:
        # Only without a token, and then the entitlements' own ENOTCHECKED says what to set.
        return None
    except InventoryError as exc:
        findings.append(
            Finding(
                "EENT04", f"cannot read the replicas ({source} inventory): {exc}", Severity.ERROR
            )
        )
        return None
    return sorted(live_replicas(replicas), key=lambda r: (r.hostname, r.id))


def _entitlements(
    settings: Settings,
    deadline: Deadline,
    findings: list[Finding],
    live: list[Replica] | None,
) -> Mapping[str, Any] | None:
    try:
        api = CoderAPI.for_settings(settings)
    except InventoryError as exc:
        findings.append(Finding("EENT04", f"cannot read the entitlements: {exc}", Severity.ERROR))
        return None
    try:
        if not api.token:
            findings.append(Finding("ENOTCHECKED", _no_token(live), Severity.WARNING))
            return None
        return api.entitlements(deadline)
    except (InventoryError, SettingsError) as exc:
        findings.append(Finding("EENT04", f"cannot read the entitlements: {exc}", Severity.ERROR))
        return None
    finally:
        api.close()


def _no_token(live: list[Replica] | None) -> str:
    message = (
        "the entitlements are not checked: no Coder API token is configured (set "
        "DEPLOYHEALTH_CODER_TOKEN or DEPLOYHEALTH_CODER_TOKEN_SECRET)"
    )
    if live is not None and len(live) > 1:
        message += (
            f"; {len(live)} live primary replicas are running, and whether high "
            "availability is licensed for them is unknown"
        )
    return message


def _feature(entitlements: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    features = entitlements.get("features")
    feature = features.get(name) if isinstance(features, Mapping) else None
    return feature if isinstance(feature, Mapping) else {}


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [str(v) for v in value if str(v).strip()]


def _replica(replica: Replica) -> dict[str, Any]:
    latency = replica.database_latency_us
    return {
        "hostname": replica.hostname,
        "region_id": replica.region_id,
        "version": replica.version,
        "error": replica.error,
        "updated_at": None if replica.updated_at is None else rfc3339(replica.updated_at),
        "database_latency_ms": None if latency is None else round(latency / 1000.0, 3),
    }
