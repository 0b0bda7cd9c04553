"""Keeps secrets out of every message deployhealth writes.

Two tools, used together:

- `safe_url(url)`: a URL fit to show, without `user:password@` and with the values of
  query parameters that look like credentials masked. Every place that puts a configured
  or discovered URL into a message, a section or a line of output calls it.
- `Redactor`: masks known secret values (tokens, the database password, the credentials
  inside URL settings) wherever they appear. The runner scrubs every section with it
  before the section is printed, stored or served: the backstop for a URL that a message
  quotes from somewhere else (an exception's text, a redirect's Location).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from deployhealth.model import Finding, Section
from deployhealth.settings import Secret, Settings

MASK = "***"

# Query parameters that carry credentials in practice: Coder's `coder_session_token`,
# presigned S3 URLs' `X-Amz-Signature` and `X-Amz-Credential`, `api_key`, `access_token`.
_SECRET_QUERY_KEY = re.compile(
    r"token|secret|passw|pwd|key|sig|auth|credential|session", re.IGNORECASE
)
_PROXY_VARIABLES = tuple(
    v for name in ("http_proxy", "https_proxy", "all_proxy") for v in (name, name.upper())
)
# user:password@ (or user@) after a scheme, for text that is not one URL.
_USERINFO = re.compile(r"(?<=://)[^/?#@\s]+@")


def safe_url(url: str) -> str:
    """`url` without userinfo, and with credential-looking query values masked.

    >>> safe_url("https://admin:hunter2@coder.example.com/derp.json?token=abc&v=2")
    'https://coder.example.com/derp.json?token=***&v=2'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub("", url)
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY_KEY.search(k) for k, _ in pairs):
            masked = [(k, MASK if _SECRET_QUERY_KEY.search(k) else v) for k, v in pairs]
            query = urlencode(masked, safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str | None) -> list[str]:
    """The credentials a URL carries: its userinfo, its password, secret query values."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found: list[str] = []
    userinfo, at, _host = parts.netloc.rpartition("@")
    if at and userinfo:
        if ":" in userinfo:
            found += [userinfo, userinfo.split(":", 1)[1]]
        else:
            # A bare user name, or a token in its place: masked only where it is userinfo,
            # so that a name like "coder" is not masked all over every message.
            found.append(userinfo + "@")
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if value and _SECRET_QUERY_KEY.search(key):
            found.append(value)
    return found


@dataclass(frozen=True)
class Redactor:
    secrets: tuple[str, ...]

    @classmethod
    def for_settings(cls, settings: Settings, extra: Iterable[str] = ()) -> Redactor:
        values: list[str] = list(extra)
        for secret in (settings.coder_token, settings.api_token):
            if isinstance(secret, Secret):
                values.append(secret.reveal())
        if settings.database_url is not None:
            values.append(settings.database_url.reveal())
            try:
                target = settings.database()
            except ValueError:
                target = None
            if target is not None:
                values.append(target.password.reveal())
        # URL settings that are not secrets as a whole may still carry one; so may the
        # proxy settings of the environment, which requests reads and may quote.
        urls = [settings.access_url, settings.derp_map]
        urls += [str(p.get("url") or "") for p in settings.static_proxies]
        urls += [os.environ.get(k) for k in _PROXY_VARIABLES]
        for url in urls:
            values += url_secrets(url)
        # Also the URL-encoded form, as it appears inside connection strings.
        values += [quote(v, safe="") for v in list(values)]
        # Longest first, so a URL containing a password is masked whole.
        ordered = sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)
        return cls(tuple(ordered))

    def scrub(self, text: str) -> str:
        for value in self.secrets:
            text = text.replace(value, MASK)
        return text

    def scrub_value(self, value: Any) -> Any:
        """`value` (JSON-like: dicts, lists, strings) with every string scrubbed."""
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self.scrub_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub_value(v) for v in value)
        return value

    def scrub_section(self, section: Section) -> Section:
        """The section with its messages and details scrubbed; itself when nothing leaks.

        One `json.dumps` decides: a clean section (the usual case, even with 5,000 proxies)
        costs no walk through its details.
        """
        if not self.secrets:
            return section
        text = json.dumps(
            [[f.message for f in section.warnings + section.errors], section.details],
            default=str,
            ensure_ascii=False,
        )
        if not any(v in text or json.dumps(v, ensure_ascii=False)[1:-1] in text
                   for v in self.secrets):
            return section

        def scrubbed(findings: list[Finding]) -> list[Finding]:
            return [dataclasses.replace(f, message=self.scrub(f.message)) for f in findings]

        return dataclasses.replace(
            section,
            warnings=scrubbed(section.warnings),
            errors=scrubbed(section.errors),
            details=self.scrub_value(section.details),
        )
