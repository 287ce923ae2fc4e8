"""The HTTP transport: the Segment batch envelope, auth, gzip, connection pools.

Auth is Basic with the write key, or with OAuth settings a Bearer token (``_oauth``). What
a server answers is scrubbed of both before anything keeps it (``_scrub``).

A batch to a host reached directly goes through our own lean HTTP/1.1 client (``_wire``);
through a proxy it goes through urllib3's ``ProxyManager`` (``_proxied``; as does the OAuth
token request).
Connections are pooled per transport, in the process that made them (never reused across a
fork). Proxies and the CA bundle are taken from the environment once per host, not on every
request, and redirects are never followed so the write key cannot be sent to a third host.
"""

from __future__ import annotations

import base64
import gzip as gzip_module
import logging
import os
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import urllib3

from durable_analytics._bounded_call import call_within
from durable_analytics._config import ca_bundle_from_env, proxy_for_url
from durable_analytics._oauth import OAuthSettings, TokenSource, urllib3_poster
from durable_analytics._version import __version__
from durable_analytics.exceptions import ConfigurationRejected, DeliveryError

from . import _proxied as proxied
from ._proxied import make_manager, proxy_from_mapping
from ._resolve import LookupTimeout
from ._scrub import Scrubber
from ._wire import (
    ConnectError,
    Origin,
    ProtocolError,
    Response,
    Sent,
    WireClient,
    make_tls_context,
    origin_of,
)
from .base import (
    Outcome,
    Started,
    Target,
    classify,
    one_line,
    parse_rate_limit_reset,
    parse_retry_after,
)

__all__ = [
    "MAX_RESPONSE_BYTES",
    "HTTPTransport",
    "batch_body",
    "envelope_overhead",
]

log = logging.getLogger("durable_analytics.delivery")

#: A sent-ahead answer read after its request's timeout (its thread was busy with the batch
#: before it) and already arriving still gets this long to be read whole.
LATE_READ = 0.25
#: Response bodies are read to at most this many bytes.
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = f"durable-analytics/{__version__}"


def _sent_at() -> bytes:
    # As segment-analytics-python writes it (microseconds, "+00:00"), and always with the
    # microseconds: one length, so ``envelope_overhead`` measured once holds for every body.
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").encode("ascii")


_HEAD = b'{"batch":['
_TAIL = b'],"sentAt":"'
_END = b'"}'


def envelope_overhead() -> int:
    """Bytes the batch envelope adds around the messages (the commas are counted apart)."""
    return len(_HEAD) + len(_TAIL) + len(_sent_at()) + len(_END)


def batch_body(bodies: Sequence[bytes]) -> bytes:
    """The request body: the stored messages, byte for byte, and a fresh ``sentAt``."""
    return b"".join((_HEAD, b",".join(bodies), _TAIL, _sent_at(), _END))


class HTTPTransport:
    """POSTs batch bodies to ``{host}/v1/batch`` with Basic auth, never following redirects.

    A direct route uses ``_wire``, a keep-alive HTTP/1.1 client of a few hundredths of a
    millisecond of CPU per POST; urllib3 (requests' own engine, half the CPU of a
    ``requests.Session``) carries proxied routes. Measured in ``benchmarks/``: in the
    caller's process that CPU is taken from the caller's own thread by the GIL.
    """

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        gzip: bool = False,
        proxies: Mapping[str, str] | None = None,
        verify: bool | str = True,
        trust_env: bool = True,
        oauth: OAuthSettings | None = None,
        maxsize: int = 32,
    ) -> None:
        self.timeout = timeout
        self._oauth = oauth
        self._tokens: TokenSource | None = None
        #: Keep-alive connections kept per host: one per request in flight.
        self.maxsize = max(1, maxsize)
        # Many delivery threads share one transport; pools are made under this lock.
        self._lock = threading.Lock()
        self.gzip = gzip
        self._proxies = dict(proxies) if proxies is not None else None
        self._verify = verify
        self._trust_env = trust_env
        self._managers: dict[str, urllib3.PoolManager] = {}
        self._pools: dict[str, Any] = {}
        self._wire: WireClient | None = None
        self._heads: dict[str, bytes] = {}
        self._pid = os.getpid()
        self._auth_cache: dict[str, str] = {}
        self._scrubber = Scrubber()

    def __repr__(self) -> str:
        return f"HTTPTransport(timeout={self.timeout!r}, gzip={self.gzip!r})"

    def _pool(self, url: str) -> Any:
        """The connection pool for ``url``, looked up (proxy included) once per process."""
        pool = self._pools.get(url)
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            return self._new_pool(url)

    def _new_pool(self, url: str) -> Any:
        pool = self._pools.get(url)
        if pool is None or self._pid != os.getpid():
            if self._pid != os.getpid():
                # Connections inherited over fork belong to the parent: never reuse them.
                self._managers = {}
                self._pools = {}
                self._pid = os.getpid()
            pool = self._route(url)
            self._pools[url] = pool
        return pool

    def _route(self, url: str) -> Any:
        """``url``'s ``Origin`` when it is reached directly, else its urllib3 proxy manager."""
        if self._proxy(url) is None:
            try:
                return origin_of(url)
            except ValueError:
                pass  # not something our client sends to: urllib3 says what is wrong
        manager = self._manager(url)
        if isinstance(manager, urllib3.ProxyManager):
            return manager  # the proxy manager routes each request itself
        return manager.connection_from_url(url)

    def _proxy(self, url: str) -> str | None:
        if self._proxies is not None:
            return proxy_from_mapping(self._proxies, url)
        return proxy_for_url(url) if self._trust_env else None

    def _wire_client(self) -> WireClient:
        client = self._wire
        if client is None:
            with self._lock:
                client = self._wire
                if client is None:
                    client = self._wire = WireClient(tls=self._tls_context, maxsize=self.maxsize)
        return client

    def _tls_context(self) -> ssl.SSLContext:
        """The TLS settings of direct routes: ``verify`` (the environment's CA bundle read
        once, when the first https batch goes out)."""
        verify = self._verify
        bundle = verify if isinstance(verify, str) else None
        if verify is True:
            bundle = ca_bundle_from_env()
        return make_tls_context(verify is not False, bundle)

    def _manager(self, url: str) -> urllib3.PoolManager:
        """The pool manager for ``url``'s proxy route (environment read once per host)."""
        proxy = self._proxy(url)
        key = proxy or ""
        manager = self._managers.get(key)
        if manager is None:
            manager = make_manager(proxy, maxsize=self.maxsize, verify=self._verify)
            self._managers[key] = manager
        return manager

    def _token_source(self, settings: OAuthSettings) -> TokenSource:
        """This process's OAuth token source (made on first use, again after a fork)."""
        tokens = self._tokens
        if tokens is None or self._pid != os.getpid():
            self._pool(settings.token_url)  # resets inherited pools after a fork
            poster = urllib3_poster(self._manager(settings.token_url))
            tokens = self._tokens = TokenSource(settings, timeout=self.timeout, poster=poster)
        return tokens

    def _authorization(self, write_key: str) -> str:
        value = self._auth_cache.get(write_key)
        if value is None:
            token = base64.b64encode(f"{write_key}:".encode()).decode("ascii")
            value = f"Basic {token}"
            self._auth_cache[write_key] = value
        return value

    def close(self) -> None:
        """Close the pooled connections (in the process that opened them)."""
        if self._pid == os.getpid():
            for manager in self._managers.values():
                manager.clear()
        if self._wire is not None:
            self._wire.close()
        self._managers = {}
        self._pools = {}

    def envelope_overhead(self) -> int:
        """Bytes the Segment batch envelope adds around the messages."""
        return envelope_overhead()

    def send(
        self,
        destination: Target,
        bodies: Sequence[bytes],
        *,
        timeout: float | None = None,
        retry_count: int = 0,
    ) -> Outcome:
        """POST ``bodies`` as one Segment batch to ``destination``; see ``post``."""
        return self.post(
            destination.host,
            destination.write_key,
            batch_body(bodies),
            timeout=timeout,
            retry_count=retry_count,
        )

    def post(
        self,
        host: str,
        write_key: str,
        body: bytes,
        *,
        timeout: float | None = None,
        retry_count: int = 0,
    ) -> Outcome:
        """POST one batch body; network failures come back as a retryable ``Outcome``.

        A retry carries ``X-Retry-Count: n`` (the batch's earlier tries), as Segment's
        clients send it.
        """
        url = f"{host}/v1/batch"
        oauth = self._oauth
        if oauth is None:
            authorization = self._authorization(write_key)
        else:
            # OAuth: a Bearer token instead of the write key, fetched here (by delivery,
            # never by the calls that queue) and cached until half its lifetime.
            try:
                authorization = self._token_source(oauth).authorization(timeout)
            except ConfigurationRejected as exc:
                return Outcome("config", None, error=str(exc))
            except DeliveryError as exc:
                return Outcome("retry", None, error=str(exc))
        data = self._compressed(body)
        read_timeout = self._read_timeout(timeout)

        def exchange() -> tuple[int, bytes, str | None, str | None]:
            route = self._pool(url)
            if isinstance(route, Origin):
                return _fields(
                    self._wire_client().post(
                        route,
                        self._head(authorization, retry_count),
                        data,
                        timeout=read_timeout,
                        max_body=MAX_RESPONSE_BYTES,
                    )
                )
            # urllib3's timeout bounds each read, not the request: a proxy or server
            # that answers a byte at a time would hold it past any deadline.
            headers = self._proxied_headers(authorization, retry_count)
            return call_within(
                read_timeout,
                lambda: proxied.post(
                    route, url, headers, data, read_timeout, max_body=MAX_RESPONSE_BYTES
                ),
                f"the request to {host}",
            )

        return self._answered(host, write_key, authorization, read_timeout, exchange)

    def start(
        self,
        destination: Target,
        bodies: Sequence[bytes],
        *,
        timeout: float | None = None,
        retry_count: int = 0,
    ) -> Started | None:
        """Send ``bodies`` as one batch now and read the answer later (``Started.finish``).

        ``finish`` returns what ``send`` would have (a request that could not be written
        comes back as its retryable outcome); ``timeout`` bounds both steps together. None
        when this route cannot send ahead (a proxy, OAuth), or when a subclass overrides
        ``send`` or ``post`` and not this (what it does there must see every batch): the
        caller then uses ``send``.
        """
        overridden = type(self).send is not HTTPTransport.send or (
            type(self).post is not HTTPTransport.post
        )
        if self._oauth is not None or (overridden and type(self).start is HTTPTransport.start):
            return None
        host, write_key = destination.host, destination.write_key
        try:
            route = self._pool(f"{host}/v1/batch")
        except (ValueError, urllib3.exceptions.HTTPError):
            return None  # ``send`` says what is wrong with the host
        if not isinstance(route, Origin):
            return None
        authorization = self._authorization(write_key)
        read_timeout = self._read_timeout(timeout)
        wire = self._wire_client()
        try:
            sent = wire.start(
                route,
                self._head(authorization, retry_count),
                self._compressed(batch_body(bodies)),
                timeout=read_timeout,
                max_body=MAX_RESPONSE_BYTES,
            )
        except Exception as exc:
            outcome = self._error_outcome(exc, host, write_key, authorization, read_timeout)
            if outcome is None:
                raise
            return _Settled(outcome)
        return _Pending(self, wire, sent, (host, write_key, authorization, read_timeout))

    def _compressed(self, body: bytes) -> bytes:
        return gzip_module.compress(body, compresslevel=6) if self.gzip else body

    def _read_timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else max(0.05, min(timeout, self.timeout))

    def _answered(
        self,
        host: str,
        write_key: str,
        authorization: str,
        read_timeout: float,
        exchange: Callable[[], tuple[int, bytes, str | None, str | None]],
    ) -> Outcome:
        """The outcome of ``exchange`` (status, body, Retry-After, X-RateLimit-Reset):
        classified and scrubbed, or the retryable or configuration outcome of its error."""
        try:
            status, raw, retry_header, reset_header = exchange()
        except Exception as exc:
            outcome = self._error_outcome(exc, host, write_key, authorization, read_timeout)
            if outcome is None:
                raise
            return outcome
        kind = classify(status)
        if self._tokens is not None and status in _TOKEN_REFUSED:
            # The API refused the token (expired, revoked): the next try fetches a new one.
            self._tokens.invalidate(authorization)
            if status == 511:
                kind = "retry"
        # Scrub the whole answer, then cut: a cut first could keep part of an echoed key.
        excerpt = self._scrubber.scrub_answer(
            raw.decode("utf-8", "replace"), write_key, authorization
        )[:2000]
        retry_after = parse_retry_after(retry_header)
        if kind == "retry" and reset_header:
            # Segment's 429 names when the rate limit resets: wait for the later of the two.
            reset = parse_rate_limit_reset(reset_header)
            if reset is not None:
                retry_after = reset if retry_after is None else max(retry_after, reset)
        error = "" if kind == "ok" else f"HTTP {status} from {host}: {one_line(excerpt[:200])}"
        return Outcome(kind, status, retry_after, excerpt, error.strip())

    def _error_outcome(
        self,
        exc: Exception,
        host: str,
        write_key: str,
        authorization: str,
        read_timeout: float,
    ) -> Outcome | None:
        """The outcome of a request that raised ``exc`` (None: not a failure of ours)."""
        if isinstance(exc, (ssl.SSLError, urllib3.exceptions.SSLError)):
            return self._failed(f"TLS error talking to {host}", exc, write_key, authorization)
        if isinstance(exc, (ConnectError, urllib3.exceptions.NewConnectionError)):
            # A subclass of ConnectTimeoutError in urllib3, but a refused connection or an
            # unknown host is not a timeout: say what happened.
            return self._failed(f"cannot connect to {host}", exc, write_key, authorization)
        if isinstance(exc, LookupTimeout):
            return Outcome("retry", None, error=f"timed out on {host}: {exc}")
        if isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
            return Outcome("retry", None, error=f"timed out after {read_timeout:.3g}s on {host}")
        if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
            what = f"network error talking to {host}"
            return self._failed(what, exc, write_key, authorization)
        if isinstance(exc, ValueError):
            # A host no URL parser or resolver takes (the config's own check refuses it, a
            # transport called directly may not have): kept and backed off, never raised.
            why = self._scrubber.scrub(_short(exc), write_key, authorization)
            return Outcome("config", None, error=f"cannot send to {host!r}: {why}")
        return None

    def _failed(self, what: str, exc: BaseException, write_key: str, authorization: str) -> Outcome:
        """A retry outcome for a request that got no answer: ``what`` and why, scrubbed (a
        malformed answer is quoted, and a hostile server may echo the key in it)."""
        why = self._scrubber.scrub(_short(exc), write_key, authorization)
        return Outcome("retry", None, error=f"{what}: {why}")

    def _proxied_headers(self, authorization: str, retry_count: int) -> dict[str, str]:
        """The headers of a request through urllib3 (``_proxied``)."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Authorization": authorization,
        }
        if retry_count > 0:
            headers["X-Retry-Count"] = str(retry_count)
        if self.gzip:
            headers["Content-Encoding"] = "gzip"
        return headers

    def _head(self, authorization: str, retry_count: int) -> bytes:
        """The header lines after ``Host`` (``Content-Length`` is added by the client)."""
        head = self._heads.get(authorization)
        if head is None:
            if not authorization.isprintable():
                # A token with a line break would split the request: never send it.
                raise ProtocolError("the Authorization value holds a control character")
            head = (
                f"User-Agent: {USER_AGENT}\r\nAccept-Encoding: identity\r\n"
                f"Content-Type: application/json\r\nAuthorization: {authorization}\r\n"
            ).encode("latin-1", "replace")
            if self.gzip:
                head += b"Content-Encoding: gzip\r\n"
            if len(self._heads) >= 16:
                self._heads.clear()  # OAuth tokens come and go: keep only recent ones
            self._heads[authorization] = head
        if retry_count > 0:
            head += b"X-Retry-Count: %d\r\n" % retry_count
        return head


# Answers that say the OAuth token is not (or no longer) good; 511 is retried with OAuth.
_TOKEN_REFUSED = frozenset({401, 403, 511})


def _fields(answer: Response) -> tuple[int, bytes, str | None, str | None]:
    """Status, body, Retry-After and X-RateLimit-Reset of one answer of ``_wire``."""
    headers = answer.headers
    return answer.status, answer.body, headers.get("retry-after"), headers.get("x-ratelimit-reset")


class _Pending:
    """A batch ``HTTPTransport.start`` sent: its answer read once, by ``finish``."""

    def __init__(
        self,
        transport: HTTPTransport,
        wire: WireClient,
        sent: Sent,
        call: tuple[str, str, str, float],
    ) -> None:
        self._transport = transport
        self._wire = wire
        self._sent = sent
        self._call = call

    def finish(self) -> Outcome:
        """The server's answer, classified as ``HTTPTransport.send`` does."""
        host, write_key, authorization, read_timeout = self._call
        wire, sent = self._wire, self._sent
        return self._transport._answered(
            host,
            write_key,
            authorization,
            read_timeout,
            lambda: _fields(wire.finish(sent, late=LATE_READ)),
        )

    def cancel(self) -> None:
        """Drop the connection without reading the answer (the server may have the batch)."""
        self._wire.cancel(self._sent)


class _Settled:
    """A batch ``HTTPTransport.start`` could not send: ``finish`` says why."""

    def __init__(self, outcome: Outcome) -> None:
        self._outcome = outcome

    def finish(self) -> Outcome:
        """The failure's outcome."""
        return self._outcome

    def cancel(self) -> None:
        """Nothing to give up: no request is on the wire."""


def _short(exc: BaseException) -> str:
    text = one_line(str(exc))
    return text if len(text) <= 300 else text[:300] + "…"
