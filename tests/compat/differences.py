"""Every intended difference from segment-analytics-python 2.4.0, in one table.

The README's compatibility section shows this table (a test keeps the two in sync), and
every row is exercised by at least one scenario of this suite through ``differs(...)``:
the scenario asserts segment's behaviour on segment and ours on durable-analytics, so a
difference can neither appear nor vanish unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Difference:
    """One user-visible behaviour that differs on purpose."""

    key: str
    topic: str
    segment: str
    durable: str
    why: str


DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        "validation-error-type",
        "Invalid call arguments and settings",
        "`AssertionError` (and `RuntimeError` for an oversized message)",
        "`ValidationError` / `MessageTooLarge` / `ConfigError`, all `ValueError` subclasses",
        "a wrong argument is a value error; code that catches `AssertionError` around a "
        "call should catch `ValueError` (or both)",
    ),
    Difference(
        "failed-batch-kept",
        "A batch that still fails after the retries (5xx, 429, network)",
        "dropped; `on_error` is called once",
        "kept on disk and retried with backoff until delivered; `on_error` is called, "
        "`stats().last_error` says why",
        "the product's promise: a returned call is never lost",
    ),
    Difference(
        "on-error-each-attempt",
        "How often `on_error` is called for a batch that keeps failing",
        "once, when it is dropped",
        "after each failed delivery attempt (each backoff round), since it is kept and retried",
        "every failure is reported while the batch waits; deduplicate by `messageId` if once "
        "is wanted",
    ),
    Difference(
        "on-error-no-answer",
        "The exception `on_error` gets when no answer came (refused, timeout, TLS)",
        "requests' exception (`ConnectionError`, `Timeout`, ...): no `status`, `code`, `message`",
        '`RetryableError`, an `APIError` with `status` None, `code` `"network"` and '
        "`message` saying what failed; for an HTTP answer both pass an `APIError` whose "
        "`status`, `code`, `message` agree (ours has no `response`: `excerpt` holds its text)",
        "one exception type for every failure; requests is not a dependency",
    ),
    Difference(
        "config-status-kept",
        "401, 403, 404, 501, 505 answers",
        "dropped",
        "kept until the write key or host is fixed (backing off up to 10 minutes)",
        "a wrong key or URL is a configuration error, not bad data",
    ),
    Difference(
        "bad-message-isolated",
        "400, 413, 422 answers",
        "the whole batch is dropped",
        "the batch is split until the bad message is alone; it is dead-lettered, "
        "the others delivered",
        "one bad message must not take its batch with it",
    ),
    Difference(
        "no-write-key-in-body",
        "The request body",
        "`{batch, sentAt, writeKey}`",
        "`{batch, sentAt}`; the key travels only in the `Authorization` header",
        "the key must not end up in request logs of proxies and servers",
    ),
    Difference(
        "library-name",
        "`context.library`, `User-Agent`, the logger",
        "`analytics-python`, logger `segment`",
        "`durable-analytics`, logger `durable_analytics` (records come from its children "
        "`.client`, `.delivery`, `.queue`, `.contrib`)",
        "it is another library",
    ),
    Difference(
        "durable-defaults",
        "Defaults",
        "`timeout=15`, `max_retries=10`, `upload_size=100`, `upload_interval=0.5`, "
        "`max_queue_size=10000`",
        "`timeout=10`, `max_retries=3` quick retries per attempt, `flush_at=20`, "
        "`flush_interval=5`, no `max_queue_size` (the 1 GiB `max_queue_bytes` caps); "
        "an explicit value of segment's setting is honoured",
        "retries continue from disk, so the quick ones can be few; batching trades "
        "latency for fewer requests",
    ),
    Difference(
        "timeout-pair",
        "`timeout=(connect, read)`, requests' pair",
        "passed to requests: the connect and the read timeout; `client.timeout` is the pair",
        "one bound of the whole request, the two added; `client.timeout` is that sum",
        "one deadline per request bounds every wait of a flush; a pair that is not two "
        "positive numbers is a `ConfigError` at construction",
    ),
    Difference(
        "flush-result",
        "`flush()`",
        "returns `None`; blocks until the queue is empty (or the retries give up)",
        "returns `FlushResult(sent, pending, dead_lettered)`; `flush(timeout)` is bounded",
        "a flush must be able to end during an outage",
    ),
    Difference(
        "join-delivers",
        "`join()` and the end of the program",
        "stops the consumer; what is still queued is lost",
        "delivers for up to `shutdown_timeout` (5 s), the rest stays on disk for the next run",
        "durability",
    ),
    Difference(
        "host-attribute",
        "`client.host`",
        "what was passed (`None` for the default)",
        "the URL in use (`https://api.segment.io` by default), without a trailing slash",
        "the attribute answers where messages go",
    ),
    Difference(
        "settings-read-only",
        "Assigning a setting attribute (`client.host = ...`)",
        "accepted, though the sender thread keeps the old value",
        "`AttributeError`: settings are fixed at construction",
        "an assignment that silently does nothing is a trap",
    ),
    Difference(
        "sync-mode-keeps",
        "`sync_mode=True` when delivery fails",
        "raises `APIError` (or the network error); the message is lost",
        "raises `APIError` (the subclass `on_error` would get, with the server's `code` and "
        "`message`); the message stays queued and is retried",
        "durability",
    ),
    Difference(
        "sync-mode-network-error",
        "`sync_mode=True` when the server cannot be reached",
        "raises requests' `ConnectionError`",
        'raises `RetryableError` (an `APIError`: `status` None, `code` `"network"`, what '
        "failed in `message`); the message stays queued",
        "one exception to catch; requests is not a dependency",
    ),
    Difference(
        "queue-size-counts-in-flight",
        "`max_queue_size`, `client.queue.qsize()`",
        "counts messages waiting in memory, not the batch being sent",
        "counts every message not yet acknowledged, the batch being sent included",
        "an unacknowledged message is still in the queue file",
    ),
    Difference(
        "unknown-module-setting",
        "A misspelled module-level setting (`analytics.flush_intervall = 1`)",
        "silently ignored",
        "the first call raises `ConfigError` naming the closest valid setting",
        "a typo must not silently change behaviour",
    ),
    Difference(
        "module-log-handler",
        "`analytics.log_handler = handler`",
        "ignored (never passed to the default client)",
        "attached to the library's logger, as `Client(log_handler=...)` does",
        "a setting that is offered should work",
    ),
    Difference(
        "oauth-key-checked-early",
        "A malformed `oauth_client_key`",
        "accepted; every delivery then fails",
        "`ConfigError` from `Client(...)`",
        "a clear error at the call that caused it",
    ),
    Difference(
        "naive-timestamp-utc",
        "A naive `timestamp` datetime",
        "taken as local time when within 5 s of now, else UTC",
        "always UTC",
        "never a guess; the same result on hosts that run on UTC",
    ),
    Difference(
        "datetime-values-format",
        "Datetimes inside properties, traits, context",
        "`isoformat()`: microseconds, no offset when naive",
        "milliseconds with an offset (naive taken as UTC), like `timestamp`",
        "one format for every time in a message",
    ),
    Difference(
        "id-types",
        "Ids: `True`, `0`, a `UUID`",
        '`True` sent as `"True"`; `user_id=0` refused; a `UUID` refused',
        'bools refused; `0` sent as `"0"`; a `UUID` sent as its string',
        "a bool is never an id; 0 and UUIDs are",
    ),
    Difference(
        "string-flags",
        'A string for `send`, `gzip`, `sync_mode` or `debug` (`"false"`, `"0"`)',
        'truthy: `send="false"` sends',
        "`ConfigError` from `Client(...)`; other values read as truthy or falsy, as segment does",
        'a setting read from the environment is a string, and `"false"` must not mean on',
    ),
    Difference(
        "empty-required-ids",
        "An empty `event`, `group_id`, `previous_id` or `message_id`; a bool `message_id`",
        'sent as `""` (`"True"`)',
        "`ValidationError`",
        'an empty id cannot be joined on, nor a nameless event counted; every `""` '
        "`messageId` would be one message to a deduplicating server",
    ),
    Difference(
        "mapping-fields",
        '`traits` / `properties` / `context` / `integrations` that are `[]`, `""` or '
        "another `Mapping`; `name=0`",
        "falsy values become `{}`; only `dict` accepted; `name=0` sent",
        "`ValidationError` for a falsy non-mapping and a non-string name; any `Mapping` accepted",
        "a wrong type is a bug at the call",
    ),
    Difference(
        "value-conversion",
        "`UUID` and `frozenset` values",
        "the whole key is silently dropped",
        "sent as a string and a list",
        "nothing the caller passed disappears silently",
    ),
    Difference(
        "unserializable-values",
        "Values JSON cannot hold: `object()`, `datetime.time`, `timedelta`, `numpy.bool_`, "
        "a numpy array, ...",
        'the key is dropped with a warning ("Dictionary values must be serializeable to '
        'JSON"), the rest sent; inside a list the whole list goes',
        "`ValidationError` at the call naming the path and the type "
        "(`track: properties.flag: cannot convert numpy.bool to JSON`); nothing is queued",
        "a clear error at the call, not data silently missing at the server; convert first: "
        "`.tolist()` for numpy values, `.isoformat()`, `.total_seconds()`, `str(...)`",
    ),
    Difference(
        "number-types",
        "numpy integers, `numpy.float32`, `Fraction`",
        "`TypeError` from the call (`Object of type int64 is not JSON serializable`)",
        "sent as a JSON number",
        "a number is a number",
    ),
    Difference(
        "unrepresentable-keys",
        "Dict keys that are not `str`, `int`, `float`, `bool` or `None`",
        "`TypeError` from the call (`keys must be str, int, float, bool or None`) for any of them",
        "a tuple, `frozenset` or other object: `ValidationError` (a `ValueError`) naming the "
        "path; a date, `UUID`, `Enum`, `bytes` or numpy integer key becomes its text; `int`, "
        '`float`, `bool`, `None` keys become `"1"`, `"2.5"`, `"true"`, `"null"` in both',
        "no JSON name can be guessed for a tuple; where `TypeError` was caught around a call, "
        "catch `ValueError`",
    ),
    Difference(
        "invalid-utf8-replaced",
        "`bytes` values that are not UTF-8",
        "`UnicodeDecodeError` from the call",
        "invalid bytes replaced with U+FFFD",
        "a byte string from elsewhere should not break tracking",
    ),
    Difference(
        "non-json-values",
        "NaN, ±Infinity, circular references",
        "`NaN`/`Infinity` sent (not JSON); `RecursionError`",
        "`ValidationError` naming the field",
        "the server would reject the batch",
    ),
    Difference(
        "context-not-mutated",
        "The caller's `context` dict",
        '`context["library"]` written into it',
        "left untouched (a copy is sent)",
        "a call must not change its arguments",
    ),
    Difference(
        "size-limit-utf8",
        "The 32 KB message limit",
        "measured on ASCII-escaped JSON with spaces",
        "measured on the compact UTF-8 body that is sent",
        "the limit is about what travels",
    ),
)

BY_KEY = {d.key: d for d in DIFFERENCES}

README_START = "<!-- compat-table:start -->"
README_END = "<!-- compat-table:end -->"


def render() -> str:
    """The README's table of differences, between its markers (a test keeps them equal)."""
    lines = [
        README_START,
        "| | segment-analytics-python 2.4.0 | durable-analytics | why |",
        "|---|---|---|---|",
    ]
    lines += [f"| {d.topic} | {d.segment} | {d.durable} | {d.why} |" for d in DIFFERENCES]
    lines.append(README_END)
    return "\n".join(lines)
