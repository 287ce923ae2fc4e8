"""``durable-analytics track|identify|page|screen|group|alias``: queue one message from a shell.

The six commands and their options are generated from ``_calls.CALLS``, the one table of
the calls' fields: a field added there is an option here, with no other change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from durable_analytics import _messages
from durable_analytics._calls import CALLS, CallField, CallSpec
from durable_analytics._client import Client
from durable_analytics.exceptions import ValidationError

from ._app import (
    EXIT_OK,
    EXIT_UNDELIVERED,
    EXIT_USAGE,
    CLIError,
    cli,
    common_options,
    resolve_queue,
    setup_logging,
)

# What each command says about itself: (the line in the command list, the first help paragraph).
_ABOUT: dict[str, tuple[str, str]] = {
    "track": (
        "Queue a track: the user did --event.",
        "Queue a track message: the user did --event, with --properties.",
    ),
    "identify": (
        "Queue an identify: who the user is.",
        "Queue an identify message: who the user is, with --traits.",
    ),
    "page": (
        "Queue a page: the user saw a web page.",
        "Queue a page message: the user saw the web page --name.",
    ),
    "screen": (
        "Queue a screen: the user saw an app screen.",
        "Queue a screen message: the user saw the app screen --name.",
    ),
    "group": (
        "Queue a group: the user is in --group-id.",
        "Queue a group message: the user belongs to --group-id, with the group's --traits.",
    ),
    "alias": (
        "Queue an alias: two ids of one user.",
        "Queue an alias message: --previous-id and --user-id are the same user.",
    ),
}

_EPILOG = (
    "Prints the messageId once the message is on disk. Invalid JSON or a missing field "
    "exits 2 and stores nothing. A worker, a drain or any flusher on the queue delivers it."
)

_METAVAR = {
    "id": "ID",
    "string": "NAME",
    "object": "JSON",
    "timestamp": "ISO-8601",
    "message_id": "ID",
}
_FORMAT = {"object": ", as a JSON object", "timestamp": ", as ISO-8601 like 2024-05-01T12:00:00Z"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(spec: CallSpec, field: CallField) -> str:
    text = field.doc + _FORMAT.get(field.kind, "")
    if field.required:
        text += " (required)"
    elif field.name in spec.one_of:
        text += f" (one of {' or '.join(_flag(n) for n in spec.one_of)} is required)"
    text += "."
    if field.default:
        text += f" Default: {field.default}."
    return text


def _cli_order(spec: CallSpec) -> list[CallField]:
    """The call's fields in positional order, with those of which one is required first."""
    first = [f for f in spec.fields if f.name in spec.one_of]
    return first + [f for f in spec.fields if f.name not in spec.one_of]


def _parse_json(call: str, field: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValidationError(f"{call}: {field} is not valid JSON ({exc})") from None
    except RecursionError:
        # json.loads gives up around 1,000 levels; the library allows 64 anyway.
        raise ValidationError(
            f"{call}: {field}: nested deeper than {_messages.MAX_DEPTH} levels"
        ) from None


def _parse_timestamp(call: str, text: str) -> datetime:
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            f"{call}: timestamp must be ISO-8601 like 2024-05-01T12:00:00Z, got {text!r:.60}"
        ) from None


def _arguments(spec: CallSpec, texts: dict[str, str | None]) -> dict[str, Any]:
    """The call's keyword arguments from the options' text (JSON and timestamps parsed)."""
    args: dict[str, Any] = {}
    for field in spec.fields:
        text = texts[field.name]
        if text is None:
            args[field.name] = None
        elif field.kind == "object":
            args[field.name] = _parse_json(spec.name, field.name, text)
        elif field.kind == "timestamp":
            args[field.name] = _parse_timestamp(spec.name, text)
        else:
            args[field.name] = text
    return args


def enqueue(
    spec: CallSpec,
    texts: dict[str, str | None],
    *,
    queue_path: Path | None,
    write_key: str | None,
    host: str | None,
) -> int:
    """Validate one call's options, store the message, print its messageId."""
    if not write_key:
        raise CLIError(
            "a write key is required: pass --write-key or set DURABLE_ANALYTICS_WRITE_KEY",
            EXIT_USAGE,
        )
    args = _arguments(spec, texts)
    # Validate the message with the library before the queue file is even opened, so bad
    # input leaves no trace; the Client then builds it again (same checks) and stores it.
    getattr(_messages, spec.name)(**args)
    client = Client(
        write_key,
        host=host,
        queue_path=resolve_queue(queue_path),
        flusher="none",
        on_exit="none",
        _recover=False,  # report a damaged queue (exit 3), never repair it from a shell
    )
    try:
        stored, message = getattr(client, spec.name)(**args)
    finally:
        client.queue.close()
    if not stored:
        raise CLIError(
            "the queue is full (max_queue_bytes): the message was dropped", EXIT_UNDELIVERED
        )
    click.echo(message["messageId"])
    return EXIT_OK


def _destination_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--host",
        metavar="URL",
        envvar="DURABLE_ANALYTICS_HOST",
        show_envvar=True,
        default=None,
        help="Base URL of the API. Default: https://api.segment.io.",
    )(f)
    return click.option(
        "--write-key",
        metavar="KEY",
        envvar="DURABLE_ANALYTICS_WRITE_KEY",
        show_envvar=True,
        default=None,
        help="The source's write key (required).",
    )(f)


def _add_command(spec: CallSpec) -> None:
    short_help, about = _ABOUT[spec.name]

    def command(
        queue_path: Path | None,
        verbose: int,
        write_key: str | None,
        host: str | None,
        **texts: str | None,
    ) -> int:
        setup_logging(verbose)
        return enqueue(spec, texts, queue_path=queue_path, write_key=write_key, host=host)

    f: Callable[..., Any] = _destination_options(common_options(command))
    for field in reversed(_cli_order(spec)):
        f = click.option(
            _flag(field.name),
            field.name,
            metavar=_METAVAR[field.kind],
            default=None,
            help=_help(spec, field),
        )(f)
    cli.command(spec.name, help=about, epilog=_EPILOG, short_help=short_help)(f)


for _spec in CALLS.values():
    _add_command(_spec)
