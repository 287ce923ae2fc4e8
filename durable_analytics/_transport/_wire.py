"""A lean HTTP/1.1 client on ``socket``/``ssl``: one POST, a keep-alive pool, nothing more.

A POST is sent and answered in one call (``post``), or in two (``start`` writes it,
``finish`` reads its answer), so that one thread can have a second request on the wire while
it settles the first (``_pass.deliver_pass``).

Why not urllib3 for the batch POST: delivery runs in the caller's process and the GIL takes
its CPU from the caller's thread. A urllib3 POST of one batch costs about 0.2 ms of CPU on
loopback, ``http.client`` about 0.12 ms, this exchange (one ``sendall`` of head and body, the
answer parsed from one ``recv`` as a rule) a few hundredths (benchmarks/README.md). What it
does not do: proxies (the transport keeps urllib3's ``ProxyManager`` for those), redirects
(never followed anyway), ``Expect: 100-continue`` (never sent), compressed answers
(``Accept-Encoding: identity``).

The answer is read by ``_answer`` (bounded in size and time: the server is not trusted).
Errors are raised, never returned: ``ConnectError`` (no connection), ``ssl.SSLError`` (TLS),
``TimeoutError`` (the deadline passed), ``ProtocolError`` (an answer that is not HTTP/1.x)
and any other ``OSError`` (the connection broke). The caller turns them into outcomes.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from ._answer import MAX_HEAD_BYTES, ProtocolError, Response, read_response, remaining
from ._resolve import Resolver

__all__ = [
    "MAX_HEAD_BYTES",
    "ConnectError",
    "Origin",
    "ProtocolError",
    "Response",
    "Sent",
    "TLSSetupError",
    "WireClient",
    "make_tls_context",
    "origin_of",
]

_DEFAULT_PORTS = {"http": 80, "https": 443}


class ConnectError(OSError):
    """No connection could be made (refused, unreachable, unknown host)."""


class TLSSetupError(ssl.SSLError):
    """The TLS settings cannot be used (a CA bundle that cannot be loaded)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "TLS setup failed"


@dataclass(frozen=True)
class Origin:
    """Where requests for one URL go: the socket address, the TLS name and the head lines."""

    scheme: str
    host: str  # for connect() and the TLS name: no brackets, a zone unescaped
    port: int
    prefix: bytes  # b"POST /path HTTP/1.1\r\nHost: host[:port]\r\n"

    @property
    def key(self) -> tuple[str, str, int]:
        """The pool key: connections are shared per (scheme, host, port)."""
        return (self.scheme, self.host, self.port)


def origin_of(url: str) -> Origin:
    """Parse an ``http://`` or ``https://`` URL into the origin a POST to it uses.

    Raises ``ValueError`` for any other scheme, a missing host, or characters that cannot go
    into a request head.
    """
    if not url.isprintable() or " " in url:
        raise ValueError(f"URL {url!r} has spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL: {url!r}")
    port = _DEFAULT_PORTS[scheme] if parts.port is None else parts.port
    if port == 0:  # never the scheme's default port in its place
        raise ValueError(f"URL {url!r} names port 0")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    bracketed = netloc.startswith("[")
    host = unquote(parts.hostname) if bracketed else parts.hostname
    if bracketed:
        name = netloc[: netloc.index("]") + 1]
    else:
        name = host.encode("idna").decode("ascii") if not host.isascii() else host
        host = name
    # The Host header carries the port only when it is not the scheme's default (RFC 9110 §7.2).
    authority = name if port == _DEFAULT_PORTS[scheme] else f"{name}:{port}"
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    prefix = f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii")
    return Origin(scheme, host, port, prefix)


def make_tls_context(verify: bool, bundle: str | None) -> ssl.SSLContext:
    """A client TLS context: ``verify`` False trusts anything; else the certificate and the
    host name are checked against ``bundle`` (a file or a directory) or the system's CAs."""
    if not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif bundle:
        try:
            if os.path.isdir(bundle):
                context = ssl.create_default_context(capath=bundle)
            else:
                context = ssl.create_default_context(cafile=bundle)
        except OSError as exc:  # missing, unreadable, not PEM: a TLS setup error
            raise TLSSetupError(f"cannot load the CA bundle {bundle!r}: {exc}") from exc
    else:
        context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


class _Conn:
    """One connection: its socket, the pool generation and process it belongs to."""

    __slots__ = ("generation", "pid", "reused", "sock")

    def __init__(self, sock: socket.socket, generation: int, pid: int) -> None:
        self.sock = sock
        self.generation = generation
        self.pid = pid
        self.reused = False


if hasattr(select, "poll"):

    def _readable(sock: socket.socket) -> bool:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))

else:  # pragma: no cover - Windows

    def _readable(sock: socket.socket) -> bool:
        return bool(select.select([sock], [], [], 0)[0])


def _has_bytes(sock: socket.socket) -> bool:
    """Whether the server has sent something not yet read (or closed the connection)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    return _readable(sock)


def _idle_and_open(sock: socket.socket) -> bool:
    """Whether a pooled connection can carry a request: nothing to read on it.

    An idle keep-alive connection has nothing to say. Readable means the server closed it
    (EOF, a reset) or sent stray bytes; either way it is not reused.
    """
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    try:
        return not _readable(sock)
    except (OSError, ValueError):
        return False


class WireClient:
    """POSTs over pooled keep-alive connections, shared by many threads.

    Idle connections are kept per (scheme, host, port), at most ``maxsize`` each; a
    connection is used by one request at a time. A connection made before a ``fork()`` is
    never used by the child (the pid is checked), and ``close()`` drops the idle ones (those
    in use at that moment are closed when their request ends).
    """

    def __init__(
        self, *, tls: Callable[[], ssl.SSLContext] | None = None, maxsize: int = 32
    ) -> None:
        self._tls_factory = tls
        self._tls: ssl.SSLContext | None = None
        self.maxsize = max(1, maxsize)
        self._lock = threading.Lock()
        # One dict for the client's life (cleared, never replaced): the finalizer closes
        # what it holds when the client is dropped without close(), as urllib3's pools do.
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._generation = 0
        self._pid = os.getpid()
        self._resolver = Resolver()
        weakref.finalize(self, _close_idle, self._idle)

    @property
    def tls(self) -> ssl.SSLContext:
        """The TLS context, made when the first https connection is (loading CAs costs)."""
        context = self._tls
        if context is None:
            factory = self._tls_factory
            context = factory() if factory is not None else make_tls_context(True, None)
            self._tls = context
        return context

    def idle_count(self) -> int:
        """How many idle connections this process keeps (all origins)."""
        with self._lock:
            if self._pid != os.getpid():
                return 0
            return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        with self._lock:
            idle = dict(self._idle)
            self._idle.clear()
            self._generation += 1
        _close_idle(idle)

    # ------------------------------------------------------------------ the pool

    def _checkout(self, origin: Origin) -> _Conn | None:
        """An idle connection to ``origin`` that is still open, or None."""
        pid = os.getpid()
        while True:
            with self._lock:
                if self._pid != pid:
                    # Inherited over fork: the parent's connections, never used here. Closing
                    # this process's copy of a descriptor sends nothing (no shutdown, no TLS
                    # close_notify): the parent's connection lives on.
                    inherited = dict(self._idle)
                    self._idle.clear()
                    self._pid = pid
                    self._generation += 1
                    _close_idle(inherited)
                    return None
                idle = self._idle.get(origin.key)
                if not idle:
                    return None
                conn = idle.pop()
            if _idle_and_open(conn.sock):
                conn.reused = True
                return conn
            _close(conn.sock)

    def _checkin(self, origin: Origin, conn: _Conn) -> None:
        with self._lock:
            if conn.pid == self._pid and conn.generation == self._generation:
                idle = self._idle.setdefault(origin.key, [])
                if len(idle) < self.maxsize:
                    idle.append(conn)
                    return
        if conn.pid == os.getpid():
            _close(conn.sock)

    def _connect(self, origin: Origin, deadline: float) -> _Conn:
        # The generation before connecting: a close() while the connection is being made
        # (a TLS handshake can take seconds) must close it when its request ends too.
        with self._lock:
            generation = self._generation
        sock = _open_socket(origin.host, origin.port, deadline, self._resolver)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if origin.scheme == "https":
                sock.settimeout(remaining(deadline))
                sock = self.tls.wrap_socket(sock, server_hostname=origin.host)
        except BaseException:
            _close(sock)
            raise
        return _Conn(sock, generation, os.getpid())

    # ------------------------------------------------------------------ the exchange

    def post(
        self, origin: Origin, head: bytes, body: bytes, *, timeout: float, max_body: int
    ) -> Response:
        """POST: ``head`` is the header lines after the request line and ``Host`` (each
        ending in CRLF, no ``Content-Length``); the whole exchange ends by ``timeout``.

        At most ``max_body`` bytes of the answer's body are read; a longer body is left
        unread and its connection dropped.
        """
        return self.finish(self.start(origin, head, body, timeout=timeout, max_body=max_body))

    def start(
        self, origin: Origin, head: bytes, body: bytes, *, timeout: float, max_body: int
    ) -> Sent:
        """Send a POST as ``post`` does and return without reading its answer (``finish``).

        The request is written whole before this returns; ``timeout`` bounds the whole
        exchange, the read that ``finish`` does later included.
        """
        deadline = time.monotonic() + timeout
        request = b"".join((origin.prefix, head, b"Content-Length: %d\r\n\r\n" % len(body), body))
        conn = self._checkout(origin)
        if conn is None:
            conn = self._connect(origin, deadline)
        try:
            early = self._send(conn, request, deadline, max_body)
        except _SendFailed as failed:
            if not conn.reused:
                raise failed.error from None
            # A kept-alive connection the server closed between our idle check and the send.
            # The write failed, so the server cannot hold the whole request (its
            # Content-Length promises bytes it never got) and cannot have processed it:
            # sending it once on a new connection cannot duplicate a batch. A failure after
            # the request went out whole is never resent here: the server may have taken the
            # batch, and resending is the queue's decision (its retry, at least once).
            conn = self._connect(origin, deadline)
            try:
                early = self._send(conn, request, deadline, max_body)
            except _SendFailed as again:
                raise again.error from None
        return Sent(origin, conn, deadline, max_body, early)

    def finish(self, sent: Sent, *, late: float = 0.0) -> Response:
        """Read the answer to a request ``start`` sent, once, by its deadline.

        ``late``: called past the deadline with the answer already arriving (bytes waiting
        on the connection), the read gets this many seconds more. A caller that reads a
        sent-ahead answer after other work (the quick retries of the batch before it) reads
        what the server sent in time: taken for a timeout, it would send the batch again, a
        duplicate without a fault. A server that has not begun to answer gets no more than
        the deadline (a caller's ``flush(timeout)`` is not stretched by it).
        """
        if sent.answer is not None:
            return sent.answer
        if sent.done:
            raise ProtocolError("this request's answer was already read or given up")
        sent.done = True
        conn = sent.conn
        keep = False
        deadline = sent.deadline
        try:
            if late and time.monotonic() >= deadline and _has_bytes(conn.sock):
                deadline = time.monotonic() + late
            response, keep = read_response(conn.sock, deadline, sent.max_body)
            return response
        finally:
            if keep:
                self._checkin(sent.origin, conn)
            else:
                _close(conn.sock)

    def cancel(self, sent: Sent) -> None:
        """Give up a request ``start`` sent without reading its answer: its connection is
        closed (the server may still have taken the batch)."""
        if sent.answer is None and not sent.done:
            sent.done = True
            _close(sent.conn.sock)

    @staticmethod
    def _send(conn: _Conn, request: bytes, deadline: float, max_body: int) -> Response | None:
        """Write ``request`` whole: None, the connection left open for the answer; or the
        answer a server sent before it read the whole request (a 413), its connection closed.
        """
        sock = conn.sock
        try:
            sock.settimeout(remaining(deadline))
            try:
                sock.sendall(request)
            except TimeoutError:
                raise
            except OSError as exc:
                # The server may have answered before reading the whole request (a 413)
                # and closed: that answer is the outcome if it can be read.
                try:
                    response, _ = read_response(sock, deadline, max_body)
                except (OSError, ValueError):
                    raise _SendFailed(exc) from None
                _close(sock)
                return response
        except BaseException:
            _close(sock)
            raise
        return None


@dataclass
class Sent:
    """A request ``WireClient.start`` wrote, its answer still to read (``finish``)."""

    origin: Origin
    conn: _Conn
    deadline: float
    max_body: int
    #: The answer when the server gave it before it read the whole request.
    answer: Response | None = None
    #: Its answer was read or given up (``cancel``): the connection is no longer this one's.
    done: bool = False


class _SendFailed(Exception):
    """The request could not be written whole (``error`` says why)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _open_socket(host: str, port: int, deadline: float, resolver: Resolver) -> socket.socket:
    """A TCP connection to the first address of ``host`` that answers, by ``deadline``.

    The name lookup ends by the deadline too (``_resolve``), and each address gets what is
    left of it (at most 10 s), not a fresh timeout of its own: a name with several dead
    addresses cannot stretch the request.
    """
    try:
        addresses = resolver.addresses(host, port, deadline)
    except TimeoutError:
        raise
    except OSError as exc:  # an unknown name (one that is not a name: ValueError)
        raise ConnectError(str(exc)) from exc
    error: OSError = ConnectError(f"no address for {host!r}")
    for family, kind, proto, _, address in addresses:
        left = remaining(deadline)
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(min(left, 10.0))
            sock.connect(address)
        except OSError as exc:
            _close(sock)
            error = exc
            continue
        return sock
    if isinstance(error, (TimeoutError, ConnectError)):
        raise error
    raise ConnectError(str(error)) from error


def _close_idle(idle: dict[tuple[str, str, int], list[_Conn]]) -> None:
    for conns in list(idle.values()):
        for conn in conns:
            _close(conn.sock)
    idle.clear()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
