"""The module-level API: a drop-in for ``import segment.analytics as analytics``.

Settings are plain module attributes of ``durable_analytics`` that the user sets before the
first call (``durable_analytics.write_key = "..."``): every ``Client`` setting can be set so,
segment's names and ours (``analytics.flusher = "none"``). The first call builds one default
``Client`` from them; a module attribute that is not a setting (a typo such as
``analytics.flush_intervall``) makes that first call raise ``ConfigError`` naming the closest
setting, instead of being silently ignored.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, Concatenate, ParamSpec, TypeVar

from ._client import Client
from ._config import SEGMENT_PARAMETERS, Settings, unknown_settings_message
from .exceptions import ConfigError

__all__ = [
    "SETTINGS",
    "alias",
    "flush",
    "get_client",
    "group",
    "identify",
    "join",
    "page",
    "remember_module_names",
    "screen",
    "shutdown",
    "stats",
    "track",
]

#: Module attributes read when the default client is built: every Client setting.
SETTINGS: tuple[str, ...] = SEGMENT_PARAMETERS[1:] + tuple(Settings.__annotations__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

_lock = threading.Lock()
# The package's own names (functions, classes, imports), recorded once it is imported: any
# other public attribute found at the first call was set by the user and is not a setting.
_module_names: set[str] = set()


def _package() -> Any:
    return sys.modules[__name__.rpartition(".")[0]]


def remember_module_names() -> None:
    """Record the package's names; called once at the end of its ``__init__``."""
    _module_names.update(vars(_package()))


def _unknown_settings(pkg: Any) -> list[str]:
    known = _module_names | set(SETTINGS) | {"write_key", "default_client"}
    return sorted(
        name
        for name, value in vars(pkg).items()
        if not name.startswith("_") and name not in known and not isinstance(value, ModuleType)
    )


def get_client() -> Client:
    """The default client, built from the module settings on first use."""
    pkg = _package()
    client = getattr(pkg, "default_client", None)
    if client is not None:
        return client  # type: ignore[no-any-return]
    with _lock:
        client = getattr(pkg, "default_client", None)
        if client is None:
            unknown = _unknown_settings(pkg)
            if unknown:
                raise ConfigError(
                    "module-level "
                    + unknown_settings_message(unknown, frozenset(SETTINGS) | {"write_key"})
                )
            settings: dict[str, Any] = {name: getattr(pkg, name, None) for name in SETTINGS}
            if settings.get("debug") is False:
                # The module default, not a choice: DEBUG=analytics may still turn it on.
                settings["debug"] = None
            client = Client(getattr(pkg, "write_key", None), **settings)
            pkg.default_client = client
    return client


def _on_default_client(
    method: Callable[Concatenate[Client, _P], _R], doc: str | None = None
) -> Callable[_P, _R]:
    """The module-level function that calls ``method`` on the default client.

    It has ``method``'s exact signature, ``self`` left out: for type checkers and IDEs through
    the ParamSpec, for ``inspect.signature`` and ``help()`` through ``__signature__``, for
    ``typing.get_type_hints`` through ``__annotations__`` and ``__wrapped__``. The call
    goes to ``get_client()``'s own attribute, so a ``default_client`` of a Client subclass
    is called as itself.
    """
    name = method.__name__

    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        bound: Callable[_P, _R] = getattr(get_client(), name)
        return bound(*args, **kwargs)

    signature = inspect.signature(method)
    call.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=list(signature.parameters.values())[1:]
    )
    call.__annotations__ = {k: v for k, v in method.__annotations__.items() if k != "self"}
    # get_type_hints resolves the annotations in the globals of the innermost __wrapped__.
    call.__wrapped__ = method  # type: ignore[attr-defined]
    call.__name__ = call.__qualname__ = name
    call.__module__ = __name__
    call.__doc__ = doc or (
        f"Queue {'an' if name[0] in 'aeiou' else 'a'} {name} call on the default client "
        f"(see ``Client.{name}``)."
    )
    return call


identify = _on_default_client(Client.identify)
track = _on_default_client(Client.track)
page = _on_default_client(Client.page)
screen = _on_default_client(Client.screen)
group = _on_default_client(Client.group)
alias = _on_default_client(Client.alias)
flush = _on_default_client(
    Client.flush, "Deliver what the default client has queued (see ``Client.flush``)."
)
join = _on_default_client(
    Client.join, "Deliver what is queued and stop the default client's flusher."
)
shutdown = _on_default_client(
    Client.shutdown, "Flush and stop the default client (segment-analytics-python's ``shutdown``)."
)
stats = _on_default_client(Client.stats, "The default client's queue statistics.")
