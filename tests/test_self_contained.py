"""The repository is self-contained: no tracked file points at one machine's paths or at notes kept elsewhere.

A user with only a clone must find every fact the code and docs rely on inside it. Two rules, checked on every
file `git ls-files` lists (run in the repository root; skipped without git or without the .git metadata, as in
an unpacked sdist):

(a) No absolute machine path: `/work/...`, `/root/...`, `/tmp/...`, `/mnt/...`, `/home/<name>/...`,
    `/Users/<name>...` or a Windows drive path such as `C:\\Users\\...`. Only a path that starts a token counts,
    so URLs (`https://host/work/...`), relative paths (`runs/tmp/...`), `~/...` and device files (`/dev/...`)
    pass.
(b) No citation of notes that are not in the repository: a path ending in one of `NOTE_NAMES` must name a
    tracked file (from the repository root or from the citing file's folder; a bare name must be the name of
    some tracked file, case included; a web address passes), and the folders the notes live in
    (`FOREIGN_FOLDERS`) are never named.

Exempt files and why are in `EXEMPT`; add a file there only with a reason.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SELF = Path(__file__).resolve().relative_to(REPO).as_posix()

EXEMPT = {
    "tests/data/HYPERPARAMETERS.md": "a verbatim copy of the tuning guide's table; its notes are cited as written",
    SELF: "names the patterns it looks for",
}

# (a) A path token starts at the beginning of a line or after a character that cannot be part of a path.
_START = r"(?<![\w.~/\\$-])"
MACHINE_PATH = re.compile(
    _START
    + r"(?:/(?:work|root|tmp|mnt)(?=/|[\s\"'`)\]},;:]|$)"  # a fixed top-level folder
    + r"|/home/[^/\s\"'`]+/"  # a user's home
    + r"|/Users/[^/\s\"'`]+"  # a macOS home
    + r"|[A-Z]:\\{1,2}[\w.$ -])"  # a Windows drive (one backslash, or two inside a string literal)
)

# (b) Notes kept outside the repository, cited by file name, and the folders holding them.
NOTE_NAMES = (
    "ban_cfr_aoa.md",
    "mghr_system.md",
    "isubgvqa_xvlm.md",
    "ref_harness.md",
    "ecosystem.md",
    "aesthetics.md",
    "DESIGN.md",
    "HYPERPARAMETERS.md",
)
FOREIGN_FOLDERS = ("../shared", "shared/docs", "shared/reference", "../reference/", "../seed/")
_NOTE = re.compile(r"(?<![\w./:-])((?:/|[\w.-]+/)*)(" + "|".join(re.escape(n) for n in NOTE_NAMES) + r")(?![\w-]|\.\w)")


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"no git metadata here: git {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout.decode("utf-8", errors="replace")


def tracked_files() -> list[str]:
    """The repository's tracked files (relative, POSIX), or skip when git or its metadata is unavailable."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    top = _git("rev-parse", "--show-toplevel").strip()
    if Path(top).resolve() != REPO:
        pytest.skip(f"{REPO} is not the root of its own git checkout")
    return [p for p in _git("ls-files", "-z").split("\0") if p]


def _cites_a_tracked_file(citing: str, folders: str, name: str, tracked: set[str], basenames: set[str]) -> bool:
    if not folders:
        return name in basenames
    for base in ("", posixpath.dirname(citing)):
        target = posixpath.normpath(posixpath.join(base, folders + name))
        if not target.startswith("../") and target in tracked:
            return True
    return False


def problems(path: str, text: str, tracked: set[str]) -> list[str]:
    """`path:line: what` for every rule a file's text breaks."""
    basenames = {posixpath.basename(p) for p in tracked}
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{path}:{number}"
        for match in MACHINE_PATH.finditer(line):
            found.append(f"{where}: absolute machine path {match.group(0)!r}: {line.strip()[:120]}")
        for folder in FOREIGN_FOLDERS:
            if folder in line:
                found.append(f"{where}: names {folder!r}, a folder outside the repository: {line.strip()[:120]}")
        for match in _NOTE.finditer(line):
            folders, name = match.group(1), match.group(2)
            if not _cites_a_tracked_file(path, folders, name, tracked, basenames):
                found.append(f"{where}: cites {folders + name!r}, which is not in the repository: {line.strip()[:120]}")
    return found


def _read(path: str) -> str | None:
    """A tracked file's text; None when it is missing from the work tree or binary."""
    try:
        data = (REPO / path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data:
        return None
    return data.decode("utf-8", errors="replace")


def test_no_tracked_file_points_outside_the_repository() -> None:
    files = tracked_files()
    tracked = set(files)
    found = []
    for path in files:
        if path in EXEMPT:
            continue
        text = _read(path)
        if text is not None:
            found += problems(path, text, tracked)
    assert not found, "the repository must stand on its own:\n" + "\n".join(found)


def test_exempt_files_exist() -> None:
    tracked = set(tracked_files())
    stale = set(EXEMPT) - tracked - {SELF}  # this file counts before its first commit too
    assert not stale, f"exemptions for files that are not tracked: {sorted(stale)}"


TRACKED_EXAMPLE = {"docs/design.md", "docs/deviations.md", "tests/data/HYPERPARAMETERS.md", "README.md"}


@pytest.mark.parametrize(
    "line",
    [
        "see /work/shared/docs/DESIGN.md",
        "cache = Path('/root/.cache/isubg')",
        "isubg train --output /tmp/run",
        'out = "/tmp"',
        "clip_url defaults to /home/someone/.cache/huggingface",
        "data in /Users/someone/gqa",
        "/mnt/sda/features.h5",
        r"path = 'C:\\Users\\me\\gqa'",
        r"C:\data\gqa",
        "the facts are in ban_cfr_aoa.md, sec. 2.3",
        "(mghr_system.md 2.4)",
        "sec. 1.5 of reference/isubgvqa_xvlm.md",
        "(DESIGN.md: layers)",
        "`../reference/mghr_system.md`",
        "see docs/HYPERPARAMETERS.md",
        'Path(__file__).parents[2] / "shared/docs/HYPERPARAMETERS.md"',
        "copied from ../shared/notes",
        "kept in /opt/notes/mghr_system.md",
    ],
)
def test_the_rules_catch(line: str) -> None:
    assert problems("docs/example.md", line, TRACKED_EXAMPLE)


@pytest.mark.parametrize(
    "line",
    [
        "https://keepachangelog.com/en/1.1.0/ and https://example.org/work/tmp/x",
        "runs/tmp/x and $OUT/tmp/ and data/work/ are relative",
        "~/.cache/isubg or $XDG_CACHE_HOME/isubg",
        "check access to /dev/nvidia* ; #!/usr/bin/env bash",
        "tmp = path.with_name('.tmp'); /tmpfile and /tmp_dir are other names",
        r'"Invalid configuration:\n  " and "train:\n  lr: 1"',
        "design: docs/design.md and [deviations](deviations.md#ban-schedule)",
        "the table: tests/data/HYPERPARAMETERS.md, or just HYPERPARAMETERS.md",
        "../refs/ban-vqa is a checkout the user names",
        "a public page: https://github.com/owner/name/blob/main/DESIGN.md",
    ],
)
def test_the_rules_pass(line: str) -> None:
    assert problems("docs/example.md", line, TRACKED_EXAMPLE) == []
