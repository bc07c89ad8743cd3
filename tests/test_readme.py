"""The README's two fresh-machine commands exist, and CI runs the test one."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _command(marker: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.+)\n```", text)
    assert match, f"README.md has no command after <!-- {marker} -->"
    return match.group(1)


def test_readme_has_exactly_two_setup_commands() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count("python3 -m venv") == 2
    assert "isubg " in _command("main-command")
    assert "pytest" in _command("test-command")


def test_both_commands_install_the_cpu_torch_first() -> None:
    # A bare `torch` requirement would pull a multi-GB CUDA build; the pinned CPU wheel must come first.
    for marker in ("main-command", "test-command"):
        command = _command(marker)
        package = re.search(r"pip install '?\.", command)
        assert package and command.index("pip install torch==2.13.0") < package.start()


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "<!-- test-command -->" in ci and "README.md" in ci
