"""derp: every DERP relay node passes a packet between two fresh clients; STUN answers.

Input is a DERP map in Tailscale's JSON shape, from `DEPLOYHEALTH_DERP_MAP` (inline JSON,
a file, or an http(s) URL) or, when none is set, Coder's default: region 999, the embedded
relay at the access URL, plus one STUN-only region per configured STUN server (1000, ...).

What runs, all at once (the family costs about its slowest node, not their sum): every
node's job starts together, however large the map, up to a ceiling (`job_ceiling`) that
only a map of hundreds of nodes reaches, set by the open-files limit and a thread budget:

- per DERP node, two clients connect (raw `Upgrade: DERP`, WebSocket fallback on a 4xx;
  see deployhealth.derpclient); the first sends a one-byte packet to the second every
  second until it arrives from the right key. `round_trip_ping` is the time from the last
  send to the receipt;
- one STUN session (deployhealth.stunclient) asks every STUN-enabled node for our mapped
  address from a single UDP socket: the node's own STUN verdict and, across servers at
  different IPs, netcheck's `MappingVariesByDestIP` (hard NAT).

Every node has 10 s, clipped by the family deadline; the section is assembled shortly
before the deadline from what has finished, and a node still running is reported as not
finished. Verdicts follow checks.md ("derp") and Coder's derphealth package; the report
keeps Coder's keys and Tailscale's Go field names so Coder's readers parse it.

A configured map that cannot be read (a missing file, bad JSON, a map URL that fails or
points at instance metadata) is EUNKNOWN at error: the check cannot run, and saying so
beats checking nothing and passing. Map URLs are shown without query or user info.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from deployhealth.deadline import Deadline, DeadlineExceeded
from deployhealth.derpclient import DerpClient, DerpError, NodeTarget
from deployhealth.model import Finding, Section, Severity
from deployhealth.net import AddressCheck, blocked_address_check, open_files_limit
from deployhealth.settings import BLOCKED_NETWORKS, Settings
from deployhealth.stunclient import StunResult, StunRun, StunTarget, probe_all
from deployhealth.wire import derp as wire
from deployhealth.wire.stun import DEFAULT_PORT as STUN_DEFAULT_PORT

NODE_SECONDS = 10.0
SEND_INTERVAL_SECONDS = 1.0
# Each DERP node's job holds two TCP sockets and two threads (the sender's and the
# receiver's) while it runs; the STUN job one UDP socket and one thread. The jobs may use
# a quarter of the open-files limit (the rest is for the other families of a `check` and
# the process itself: 128 nodes at once under Lambda's 1,024) and at most JOB_THREADS
# threads (their stacks are what the family's memory grows with; Lambda allows 1,024
# threads in all).
SOCKETS_PER_JOB = 2
THREADS_PER_JOB = 2
JOB_THREADS = 512
MAP_CAP = 1024 * 1024
MAP_FETCH_TIMEOUT_SECONDS = 5.0
# The section is put together this long before the family deadline, and nodes stop this
# much earlier still, so that the runner never has to abandon the family.
ASSEMBLE_MARGIN_SECONDS = 0.25
NODE_MARGIN_SECONDS = 0.25

EMBEDDED_REGION_ID = 999
FIRST_STUN_REGION_ID = 1000

WEBSOCKET_WARNING = (
    'works only over the WebSocket fallback: the "Upgrade: DERP" header may be blocked by a '
    "load balancer or proxy in front of it (WebSocket relaying is slower)"
)
NO_STUN_WARNING = (
    "no STUN server answered: UDP to the STUN ports may be blocked, so clients cannot learn "
    "their public address and direct connections will fail (traffic is relayed)"
)
HARD_NAT_MESSAGE = (
    "STUN servers at different IPs saw different public addresses for the same local socket: "
    "this network is behind a hard NAT, so direct connections will rarely work"
)


class MapError(Exception):
    """The configured DERP map cannot be read or is not a DERP map."""


# --- the DERP map ----------------------------------------------------------------------------


def default_map(settings: Settings) -> tuple[dict[str, Any], list[str]]:
    """Coder's default map for these settings, and notes on what was left out."""
    regions: dict[str, Any] = {}
    notes: list[str] = []
    access = (settings.access_url or "").strip()
    parts = urlsplit(access)
    host = parts.hostname
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
        host = None
    if not access:
        notes.append("no access URL configured: the embedded relay (region 999) is not checked")
    elif scheme not in ("http", "https") or not host:
        notes.append(
            f"the access URL {access!r} does not parse as an absolute http(s) URL: the "
            "embedded relay (region 999) is not checked (see the access_url section)"
        )
    else:
        regions[str(EMBEDDED_REGION_ID)] = {
            "EmbeddedRelay": True,
            "RegionID": EMBEDDED_REGION_ID,
            "RegionCode": "coder",
            "RegionName": "Coder Embedded Relay",
            "Nodes": [
                {
                    "Name": f"{EMBEDDED_REGION_ID}b",
                    "RegionID": EMBEDDED_REGION_ID,
                    "HostName": host,
                    "DERPPort": port or (443 if scheme == "https" else 80),
                    "STUNPort": -1,
                    "ForceHTTP": scheme == "http",
                }
            ],
        }
    for index, server in enumerate(settings.stun_servers):
        stun_host, _sep, stun_port = server.rpartition(":")
        region_id = FIRST_STUN_REGION_ID + index
        regions[str(region_id)] = {
            "EmbeddedRelay": False,
            "RegionID": region_id,
            "RegionCode": f"coder_stun{index}",
            "RegionName": f"Coder STUN {index}",
            "Nodes": [
                {
                    "Name": f"{region_id}stun0",
                    "RegionID": region_id,
                    "HostName": stun_host.strip("[]"),
                    "STUNOnly": True,
                    "STUNPort": int(stun_port),
                }
            ],
        }
    return {"Regions": regions}, notes


def load_map(
    settings: Settings, deadline: Deadline, check_address: AddressCheck
) -> tuple[dict[str, Any], str, list[str]]:
    """(map, where it came from, notes). Raises MapError for a configured map that fails."""
    text = (settings.derp_map or "").strip()
    if not text:
        derp_map, notes = default_map(settings)
        return derp_map, "default", notes
    if text.startswith("{"):
        source = "inline JSON"
        raw = text.encode()
    elif text.lower().startswith(("http://", "https://")):
        source = shown_url(text)
        raw = _fetch_map(text, deadline, check_address)
    else:
        source = text
        raw = _read_map_file(Path(text))
    try:
        derp_map = json.loads(raw)
    except ValueError as exc:
        raise MapError(f"the DERP map from {source} is not valid JSON: {exc}") from None
    except RecursionError:
        raise MapError(f"the DERP map from {source} is nested too deeply") from None
    if not isinstance(derp_map, dict) or not isinstance(derp_map.get("Regions"), dict):
        raise MapError(
            f"the DERP map from {source} has no \"Regions\" object (expected Tailscale's "
            'DERPMap JSON: {"Regions": {"1": {"RegionID": 1, "Nodes": [...]}}})'
        )
    return derp_map, source, []


def _source_of(setting: str | None) -> str:
    text = (setting or "").strip()
    if not text:
        return "default"
    if text.startswith("{"):
        return "inline JSON"
    if text.lower().startswith(("http://", "https://")):
        return shown_url(text)
    return text


def _read_map_file(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAP_CAP + 1)
    except OSError as exc:
        reason = exc.strerror or exc
        raise MapError(f"cannot read the DERP map file {str(path)!r}: {reason}") from None
    if len(raw) > MAP_CAP:
        raise MapError(f"the DERP map file {str(path)!r} is larger than {MAP_CAP} bytes")
    return raw


def _fetch_map(url: str, deadline: Deadline, check_address: AddressCheck) -> bytes:
    """GET the map with requests, the whole fetch bounded by its budget.

    Socket timeouts bound each read, not the answer: a server trickling a byte at a time
    could hold requests for ever. So the fetch runs on a daemon thread and is abandoned
    (reported as too slow) when its budget ends; its own timeouts end it later.
    """
    shown = shown_url(url)
    try:
        # Leaves the family time to put the section together before its own deadline.
        budget = Deadline(deadline.at - ASSEMBLE_MARGIN_SECONDS).timeout(MAP_FETCH_TIMEOUT_SECONDS)
    except DeadlineExceeded:
        raise MapError(f"no time left to fetch the DERP map from {shown}") from None
    outcome: list[bytes | MapError] = []
    done = threading.Event()

    def fetch() -> None:
        try:
            outcome.append(_get_map(url, shown, deadline.sooner(budget), check_address))
        except MapError as exc:
            outcome.append(exc)
        except Exception as exc:
            detail = _scrub(f"{type(exc).__name__}: {exc}", url)
            outcome.append(MapError(f"GET {shown} failed: {detail}"))
        finally:
            done.set()

    threading.Thread(target=fetch, name="derp-map-fetch", daemon=True).start()
    if not done.wait(budget):
        raise MapError(f"fetching the DERP map from {shown} took longer than {budget:.1f} s")
    result = outcome[0]
    if isinstance(result, MapError):
        raise result
    return result


def _get_map(url: str, shown: str, budget: Deadline, check_address: AddressCheck) -> bytes:
    import requests

    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise MapError(f"the DERP map URL {shown!r} has no host")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise MapError(f"the DERP map URL {shown!r} has an invalid port") from None
    # requests resolves again when it connects; this check stops a map URL that points at
    # instance metadata, which is what the guard is for, not a resolver that changes its mind.
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise MapError(f"cannot resolve the DERP map host {host}: {exc}") from None
    for info in infos:
        why = check_address(str(info[4][0]))
        if why is not None:
            raise MapError(f"not fetching the DERP map from {shown}: {why}")
    # A little past the budget: the caller's wait, not requests, reports a slow server, so
    # the message is the same however the time ran out.
    timeout = budget.remaining() + 1.0
    try:
        response = requests.get(
            url,
            timeout=(timeout, timeout),
            stream=True,
            allow_redirects=False,
            headers={"User-Agent": "deployhealth/0.1 (+derp check)", "Accept": "application/json"},
        )
    except requests.RequestException as exc:
        detail = _scrub(f"{type(exc).__name__}: {exc}", url)
        raise MapError(f"GET {shown} failed: {detail}") from None
    with response:
        if response.status_code != 200:
            raise MapError(
                f"GET {shown} answered {response.status_code} {response.reason} instead of the "
                "DERP map" + (" (redirects are not followed)" if response.is_redirect else "")
            )
        body = bytearray()
        try:
            for chunk in response.iter_content(64 * 1024):
                body += chunk
                if len(body) > MAP_CAP:
                    raise MapError(f"the DERP map at {shown} is larger than {MAP_CAP} bytes")
        except requests.RequestException as exc:
            detail = _scrub(str(exc), url)
            raise MapError(f"reading the DERP map from {shown} failed: {detail}") from None
    return bytes(body)


def shown_url(url: str) -> str:
    """The URL for messages and the report: no user info, no query (either may hold a token)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" + ("?..." if parts.query else "")


def _scrub(text: str, url: str) -> str:
    parts = urlsplit(url)
    for secret in (parts.query, parts.netloc.rpartition("@")[0]):
        if secret:
            text = text.replace(secret, "...")
    return text


@dataclass
class _Region:
    id: int
    raw: dict[str, Any]
    nodes: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return str(self.raw.get("RegionName") or self.raw.get("RegionCode") or self.id)


def _regions(derp_map: dict[str, Any]) -> list[_Region]:
    regions = []
    for key, raw in derp_map["Regions"].items():
        if not isinstance(raw, dict):
            raise MapError(f"DERP map region {key!r} is not an object")
        region_id = raw.get("RegionID", key)
        try:
            region_id = int(region_id)
        except (TypeError, ValueError):
            raise MapError(
                f"DERP map region {key!r} has RegionID {region_id!r}, not a number"
            ) from None
        nodes = raw.get("Nodes") or []
        if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
            raise MapError(f"DERP map region {region_id}: Nodes is not a list of objects")
        for index, node in enumerate(nodes):
            if not isinstance(node.get("Name", ""), str):
                raise MapError(
                    f"DERP map region {region_id}: node {index} has a Name that is not text"
                )
            stun_port = node.get("STUNPort", 0)
            if not isinstance(stun_port, int) or isinstance(stun_port, bool):
                raise MapError(
                    f"DERP map region {region_id}: node {node.get('Name', index)!r} has "
                    f"STUNPort {stun_port!r}, not a number"
                )
        nodes = sorted(nodes, key=lambda n: str(n.get("Name", "")))
        # The report shows the region as Coder's tailcfg.DERPRegion: its required keys at
        # Go's zero values when the configured map leaves them out.
        shown = {**_REGION_ZERO, **raw, "Nodes": [tailcfg_node(n) for n in nodes]}
        regions.append(_Region(region_id, shown, nodes))
    return sorted(regions, key=lambda r: r.id)


# tailcfg.DERPRegion's and tailcfg.DERPNode's keys without omitempty (typesGenerated.ts
# TailDERPRegion, TailDERPNode), at Go's zero values.
_REGION_ZERO: dict[str, Any] = {
    "EmbeddedRelay": False, "RegionID": 0, "RegionCode": "", "RegionName": "",
}
_NODE_ZERO: dict[str, Any] = {"Name": "", "RegionID": 0, "HostName": ""}


def tailcfg_node(node: dict[str, Any]) -> dict[str, Any]:
    """A map node as Coder's report shows a tailcfg.DERPNode: its required keys always there."""
    return {**_NODE_ZERO, **node}


def server_info_message(info: dict[str, Any]) -> dict[str, int]:
    """Tailscale's derp.ServerInfoMessage from the server's ServerInfo JSON.

    The server sends `{"version": 2}` and, when it rate-limits, `TokenBucketBytesPerSecond`
    and `TokenBucketBytesBurst`; Coder's node report carries only those two, always, 0 when
    the server does not say (Tailscale: "zero means unspecified"). Go's decoder matches keys
    without regard to case, so this does too.

    >>> server_info_message({"version": 2, "tokenbucketbytesburst": 4096})
    {'TokenBucketBytesPerSecond': 0, 'TokenBucketBytesBurst': 4096}
    """
    folded = {str(k).lower(): v for k, v in info.items()}

    def number(key: str) -> int:
        value = folded.get(key.lower())
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return {
        "TokenBucketBytesPerSecond": number("TokenBucketBytesPerSecond"),
        "TokenBucketBytesBurst": number("TokenBucketBytesBurst"),
    }


# --- probing -------------------------------------------------------------------------------


@dataclass
class _Exchange:
    """What the two DERP clients of one node found."""

    can_exchange: bool = False
    rtt: float | None = None
    uses_websocket: bool = False
    server_info: dict[str, Any] = field(default_factory=dict)
    client_logs: list[list[str]] = field(default_factory=lambda: [[], []])
    client_errs: list[list[str]] = field(default_factory=lambda: [[], []])
    error: str | None = None


def exchange(node: dict[str, Any], deadline: Deadline, check_address: AddressCheck) -> _Exchange:
    """Two clients; the second (sender) sends to the first (receiver) until it arrives."""
    result = _Exchange()
    try:
        target = NodeTarget.from_node(node)
    except DerpError as exc:
        result.error = str(exc)
        result.client_errs[0].append(str(exc))
        return result

    clients: list[DerpClient | None] = [None, None]
    lock = threading.Lock()
    abandoned = False

    def connect(index: int) -> None:
        try:
            client = DerpClient.connect(
                target, deadline, check_address=check_address, log=result.client_logs[index].append
            )
        except DerpError as exc:
            result.client_errs[index].append(f"connect to derp: {exc}")
            return
        with lock:
            if abandoned:
                client.close()  # the probe gave up on this client: nobody else will close it
            else:
                clients[index] = client

    # The receiver connects on a helper thread while the sender connects here: the two
    # handshakes overlap, so a node 50 ms away costs one handshake of latency, not two.
    helper = threading.Thread(target=connect, args=(0,), name="derp-receiver", daemon=True)
    helper.start()
    connect(1)
    helper.join(max(0.0, deadline.remaining()) + 0.1)
    with lock:
        abandoned = helper.is_alive()
        receiver, sender = clients
    try:
        if receiver is None or sender is None or abandoned:
            errors = [e for errs in result.client_errs for e in errs]
            result.error = errors[0] if errors else "connect to derp: did not finish in time"
            result.uses_websocket = any(c is not None and c.uses_websocket for c in clients)
            return result
        result.uses_websocket = receiver.uses_websocket or sender.uses_websocket
        result.server_info = receiver.server_info
        _send_until_received(receiver, sender, deadline, result)
    except DerpError as exc:
        result.error = str(exc)
    finally:
        for client in clients:
            if client is not None:
                client.close()
    return result


def _send_until_received(
    receiver: DerpClient, sender: DerpClient, deadline: Deadline, result: _Exchange
) -> None:
    sent = 0
    while not deadline.expired:
        last_send = time.monotonic()
        try:
            sender.send_packet(receiver.public_key, bytes([sent % 256]), deadline)
        except DerpError as exc:
            result.client_errs[1].append(f"send derp message: {exc}")
            raise
        sent += 1
        window = deadline.sooner(SEND_INTERVAL_SECONDS)
        while True:
            try:
                message = receiver.recv(window)
            except DerpError as exc:
                result.client_errs[0].append(f"recv derp message: {exc}")
                raise
            if message is None:
                break  # a second went by: send again
            if isinstance(message, wire.RecvPacket):
                if message.source == sender.public_key:
                    result.rtt = time.monotonic() - last_send
                    result.can_exchange = True
                    return
                result.client_errs[0].append(
                    f"received a packet from an unknown peer {message.source.hex()[:16]}..."
                )
            elif isinstance(message, wire.PeerGone):
                receiver.log(f"peer gone: {message.key.hex()[:16]}... (reason {message.reason})")
    waited = "before the deadline" if sent else "(no time left to send)"
    result.error = (
        f"the receiving client got no packet from the sending client {waited}: "
        f"{sent} sent, none relayed"
    )
    result.client_errs[0].append(result.error)


def _run_jobs(
    jobs: dict[Hashable, Callable[[], Any]], until: float, workers: int
) -> dict[Hashable, Any]:
    """Run jobs on at most `workers` daemon threads; results of those done by `until`.

    A job that raises yields its exception. Daemon threads, not an executor: a job stuck
    in a DNS lookup must not hold the process (or the Lambda invocation) at exit.
    """
    results: dict[Hashable, Any] = {}
    lock = threading.Condition()
    work: queue.SimpleQueue[tuple[Hashable, Callable[[], Any]]] = queue.SimpleQueue()
    for item in jobs.items():
        work.put(item)

    def worker() -> None:
        while True:
            try:
                key, job = work.get_nowait()
            except queue.Empty:
                return
            if time.monotonic() >= until:
                continue  # too late to start: reported as not finished
            try:
                value: Any = job()
            except Exception as exc:
                value = exc
            with lock:
                results[key] = value
                lock.notify_all()

    for index in range(max(1, min(workers, len(jobs)))):
        threading.Thread(target=worker, name=f"derp-job-{index}", daemon=True).start()
    with lock:
        lock.wait_for(lambda: len(results) == len(jobs), timeout=max(0.0, until - time.monotonic()))
        return dict(results)


def job_ceiling() -> int:
    """How many jobs may run at once: every node's, unless the map outgrows the process.

    A quarter of the open-files limit in sockets, and JOB_THREADS threads; at least one.
    """
    by_threads = JOB_THREADS // THREADS_PER_JOB
    files = open_files_limit()
    if files is None:
        return by_threads
    return max(1, min(by_threads, files // 4 // SOCKETS_PER_JOB))


# --- the family ----------------------------------------------------------------------------


def probe(settings: Settings, deadline: Deadline) -> Section:
    check_address = blocked_address_check(settings.ssrf_allow, BLOCKED_NETWORKS)
    try:
        derp_map, source, notes = load_map(settings, deadline, check_address)
        regions = _regions(derp_map)
    except MapError as exc:
        details = {
            "regions": {},
            "netcheck_logs": [],
            "derp_map_source": _source_of(settings.derp_map),
        }
        return Section.from_findings(
            [Finding("EUNKNOWN", f"the DERP check cannot run: {exc}", Severity.ERROR)], details
        )

    assemble_at = deadline.at - ASSEMBLE_MARGIN_SECONDS
    node_deadline = Deadline(
        min(assemble_at - NODE_MARGIN_SECONDS, time.monotonic() + NODE_SECONDS)
    )

    stun_targets: list[StunTarget] = []
    jobs: dict[Hashable, Callable[[], Any]] = {}
    for region in regions:
        for index, node in enumerate(region.nodes):
            key = (region.id, index)
            stun = _stun_target(key, region, node)
            if isinstance(stun, StunTarget):
                stun_targets.append(stun)
            if not node.get("STUNOnly"):
                jobs[("derp", key)] = (
                    lambda n=node: exchange(n, node_deadline, check_address)
                )
    if stun_targets:
        jobs["stun"] = lambda: probe_all(stun_targets, node_deadline, check_address=check_address)
    results = _run_jobs(jobs, assemble_at, min(len(jobs), job_ceiling()))

    stun_run = results.get("stun")
    if not isinstance(stun_run, StunRun):
        stun_run = None
    stun_failure = _job_failure(results, "stun", bool(stun_targets))

    region_reports: dict[str, Any] = {}
    findings: list[Finding] = []
    failed_regions: list[str] = []
    severities: list[Severity] = []
    healthy = True
    stun_enabled = stun_capable = 0
    for region in regions:
        node_reports = []
        for index, node in enumerate(region.nodes):
            key = (region.id, index)
            outcome = results.get(("derp", key))
            if node.get("STUNOnly"):
                exchanged = None
            elif isinstance(outcome, _Exchange):
                exchanged = outcome
            else:
                exchanged = _Exchange(error=_job_failure(results, ("derp", key), True))
            stun_report = _stun_report(key, region, node, stun_run, stun_failure)
            stun_enabled += stun_report["Enabled"]
            stun_capable += stun_report["CanSTUN"]
            node_reports.append(_node_report(region, node, exchanged, stun_report))
        report, region_findings = _region_report(region, node_reports)
        region_reports[str(region.id)] = report
        findings += region_findings
        if report["severity"] == Severity.ERROR.value:
            failed_regions.append(_region_failure(region, report))
        severities.append(Severity(report["severity"]))
        healthy = healthy and report["healthy"]

    netcheck, netcheck_logs = _netcheck(regions, stun_targets, stun_run)
    if stun_enabled and not stun_capable:
        findings.append(Finding("ESTUN01", NO_STUN_WARNING, Severity.WARNING))
    if netcheck["MappingVariesByDestIP"] is True:
        findings.append(Finding("ESTUN02", HARD_NAT_MESSAGE, Severity.OK))
    if failed_regions:
        # One line, for a pager or an alarm: every region at error, its nodes and why.
        count = f"{len(failed_regions)} of {len(regions)} regions are unhealthy: " if len(
            failed_regions
        ) > 1 else ""
        findings.append(Finding("EDERP03", count + " | ".join(failed_regions), Severity.ERROR))
    if not regions:
        findings.append(Finding("ENOTCHECKED", _nothing_to_check(source, notes), Severity.WARNING))
    severity = Severity.worst([*severities, *(f.severity for f in findings)])
    details = {
        "regions": region_reports,
        "netcheck": netcheck,
        "netcheck_logs": [*notes, *netcheck_logs],
        "derp_map_source": source,
    }
    if stun_targets and stun_run is None:
        # omitempty in Coder's type: the key is there only when there is an error.
        details["netcheck_err"] = stun_failure or "the STUN probe gave no result"
    # Coder leaves the section's `error` empty and the cause deep in the node reports; here
    # each region at error is one EDERP03 line in `error`, where /readyz and on-call look.
    section = Section.from_findings(findings, details, healthy=healthy)
    section.severity = severity
    return section


def _region_failure(region: _Region, report: dict[str, Any]) -> str:
    """A region at error, for EDERP03: which nodes are not ok and why."""
    nodes = report["node_reports"]
    failing = [r for r in nodes if r["severity"] != Severity.OK.value]
    causes = "; ".join(f"node {r['node'].get('Name', '')}: {_why(r)}" for r in failing)
    count = f"{len(failing)} of {len(nodes)} nodes are not ok: " if len(nodes) > 1 else ""
    return f"region {region.id} ({region.name}) is unhealthy: {count}{causes}"


def _why(node_report: dict[str, Any]) -> str:
    if "error" in node_report:
        return str(node_report["error"])
    return "; ".join(w["message"] for w in node_report["warnings"]) or "not ok"


def _nothing_to_check(source: str, notes: list[str]) -> str:
    if source == "default":
        why = "; ".join(notes) or "the default DERP map is empty"
        return (
            f"no DERP relay or STUN server was checked: {why}; set DEPLOYHEALTH_ACCESS_URL "
            "for the embedded relay, or DEPLOYHEALTH_DERP_MAP / DEPLOYHEALTH_STUN_SERVERS"
        )
    return (
        f"no DERP relay or STUN server was checked: the DERP map from {source} has no "
        "regions; point DEPLOYHEALTH_DERP_MAP at the deployment's map"
    )


def _job_failure(results: dict[Hashable, Any], key: Hashable, expected: bool) -> str | None:
    if not expected:
        return None
    value = results.get(key)
    if key not in results:
        return "did not finish before the family deadline"
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return None


def _stun_target(
    key: tuple[int, int], region: _Region, node: dict[str, Any]
) -> StunTarget | str | None:
    """Where to send STUN for this node: None when disabled, a reason text when invalid."""
    port = node.get("STUNPort", 0)
    if port == -1:
        return None
    port = port or STUN_DEFAULT_PORT
    name = str(node.get("Name", ""))
    if not 0 < port < 65536:
        return f"invalid STUN port {port}"
    host = str(node.get("STUNTestIP") or node.get("HostName") or node.get("IPv4") or "")
    host = host or str(node.get("IPv6") or "")
    if not host:
        return "no STUN address: the node has no STUNTestIP, HostName, IPv4 or IPv6"
    return StunTarget(key, host, int(port), label=f"{name} (region {region.id})")


def _stun_report(
    key: tuple[int, int],
    region: _Region,
    node: dict[str, Any],
    run: StunRun | None,
    failure: str | None,
) -> dict[str, Any]:
    target = _stun_target(key, region, node)
    if target is None:
        return {"Enabled": False, "CanSTUN": False, "Error": None}
    if isinstance(target, str):
        return {"Enabled": True, "CanSTUN": False, "Error": f"get stun addr: {target}"}
    result: StunResult | None = run.results.get(target.key) if run is not None else None
    if result is None:
        return {"Enabled": True, "CanSTUN": False, "Error": f"probe stun: {failure or 'no result'}"}
    if result.answered:
        return {"Enabled": True, "CanSTUN": True, "Error": None}
    return {"Enabled": True, "CanSTUN": False, "Error": f"probe stun: {result.error}"}


def _node_report(
    region: _Region,
    node: dict[str, Any],
    exchanged: _Exchange | None,
    stun: dict[str, Any],
) -> dict[str, Any]:
    stun_only = bool(node.get("STUNOnly"))
    result = exchanged or _Exchange()
    name = str(node.get("Name", ""))
    severity = Severity.OK
    healthy = True
    warnings: list[Finding] = []
    errors: list[str] = []
    if not stun_only and not result.can_exchange:
        errors.append(f"cannot exchange messages: {result.error or 'unknown failure'}")
    if stun["Error"] is not None:
        errors.append(f"STUN failed: {stun['Error']}")
    if errors:
        healthy = False
        severity = Severity.ERROR
    if result.uses_websocket:
        # Coder's rule, kept for compatibility: a node on the WebSocket fallback is a
        # warning, even when it failed in other ways (the error text still says so).
        warnings.append(
            Finding("EDERP01", f"[{region.name}] node {name} {WEBSOCKET_WARNING}", Severity.WARNING)
        )
        severity = Severity.WARNING
    rtt = result.rtt
    report: dict[str, Any] = {
        "healthy": healthy,
        "severity": severity.value,
        "warnings": _messages(warnings),
        "node": tailcfg_node(node),
        "node_info": server_info_message(result.server_info),
        "can_exchange_messages": result.can_exchange,
        "round_trip_ping": go_duration(rtt) if rtt is not None else "",
        "round_trip_ping_ms": int(rtt * 1000) if rtt is not None else 0,
        "uses_websocket": result.uses_websocket,
        "client_logs": [] if stun_only else result.client_logs,
        "client_errs": [] if stun_only else result.client_errs,
        "stun": stun,
        # deployhealth's own: the round trip unrounded, for `derp_regions` (see
        # section_properties).
        "round_trip_ping_ms_exact": round(rtt * 1000, 3) if rtt is not None else None,
    }
    if errors:
        report["error"] = "; ".join(errors)
    report["_findings"] = warnings
    return report


def _region_report(
    region: _Region, node_reports: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[Finding]]:
    findings: list[Finding] = []
    for report in node_reports:
        findings += report.pop("_findings")
    severity = Severity.OK
    healthy = True
    error: str | None = None
    not_ok = [r for r in node_reports if r["severity"] != Severity.OK.value]
    if len(node_reports) == 1:
        only = node_reports[0]
        severity = Severity(only["severity"])
        healthy = severity is not Severity.ERROR
        if "error" in only:
            error = f"node {only['node'].get('Name', '')}: {only['error']}"
    elif len(not_ok) == 1:
        bad = not_ok[0]
        severity = Severity.WARNING
        why = bad.get("error") or "; ".join(w["message"] for w in bad["warnings"])
        findings.append(
            Finding(
                "EDERP02",
                f"[{region.name}] region is operational, but performance might be degraded as "
                f"one node is unhealthy: {bad['node'].get('Name', '')}: {why}",
                Severity.WARNING,
            )
        )
    elif len(not_ok) > 1:
        healthy = False
        severity = Severity.worst(Severity(r["severity"]) for r in not_ok)
        error = f"{len(not_ok)} of {len(node_reports)} nodes are not ok: " + "; ".join(
            f"{r['node'].get('Name', '')}: {r.get('error') or 'warning'}" for r in not_ok
        )
    report: dict[str, Any] = {
        "healthy": healthy,
        "severity": severity.value,
        "warnings": _messages(findings),
        "region": region.raw,
        "node_reports": node_reports,
    }
    if error is not None:
        report["error"] = error
    return report, findings


def _messages(findings: list[Finding]) -> list[dict[str, str]]:
    return [{"code": f.code, "message": f.message} for f in findings]


def _netcheck(
    regions: list[_Region], targets: list[StunTarget], run: StunRun | None
) -> tuple[dict[str, Any], list[str]]:
    """The fields of Tailscale's netcheck.Report that one STUN session can fill."""
    answered = [r for r in run.results.values() if r.answered] if run is not None else []
    v4 = [r for r in answered if r.server_ip and ":" not in r.server_ip]
    v6 = [r for r in answered if r.server_ip and ":" in r.server_ip]
    latency: dict[str, int] = {}
    by_version: dict[int, dict[str, int]] = {4: {}, 6: {}}
    for result in answered:
        region_id = str(result.target.key[0])  # type: ignore[index]
        nanos = int((result.rtt or 0.0) * 1e9)
        version = 6 if ":" in (result.server_ip or "") else 4
        for table in (latency, by_version[version]):
            table[region_id] = min(table.get(region_id, nanos), nanos)
    derp_regions = {str(r.id) for r in regions if any(not n.get("STUNOnly") for n in r.nodes)}
    preferred = min(
        (rid for rid in latency if rid in derp_regions), key=lambda rid: latency[rid], default=None
    )
    report: dict[str, Any] = {
        "UDP": bool(answered),
        "IPv6": bool(v6),
        "IPv4": bool(v4),
        "IPv6CanSend": run is not None and 6 in run.sent,
        "IPv4CanSend": run is not None and 4 in run.sent,
        "OSHasIPv6": socket.has_ipv6,
        "ICMPv4": False,
        "MappingVariesByDestIP": _varies(v4) if len(v4) >= len(v6) else _varies(v6),
        "HairPinning": None,
        "UPnP": None,
        "PMP": None,
        "PCP": None,
        "PreferredDERP": int(preferred) if preferred is not None else 0,
        "RegionLatency": latency,
        "RegionV4Latency": by_version[4],
        "RegionV6Latency": by_version[6],
        "GlobalV4": v4[0].mapped if v4 else "",
        "GlobalV6": v6[0].mapped if v6 else "",
        "CaptivePortal": None,
    }
    logs = list(run.logs) if run is not None else []
    if not targets:
        logs.append("no STUN-enabled node in the DERP map: UDP was not tested")
    return report, logs


def _varies(results: list[StunResult]) -> bool | None:
    """True when servers at different IPs mapped us differently; None when unknowable."""
    seen: dict[str, str] = {}
    for result in results:
        if result.server_ip is not None and result.mapped is not None:
            seen.setdefault(result.server_ip, result.mapped)
    if len(seen) < 2:
        return None
    return len(set(seen.values())) > 1


def go_duration(seconds: float) -> str:
    """A duration as Go's time.Duration.String() writes it ("1.234567ms", "1m2.5s")."""
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    if nanos < 1_000:
        return f"{sign}{nanos}ns"
    if nanos < 1_000_000:
        return sign + _decimal(nanos, 1_000, 3) + "µs"
    if nanos < 1_000_000_000:
        return sign + _decimal(nanos, 1_000_000, 6) + "ms"
    hours, rest = divmod(nanos, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = _decimal(rest, 1_000_000_000, 9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text


def _decimal(value: int, unit: int, digits: int) -> str:
    whole, fraction = divmod(value, unit)
    tail = f"{fraction:0{digits}d}".rstrip("0")
    return f"{whole}.{tail}" if tail else str(whole)


# --- EMF properties ------------------------------------------------------------------------


def section_properties(section: Section) -> dict[str, Any]:
    """`stun_reachable` (1/0, where any node has STUN enabled) and `derp_regions`.

    Properties of the section's EMF record, not metrics (see deployhealth.metrics).
    `derp_regions` has one item per region of the map: `region` (its ID, a string), `code`
    (its RegionCode), `severity`, and `round_trip_ms`, the slowest node that relayed (so a
    slow node shows), absent when no node of the region relayed (STUN-only regions).
    """
    properties: dict[str, Any] = {}
    enabled = capable = False
    items: list[dict[str, Any]] = []
    for region_id, region in (section.details.get("regions") or {}).items():
        times: list[float] = []
        for node in region.get("node_reports") or []:
            stun = node.get("stun") or {}
            enabled = enabled or bool(stun.get("Enabled"))
            capable = capable or bool(stun.get("CanSTUN"))
            exact = node.get("round_trip_ping_ms_exact")
            if node.get("can_exchange_messages") and isinstance(exact, int | float):
                times.append(float(exact))
        item: dict[str, Any] = {
            "region": str(region_id),
            "code": str((region.get("region") or {}).get("RegionCode") or ""),
            "severity": str(region.get("severity", "")),
        }
        if times:
            item["round_trip_ms"] = max(times)
        items.append(item)
    if enabled:
        properties["stun_reachable"] = 1 if capable else 0
    properties["derp_regions"] = items
    return properties
