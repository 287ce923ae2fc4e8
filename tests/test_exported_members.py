"""Every public name is exported on purpose: ``__all__`` lists are sorted, complete and real.

The idea is httpx's ``test_exported_members.py``: a name that appears on the package without
being in ``__all__`` (or ``__all__`` naming something that is gone) is a review question,
caught here rather than by a user's ``from durable_analytics import *``.
"""

from __future__ import annotations
import __future__

import importlib
import inspect
import pkgutil
import types

import pytest

import durable_analytics
import durable_analytics.contrib
import durable_analytics.testing
from durable_analytics import _default

#: Public attributes of the package that are not exported and need not be: the
#: module-level settings the default client reads (``_default.SETTINGS``), the write key
#: (passed to ``Client`` apart from the other settings), segment-analytics-python's two
#: OAuth settings that are accepted and never read (``_default.SETTINGS`` leaves them out),
#: the default client itself, and segment-analytics-python's ``VERSION``.
NOT_EXPORTED = {
    *_default.SETTINGS,
    "write_key",
    "oauth_auth_server",
    "oauth_scope",
    "default_client",
    "VERSION",
}


def _imported_for_annotations(value: object) -> bool:
    """Names imported only for annotations (``__future__``, ``typing``, ``collections.abc``,
    ``_config``'s type aliases): the module's own, not API."""
    if isinstance(value, __future__._Feature):
        return True
    module = getattr(value, "__module__", "")
    return module in ("typing", "collections.abc") or (
        module == "durable_analytics._config" and not inspect.isclass(value)
    )


# Framework hooks that Django loads by their path (an AppConfig, management commands):
# they have no API of their own to export.
_FRAMEWORK_HOOKS = (
    "durable_analytics.contrib.django.apps",
    "durable_analytics.contrib.django.management",
)


def _contrib_modules() -> list[str]:
    """Every module under ``durable_analytics.contrib`` but the framework hooks."""
    prefix = durable_analytics.contrib.__name__ + "."
    return [
        info.name
        for info in pkgutil.walk_packages(durable_analytics.contrib.__path__, prefix)
        if not info.name.startswith(_FRAMEWORK_HOOKS)
    ]


CONTRIB = _contrib_modules()


def _check_all(module: types.ModuleType) -> None:
    exported = list(module.__all__)
    assert exported == sorted(exported), f"{module.__name__}.__all__ is not sorted"
    duplicates = sorted({name for name in exported if exported.count(name) > 1})
    assert duplicates == [], f"{module.__name__}.__all__ repeats names"
    missing = [name for name in exported if not hasattr(module, name)]
    assert missing == [], f"{module.__name__}.__all__ names what it does not have"


def test_the_package_all_is_sorted_without_duplicates_and_every_name_exists() -> None:
    """``durable_analytics.__all__`` is sorted, unique, and each name is an attribute."""
    _check_all(durable_analytics)


def test_every_public_attribute_of_the_package_is_exported_or_a_documented_setting() -> None:
    """A public, non-module attribute of the package is in ``__all__`` or in NOT_EXPORTED."""
    public = {
        name
        for name, value in vars(durable_analytics).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and not _imported_for_annotations(value)
    }
    unexplained = sorted(public - set(durable_analytics.__all__) - NOT_EXPORTED)
    assert unexplained == []


def test_every_documented_setting_exists_on_the_package() -> None:
    """Each name NOT_EXPORTED excuses is really a module attribute (none is stale)."""
    assert sorted(name for name in NOT_EXPORTED if not hasattr(durable_analytics, name)) == []


def test_the_testing_module_all_is_sorted_without_duplicates_and_every_name_exists() -> None:
    """``durable_analytics.testing.__all__`` is sorted, unique, and each name is defined."""
    _check_all(durable_analytics.testing)


def test_every_public_class_of_the_testing_module_is_exported() -> None:
    """A public class defined for the testing module (there, in ``_recording`` or in
    ``_collector_http``) is exported.

    Classes it merely imports (``CollectorError`` comes from ``exceptions``) are exported by
    the package itself.
    """
    module = durable_analytics.testing
    home = {module.__name__, "durable_analytics._recording", "durable_analytics._collector_http"}
    classes = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and inspect.isclass(value) and value.__module__ in home
    }
    assert sorted(classes - set(module.__all__)) == []


def test_there_are_contrib_modules_to_check() -> None:
    """The walk below finds the integrations (an empty walk would prove nothing)."""
    assert {"durable_analytics.contrib.asgi", "durable_analytics.contrib.django"} <= set(CONTRIB)


@pytest.mark.parametrize("name", CONTRIB)
def test_every_contrib_module_has_a_sorted_all_naming_what_it_has(name: str) -> None:
    """Each integration module declares ``__all__``, sorted, unique, every name defined."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] != "durable_analytics":
            pytest.skip(f"{name} needs {exc.name}, not installed here")
        raise
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    _check_all(module)


def _exported_classes() -> list[tuple[str, type]]:
    return [
        (name, value)
        for name in durable_analytics.__all__
        if inspect.isclass(value := getattr(durable_analytics, name))
    ]


def test_the_exported_records_and_exceptions_belong_to_the_package() -> None:
    """Each class the facade exports is defined under ``durable_analytics``.

    A record or exception re-exported from a dependency would tie the public API to it.
    """
    classes = _exported_classes()
    assert {"Client", "QueueStats", "DeadLetter", "FlushResult", "QueueError"} <= {
        name for name, _ in classes
    }
    foreign = sorted(
        name for name, cls in classes if cls.__module__.split(".")[0] != "durable_analytics"
    )
    assert foreign == []
