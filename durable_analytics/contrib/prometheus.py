"""The client's queue health in the Prometheus text format (no dependency needed).

::

    from durable_analytics.contrib.prometheus import CONTENT_TYPE, render

    @app.get("/metrics")
    def metrics():
        return Response(render(client), content_type=CONTENT_TYPE)

The figures are those of ``client.stats()`` (the whole queue file, whichever process wrote
it), each labelled with ``queue`` (the file's path), and the delivery counters of this
process (``durable_analytics_sent_messages_total``, ``…_dead_lettered_messages_total``,
``…_retries_total``, ``…_requests_total{status}``).
"""

from __future__ import annotations

import time

from durable_analytics import Client
from durable_analytics._metrics import (
    delivery_counters,
    delivery_samples,
    queue_samples,
    render_prometheus,
)

__all__ = ["CONTENT_TYPE", "render"]

#: The content type of the text format the output follows.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(client: Client) -> str:
    """``client``'s queue metrics and this process's delivery counters, as Prometheus text."""
    samples = queue_samples(client.stats(), now=time.time())
    samples += delivery_samples(delivery_counters.snapshot())
    return render_prometheus(samples, {"queue": client.config.queue_name})
