"""Framework integrations: each module imports its framework only when it is used.

- ``durable_analytics.contrib.asgi``: close the client on ASGI lifespan shutdown
  (FastAPI, Starlette, Django under an ASGI server; uvicorn, hypercorn, granian).
- ``durable_analytics.contrib.django``: a Django app that builds the client from settings,
  with ``manage.py analytics status`` / ``drain``.
- ``durable_analytics.contrib.flask``: a Flask extension with ``init_app``.
- ``durable_analytics.contrib.celery``: worker signals that close the client in every pool
  child and in the worker.
- ``durable_analytics.contrib.gunicorn``: server hooks for ``gunicorn.conf.py``.
- ``durable_analytics.contrib.opentelemetry``: OpenTelemetry metrics for a client.
- ``durable_analytics.contrib.prometheus``: the same metrics in the Prometheus text format.
"""
