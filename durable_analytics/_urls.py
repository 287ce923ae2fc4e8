"""URLs the settings hold: a delivery ``host`` checked and normalized, whether a host is
this machine, and a queue URL with its secrets hidden for logs and ``status``.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from .exceptions import ConfigError

__all__ = [
    "SECRET_URL_PARAMETERS",
    "is_loopback_host",
    "normalize_host",
    "url_without_secrets",
]


def normalize_host(host: str) -> str:
    """Validate a base URL and strip its trailing slash; ``/v1/batch`` is appended later."""
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"host must be a non-empty URL string, got {type(host).__name__}")
    host = host.strip()
    if not host.isprintable() or " " in host:
        # urlsplit silently drops tabs and line breaks; the host is logged and stored.
        raise ConfigError(f"host must not contain spaces or control characters, got {host!r}")
    try:
        parts = urlsplit(host)
    except ValueError as exc:  # "Invalid IPv6 URL": an unclosed or bad [...] literal
        literal = _BRACKETED.match(host)
        if literal is not None:
            # Python 3.11+ checks a closed literal itself; 3.10 leaves it to _check_authority,
            # whose words every Python gives.
            raise ConfigError(
                f"host {host!r} has an invalid IPv6 address [{literal.group(1)}]"
            ) from None
        raise ConfigError(
            f"host {host!r} is not a valid URL ({exc}); an IPv6 address goes in brackets, "
            "as in http://[::1]:8080"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"host must be an http:// or https:// URL, got {host!r}")
    if "@" in parts.netloc:
        # Credentials in the URL would be logged and stored with every destination.
        raise ConfigError("host must not contain credentials; pass the write key instead")
    _check_authority(parts.netloc, host)
    if parts.query or parts.fragment:
        raise ConfigError(f"host must be a base URL without query or fragment, got {host!r}")
    if _ENDPOINT_TAIL.search(parts.path.rstrip("/")):
        # POST {host}/v1/batch would go to .../v1/batch/v1/batch: a 404 for every batch,
        # found only once messages pile up. A path before it (a proxy's prefix) is kept.
        path = parts.path.rstrip("/")
        while tail := _ENDPOINT_TAIL.search(path):
            path = path[: tail.start()].rstrip("/")
        base = f"{parts.scheme}://{parts.netloc}{path}"
        raise ConfigError(
            f"host must be the base URL: the library appends /v1/batch itself, so use "
            f"{base!r}, not {host!r}"
        )
    return host.rstrip("/")


#: A URL's closed ``[...]`` host literal, as ``urlsplit`` reads it.
_BRACKETED = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\[([^\]/?#]*)\]")

#: One label of a host name: letters, digits, hyphens (underscores too, as some internal
#: DNS names use them), neither starting nor ending with a hyphen.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _check_authority(netloc: str, host: str) -> None:
    """Refuse a host part or port that no request could go to, naming what is wrong.

    ``urlsplit`` checks little and only when asked (``.port`` raises, ``.hostname``
    does not): without this an out-of-range port or a bad name is stored with every
    message and fails only at delivery, again and again.
    """
    if netloc.startswith("["):
        end = netloc.find("]")
        literal, rest = netloc[1:end], netloc[end + 1 :]
        address = literal.split("%", 1)[0]  # a zone (fe80::1%25eth0) is the OS's to check
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ConfigError(f"host {host!r} has an invalid IPv6 address [{literal}]") from None
        if rest and not rest.startswith(":"):
            raise ConfigError(f"host {host!r} has {rest!r} after its IPv6 address")
        port = rest[1:] if rest else None
    else:
        name, colon, port_text = netloc.rpartition(":") if ":" in netloc else (netloc, "", "")
        port = port_text if colon else None
        if ":" in name:
            raise ConfigError(
                f"host {host!r}: an IPv6 address must be in brackets, as in http://[::1]:8080"
            )
        labels = name.rstrip(".").split(".")  # a trailing dot is a fully qualified name
        if not all(_LABEL.fullmatch(label) or _is_idna(label) for label in labels):
            raise ConfigError(f"host {host!r} has an invalid host name {name!r}")
    if port is not None:
        if not port.isascii() or not port.isdigit():
            raise ConfigError(f"host {host!r} has an invalid port {port!r}: a number is needed")
        if not 1 <= int(port) <= 65535:
            raise ConfigError(f"host {host!r} has port {int(port)}, outside 1-65535")


def _is_idna(label: str) -> bool:
    """Whether ``label`` is a non-ASCII label that IDNA can encode (``bücher``)."""
    if label.isascii():
        return False
    try:
        encoded = label.encode("idna")
    except UnicodeError:
        return False
    return _LABEL.fullmatch(encoded.decode("ascii")) is not None


#: A path ending in the tracking API's own path (``/v1``, ``/v1/batch``, ``/batch``,
#: ``/v1/track`` ...), which ``host`` must not hold.
_ENDPOINT_TAIL = re.compile(
    r"(?:/v1(?:/(?:batch|import|track|identify|page|screen|group|alias))?|/batch)$",
    re.IGNORECASE,
)


def is_loopback_host(url: str) -> bool:
    """Whether ``url``'s host is this machine: ``localhost`` (and ``*.localhost``) or a
    loopback address (127.0.0.0/8, ``::1``); plain ``http://`` is fine there."""
    name = (urlsplit(url).hostname or "").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


#: Query parameters of a PostgreSQL URL that hold a secret (libpq's ``password`` and the
#: passphrase of an encrypted client key).
SECRET_URL_PARAMETERS = frozenset({"password", "sslpassword"})


def url_without_secrets(url: str) -> str:
    """``url`` with its password replaced by ``***``: the one in the authority
    (``user:password@``) and one given as a ``?password=`` parameter (libpq takes both)."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    if parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(k.lower() in SECRET_URL_PARAMETERS for k, _ in query):
            hidden = [(k, "***" if k.lower() in SECRET_URL_PARAMETERS else v) for k, v in query]
            parts = parts._replace(query=urlencode(hidden, safe="*"))
    return parts.geturl()
