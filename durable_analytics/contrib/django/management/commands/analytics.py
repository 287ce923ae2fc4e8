"""``manage.py analytics …``: the ``durable-analytics`` command on the settings' queue.

``manage.py analytics status``, ``manage.py analytics drain --timeout 60``,
``manage.py analytics dead-letters list`` ... take the same options as
``durable-analytics``; ``--queue`` defaults to the queue of ``settings.DURABLE_ANALYTICS``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from durable_analytics._config import Config
from durable_analytics.contrib.django import settings_dict

# Commands that take --queue (the others: collector, demo, the enqueue calls' own options).
_QUEUE_COMMANDS = frozenset({"drain", "status", "worker", "dead-letters"})


class Command(BaseCommand):  # type: ignore[misc]  # django ships no types
    """Run ``durable-analytics ARGS`` with ``--queue`` set from the Django settings."""

    help = (
        "Run a durable-analytics command (status, drain, worker, dead-letters ...) on the "
        "queue of settings.DURABLE_ANALYTICS. `manage.py analytics --help` lists them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Everything after the command name goes to durable-analytics as given."""
        parser.add_argument("cli_args", nargs=argparse.REMAINDER, metavar="ARGS")

    def run_from_argv(self, argv: list[str]) -> None:
        """Pass ``--help`` through to durable-analytics instead of Django's parser."""
        if len(argv) > 2 and argv[2] in ("-h", "--help"):
            self._run(argv[2:])
            return
        super().run_from_argv(argv)

    def handle(self, *args: Any, **options: Any) -> None:
        """Run it; exit with its exit code when that is not 0."""
        self._run(list(options["cli_args"]))

    def _run(self, args: list[str]) -> None:
        from durable_analytics.cli import main

        if (
            args
            and args[0] in _QUEUE_COMMANDS
            and not any(a == "--queue" or a.startswith("--queue=") for a in args)
        ):
            config = Config.build(**settings_dict())
            # A PostgreSQL queue by its URL (passed in this process, never on a command line).
            path = config.queue_url or config.queue_path
            if args[0] == "dead-letters" and len(args) > 1:
                args = [*args[:2], "--queue", str(path), *args[2:]]
            elif args[0] != "dead-letters":
                args = [args[0], "--queue", str(path), *args[1:]]
        code = _call(main, args)
        if code:
            sys.exit(code)


def _call(main: Any, args: list[str]) -> int:
    import click

    try:
        code = main(args)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return int(exc.exit_code)
    return int(code or 0)
