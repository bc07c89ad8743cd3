"""Edit a processed folder's question tables in tests (filter a split, strip its answers)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from isubg.data.tables import QuestionTable, QuestionWriter


def rewrite_questions(folder: Path, split: str, edit: Callable[[dict[str, Any]], dict[str, Any] | None]) -> int:
    """Rewrite `folder`'s `split` through `edit` (a record dict in, the record to keep or None out); the kept count."""
    table = QuestionTable(folder / f"questions_{split}")
    writer = QuestionWriter()
    for i in range(len(table)):
        record = edit(table.record(i))
        if record is not None:
            writer.add(record, *table.graph_rows(i))
    new = folder / f".questions_{split}.new"
    writer.write(new)
    shutil.rmtree(folder / f"questions_{split}")
    new.rename(folder / f"questions_{split}")
    return len(writer)


def question_records(folder: Path, split: str) -> list[dict[str, Any]]:
    """Every question of a processed split as a record dict."""
    return list(QuestionTable(folder / f"questions_{split}"))
