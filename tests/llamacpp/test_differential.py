"""The differential run of llama.cpp's server suite (tests/llamacpp/differential.py).

This module runs in paddler's suite; tests/llamacpp/differential_plugin.py is the pytest plugin
loaded into llama.cpp's suite, not collected here.

The comparison and the allowed list are checked here on made-up outcomes
(fast, always). A few files of llama.cpp's suite (the ones about keys, slots
by id and the server's own answers) run direct and through paddler with one
and two upstreams wherever llama-server is built (about a minute); the whole
suite takes much longer and runs here only with ``PADDLER_LLAMACPP_SUITE=1``
(``contrib/llamacpp-differential.sh`` prints its table).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from tests.llamacpp import differential
from tests.llamacpp.differential import (
    Run,
    compare,
    load_allowed,
    parse_allowed,
    pinned_version,
    unpack_suite,
)


def _run(mode: str, **outcomes: str) -> Run:
    return Run(mode, {f"unit/t.py::{name}": {"outcome": o, "message": f"{name} {o}"} for name, o in outcomes.items()})


def test_a_difference_not_in_the_allowed_list_is_unexpected() -> None:
    runs = {
        "direct": _run("direct", a="passed", b="passed", c="failed"),
        "paddler1": _run("paddler1", a="passed", b="failed", c="failed"),
        "paddler2": _run("paddler2", a="failed", b="passed", c="failed"),
    }
    comparison = compare(runs, [])
    assert [(d.mode, d.test_id) for d in comparison.unexpected] == [
        ("paddler1", "unit/t.py::b"),
        ("paddler2", "unit/t.py::a"),
    ]
    assert comparison.unexpected[0].message == "b failed"


def test_an_allowed_difference_is_allowed_only_in_its_modes() -> None:
    allowed = parse_allowed("unit/t.py::b | paddler2 | names one server's slot\n")
    runs = {
        "direct": _run("direct", b="passed"),
        "paddler1": _run("paddler1", b="failed"),
        "paddler2": _run("paddler2", b="failed"),
    }
    comparison = compare(runs, allowed)
    assert [(d.mode, d.allowed_by is not None) for d in comparison.differences] == [
        ("paddler1", False),
        ("paddler2", True),
    ]
    assert [d.mode for d in comparison.unexpected] == ["paddler1"]


def test_a_test_that_passes_only_through_paddler_is_a_difference_too() -> None:
    runs = {"direct": _run("direct", a="failed"), "paddler1": _run("paddler1", a="passed")}
    assert [d.test_id for d in compare(runs, []).unexpected] == ["unit/t.py::a"]


def test_a_test_missing_in_one_run_is_a_difference() -> None:
    runs = {"direct": _run("direct", a="passed", b="passed"), "paddler1": _run("paddler1", a="passed")}
    (difference,) = compare(runs, []).unexpected
    assert (difference.test_id, difference.direct, difference.through) == ("unit/t.py::b", "passed", None)


def test_patterns_cover_parametrized_tests() -> None:
    allowed = parse_allowed("unit/t.py::b[* | paddler1,paddler2 | reason\n")
    runs = {"direct": _run("direct", **{"b[x]": "passed", "bb": "passed"}),
            "paddler1": _run("paddler1", **{"b[x]": "failed", "bb": "failed"})}
    assert [d.test_id for d in compare(runs, allowed).unexpected] == ["unit/t.py::bb"]


def test_unused_entries_are_reported() -> None:
    allowed = parse_allowed("unit/t.py::a | paddler1,paddler2 | reason\n")
    runs = {"direct": _run("direct", a="passed"), "paddler1": _run("paddler1", a="failed"),
            "paddler2": _run("paddler2", a="passed")}
    comparison = compare(runs, allowed)
    assert [(e.pattern, m) for e, m in comparison.unused(allowed, runs)] == [("unit/t.py::a", "paddler2")]


@pytest.mark.parametrize(
    "line",
    ["unit/t.py::a | paddler1", "unit/t.py::a | direct | reason", "unit/t.py::a |  | reason", "| paddler1 | r"],
)
def test_a_malformed_allowed_line_is_refused_with_its_line_number(line: str) -> None:
    with pytest.raises(ValueError, match=r"list:2:"):
        parse_allowed("# comment\n" + line + "\n", "list")


def test_the_committed_list_is_short_and_reasoned() -> None:
    """Issue #24's bound: at most 5 entries through one upstream (router mode, #21, is in: none
    waits for it); with two upstreams only tests that name a single server's state come on top."""
    allowed = load_allowed()
    one = [a for a in allowed if "paddler1" in a.modes]
    assert len(one) <= 5, [a.pattern for a in one]
    for entry in allowed:
        assert len(entry.reason) >= 20, entry
    two_only = [a for a in allowed if a.modes == {"paddler2"}]
    for entry in two_only:
        assert entry.reason.startswith("two upstreams:"), entry


def test_the_pinned_version_is_build_llama_servers() -> None:
    assert pinned_version() == "0.3.36"


def test_unpack_takes_only_the_server_tests(tmp_path: Path) -> None:
    sdist = tmp_path / "x.tar.gz"
    members = {
        "pkg-1/vendor/llama.cpp/tools/server/tests/utils.py": b"utils",
        "pkg-1/vendor/llama.cpp/tools/server/tests/unit/test_a.py": b"a",
        "pkg-1/vendor/llama.cpp/models/templates/x.jinja": b"template",
        "pkg-1/vendor/llama.cpp/tools/mtmd/test-1.jpeg": b"image",
        "pkg-1/vendor/llama.cpp/tools/mtmd/mtmd.cpp": b"not needed",
        "pkg-1/vendor/llama.cpp/tools/server/server.cpp": b"not a test",
        "pkg-1/vendor/llama.cpp/tools/server/tests/../../evil.py": b"outside",
    }
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = unpack_suite(sdist, tmp_path / "suite")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "models/templates/x.jinja",
        "tools/mtmd/test-1.jpeg",
        "tools/server/tests/unit/test_a.py",
        "tools/server/tests/utils.py",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite", "x.tar.gz"]


def test_an_sdist_without_the_suite_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    sdist = tmp_path / "x.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("pkg-1/README")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="utils.py"):
        unpack_suite(sdist, tmp_path / "suite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar.gz"]


#: The part of llama.cpp's suite run in every test run: keys, /slots and slots by id, CORS preflight.
SUBSET = [
    "unit/test_basic.py",
    "unit/test_slot_save.py",
    "unit/test_security.py",
    "-k", "not cors_origins and not local_media",
]


@pytest.mark.llamacpp
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_llamacpp_suite_subset_through_paddler_differs_only_where_allowed(
    llama_server_binary: Path, tmp_path: Path
) -> None:
    """test_basic, test_slot_save and test_security (not the router-mode CORS ones) of llama.cpp's
    suite, direct and through paddler with one and two upstreams: no difference but the allowed."""
    code = differential.main(["--parallel", "--out", str(tmp_path), "--", *SUBSET])
    assert code == 0, (tmp_path / "results.json").read_text()[:3000]


@pytest.mark.llamacpp
@pytest.mark.integration
@pytest.mark.timeout(5400)
@pytest.mark.skipif(
    os.environ.get("PADDLER_LLAMACPP_SUITE") != "1",
    reason="the differential llama.cpp suite takes minutes: PADDLER_LLAMACPP_SUITE=1 runs it",
)
def test_llamacpp_suite_through_paddler_differs_only_where_allowed(
    llama_server_binary: Path, tmp_path: Path
) -> None:
    """llama.cpp's server suite, direct and through paddler with one and two upstreams: every
    difference of outcome is in differential-allowed.txt."""
    code = differential.main(["--out", str(tmp_path)])
    assert code == 0, (tmp_path / "results.json").read_text()[:2000]
