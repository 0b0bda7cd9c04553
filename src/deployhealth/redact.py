"""Keeps secrets out of every message deployhealth writes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

from deployhealth.settings import Secret, Settings

MASK = "***"


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
        # Also the URL-encoded form, as it appears inside connection strings.
        values += [quote(v, safe="") for v in list(values)]
        # Longest first, so a URL containing a password is masked whole.
        ordered = sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)
        return cls(tuple(ordered))

    def scrub(self, text: str) -> str:
        for value in self.secrets:
            text = text.replace(value, MASK)
        return text
