"""benchmarks/gpu.sh runs only on a lent GPU machine, a few minutes a session: a misspelt option there would cost a
whole step of that time. Every command it runs is checked here against its module's own argument parser (parsed,
not run), and its steps against its list of them."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
ENTRY = {"benchmarks.bench": "benchmarks.bench.cli", "vizapp.evaluate": "vizapp.evaluate.run"}
"""Packages whose ``python -m`` entry point is another module's ``main``."""


def commands(out: str) -> list[tuple[str, list[str]]]:
    """Each ``$PY -m MODULE ARGS`` of the script (continuation lines joined), as (MODULE, ARGS), with ``$OUT`` set to
    ``out`` and ``$MEM`` to its default."""
    text = SCRIPT.read_text(encoding="utf-8").replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or "$PY -m " not in line:
            continue
        words = shlex.split(line.split("$PY -m ", 1)[1].replace("$OUT", out).replace("$MEM", "--no-memory"))
        found.append((words[0], words[1:]))
    return found


class _Parsed(Exception):
    """Raised by the patched parser once the arguments parse: the command stops there."""


@pytest.fixture
def parse_only(monkeypatch):
    """Every argument parser raises :class:`_Parsed` once its arguments parse (it still exits on bad ones)."""
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):  # noqa: ANN001, ANN202 - argparse's own signature
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def test_every_command_of_the_gpu_script_parses_with_its_modules_own_parser(parse_only, tmp_path):
    found = commands(str(tmp_path))
    modules = {m for m, _ in found}
    # the script's measurements: a change that dropped one of them from the script would show here
    assert {
        "pytest",
        "benchmarks.bench",
        "benchmarks.batch",
        "benchmarks.evaluation",
        "benchmarks.gpu_profile",
    } <= modules
    for module, args in found:
        if module == "pytest":
            tests = [a for a in args if a.endswith(".py")]
            assert tests and all((ROOT / t).is_file() for t in tests), args
            continue
        main = importlib.import_module(ENTRY.get(module, module)).main
        with pytest.raises(_Parsed):  # an unknown option or a bad value exits with status 2 instead
            main(args)


def test_a_misspelt_option_fails_the_parse_check(parse_only):
    # the check above can fail: an option the evaluation's benchmark does not have ends in argparse's exit
    main = importlib.import_module("benchmarks.evaluation").main
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--imagess", "16"])


def test_the_gpu_scripts_steps_are_its_default_list_and_its_usage():
    text = SCRIPT.read_text(encoding="utf-8")
    used = list(dict.fromkeys(re.findall(r"^step ([\w-]+) \d+ ", text, flags=re.M)))
    default = re.search(r"^STEPS=\$\{\*:-([^}]*)\}", text, flags=re.M)
    usage = re.search(r"\(steps: ([^)]*)\)", text)
    assert default and usage
    # the steps run in the script's order whatever the order asked: the lists need only name the same ones, once
    for listed in (default.group(1).split(), [w for w in usage.group(1).split() if w != "#"]):
        assert sorted(listed) == sorted(used), listed


def test_the_lease_runs_gpu_script_steps_whose_files_all_come_back():
    """benchmarks/gpu_lease.sh's default steps are gpu.sh's, and the files they write into OUT (log.txt, steps.txt
    and each step's ``--out "$OUT/..."`` table) are at most the 8 the device tool brings back from one call."""
    lease = (ROOT / "benchmarks" / "gpu_lease.sh").read_text(encoding="utf-8")
    steps = re.search(r"\$\{LEASE_STEPS:-([^}]*)\}", lease)
    assert steps
    text = SCRIPT.read_text(encoding="utf-8").replace("\\\n", " ")
    tables = {}
    for name, rest in re.findall(r"^step ([\w-]+) \d+ (.*)$", text, flags=re.M):
        tables.setdefault(name, set()).update(re.findall(r'--out "\$OUT/([^"]+)"', rest))
    asked = steps.group(1).split()
    assert set(asked) <= set(tables), set(asked) - set(tables)
    files = {"log.txt", "steps.txt"}.union(*(tables[s] for s in asked))
    assert len(files) <= 8, sorted(files)
    # every other step keeps a table; these print into log.txt
    assert all(tables[s] for s in asked if s not in ("tests", "profile", "kernels", "graph-routes")), tables
