"""The Django app configuration (picked up from ``INSTALLED_APPS`` by Django)."""

from __future__ import annotations

from django.apps import AppConfig

from durable_analytics._config import Config
from durable_analytics.contrib.django import settings_dict


class DurableAnalyticsConfig(AppConfig):  # type: ignore[misc]  # django ships no types
    """Checks ``settings.DURABLE_ANALYTICS`` at start-up; the client is built on first use."""

    name = "durable_analytics.contrib.django"
    label = "durable_analytics"
    verbose_name = "durable-analytics"

    def ready(self) -> None:
        """Validate the settings now, so a typo fails at start-up rather than on a request."""
        Config.build(**settings_dict())
