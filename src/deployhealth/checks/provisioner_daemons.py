"""provisioner_daemons: are daemons taking jobs, and do they speak the server's version?

The daemons come from the inventory (`deployhealth.inventory`); the server's version and
provisioner API version from `GET <access_url>/api/v2/buildinfo`, as Coder's own check
compares them. Only daemons seen within the last 90 s count (a daemon never seen does not).

- EPD01 (error): no daemon seen within 90 s; the message says how many stale ones exist.
- EPD02 (warning): a daemon's major.minor differs from the server's. Patch levels and build
  metadata are ignored; a `v0.0.0` or `-devel` build on either side always matches.
- EPD03 (warning): a daemon's provisioner API major version differs from the server's.
- EUNKNOWN (error): a daemon's version or API version does not parse, as in Coder; and,
  deployhealth's own case, the server's buildinfo could not be read (the versions are then
  not compared, but EPD01 is still judged).
- EPD04 (error): the inventory could not be read (token rejected, database unreachable, a
  5xx, an answer that does not parse, a 403 that is not Coder's licence answer). Could not
  look is not "found none": EPD01 is never judged then, and `items` is empty.
- ENOTCHECKED (warning): the API refused the daemon list for want of a licence (Coder's
  feature gate, as releases that gated the list answer without one) and no database is
  configured to read them from instead. With a database configured, the daemons are read
  from its `provisioner_daemons` table and judged as usual; deployhealth's own key `note`
  says so. If that read fails too, EPD04 names both.

Each item carries its daemon's own findings in `warnings`, as Coder's report does; the
section lists them again, with the daemon's name, in `warnings` or `error`. There is no
`healthy` key. `ProvisionerDaemonsActive` (metric) is the number of items.
"""

from __future__ import annotations

import re
from contextlib import closing
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from deployhealth.deadline import Deadline
from deployhealth.inventory import (
    CoderAPI,
    DatabaseInventory,
    FeatureNotLicensed,
    InventoryError,
    NothingConfigured,
    ProvisionerDaemon,
    open_inventory,
)
from deployhealth.model import Finding, Section, Severity, rfc3339, utcnow
from deployhealth.settings import Settings

ACTIVE_WINDOW = timedelta(seconds=90)

# Go's semver as Coder uses it (a leading "v"), made lenient on the "v" only.
_SEMVER = re.compile(
    r"^v?(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<pre>[0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)
_API_VERSION = re.compile(r"^(?P<major>\d+)\.(?P<minor>\d+)$")


class _Version:
    def __init__(self, text: str) -> None:
        match = _SEMVER.match(text.strip())
        if match is None:
            raise ValueError(text)
        self.text = text
        self.major = int(match["major"])
        self.minor = int(match["minor"])
        self.dev = (self.major, self.minor, int(match["patch"])) == (0, 0, 0) or (
            "devel" in (match["pre"] or "")
        )

    def matches(self, other: _Version) -> bool:
        # A development build says nothing about compatibility: Coder's VersionsMatch.
        if self.dev or other.dev:
            return True
        return (self.major, self.minor) == (other.major, other.minor)


def _api_major(text: str) -> int:
    match = _API_VERSION.match(text.strip())
    if match is None:
        raise ValueError(text)
    return int(match["major"])


@dataclass(frozen=True)
class _Inventory:
    """What reading the daemons gave: the daemons, or the finding that says why not."""

    daemons: list[ProvisionerDaemon] | None
    unread: Finding | None = None
    note: str | None = None  # where they came from, when not from the configured source


def _read(settings: Settings, deadline: Deadline) -> _Inventory:
    source = settings.inventory_source
    try:
        with closing(open_inventory(settings)) as inventory:
            return _Inventory(inventory.provisioner_daemons(deadline))
    except FeatureNotLicensed as refused:
        return _unlicensed(settings, deadline, refused)
    except NothingConfigured as exc:
        message = f"the provisioner daemons are not checked: {exc}"
        return _Inventory(None, Finding("ENOTCHECKED", message, Severity.WARNING))
    except InventoryError as exc:
        message = (
            f"cannot read the provisioner daemons ({source} inventory): {exc}: nothing is "
            "known about them"
        )
        return _Inventory(None, Finding("EPD04", message, Severity.ERROR))


def _unlicensed(
    settings: Settings, deadline: Deadline, refused: FeatureNotLicensed
) -> _Inventory:
    """The API will not list the daemons without a licence: the database can, if configured."""
    why = f"the Coder API lists provisioner daemons only with an Enterprise licence ({refused})"
    if settings.database_url is None and not settings.database_secret:
        message = (
            f"the provisioner daemons are not checked: {why}; set DEPLOYHEALTH_DATABASE_URL "
            "or DEPLOYHEALTH_DATABASE_SECRET to read them from Coder's provisioner_daemons "
            "table"
        )
        return _Inventory(None, Finding("ENOTCHECKED", message, Severity.WARNING))
    try:
        with closing(DatabaseInventory(settings)) as database:
            daemons = database.provisioner_daemons(deadline)
    except InventoryError as exc:
        message = (
            f"cannot read the provisioner daemons: {why}, and the database inventory failed: "
            f"{exc}: nothing is known about them"
        )
        return _Inventory(None, Finding("EPD04", message, Severity.ERROR))
    return _Inventory(daemons, note=f"read from the database inventory: {why}")


def probe(settings: Settings, deadline: Deadline) -> Section:
    read = _read(settings, deadline)
    if read.daemons is None:
        assert read.unread is not None
        # Nothing to compare versions with, and no verdict on how many are active; the
        # server's version is still the report's coder_version (its findings do not count).
        _, _, coder_version = _server_versions(settings, deadline, [])
        details = {"items": [], "coder_version": coder_version}
        return Section.from_findings([read.unread], details, healthy_key=False)
    daemons = read.daemons

    findings: list[Finding] = []
    server, server_api, coder_version = _server_versions(settings, deadline, findings)
    now = utcnow()
    active = sorted(
        (d for d in daemons if d.last_seen_at and now - d.last_seen_at <= ACTIVE_WINDOW),
        key=lambda d: (d.name, d.id),
    )
    items: list[dict[str, Any]] = []
    for daemon in active:
        own = _judge(daemon, server, server_api)
        findings += own
        items.append(
            {
                "provisioner_daemon": daemon.to_dict(),
                "warnings": [{"code": f.code, "message": f.message} for f in own],
            }
        )
    if not active:
        findings.insert(0, Finding("EPD01", _none_active(daemons), Severity.ERROR))
    # `coder_version` is the report's (HealthcheckReport.coder_version), taken from here.
    details: dict[str, Any] = {"items": items, "coder_version": coder_version}
    if read.note is not None:
        details["note"] = read.note
    return Section.from_findings(findings, details, healthy_key=False)


def _server_versions(
    settings: Settings, deadline: Deadline, findings: list[Finding]
) -> tuple[_Version | None, int | None, str]:
    """The server's version and API major, each None (with an EUNKNOWN) when unknown, and
    the version text buildinfo gave ("" when it could not be read)."""
    api = CoderAPI(settings.access_url, None)
    try:
        info = api.buildinfo(deadline)
    except InventoryError as exc:
        findings.append(
            Finding(
                "EUNKNOWN",
                f"cannot read the server's version ({exc}): daemon versions are not compared",
                Severity.ERROR,
            )
        )
        return None, None, ""
    finally:
        api.close()
    server: _Version | None = None
    server_api: int | None = None
    version = str(info.get("version") or "")
    api_version = str(info.get("provisioner_api_version") or "")
    try:
        server = _Version(version)
    except ValueError:
        findings.append(
            Finding(
                "EUNKNOWN",
                f"the server reports version {version!r}, which does not parse: daemon "
                "versions are not compared",
                Severity.ERROR,
            )
        )
    try:
        server_api = _api_major(api_version)
    except ValueError:
        findings.append(
            Finding(
                "EUNKNOWN",
                f"the server reports provisioner API version {api_version!r}, which does not "
                "parse: daemon API versions are not compared",
                Severity.ERROR,
            )
        )
    return server, server_api, version


def _judge(
    daemon: ProvisionerDaemon, server: _Version | None, server_api: int | None
) -> list[Finding]:
    name = daemon.name or daemon.id
    found: list[Finding] = []
    try:
        version = _Version(daemon.version)
    except ValueError:
        found.append(
            Finding(
                "EUNKNOWN",
                f"provisioner daemon {name!r} reports version {daemon.version!r}, which does "
                "not parse as a semantic version",
                Severity.ERROR,
            )
        )
    else:
        if server is not None and not version.matches(server):
            found.append(
                Finding(
                    "EPD02",
                    f"provisioner daemon {name!r} runs {daemon.version}, the server runs "
                    f"{server.text}: their major.minor versions differ",
                    Severity.WARNING,
                )
            )
    try:
        api_major = _api_major(daemon.api_version)
    except ValueError:
        found.append(
            Finding(
                "EUNKNOWN",
                f"provisioner daemon {name!r} reports API version {daemon.api_version!r}, "
                "which does not parse as MAJOR.MINOR",
                Severity.ERROR,
            )
        )
    else:
        if server_api is not None and api_major != server_api:
            found.append(
                Finding(
                    "EPD03",
                    f"provisioner daemon {name!r} speaks provisioner API {daemon.api_version}, "
                    f"major version {api_major}; the server's major version is {server_api}",
                    Severity.WARNING,
                )
            )
    return found


def _none_active(daemons: list[ProvisionerDaemon]) -> str:
    message = "no provisioner daemon was seen within the last 90 s: workspace builds will queue"
    seen = [d.last_seen_at for d in daemons if d.last_seen_at is not None]
    if not daemons:
        return message + " (the deployment has no provisioner daemons)"
    if not seen:
        return message + f" ({len(daemons)} known, never seen)"
    # The time, not "N s ago": two runs a moment apart must say the same thing.
    return message + f" ({len(daemons)} known; the most recent was seen at {rfc3339(max(seen))})"


def section_properties(section: Section) -> dict[str, Any]:
    """`provisioner_daemons_active`: the daemons seen within 90 s, when they could be listed.

    A property of the section's EMF record, not a metric (see deployhealth.metrics). Left
    out when the daemons were not read (EPD04, ENOTCHECKED): 0 would say "none".
    """
    if {"EPD04", "ENOTCHECKED"} & set(section.codes):
        return {}
    items = section.details.get("items")
    if isinstance(items, list):
        return {"provisioner_daemons_active": len(items)}
    return {}
