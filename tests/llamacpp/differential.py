"""llama.cpp's own server test suite, run directly and through paddler, compared test by test.

    python -m tests.llamacpp.differential [--modes direct,paddler1,paddler2] [--out DIR]
                                          [--allowed FILE] [PYTEST ARGS...]

The suite (``tools/server/tests`` of the llama.cpp that ``build-llama-server``
builds: the one vendored in the pinned llama-cpp-python sdist) is unpacked
once into the cache beside the server (``.../llama-server/server-suite-<version>``:
not inside the version's entry, which a rebuild replaces whole),
copied afresh for each mode, and run by pytest with L{differential_plugin}:
``direct`` against llama-server itself, ``paddler1`` through a paddler
balancer in front of it, ``paddler2`` through a balancer in front of two
servers started alike. Through paddler only the tests that passed directly
are run (a test that fails or is skipped directly counts as the same through
paddler: its outcome there is not what the balancer is judged on). Then each
test's outcome through paddler is compared with its outcome directly: a test whose outcome differs must be in the
allowed list (``differential-allowed.txt`` beside this file) for that mode;
any other difference fails the run (exit 1). The table and the differences
are printed, and written with every outcome to ``DIR/results.json``.

Environment: ``PADDLER_CACHE`` (as for ``build-llama-server``);
``PADDLER_DIFF_TIMEOUT`` seconds per test (default 120).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD_SCRIPT = HERE / "build-llama-server"
ALLOWED_FILE = HERE / "differential-allowed.txt"
MODES = ("direct", "paddler1", "paddler2")
THROUGH = ("paddler1", "paddler2")
#: Where llama.cpp lies in the sdist, and what of it the suite needs: itself, the chat templates
#: and the test image its tests reach by relative paths (``../../../models/templates/...``).
LLAMA_IN_SDIST = "vendor/llama.cpp/"
SUITE = "tools/server/tests"
SUITE_NEEDS = (SUITE + "/", "models/templates/", "tools/mtmd/test-1.jpeg")
OUTCOMES = ("passed", "failed", "skipped")


def pinned_version(script: Path = BUILD_SCRIPT) -> str:
    """The llama-cpp-python version ``build-llama-server`` pins (its ``VERSION=`` line)."""
    match = re.search(r"^VERSION=(\S+)$", script.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"no VERSION= line in {script}")
    return match.group(1)


def cache_root() -> Path:
    """Where ``build-llama-server`` caches its builds (one directory per version)."""
    return Path(os.environ.get("PADDLER_CACHE", Path.home() / ".cache" / "paddler")) / "llama-server"


def unpack_suite(sdist: Path, dest: Path) -> Path:
    """Extract the server tests (and what they reach of the llama.cpp tree) from C{sdist} into
    C{dest}, laid out as in llama.cpp (made whole, then renamed into place)."""
    stage = Path(tempfile.mkdtemp(prefix=".server-tests.", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            for member in tar:
                top, _, inner = member.name.partition("/")
                if not inner.startswith(LLAMA_IN_SDIST) or not (member.isfile() or member.isdir()):
                    continue
                relative = inner[len(LLAMA_IN_SDIST):]
                if not relative.startswith(SUITE_NEEDS) or ".." in Path(relative).parts:
                    continue
                target = stage / relative
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
        if not (stage / SUITE / "utils.py").is_file() or not (stage / SUITE / "unit").is_dir():
            raise ValueError(f"no {LLAMA_IN_SDIST}{SUITE}/utils.py and unit/ in {sdist}")
        if dest.exists():
            shutil.rmtree(dest)
        stage.rename(dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dest


def server_suite(version: str, python: str = sys.executable) -> Path:
    """The unpacked server tests of C{version} (a partial llama.cpp tree, see L{unpack_suite}),
    downloaded (pip, from PyPI) and unpacked on first use."""
    dest = cache_root() / f"server-suite-{version}"
    if (dest / SUITE / "utils.py").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="paddler-suite-") as download:
        subprocess.run(
            [python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", download],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        sdists = sorted(Path(download).glob("*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download left no sdist of llama-cpp-python=={version}")
        return unpack_suite(sdists[0], dest)


def llama_server(python: str = sys.executable) -> Path:
    """The cached llama-server (``build-llama-server`` builds it on first use)."""
    out = subprocess.run(
        [str(BUILD_SCRIPT)], env=dict(os.environ, PYTHON=python), check=True,
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


# -- running ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One mode's run: each test's outcome (``passed``/``failed``/``skipped``) and its message."""

    mode: str
    tests: dict[str, dict[str, Any]]
    seconds: float = 0.0
    #: tests not run in this mode, whose outcome is taken from the direct run
    carried: int = 0

    def outcome(self, test_id: str) -> str | None:
        entry = self.tests.get(test_id)
        return None if entry is None else entry["outcome"]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(OUTCOMES, 0)
        for entry in self.tests.values():
            counts[entry["outcome"]] += 1
        return counts


def run_mode(
    mode: str,
    suite: Path,
    binary: Path,
    out: Path,
    pytest_args: Sequence[str] = (),
    python: str = sys.executable,
    timeout: float = 120.0,
    paddler_root: Path = ROOT,
    only: Run | None = None,
) -> Run:
    """Run the suite in a fresh copy under C{out}/C{mode}; return what each test did.

    With C{only} (the direct run), just the tests that passed there run; the
    others are given their outcome there (L{Run.carried} counts them).
    """
    tree = out / mode
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(suite, tree)
    work = tree / SUITE
    report = out / f"{mode}.json"
    report.unlink(missing_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(HERE), str(work)]),
        PYTHONUNBUFFERED="1",
        LLAMA_SERVER_BIN_PATH=str(binary),
        LLAMA_CACHE=str(work / "tmp"),
        PADDLER_DIFF_MODE=mode,
        PADDLER_DIFF_MODEL=str(binary.with_name("tiny.gguf")),
        PADDLER_DIFF_REPORT=str(report),
        PADDLER_DIFF_ROOT=str(paddler_root),
        PADDLER_DIFF_PYTHON=python,
        PADDLER_DIFF_LOGS=str(out / f"{mode}-paddler-logs"),
    )
    for variable in ("PORT", "DEBUG", "DEBUG_EXTERNAL", "SLOW_TESTS", "PYTEST_ADDOPTS"):
        env.pop(variable, None)
    if only is not None:
        selected = out / f"{mode}-selected.txt"
        selected.write_text("".join(f"{t}\n" for t, e in sorted(only.tests.items()) if e["outcome"] == "passed"))
        env["PADDLER_DIFF_ONLY"] = str(selected)
    (work / "tmp").mkdir(exist_ok=True)
    argv = [
        python, "-m", "pytest",
        "-p", "differential_plugin",
        "-p", "no:cacheprovider",
        "-p", "no:twisted",  # paddler's test plugin; the llama.cpp suite does not use it
        "-o", "addopts=",
        f"--timeout={timeout:g}",
        "-q", "-rN", "--color=no",
        "-m", "not slow",
        *(pytest_args or ["unit"]),
    ]
    started = time.monotonic()
    with open(out / f"{mode}.log", "wb") as log:
        subprocess.run(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    if not report.is_file():
        raise RuntimeError(f"the {mode} run wrote no report; see {out / (mode + '.log')}")
    tests = json.loads(report.read_text())["tests"]
    carried = 0
    if only is not None:
        for test_id, entry in only.tests.items():
            if entry["outcome"] != "passed" and test_id not in tests:
                tests[test_id] = dict(entry, carried=True)
                carried += 1
    return Run(mode, tests, seconds, carried)


# -- comparing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowed:
    """One line of the allowed list: tests (a pattern) that may differ in some modes, and why."""

    pattern: str
    modes: frozenset[str]
    reason: str

    def covers(self, test_id: str, mode: str) -> bool:
        return mode in self.modes and fnmatch.fnmatchcase(test_id, self.pattern)


def parse_allowed(text: str, where: str = "allowed list") -> list[Allowed]:
    """``PATTERN | MODES | REASON`` lines (``#`` comments); MODES is ``paddler1,paddler2`` or ``paddler2``."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [part.strip() for part in line.split("|", 2)]
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"{where}:{number}: want 'test id | modes | reason', got {raw!r}")
        pattern, modes_text, reason = parts
        modes = frozenset(m.strip() for m in modes_text.split(","))
        if not modes <= set(THROUGH):
            raise ValueError(f"{where}:{number}: modes must be among {', '.join(THROUGH)}, got {modes_text!r}")
        entries.append(Allowed(pattern, modes, reason))
    return entries


def load_allowed(path: Path = ALLOWED_FILE) -> list[Allowed]:
    return parse_allowed(path.read_text(), str(path))


@dataclass
class Difference:
    """A test whose outcome through paddler (C{mode}) is not its outcome directly."""

    test_id: str
    mode: str
    direct: str | None
    through: str | None
    message: str
    allowed_by: Allowed | None = None


@dataclass
class Comparison:
    """Every difference of every mode against ``direct``, allowed or not."""

    differences: list[Difference] = field(default_factory=list)

    @property
    def unexpected(self) -> list[Difference]:
        return [d for d in self.differences if d.allowed_by is None]

    def unused(self, allowed: Iterable[Allowed], modes: Iterable[str]) -> list[tuple[Allowed, str]]:
        """Allowed entries (per mode) that no difference needed: tests that pass through paddler now."""
        used = {(id(d.allowed_by), d.mode) for d in self.differences if d.allowed_by is not None}
        return [(a, m) for a in allowed for m in sorted(a.modes) if m in modes and (id(a), m) not in used]


def compare(runs: Mapping[str, Run], allowed: Sequence[Allowed]) -> Comparison:
    """Each test's outcome in each mode but ``direct`` against its outcome in ``direct``."""
    direct = runs["direct"]
    comparison = Comparison()
    for mode, run in runs.items():
        if mode == "direct":
            continue
        for test_id in sorted(set(direct.tests) | set(run.tests)):
            before, after = direct.outcome(test_id), run.outcome(test_id)
            if before == after:
                continue
            entry = run.tests.get(test_id) or {}
            covering = next((a for a in allowed if a.covers(test_id, mode)), None)
            comparison.differences.append(
                Difference(test_id, mode, before, after, entry.get("message", ""), covering)
            )
    return comparison


def table(runs: Mapping[str, Run], comparison: Comparison) -> str:
    """The table of outcomes per mode, and the differences allowed and not."""
    rows = [("mode", "passed", "failed", "skipped", "total", "run", "differ", "allowed", "unexpected", "seconds")]
    for mode, run in runs.items():
        counts = run.counts()
        mine = [d for d in comparison.differences if d.mode == mode]
        allowed = sum(d.allowed_by is not None for d in mine)
        rows.append((
            mode, str(counts["passed"]), str(counts["failed"]), str(counts["skipped"]), str(len(run.tests)),
            str(len(run.tests) - run.carried),
            "-" if mode == "direct" else str(len(mine)),
            "-" if mode == "direct" else str(allowed),
            "-" if mode == "direct" else str(len(mine) - allowed),
            f"{run.seconds:.0f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    if any(run.carried for run in runs.values()):
        lines.append("(run: tests run in that mode; through paddler only those that pass directly)")
    for title, chosen in (
        ("unexpected differences", comparison.unexpected),
        ("allowed differences", [d for d in comparison.differences if d.allowed_by is not None]),
    ):
        if chosen:
            lines += ["", f"{title}:"]
            for d in chosen:
                why = f"  [{d.allowed_by.reason}]" if d.allowed_by is not None else f"  {d.message}"
                lines.append(f"  {d.mode}  {d.test_id}: {d.direct} directly, {d.through} through paddler{why}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, among " + ", ".join(MODES))
    parser.add_argument("--out", type=Path, default=None, help="work and report directory (default: a temporary one)")
    parser.add_argument("--allowed", type=Path, default=ALLOWED_FILE)
    parser.add_argument("--python", default=sys.executable, help="interpreter for pytest and paddler")
    parser.add_argument("--paddler", type=Path, default=ROOT,
                        help="the paddler checkout to put in front (default: this one)")
    parser.add_argument("--direct-from", type=Path, default=None,
                        help="take the direct outcomes from this earlier run's directory (its direct.json)")
    parser.add_argument("--parallel", action="store_true",
                        help="run the through-paddler modes at the same time (after direct)")
    parser.add_argument("pytest_args", nargs="*",
                        help="tests to run (default: unit), e.g. unit/test_basic.py; after -- also pytest options")
    options = parser.parse_args(argv)
    modes = [m.strip() for m in options.modes.split(",") if m.strip()]
    if "direct" not in modes or not set(modes) <= set(MODES):
        parser.error(f"--modes must include direct and be among {', '.join(MODES)}")
    allowed = load_allowed(options.allowed)
    binary = llama_server(options.python)
    suite = server_suite(pinned_version(), options.python)
    out = options.out or Path(tempfile.mkdtemp(prefix="paddler-differential-"))
    out.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get("PADDLER_DIFF_TIMEOUT", "120"))
    def run(mode: str, only: Run | None = None) -> Run:
        done = run_mode(
            mode, suite, binary, out, options.pytest_args, options.python, timeout, options.paddler.resolve(), only
        )
        print(f"{mode}: {done.counts()} in {done.seconds:.0f} s", file=sys.stderr, flush=True)
        return done

    if options.direct_from is not None:
        earlier = json.loads((options.direct_from / "direct.json").read_text())["tests"]
        if options.pytest_args:
            files = [a.split("::")[0] for a in options.pytest_args if not a.startswith("-")]
            earlier = {t: e for t, e in earlier.items() if any(t.startswith(f) for f in files)}
        runs = {"direct": Run("direct", earlier)}
    else:
        runs = {"direct": run("direct")}
    through = [m for m in modes if m != "direct"]
    if options.parallel and len(through) > 1:
        with ThreadPoolExecutor(len(through)) as pool:
            futures = {m: pool.submit(run, m, runs["direct"]) for m in through}
            runs.update((m, f.result()) for m, f in futures.items())
    else:
        runs.update((m, run(m, runs["direct"])) for m in through)
    comparison = compare(runs, allowed)
    (out / "results.json").write_text(json.dumps(
        {mode: {"seconds": run.seconds, "tests": run.tests} for mode, run in runs.items()}, indent=1
    ))
    print(table(runs, comparison))
    unused = comparison.unused(allowed, modes) if not options.pytest_args else []
    if unused:
        print("\nallowed but not needed this run:")
        for entry, mode in unused:
            print(f"  {mode}  {entry.pattern}")
    print(f"\nreports and logs: {out}")
    return 1 if comparison.unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
