"""``python -m durable_analytics.cli``: the same as the ``durable-analytics`` command."""

import sys

from . import main

sys.exit(main())
