"""``durable-analytics worker``: the long-running flusher for producers that only append."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import click

from durable_analytics._delivery import make_deliverer
from durable_analytics._flusher import Flusher
from durable_analytics.exceptions import QueueBusy

from ._app import (
    EXIT_OK,
    Seconds,
    cli,
    common_options,
    lease_timeout_option,
    log,
    max_in_flight_option,
    open_queue,
    queue_config,
    resolve_queue,
    setup_logging,
    stop_on_signals,
)
from ._output import PROG


@cli.command("worker", short_help="Run the long-running flusher.")
@common_options
@click.option(
    "--poll",
    type=Seconds(min=0.01),
    default=0.5,
    show_default=True,
    metavar="SECONDS",
    help="How often to look for messages other processes appended.",
)
@max_in_flight_option
@lease_timeout_option(request_timeout="--request-timeout")
@click.option(
    "--shutdown-timeout",
    type=Seconds(min=0),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM/SIGINT, how long the batches in flight may take before exiting.",
)
@click.option(
    "--flush-interval",
    type=Seconds(min=0, min_open=True),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Send a batch smaller than 20 messages once its oldest is this old.",
)
@click.option(
    "--request-timeout",
    type=Seconds(min=0, min_open=True),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Timeout of one HTTP request.",
)
def worker_command(
    queue_path: Path | None,
    verbose: int,
    poll: float,
    max_in_flight: int,
    lease_timeout: float,
    shutdown_timeout: float,
    flush_interval: float,
    request_timeout: float,
) -> int:
    """Run the long-running flusher for producers that use flusher="none".

    For cron jobs, serverless functions and servers without threads: they only append, and
    this process delivers, with the same batching, retry and backoff rules as a Client's
    flusher thread. Logs to stderr. SIGTERM or SIGINT finishes the batches in flight and
    exits 0 within --shutdown-timeout (a second signal exits at once); a batch still in
    flight then goes back to the queue as this process ends. Creates the queue if missing.
    """
    setup_logging(verbose, worker=True)
    config = queue_config(
        resolve_queue(queue_path),
        timeout=request_timeout,
        flush_interval=flush_interval,
        max_in_flight=max_in_flight,
        lease_timeout=lease_timeout,
    )
    path = config.queue_path
    queue = open_queue(config, must_exist=False)
    # One flusher: it keeps up to max_in_flight batches in flight on its connection pool.
    flushers = [
        Flusher(
            make_deliverer(config, queue),
            flush_interval=flush_interval,
            poll_interval=poll,
            name=f"{PROG}-worker",
        )
    ]
    stop = threading.Event()
    with stop_on_signals(stop):
        for flusher in flushers:
            flusher.start()
        log.info(
            "worker started on %s (%s pending, max %d in flight)",
            path,
            f"{queue.pending():,}",
            max_in_flight,
        )
        reported = 0
        last_report = time.monotonic()
        while not stop.wait(1.0):
            if time.monotonic() - last_report >= 60:
                sent = sum(f.delivered.sent for f in flushers)
                if sent != reported:
                    log.info("sent %s in the last minute", f"{sent - reported:,}")
                reported, last_report = sent, time.monotonic()
        log.info("stopping: finishing the batches in flight (up to %gs)", shutdown_timeout)
        deadline = time.monotonic() + shutdown_timeout
        # No queue wait of a flusher outlasts the shutdown (a lock holder may be frozen).
        with queue.bounded(shutdown_timeout):
            for flusher in flushers:
                flusher.stop(max(0.0, deadline - time.monotonic()))
    in_flight = [f for f in flushers if f.alive]
    for flusher in flushers:
        if not flusher.alive:
            flusher.deliverer.transport.close()
    if in_flight:
        log.warning(
            "%d batch(es) still in flight after %gs; they go back to the queue as this "
            "process exits",
            len(in_flight),
            shutdown_timeout,
        )
    sent = sum(f.delivered.sent for f in flushers)
    dead = sum(f.delivered.dead_lettered for f in flushers)
    try:
        # Within what is left of the shutdown: a lock holder may be frozen.
        with queue.bounded(max(0.0, deadline - time.monotonic())):
            pending = f"{queue.pending():,}"
    except QueueBusy:
        pending = "an unknown number (the queue did not answer in time)"
    log.info("stopped: sent %s, dead-lettered %s, %s pending", f"{sent:,}", f"{dead:,}", pending)
    return EXIT_OK
