"""``durable-analytics dead-letters list|requeue|purge``: the messages the server rejected."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import click

from durable_analytics._store import DeadLetter, QueueBackend

from ._app import (
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    cli,
    common_options,
    json_option,
    open_queue,
    queue_config,
    queue_exists,
    resolve_queue,
    setup_logging,
)
from ._output import count, human_age, one_line


@cli.group("dead-letters", short_help="List, requeue or purge rejected messages.")
def dead_letters_group() -> None:
    """List, requeue or purge the messages the server rejected (400, 413, 422).

    A rejected message is moved out of the queue with the status and an excerpt of the
    response. Fix the cause, then `requeue` it (a drain or flusher sends it again), or
    `purge` it. Each subcommand acts on all dead letters, or on those given with --id.
    """


_ID_OPTION = click.option(
    "--id",
    "ids",
    type=click.IntRange(min=1),
    multiple=True,
    metavar="N",
    help="Only this dead letter (repeatable). Default: all of them.",
)


_MISSING_OK = click.option(
    "--missing-ok",
    is_flag=True,
    help="A queue file not created yet (nothing tracked there) has no dead letters: exit 0, "
    "and it is not created. Without it: exit 3.",
)


def _selected(queue: QueueBackend | None, ids: tuple[int, ...]) -> list[DeadLetter]:
    """The dead letters named by ``ids`` (all without ids); an unknown id is a usage error.

    ``queue`` None: a queue not created yet, which has none.
    """
    if not ids:
        return [] if queue is None else queue.dead_letters()
    wanted = sorted(set(ids))
    found = [] if queue is None else queue.dead_letters(wanted)
    missing = sorted(set(wanted) - {d.id for d in found})
    if missing:
        raise CLIError(
            f"no dead letter with id {', '.join(map(str, missing))}; nothing was changed",
            EXIT_USAGE,
        )
    return found


@contextlib.contextmanager
def _opened(queue_path: Path | None, missing_ok: bool) -> Iterator[QueueBackend | None]:
    """The queue, closed after the block; None for one not created yet with ``missing_ok``."""
    config = queue_config(resolve_queue(queue_path))
    if missing_ok and not queue_exists(config):
        yield None  # nothing tracked there yet: no dead letters, and no file created
        return
    queue = open_queue(config, hint="; with `--missing-ok` it has no dead letters (exit 0)")
    try:
        yield queue
    finally:
        queue.close()


@dead_letters_group.command("list", short_help="Show id, type, event, status, reason, age.")
@common_options
@_ID_OPTION
@json_option
@_MISSING_OK
def dead_letters_list(
    queue_path: Path | None, verbose: int, ids: tuple[int, ...], as_json: bool, missing_ok: bool
) -> int:
    """Show the dead letters: id, type, event, status, reason, age (--json: everything)."""
    setup_logging(verbose)
    with _opened(queue_path, missing_ok) as queue:
        letters = _selected(queue, ids)
    if as_json:
        click.echo(json.dumps([d.as_dict() for d in letters], indent=2))
        return EXIT_OK
    if not letters:
        click.echo("no dead letters")
        return EXIT_OK
    now = time.time()
    header = ("ID", "TYPE", "EVENT", "STATUS", "REASON", "AGE")
    rows = [
        (
            str(d.id),
            d.type or "?",
            one_line(d.event or "-")[:40],
            "-" if d.status is None else str(d.status),
            one_line(d.reason)[:60],
            human_age(max(0.0, now - d.dead_at)),
        )
        for d in letters
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


@dead_letters_group.command("requeue", short_help="Put dead letters back in the queue.")
@common_options
@_ID_OPTION
@json_option
@_MISSING_OK
def dead_letters_requeue(
    queue_path: Path | None, verbose: int, ids: tuple[int, ...], as_json: bool, missing_ok: bool
) -> int:
    """Put dead letters back in the queue, to be sent again by the next drain or flusher."""
    return _act_on_dead_letters(queue_path, verbose, ids, as_json, missing_ok, "requeued")


@dead_letters_group.command("purge", short_help="Delete dead letters for good.")
@common_options
@_ID_OPTION
@json_option
@_MISSING_OK
def dead_letters_purge(
    queue_path: Path | None, verbose: int, ids: tuple[int, ...], as_json: bool, missing_ok: bool
) -> int:
    """Delete dead letters for good."""
    return _act_on_dead_letters(queue_path, verbose, ids, as_json, missing_ok, "purged")


def _act_on_dead_letters(
    queue_path: Path | None,
    verbose: int,
    ids: tuple[int, ...],
    as_json: bool,
    missing_ok: bool,
    done: str,
) -> int:
    """Requeue or purge the selected dead letters and report how many, as ``done``."""
    setup_logging(verbose)
    with _opened(queue_path, missing_ok) as queue:
        chosen = _selected(queue, ids)
        n = 0
        if queue is not None and chosen:
            act = queue.requeue_dead_letters if done == "requeued" else queue.purge_dead_letters
            n = act([d.id for d in chosen])
    if as_json:
        click.echo(json.dumps({done: n}))
    else:
        click.echo(f"{done} {count(n, 'dead letter')}")
    return EXIT_OK
