"""Statistics of one's own, from the command line: ``--statistics MODULE`` for the app (``python app.py``, or
``VIZAPP_STATISTICS`` where the app starts without arguments, as on Spaces), dataset mode (``python -m vizapp.stats``)
and the evaluation (``python -m vizapp.evaluate``).

Each module is imported before anything is built, and its import registers its statistics
(:func:`vizapp.statistics.register`), which every path then computes. The modules are the operator's own code,
imported like any Python module on ``sys.path``; nothing a visitor uploads is ever imported. Ray's workers are other
processes that do not import them, so the evaluation refuses the Ray engine while statistics beyond the built-in ones
are registered, instead of writing rows without their columns.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from vizapp import statistics
from vizapp.errors import BadParameterError

#: Modules whose statistics the app imports when it starts without ``--statistics`` (comma-separated).
ENV = "VIZAPP_STATISTICS"


def import_statistics(modules: Sequence[str]) -> list[str]:
    """Import each of ``modules`` (dotted names) in order; the names of the statistics their imports registered (a
    module imported before registered its statistics then, and adds none now).

    Raises:
        BadParameterError: a module cannot be imported (the message names it and why), or registers nothing.
    """
    found: list[str] = []
    for module in modules:
        before, imported = set(statistics.STATISTICS), module in sys.modules  # imported before: registered then
        try:
            importlib.import_module(module)
        except Exception as exc:  # the operator's module: whatever it raises is said in one line
            raise BadParameterError(
                f"--statistics {module}: could not import it ({type(exc).__name__}: {exc})"
            ) from exc
        new = [name for name in statistics.STATISTICS if name not in before]
        if not new and not imported:
            raise BadParameterError(
                f"--statistics {module}: importing it registered no statistic; call vizapp.statistics.register("
                "YourStatistic()) at the module's top level"
            )
        found += new
    return found


def env_modules() -> list[str]:
    """The modules named in ``VIZAPP_STATISTICS`` (comma-separated; none when unset)."""
    return [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]


def registered_beyond_built_ins() -> list[str]:
    """Names of the registered statistics that vizapp does not define itself (a user's)."""
    return [name for name, s in statistics.STATISTICS.items() if type(s).__module__ != statistics.__name__]
