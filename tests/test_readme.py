"""The README is short and true: title first, the two commands first, its examples run, and the
PyPI description leaves out what would be broken there."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .processes import Processes

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
QUICKSTART = (ROOT / "docs" / "quickstart.md").read_text()
EXAMPLE_PROXY = "http://127.0.0.1:8086"


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def commands(block: str) -> list[str]:
    """The commands of a shell block (continuation lines joined, comments dropped)."""
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_its_title_and_the_two_commands() -> None:
    """The first line is the title (no code block before it), and the first two commands anywhere in
    the README are `bash contrib/run.sh` and `bash contrib/test.sh`, exactly."""
    assert README.startswith("# paddler\n")
    assert README.index("```") > README.index("# paddler")
    first = commands(code_blocks(README, "sh")[0])
    assert first[:2] == ["bash contrib/run.sh", "bash contrib/test.sh"]
    assert (ROOT / "contrib" / "run.sh").is_file() and (ROOT / "contrib" / "test.sh").is_file()


def test_readme_has_an_install_step_before_running_paddler() -> None:
    """A newcomer installs before the first `paddler` command (no "command not found")."""
    install = README.index("pip install .")
    assert install < README.index("paddler balancer --upstream")


def test_readme_describes_max_retries_once() -> None:
    """--max-retries is explained in one place."""
    assert README.count("--max-retries") == 1


def test_readme_and_quick_start_show_the_same_examples() -> None:
    """The curl and OpenAI SDK examples of the README are the quick start's, word for word."""
    readme_curl = [c for c in code_blocks(README, "sh") if "curl " in c]
    assert readme_curl and readme_curl[0] in code_blocks(QUICKSTART, "sh")
    assert code_blocks(README, "python") == code_blocks(QUICKSTART, "python")


def test_the_pypi_description_leaves_out_the_screenshot_and_relative_links() -> None:
    """setup.py's long description is the README without its not-on-pypi parts: no image and no
    link relative to the repository (both would be broken on PyPI); the README itself shows the
    screenshot, which exists."""
    described = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_py_test")["long_description"]()
    assert "docs/dashboard.png" in README and (ROOT / "docs" / "dashboard.png").is_file()
    assert "![" not in described
    assert re.findall(r"\]\((?!https?://)[^)]*\)", described) == []
    assert described.startswith("# paddler\n") and "bash contrib/run.sh" in described
    assert "## Send requests" in described and "--max-retries" in described
    relative = re.findall(r"\]\(((?!https?://)[^)#]+)", README)
    assert relative and all((ROOT / target).exists() for target in relative), relative


@pytest.fixture
def procs(tmp_path: Path):
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.mark.integration
def test_the_readme_examples_answer_through_a_balancer(procs: Processes, tmp_path: Path) -> None:
    """The README's curl command and OpenAI SDK program, pointed at a balancer with a simulated
    fleet, get a chat completion back (the SDK's streamed)."""
    _, proxy, _ = procs.balancer("--simulated-fleet", "2")
    [curl] = [c for c in code_blocks(README, "sh") if "curl " in c]
    [argv] = [shlex.split(c.replace(EXAMPLE_PROXY, proxy)) for c in commands(curl)]
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    result = subprocess.run([*argv, "--silent", "--show-error", "--max-time", "60"],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]

    pytest.importorskip("openai", reason="the openai package (test extras) is missing")
    [program] = code_blocks(README, "python")
    script = tmp_path / "example.py"
    script.write_text(program.replace(EXAMPLE_PROXY, proxy))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 10, result.stdout
