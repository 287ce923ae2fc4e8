"""Reading one HTTP/1.x answer from a socket: its head, its framing and its body, bounded.

The server is not trusted: the head is capped at 64 KiB, interim (1xx) answers at 32, the
body at the caller's cap, trailers at 64 KiB, and every read waits only what is left of the
request's deadline. Bytes are gathered in a ``bytearray`` (appends and front deletions are
cheap), so an answer sent a byte at a time costs linear, not quadratic, CPU.

A head whose framing is ambiguous or invalid (a Content-Length that is not one decimal
number) is refused whole, as RFC 9112 §6.3 asks; a body that breaks off after a good head
keeps the status. An answer framed by both Transfer-Encoding and Content-Length, or carrying
Transfer-Encoding in HTTP/1.0, is read by its Transfer-Encoding and its connection dropped.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass

__all__ = [
    "MAX_HEAD_BYTES",
    "MAX_INTERIM",
    "ProtocolError",
    "Response",
    "read_response",
    "remaining",
]

#: A response head (or a trailer section) longer than this is not an answer we will parse.
MAX_HEAD_BYTES = 64 * 1024
#: More interim (1xx) answers than this before the final one is a server that never answers.
MAX_INTERIM = 32
_NO_BODY = frozenset({204, 304})
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([0-9]{3})(?: [^\r\n]*)?\r?\n")
#: One header line: a token, a colon, the value (its blanks are stripped in Python: a lazy
#: value before optional blanks backtracks quadratically on a long line of spaces, seconds
#: of CPU in C with the GIL held, past any timeout).
_FIELD = re.compile(rb"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):([^\r\n]*)\r?\n", re.MULTILINE)
#: A Content-Length of more digits than this is absurd (and would be slow to convert).
_MAX_LENGTH_DIGITS = 18


class ProtocolError(OSError):
    """The server's answer is not HTTP/1.x (a malformed status line, header or framing)."""


@dataclass
class Response:
    """One answer: its status, headers (names lower-cased), and the body read (at most the
    cap; ``complete`` is False when more was left unread, the connection then dropped)."""

    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool = True


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value); ``TimeoutError`` when
    none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def read_response(sock: socket.socket, deadline: float, max_body: int) -> tuple[Response, bool]:
    """Read one answer; returns it and whether the connection can carry another request."""
    # Each read waits only what is left of the deadline, the first one too: the send may
    # have used most of it.
    data = _recv(sock, deadline)
    if not data:
        raise ConnectionResetError("the server closed the connection without an answer")
    for _ in range(MAX_INTERIM + 1):
        head, data = _read_head(sock, data, deadline)
        status, version, headers = _parse_head(head)
        if not 100 <= status < 200 or status == 101:
            break
        # An interim answer (100 Continue, 103 Early Hints): the final one follows.
    else:
        raise ProtocolError(f"malformed answer: more than {MAX_INTERIM} interim (1xx) answers")
    keep = _keeps_alive(version, headers)
    if status in _NO_BODY or status == 101:
        return Response(status, headers, b""), keep and status != 101 and not data
    # Raised, not kept with the status: an answer whose length cannot be known is discarded.
    length, framing_ok = _framing(version, headers)
    try:
        body, complete, reusable = _read_body(sock, data, length, deadline, max_body)
    except (OSError, ValueError) as exc:
        # The status came whole: it stands (a 200 whose body broke off still took the
        # batch); the body is unknown and the connection is dropped.
        unreadable = f"<unreadable response body: {type(exc).__name__}>".encode()
        return Response(status, headers, unreadable, False), False
    return Response(status, headers, body, complete), keep and reusable and framing_ok


#: How a body is framed: a byte count, or one of these.
_CHUNKED = -1
_TO_CLOSE = -2


def _framing(version: bytes, headers: dict[str, str]) -> tuple[int, bool]:
    """The body's framing (a length, ``_CHUNKED`` or ``_TO_CLOSE``) and whether it is
    unambiguous enough to leave the connection in use (RFC 9112 §6.1, §6.3)."""
    coding = headers.get("transfer-encoding")
    if coding is not None:
        # Transfer-Encoding overrides Content-Length; both at once (or Transfer-Encoding in
        # HTTP/1.0) is how request smuggling starts: read it, then never reuse the connection.
        clean = "content-length" not in headers and version == b"HTTP/1.1"
        if coding.lower().rsplit(",", 1)[-1].strip() == "chunked":
            return _CHUNKED, clean
        return _TO_CLOSE, False
    text = headers.get("content-length")
    if text is None:
        return _TO_CLOSE, False
    # One decimal number, or a list of the same one (two equal header lines, "5, 5").
    values = {value.strip() for value in text.split(",")}
    value = values.pop()
    if values or not value.isascii() or not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
        raise ProtocolError(f"malformed answer: invalid Content-Length {text[:40]!r}")
    return int(value), True


def _read_body(
    sock: socket.socket, data: bytes, length: int, deadline: float, max_body: int
) -> tuple[bytes, bool, bool]:
    """The body (to ``max_body`` bytes), whether it was read whole, and whether the
    connection is left at the start of the next answer (reusable)."""
    if length == _CHUNKED:
        body, complete, rest = _read_chunked(sock, bytearray(data), deadline, max_body)
        return body, complete, complete and not rest
    if length == _TO_CLOSE:
        body, complete = _read_to_close(sock, data, deadline, max_body)
        return body, complete, False
    wanted = min(length, max_body)
    if len(data) < wanted:
        buffer = bytearray(data)
        while len(buffer) < wanted:
            buffer += _recv_more(sock, deadline)
        data = bytes(buffer)
    if length > max_body:
        return data[:max_body], False, False
    # Bytes beyond the body answer nothing we asked: the connection is out of step, dropped.
    return data[:length], True, len(data) == length


def _head_end(data: bytes | bytearray, start: int) -> tuple[int, int]:
    """Where the head ends (the first blank line at or after ``start``) and the length of
    its terminator, or (-1, 0)."""
    end = data.find(b"\r\n\r\n", start)
    # A lenient server ends lines with LF alone: the first blank line wins, whichever kind.
    bare = data.find(b"\n\n", start, end + 2 if end >= 0 else len(data))
    if bare >= 0:
        return bare, 2
    return end, 4 if end >= 0 else 0


def _read_head(sock: socket.socket, data: bytes, deadline: float) -> tuple[bytes, bytes]:
    """The answer's head (status line and headers) and the bytes after it."""
    end, size = _head_end(data, 0)
    if end < 0:
        buffer = bytearray(data)
        while end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                break
            chunk = _recv(sock, deadline)
            if not chunk:
                if buffer:
                    raise ConnectionResetError("the server closed the connection mid-answer")
                raise ConnectionResetError("the server closed the connection without an answer")
            # Search only the new bytes (and the three before them a terminator may span).
            start = max(0, len(buffer) - 3)
            buffer += chunk
            end, size = _head_end(buffer, start)
        data = bytes(buffer)
    if end < 0 or end > MAX_HEAD_BYTES:
        raise ProtocolError("malformed answer: the head is longer than 64 KiB")
    return data[:end], data[end + size :]


def _recv(sock: socket.socket, deadline: float) -> bytes:
    # Each read waits only what is left of the deadline: a server trickling its answer a
    # byte at a time cannot hold the caller past it.
    sock.settimeout(remaining(deadline))
    return sock.recv(65536)


def _parse_head(head: bytes) -> tuple[int, bytes, dict[str, str]]:
    """Status, version and headers (names lower-cased) of an answer's head.

    Two regular expressions do the work in C: the request's CPU is taken from the caller's
    thread, and a Python loop over each header line costs more than the rest of the parse.
    """
    head += b"\r\n"
    status = _STATUS_LINE.match(head)
    if status is None:
        first = head.split(b"\n", 1)[0]
        raise ProtocolError(f"malformed status line {first[:80]!r}")
    fields = _FIELD.findall(head, status.end())
    if len(fields) != head.count(b"\n") - 1:
        bad = next(line for line in head.split(b"\n")[1:-1] if not _FIELD.match(line + b"\n"))
        raise ProtocolError(f"malformed header line {bad[:80]!r}")
    headers = {
        name.decode("latin-1").lower(): value.strip(b" \t").decode("latin-1")
        for name, value in fields
    }
    if len(headers) != len(fields):
        headers = _merge_fields(fields)
    return int(status.group(2)), status.group(1), headers


def _merge_fields(fields: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Headers with repeated names: values joined by commas; two different Content-Length
    values make the answer's framing ambiguous, which is refused."""
    headers: dict[str, str] = {}
    for name, value in fields:
        key = name.decode("latin-1").lower()
        text = value.strip(b" \t").decode("latin-1")
        previous = headers.get(key)
        if previous is None:
            headers[key] = text
        elif key == "content-length":
            if previous != text:
                raise ProtocolError("malformed answer: two different Content-Length headers")
        else:
            headers[key] = f"{previous}, {text}"
    return headers


def _keeps_alive(version: bytes, headers: dict[str, str]) -> bool:
    tokens = headers.get("connection", "").lower()
    if version == b"HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


def _read_to_close(
    sock: socket.socket, data: bytes, deadline: float, max_body: int
) -> tuple[bytes, bool]:
    """A body framed by the end of the connection, read to ``max_body`` bytes."""
    buffer = bytearray(data)
    while len(buffer) < max_body:
        chunk = _recv(sock, deadline)
        if not chunk:
            return bytes(buffer), True
        buffer += chunk
    return bytes(buffer[:max_body]), False


def _read_chunked(
    sock: socket.socket, data: bytearray, deadline: float, max_body: int
) -> tuple[bytes, bool, bytes]:
    """A chunked body: returns its bytes (to ``max_body``), whether it was read to its end,
    and any bytes after it. ``data`` is consumed from its front (cheap for a bytearray)."""
    body = bytearray()
    while True:
        line_end = data.find(b"\n")
        while line_end < 0:
            if len(data) > 1024:
                raise ProtocolError("chunk size line too long")
            data += _recv_more(sock, deadline)
            line_end = data.find(b"\n")
        size_text = data[:line_end].split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_text):
            raise ProtocolError(f"invalid chunk size {bytes(size_text[:20])!r}")
        size = int(size_text, 16)
        del data[: line_end + 1]
        if size == 0:
            break
        if len(body) + size > max_body:
            # Too long: keep what fits, leave the rest unread and the connection dropped.
            take = max_body - len(body)
            while len(data) < take:
                data += _recv_more(sock, deadline)
            body += data[:take]
            return bytes(body), False, b""
        while len(data) < size + 2:
            data += _recv_more(sock, deadline)
        if data[size : size + 2] != b"\r\n":
            raise ProtocolError("a chunk does not end where its size says")
        body += data[:size]
        del data[: size + 2]
    # Trailers, then the empty line that ends the message: 64 KiB in all, like a head.
    trailers = 0
    while True:
        line_end = data.find(b"\n")
        while line_end < 0:
            if trailers + len(data) > MAX_HEAD_BYTES:
                raise ProtocolError("trailers longer than 64 KiB")
            data += _recv_more(sock, deadline)
            line_end = data.find(b"\n")
        trailers += line_end + 1
        if trailers > MAX_HEAD_BYTES:
            raise ProtocolError("trailers longer than 64 KiB")
        line = data[:line_end].rstrip(b"\r")
        del data[: line_end + 1]
        if not line:
            return bytes(body), True, bytes(data)


def _recv_more(sock: socket.socket, deadline: float) -> bytes:
    chunk = _recv(sock, deadline)
    if not chunk:
        raise ConnectionResetError("the server closed the connection mid-body")
    return chunk
