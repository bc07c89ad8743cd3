"""The embedded default dataset: generate the demo world, prepare it for GQA and VQA, and keep it in a cache.

`isubg data demo` builds it where asked; training with no data given calls `ensure_demo()`, which
builds it once under the cache folder and reuses it afterwards (a cache written by an older generator,
whose demo.json has another `GENERATOR_VERSION`, or prepared in an older processed format, is rebuilt in place):

    <cache>/demo/<size>-seed<seed>/        the raw files (see isubg.data.demo)
    <cache>/demo/<size>-seed<seed>/processed/gqa, .../processed/vqa   processed folders (isubg data prepare)

<cache> is $ISUBG_CACHE_DIR, else $XDG_CACHE_HOME/isubg, else ~/.cache/isubg.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from isubg.data.demo import GENERATOR_VERSION, DemoReport, generate_demo
from isubg.data.files import read_json
from isubg.data.prepare import FORMAT_VERSION, PrepareReport, discover_splits, prepare
from isubg.errors import DataError

__all__ = ["DemoBuild", "build_demo", "cache_dir", "demo_dir", "ensure_demo", "processed_dir"]

Size = Literal["tiny", "small", "medium"]
DATASETS = ("gqa", "vqa")


def cache_dir() -> Path:
    """Where isubg keeps generated data ($ISUBG_CACHE_DIR, $XDG_CACHE_HOME/isubg or ~/.cache/isubg)."""
    if os.environ.get("ISUBG_CACHE_DIR"):
        return Path(os.environ["ISUBG_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "isubg"


def demo_dir(size: Size = "small", seed: int = 0) -> Path:
    """The cache folder of one demo dataset."""
    return cache_dir() / "demo" / f"{size}-seed{seed}"


def processed_dir(root: Path, dataset: str) -> Path:
    """The processed folder of one dataset ("gqa" or "vqa") inside a demo folder."""
    return root / "processed" / dataset


@dataclass
class DemoBuild:
    """A generated and prepared demo dataset."""

    root: Path
    generated: DemoReport | None = None  # None when an existing build was reused
    prepared: dict[str, PrepareReport] = field(default_factory=dict)

    def processed(self, dataset: str) -> Path:
        return processed_dir(self.root, dataset)


def build_demo(
    out: Path, size: Size = "small", seed: int = 0, progress: Callable[[str], None] | None = None
) -> DemoBuild:
    """Generate the demo world under `out` and prepare it as GQA and as VQA v2.

    Both are given the detector vocabularies, so both get named detector graphs and detector stat words; GQA
    also gets the demo's ground-truth scene graphs of train, val and testdev.
    """
    say = progress or (lambda _message: None)
    generated = generate_demo(out, size=size, seed=seed, progress=say)
    build = DemoBuild(root=out, generated=generated)
    features = out / "features" / "demo.h5"
    for dataset in DATASETS:
        say(f"preparing {dataset}")
        raw = out / dataset
        build.prepared[dataset] = prepare(
            dataset,  # type: ignore[arg-type]
            discover_splits(dataset, raw, ["train", "val", "testdev"]),  # type: ignore[arg-type]
            features,
            processed_dir(out, dataset),
            object_vocab=out / "features" / "objects_vocab.txt",
            attribute_vocab=out / "features" / "attributes_vocab.txt",
            min_answer_count=1,  # the demo's answers are few; every training answer is a class
            log=say,
        )
    return build


def _is_complete(root: Path, size: str, seed: int) -> bool:
    """Whether `root` holds a whole, prepared demo of this size and seed made by the current generator.

    A demo written by an older generator (another `GENERATOR_VERSION` in demo.json, or none) is stale:
    the same (size, seed) now gives another world, so it is rebuilt rather than trained on. So is one whose
    processed folders have another processed format (`FORMAT_VERSION`): training could not read them.
    """
    manifest = root / "demo.json"
    if not manifest.exists():
        return False
    info = read_json(manifest)
    if info.get("size") != size or info.get("seed") != seed or info.get("version") != GENERATOR_VERSION:
        return False
    return all(_current_format(processed_dir(root, d) / "manifest.json") for d in DATASETS)


def _current_format(manifest: Path) -> bool:
    """Whether a processed folder's manifest exists and has this isubg's processed format."""
    try:
        info = read_json(manifest)
    except DataError:
        return False  # missing or unreadable: rebuilt like a stale one
    return isinstance(info, dict) and info.get("format_version") == FORMAT_VERSION


def ensure_demo(size: Size = "small", seed: int = 0, progress: Callable[[str], None] | None = None) -> DemoBuild:
    """The cached demo dataset, built on first use and reused afterwards."""
    root = demo_dir(size, seed)
    if _is_complete(root, size, seed):
        return DemoBuild(root=root)
    return build_demo(root, size=size, seed=seed, progress=progress)
