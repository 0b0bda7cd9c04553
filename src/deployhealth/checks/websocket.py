"""websocket: Coder's WebSocket echo check, and deployhealth's idle probe.

The echo, as Coder's own health check does it: dial `wss://<access host>/api/v2/debug/ws`
(`ws://` for an http access URL; the access URL's own path is dropped, as Coder drops it)
with `Coder-Session-Token`, send "0", "1", "2" one at a time reading each echo, close
with 1001 "goodbye". Dial and echo share one 5 s budget, clipped by the family deadline.

| code  | when                                                                  | severity |
|-------|-----------------------------------------------------------------------|----------|
| EWS01 | no access URL, an unusable one, or the dial or handshake failed       | error    |
| EWS02 | a write or a read failed (the server closed, reset or went silent)    | error    |
| EWS03 | an echo was not a text message, or not the same text                  | error    |
| EWS04 | idle probe: the connection was closed before the idle window ended    | warning  |

No access URL is EWS01 at error ("no access URL configured"): the access_url section says
the same as EACS01, and a WebSocket section that passed with nothing to dial would let
readiness pass without WebSockets ever being tried.

Section keys: `code` (the handshake's HTTP status: 101 when it upgraded, 0 when no
answer came), `body` (the body of a refused handshake, first 4 KiB), `healthy` (the echo
passed), and deployhealth's `idle_seconds` (the idle window actually held; 0 when off),
`idle_seconds_configured`, `idle_survived` (null when no idle probe ran),
`idle_closed_after_seconds`, `server_pings` (pings the server sent during the idle
window; null when no idle probe ran), `idle_checked_at` (when that verdict was made) and
`idle_carried_over` (the verdict comes from an earlier run, see below).

The idle probe (`DEPLOYHEALTH_WEBSOCKET_IDLE_SECONDS` > 0): after a good echo the
connection stays silent for that many seconds. The probe sends no ping of its own, so it
cannot keep the connection alive itself; it answers the server's pings and counts them.
Then it sends "3" and expects it back. A connection closed during the window (or one that
no longer carries "3" afterwards) is EWS04; the message says how long it lasted, how many
server pings arrived and whether the server sent a close frame or the connection was just
dropped (a proxy's idle timeout). A close frame from the server is not EWS04: it is a
decision of something that speaks WebSocket, not a proxy's silent cut, and Coder's own
`/api/v2/debug/ws` sends no pings and gives up after 10 s without a message. Such a run
has no idle verdict (`idle_survived` null) and says why in `idle_inconclusive`.

Deadline. The family deadline (`DEPLOYHEALTH_WEBSOCKET_DEADLINE_SECONDS`, default 15 s)
must cover the idle window: for an idle run set it to at least idle + 15 (template.yaml
gives the idle function idle + 20). The probe never runs past it: the window is
clipped to what the deadline leaves after the echo, less `FINAL_ECHO_RESERVE_SECONDS` for
"3" and the close, and `idle_seconds` then says how long the window really was, next to
`idle_seconds_configured`.

The client. websocket-client frames the messages, but the opening handshake is done here:
its own handshake reads a refused answer's body whole, whatever its length (every body
this project reads is capped), follows redirects to any host through its own unbounded
DNS lookup, and keeps a process-wide cookie jar. Here the handshake is one GET with a
capped head and body, through deployhealth.net's DNS, connect and TLS helpers (so a
lookup that hangs is bounded, too); a redirect is reported as the refused handshake it is.
TLS is verified against the system store or, as with requests, the CA bundle named by
`REQUESTS_CA_BUNDLE`, else `SSL_CERT_FILE`, read on every probe. Every socket operation
gets what is left of its budget as its timeout.

Keeping the idle verdict (for the lead). The idle probe runs on its own schedule (every
15 minutes, say) and the echo every minute, and both write the `websocket` section, so an
echo-only run would hide the last idle verdict a minute later. `merge_previous(previous,
section)` carries it over: when the new section has no idle verdict of its own and the
previous latest `websocket` section has one no older than `IDLE_VERDICT_MAX_AGE_SECONDS`,
the new section gets its `idle_*` and `server_pings` keys, `idle_carried_over: true`, and
its EWS04 warning. It is a pure function; it needs one call where sections are recorded
(read the latest `websocket` section from the store before writing the new one), which is
outside this module. `section_properties` then reports the idle verdict in every run's
record that holds one, fresh or carried (`ws_idle_carried_over`), so a query over them has
a point every minute.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import websocket
from websocket import ABNF

from deployhealth import wsclient
from deployhealth.deadline import Deadline, DeadlineExceeded
from deployhealth.model import Finding, Section, Severity, parse_rfc3339, rfc3339, utcnow
from deployhealth.net import (
    PhaseError,
    authority,
    connect_tcp,
    error_text,
    parse_access_url,
    resolve_host,
    tls_context,
    tls_handshake,
)
from deployhealth.settings import Settings, SettingsError
from deployhealth.wsclient import BoundedWebSocket, MessageTimeout, MessageTooLarge
from deployhealth.wsclient import Refused as _Refused

PATH = "/api/v2/debug/ws"
ECHO_TIMEOUT_SECONDS = 5.0
# Kept back from the idle window for sending "3", reading it and closing.
FINAL_ECHO_RESERVE_SECONDS = 2.0
CLOSE_WAIT_SECONDS = 1.0
# The echoes are one character each; a message above this is not an echo, and is refused
# before it is read (a hostile server could otherwise announce 2**63 bytes and stream them).
MESSAGE_CAP = 64 * 1024
# Three idle-probe intervals of 15 minutes, as staleness counts three check intervals.
IDLE_VERDICT_MAX_AGE_SECONDS = 45 * 60.0
ECHO_MESSAGES = ("0", "1", "2")
IDLE_MESSAGE = "3"
USER_AGENT = "deployhealth/0.1 (+websocket check)"

_IDLE_KEYS = (
    "idle_seconds",
    "idle_seconds_configured",
    "idle_survived",
    "idle_closed_after_seconds",
    "server_pings",
    "idle_checked_at",
)


@dataclass(frozen=True)
class _Target:
    tls: bool
    host: str
    port: int

    @property
    def authority(self) -> str:
        return authority(self.host, self.port, "https" if self.tls else "http")

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.authority}{PATH}"


@dataclass
class _Pings:
    count: int = 0


# --- the probe ----------------------------------------------------------------------


def probe(settings: Settings, deadline: Deadline) -> Section:
    configured_idle = float(settings.websocket_idle_seconds)
    details: dict[str, Any] = {
        "code": 0,
        "body": "",
        "idle_seconds": 0.0,
        "idle_seconds_configured": configured_idle,
        "idle_survived": None,
        "idle_closed_after_seconds": None,
        "server_pings": None,
        "idle_checked_at": None,
        "idle_carried_over": False,
    }
    access = (settings.access_url or "").strip()
    if not access:
        missing = "no access URL configured (set DEPLOYHEALTH_ACCESS_URL)"
        return _section([Finding("EWS01", missing, Severity.ERROR)], details)
    try:
        scheme, host, port = parse_access_url(access)
        target = _Target(scheme == "https", host, port)
    except ValueError as exc:
        return _section([Finding("EWS01", str(exc), Severity.ERROR)], details)
    try:
        token = settings.token()
    except SettingsError as exc:
        # SettingsError never carries a secret's value, only where it failed to come from.
        text = f"cannot read the session token: {exc}"
        return _section([Finding("EWS01", text, Severity.ERROR)], details)

    budget = deadline.sooner(ECHO_TIMEOUT_SECONDS)
    try:
        ws = _dial(target, token, budget, details)
    except PhaseError as exc:
        text = f"websocket dial {target.url}: {exc}"
        return _section([Finding("EWS01", text, Severity.ERROR)], details)
    except _Refused as refused:
        text = f"websocket dial {target.url}: {_refusal(refused, token)}"
        return _section([Finding("EWS01", text, Severity.ERROR)], details)

    pings = _Pings()
    try:
        findings: list[Finding] = []
        for message in ECHO_MESSAGES:
            finding = _exchange(ws, message, budget, pings)
            if finding is not None:
                findings.append(finding)
                break
        if not findings and configured_idle > 0:
            findings += _idle(ws, configured_idle, deadline, details)
    finally:
        _close(ws, deadline)
    return _section(findings, details)


def _section(findings: list[Finding], details: dict[str, Any]) -> Section:
    # healthy is Coder's: the echo passed. EWS04 is a warning and leaves it true.
    return Section.from_findings(findings, details)


# --- the opening handshake ----------------------------------------------------------


def _dial(
    target: _Target, token: str | None, budget: Deadline, details: dict[str, Any]
) -> BoundedWebSocket:
    sock: socket.socket = connect_tcp(resolve_host(target.host, target.port, budget), budget)
    try:
        if target.tls:
            sock = tls_handshake(sock, tls_context(), target.host, budget)
        key = wsclient.send_upgrade(
            sock, budget, path=PATH, authority=target.authority, user_agent=USER_AGENT,
            extra=[f"Coder-Session-Token: {token}"] if token else [],
        )
        status, reason, headers = wsclient.read_head(sock, budget)
        details["code"] = status
        if status != 101:
            body = wsclient.read_body(sock, headers, budget)
            details["body"] = body
            raise _Refused(status, reason, headers, body)
        wsclient.check_upgrade(headers, key)
    except BaseException:
        sock.close()
        raise
    # websocket-client takes over for the frames (bounded); the handshake above replaces its own.
    return BoundedWebSocket(sock, max_message=MESSAGE_CAP)


def _refusal(refused: _Refused, token: str | None) -> str:
    status = refused.status
    text = f"the server answered {status} {refused.reason}".rstrip()
    text += " instead of 101 Switching Protocols"
    coder_message = _coder_message(refused.body)
    if coder_message:
        text += f" ({coder_message})"
    if status in (401, 403):
        if not token:
            hint = "no session token is configured (set DEPLOYHEALTH_CODER_TOKEN)"
        else:
            hint = "the session token was refused: check that it is valid and not expired"
    elif 300 <= status < 400:
        location = refused.headers.get("location", "")
        hint = f"redirects are not followed (Location: {location[:200]!r})"
    elif status in (502, 503, 504):
        hint = "a proxy or load balancer answered because it could not reach the server behind it"
    elif status == 404:
        hint = f"nothing serves {PATH} here: does the access URL point at Coder?"
    else:
        hint = (
            "a proxy or load balancer in front of Coder may not pass the upgrade on "
            "(it must forward the Upgrade and Connection headers)"
        )
    return f"{text}: {hint}"


def _coder_message(body: str) -> str:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # 4 KiB of "[" is too deep for the parser
        return ""
    message = data.get("message") if isinstance(data, dict) else None
    return message[:200] if isinstance(message, str) else ""


# --- the messages -------------------------------------------------------------------


def _exchange(
    ws: BoundedWebSocket, text: str, budget: Deadline, pings: _Pings
) -> Finding | None:
    """Send `text`, read its echo; the finding when it went wrong (EWS02 or EWS03)."""
    try:
        ws.settimeout(budget.timeout(ECHO_TIMEOUT_SECONDS))
        ws.send(text)
    except DeadlineExceeded:
        return _ews02(f"write message {json.dumps(text)}: no time left before the deadline")
    except (websocket.WebSocketException, OSError) as exc:
        return _ews02(f"write message {json.dumps(text)}: {_ws_error(exc)}")
    try:
        opcode, data = _read_message(ws, budget, pings)
    except DeadlineExceeded:
        return _ews02("read message: no answer before the deadline")
    except MessageTooLarge as exc:
        return Finding(
            "EWS03", f"received incorrect message: {exc}, wanted {json.dumps(text)}", Severity.ERROR
        )
    except (websocket.WebSocketException, OSError) as exc:
        return _ews02(f"read message: {_ws_error(exc)}")
    if opcode == ABNF.OPCODE_CLOSE:
        return _ews02(f"read message: the server closed the connection ({_close_text(data)})")
    if opcode != ABNF.OPCODE_TEXT:
        kind = "binary" if opcode == ABNF.OPCODE_BINARY else f"opcode {opcode}"
        return Finding(
            "EWS03", f"received incorrect message type: {kind}, wanted text", Severity.ERROR
        )
    got = data.decode("utf-8", errors="replace")
    if got != text:
        return Finding(
            "EWS03",
            f"received incorrect message: wanted {json.dumps(text)}, got {json.dumps(got[:200])}",
            Severity.ERROR,
        )
    return None


def _ews02(message: str) -> Finding:
    return Finding("EWS02", message, Severity.ERROR)


def _read_message(ws: BoundedWebSocket, budget: Deadline, pings: _Pings) -> tuple[int, bytes]:
    """The next data or close frame; pings are answered (by websocket-client) and counted.

    Never past the budget, however fast frames come, and never more than MESSAGE_CAP bytes.
    """
    ws.until(budget.at)
    while True:
        ws.settimeout(budget.timeout(ECHO_TIMEOUT_SECONDS))
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == ABNF.OPCODE_PING:
            pings.count += 1
            continue
        if opcode == ABNF.OPCODE_PONG:
            continue
        return opcode, bytes(frame.data)


def _close_text(payload: bytes) -> str:
    if len(payload) < 2:
        return "a close frame without a code"
    code = int.from_bytes(payload[:2], "big")
    reason = payload[2:].decode("utf-8", errors="replace")
    return f"close {code} {reason!r}" if reason else f"close {code}"


def _ws_error(exc: BaseException) -> str:
    if isinstance(exc, MessageTimeout):
        return f"timeout: {exc}"
    if isinstance(exc, websocket.WebSocketTimeoutException):
        return "timeout: no answer in time"
    if isinstance(exc, websocket.WebSocketConnectionClosedException):
        return "the connection was closed without a close frame"
    if isinstance(exc, OSError):
        return error_text(exc)
    return f"{type(exc).__name__}: {exc}"


# --- the idle probe -----------------------------------------------------------------


def _idle(
    ws: BoundedWebSocket, configured: float, deadline: Deadline, details: dict[str, Any]
) -> list[Finding]:
    window = min(configured, deadline.remaining() - FINAL_ECHO_RESERVE_SECONDS)
    if window <= 0:
        return []  # no time for a window at all: no verdict, and idle_seconds stays 0
    details["idle_seconds"] = round(window, 3)
    pings = _Pings()
    started = time.monotonic()
    end = started + window
    how: str | None = None
    ws.until(end)
    while how is None:
        left = end - time.monotonic()
        if left <= 0.001:
            break
        try:
            ws.settimeout(left)
            # Silent on our side: only the server's frames (and our pongs) cross.
            opcode, frame = ws.recv_data_frame(control_frame=True)
        except websocket.WebSocketTimeoutException:
            break
        except websocket.WebSocketConnectionClosedException:
            how = "the connection was dropped without a close frame"
        except MessageTooLarge as exc:
            # Not a proxy's cut but a server breaking the protocol: EWS03, and no idle verdict.
            details["server_pings"] = pings.count
            details["idle_checked_at"] = rfc3339(utcnow())
            details["idle_inconclusive"] = f"the idle window could not be tested: {exc}"
            return [
                Finding(
                    "EWS03",
                    f"received incorrect message during the idle window: {exc}",
                    Severity.ERROR,
                )
            ]
        except (websocket.WebSocketException, OSError) as exc:
            how = f"the connection failed: {_ws_error(exc)}"
        else:
            if opcode == ABNF.OPCODE_PING:
                pings.count += 1
            elif opcode == ABNF.OPCODE_CLOSE:
                how = f"the server closed it ({_close_text(bytes(frame.data))})"
    lasted = time.monotonic() - started
    details["server_pings"] = pings.count
    details["idle_checked_at"] = rfc3339(utcnow())
    if how is not None and how.startswith("the server closed it"):
        # A close frame is a decision by something that speaks WebSocket (Coder's own
        # /api/v2/debug/ws gives up after 10 s without a message), not the silent cut of a
        # proxy idle timeout, which is what EWS04 warns about. No verdict, rather than a
        # warning on every deployment whose debug endpoint times out: never cry wolf.
        details["idle_survived"] = None
        details["idle_closed_after_seconds"] = round(lasted, 1)
        details["idle_inconclusive"] = (
            f"{how} after {lasted:.1f} s of silence: the idle window could not be tested "
            "through this endpoint"
        )
        return []
    if how is None:
        # Open by every sign; proving it carries a message is the rest of the verdict.
        finding = _exchange(ws, IDLE_MESSAGE, deadline.sooner(ECHO_TIMEOUT_SECONDS), pings)
        details["server_pings"] = pings.count
        if finding is None or finding.code == "EWS03":
            details["idle_survived"] = True
            return [finding] if finding is not None else []
        how = f"sending {json.dumps(IDLE_MESSAGE)} after the window failed ({finding.message})"
    details["idle_survived"] = False
    details["idle_closed_after_seconds"] = round(lasted, 1)
    return [Finding("EWS04", _idle_message(lasted, window, pings.count, how), Severity.WARNING)]


def _idle_message(lasted: float, window: float, pings: int, how: str) -> str:
    text = (
        f"the idle WebSocket lasted {lasted:.1f} s of a {window:g} s idle window, "
        f"with {pings} server ping{'' if pings == 1 else 's'}: {how}. "
    )
    if pings == 0:
        text += (
            "With no heartbeat from the server, a proxy idle timeout (60 s on an AWS ALB by "
            "default) cuts idle sessions: raise the idle timeout of every proxy in between "
            "or make sure the server pings"
        )
    else:
        text += (
            "Pings arrived and the connection was still cut: a proxy in between has an idle "
            "timeout shorter than the ping interval, or a hard limit on connection length"
        )
    return text


def _close(ws: BoundedWebSocket, deadline: Deadline) -> None:
    """Close with 1001 "goodbye" as Coder does, waiting for the answer only while time is left."""
    try:
        left = deadline.remaining()
        if ws.connected and left > 0.05:
            ws.close(status=1001, reason=b"goodbye", timeout=min(CLOSE_WAIT_SECONDS, left))
    except (websocket.WebSocketException, OSError):
        pass
    finally:
        ws.shutdown()


# --- keeping the idle verdict across echo-only runs ---------------------------------


def merge_previous(
    previous: Section | None,
    section: Section,
    *,
    now: datetime | None = None,
    max_age_seconds: float = IDLE_VERDICT_MAX_AGE_SECONDS,
) -> Section:
    """`section`, with the previous idle verdict carried over when it has none of its own.

    Carried: the `idle_*` keys and `server_pings`, `idle_carried_over: true`, and the
    previous EWS04 warning, when the previous verdict is no older than `max_age_seconds`.
    """
    if section.details.get("idle_survived") is not None or previous is None:
        return section
    old = previous.details
    if old.get("idle_survived") is None or not old.get("idle_checked_at"):
        return section
    try:
        checked_at = parse_rfc3339(str(old["idle_checked_at"]))
    except ValueError:
        return section
    if (now or utcnow()) - checked_at > timedelta(seconds=max_age_seconds):
        return section
    carried = [w for w in previous.warnings if w.code == "EWS04"]
    findings = [*section.errors, *section.warnings, *carried]
    details = {
        **section.details,
        **{key: old.get(key) for key in _IDLE_KEYS},
        "idle_carried_over": True,
    }
    merged = Section.from_findings(findings, details, healthy=section.healthy)
    merged.checked_at = section.checked_at
    merged.duration_ms = section.duration_ms
    return merged


# --- EMF properties ---------------------------------------------------------------


def section_properties(section: Section) -> dict[str, Any]:
    """`ws_idle_survived`, `ws_idle_carried_over` (1/0 each) and `ws_server_pings`.

    Properties of the section's EMF record, not metrics (see deployhealth.metrics), present
    when there is an idle verdict. The flags are numbers so that Logs Insights can average
    survival into a rate and filter carried-over verdicts out.
    """
    survived = section.details.get("idle_survived")
    if not isinstance(survived, bool):
        return {}
    properties: dict[str, Any] = {
        "ws_idle_survived": 1 if survived else 0,
        "ws_idle_carried_over": 1 if section.details.get("idle_carried_over") else 0,
    }
    pings = section.details.get("server_pings")
    if isinstance(pings, int | float) and not isinstance(pings, bool):
        properties["ws_server_pings"] = pings
    return properties
