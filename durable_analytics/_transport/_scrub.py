"""Secrets out of a server's answer before anything keeps it.

A server that echoes the write key (or the Authorization header) back must not put it in
logs, exceptions, ``status`` or dead letters: ``Scrubber`` removes the raw key, its Basic
token (base64 of ``key:``, with or without padding, also URL-safe), each URL-encoded, and
an OAuth Bearer token.
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote, quote_plus

__all__ = ["Scrubber", "secret_pattern"]


def secret_pattern(write_key: str) -> re.Pattern[str]:
    """A regular expression matching ``write_key`` in every spelling ``Scrubber`` removes."""
    token = base64.b64encode(f"{write_key}:".encode()).decode("ascii")
    urlsafe = token.replace("+", "-").replace("/", "_")
    spellings: set[str] = set()
    for secret in (write_key, token, token.rstrip("="), urlsafe, urlsafe.rstrip("=")):
        if secret:
            spellings.update((secret, quote(secret, safe=""), quote_plus(secret, safe="")))
    # Longest first, so that a spelling is never half-replaced by a shorter one inside it;
    # percent escapes match in either case (%2F and %2f).
    parts = [
        re.sub(r"%([0-9A-F]{2})", lambda m: f"%(?i:{m.group(1)})", re.escape(s))
        for s in sorted(spellings, key=len, reverse=True)
    ]
    return re.compile("|".join(parts))


class Scrubber:
    """Removes a write key and a Bearer token from texts; one compiled pattern per key."""

    def __init__(self) -> None:
        self._patterns: dict[str, re.Pattern[str]] = {}

    def scrub(self, text: str, write_key: str, authorization: str = "") -> str:
        """``text`` without ``write_key`` in any spelling, nor the token of a Bearer
        ``authorization``."""
        if write_key:
            pattern = self._patterns.get(write_key)
            if pattern is None:
                pattern = self._patterns[write_key] = secret_pattern(write_key)
            text = pattern.sub("<write key>", text)
        if authorization.startswith("Bearer "):
            text = text.replace(authorization[7:], "<token>")
        return text

    def scrub_answer(self, text: str, write_key: str, authorization: str) -> str:
        """``scrub`` for a server's answer, which may also spell a secret with JSON escapes.

        ``APIError.message`` is the answer's JSON ``message`` decoded, so a key written with
        escapes (``\\/``, as some servers write ``/``, or ``\\u0041``) would appear there
        although the text was scrubbed: such an answer is decoded, scrubbed and re-encoded.
        Any other answer is kept byte for byte.
        """
        text = self.scrub(text, write_key, authorization)
        if "\\" not in text:
            return text
        try:
            decoded = json.dumps(json.loads(text), ensure_ascii=False)
        except (ValueError, RecursionError):
            return text
        scrubbed = self.scrub(decoded, write_key, authorization)
        return text if scrubbed == decoded else scrubbed
