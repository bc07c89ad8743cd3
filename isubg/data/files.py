"""Small file helpers shared by the data modules: JSON with located errors, atomic writes, checksums."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from isubg.errors import DataError

__all__ = ["read_json", "sha256_file", "write_json_atomic", "write_text_atomic"]


def read_json(path: Path) -> Any:
    """Parse a JSON file.

    Raises:
        DataError: missing or unreadable file, or invalid JSON (with line and column).
    """
    try:
        with Path(path).open("rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any, *, indent: int | None = None) -> None:
    """`write_text_atomic` for JSON (compact by default: these files can be large)."""
    separators = None if indent else (",", ":")
    write_text_atomic(path, json.dumps(data, indent=indent, separators=separators, ensure_ascii=False))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (bounded memory on large feature files)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
