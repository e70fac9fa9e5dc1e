"""Statistics of one's own, from the command line: ``--statistics MODULE`` for the app (``python app.py``, or
``VIZAPP_STATISTICS`` where the app starts without arguments, as on Spaces), dataset mode (``python -m vizapp.stats``)
and the evaluation (``python -m vizapp.evaluate``).

Each module is imported before anything is built, and its import registers its statistics
(:func:`vizapp.statistics.register`), which every path then computes. The modules are the operator's own code,
imported like any Python module on ``sys.path``; nothing a visitor uploads is ever imported. Ray's workers are other
processes: each actor imports the same modules (:func:`for_workers`, :func:`in_worker`) from the folders the driver
found them in, and checks that it has every statistic the driver has. A statistic registered in the driver's process
alone (not by a module) cannot reach them, and the evaluation refuses the Ray engine for it instead of writing rows
without its columns.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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


def for_workers(modules: Sequence[str]) -> dict[str, list[str]]:
    """What another process needs to register the same statistics as this one: ``modules`` (imported here already),
    the folders on ``sys.path`` they were found in (a local cluster shares the file system; a remote one needs the
    modules at the same paths), and the names of every statistic of the user's own registered here.

    Raises:
        BadParameterError: a statistic of the user's own was registered here but not by one of ``modules``.
    """
    modules, own = list(modules), registered_beyond_built_ins()
    alone = [n for n in own if type(statistics.STATISTICS[n]).__module__ not in modules]
    if alone:
        raise BadParameterError(
            f"statistics of your own are registered in this process alone ({', '.join(alone)}), and Ray's workers, "
            "other processes, would not compute them: define them in a module and pass it (--statistics MODULE, "
            "statistics_modules=[...]), or run with --engine local"
        )
    folders: list[str] = []
    for module in modules:
        spec = importlib.util.find_spec(module.split(".")[0])
        if spec is not None and spec.origin:
            top = Path(spec.origin).parent  # the top-level module's folder, or its package's
            folder = str(top.parent if spec.submodule_search_locations else top)
            if folder not in folders:
                folders.append(folder)
    return {"modules": modules, "folders": folders, "names": own}


def in_worker(shared: dict[str, list[str]]) -> None:
    """Register, in a worker process, what :func:`for_workers` described; BadParameterError naming what is missing."""
    for folder in shared.get("folders", []):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    import_statistics(shared.get("modules", []))
    missing = [n for n in shared.get("names", []) if n not in statistics.STATISTICS]
    if missing:
        raise BadParameterError(f"this worker did not register {', '.join(missing)} from {shared.get('modules')}")
