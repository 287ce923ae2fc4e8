"""Routes through urllib3: a proxy's, and any URL our own client does not take.

``HTTPTransport`` sends to a host it reaches directly with ``_wire``; through a proxy (and
for the OAuth token request) it uses urllib3's pool and proxy managers, made here with the
transport's TLS settings, and ``post`` sends one batch through them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import urllib3

from durable_analytics._config import ca_bundle_from_env

__all__ = ["make_manager", "post", "proxy_from_mapping"]


def make_manager(proxy: str | None, *, maxsize: int, verify: bool | str) -> urllib3.PoolManager:
    """A pool manager for ``proxy`` (a ``ProxyManager``), or for direct routes (None).

    ``verify``: False for no certificate check, a path for a CA bundle, True for the
    environment's bundle (or the system's).
    """
    kwargs: dict[str, object] = {"num_pools": 4, "maxsize": maxsize, "block": False}
    if verify is False:
        kwargs["cert_reqs"] = "CERT_NONE"
    else:
        kwargs["cert_reqs"] = "CERT_REQUIRED"
        bundle = verify if isinstance(verify, str) else ca_bundle_from_env()
        if bundle:
            kwargs["ca_certs"] = bundle
    if proxy:
        return urllib3.ProxyManager(proxy, **kwargs)  # type: ignore[arg-type]
    return urllib3.PoolManager(**kwargs)  # type: ignore[arg-type]


def proxy_from_mapping(proxies: Mapping[str, str], url: str) -> str | None:
    """The proxy a ``proxies`` setting names for ``url``'s scheme (or ``all``), if any."""
    scheme = url.split("://", 1)[0]
    return proxies.get(scheme) or proxies.get("all") or None


def post(
    pool: Any,
    url: str,
    headers: dict[str, str],
    data: bytes,
    read_timeout: float,
    max_body: int,
) -> tuple[int, bytes, str | None, str | None]:
    """POST through a urllib3 pool or proxy manager: status, body, Retry-After, reset.

    Never follows a redirect nor retries; reads at most ``max_body`` bytes of the answer
    (a longer one drops the connection instead of reading on).
    """
    target = url if isinstance(pool, urllib3.ProxyManager) else _path(url)
    response = pool.urlopen(
        "POST",
        target,
        body=data,
        headers=headers,
        redirect=False,
        retries=False,
        timeout=urllib3.Timeout(connect=min(read_timeout, 10.0), read=read_timeout),
        preload_content=False,
    )
    try:
        raw = response.read(max_body) or b""
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raw = f"<unreadable response body: {type(exc).__name__}>".encode()
    if len(raw) >= max_body:
        response.close()
    else:
        response.release_conn()
    retry_header = response.headers.get("Retry-After")
    reset_header = response.headers.get("X-RateLimit-Reset")
    return int(response.status), raw, retry_header, reset_header


def _path(url: str) -> str:
    rest = url.split("://", 1)[1]
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else "/"
