"""The command line of the library's child processes: ``_flusher_process.main``.

A module of its own, which the package never imports: ``python -m`` on a module the
package already imported (``_flusher_process``, through the client) makes runpy warn
(``RuntimeWarning``) in every child.
"""

from __future__ import annotations

from ._flusher_process import main

if __name__ == "__main__":
    raise SystemExit(main())
