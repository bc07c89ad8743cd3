"""Locate, list and read the YAML presets shipped with isubg.

The presets live in the repository's top-level `presets/` folder; the wheel carries them as the
package data folder `isubg/_presets` (see pyproject.toml). Each preset file opens with a comment:
its first line says what the preset is for, a later line gives the command that uses it. A preset
holds only what it changes; `extends: NAME` layers it over another preset.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from isubg.config import ConfigError
from isubg.yamlio import YamlError, load_yaml_file

__all__ = ["PresetLayer", "is_file_ref", "list_presets", "preset_dir", "preset_layers", "preset_path", "preset_purpose"]

# The order `isubg preset list` shows: the base first, then by what a user is choosing between.
_ORDER = (
    "default",
    "demo",
    "gqa",
    "vqa",
    "8gb",
    "24gb",
    "low-memory",
    "memory-optimized",
    "high-performance",
    "throughput",
)


@cache
def preset_dir() -> Path:
    """The folder holding the shipped preset YAML files.

    Installed from a wheel, that is `isubg/_presets` inside the package; run from a source checkout
    (or an editable install), it is the checkout's `presets/` folder.

    Raises:
        RuntimeError: neither exists, i.e. the installation is broken.
    """
    packaged = Path(str(resources.files("isubg") / "_presets"))
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "presets"
    if checkout.is_dir():
        return checkout
    raise RuntimeError(f"isubg is installed without its presets: neither {packaged} nor {checkout} exists")


def list_presets() -> list[str]:
    """Names of the shipped presets, in display order (unknown extra files last, sorted)."""
    names = {p.stem for p in preset_dir().glob("*.yaml")}
    return [n for n in _ORDER if n in names] + sorted(names - set(_ORDER))


def preset_path(name: str) -> Path:
    """The file of a shipped preset.

    Raises:
        ConfigError: no preset has that name; the message lists them and suggests the closest.
    """
    known = list_presets()
    if name in known:
        return preset_dir() / f"{name}.yaml"
    lowered = {n.lower(): n for n in known}
    guess = lowered.get(name.lower()) or next(iter(difflib.get_close_matches(name, known, n=1)), None)
    hint = f" Did you mean '{guess}'?" if guess else ""
    raise ConfigError(f"Unknown preset '{name}'.{hint} Known presets: {', '.join(known)}.")


def preset_purpose(ref: str | Path) -> str:
    """The first line of a preset's (or YAML file's) opening comment: what it is for; '' if none.

    A shipped preset's line starts with its own name (`# 8gb: ...`); that prefix is dropped.
    """
    path = Path(ref) if is_file_ref(ref) else preset_path(str(ref))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip().removeprefix(f"{path.stem}:").strip()
        if line.strip():
            break
    return ""


@dataclass(frozen=True)
class PresetLayer:
    """One YAML file's settings, with the label errors and provenance use for it."""

    label: str
    data: dict[str, Any]


def is_file_ref(ref: str | Path) -> bool:
    """Whether a preset reference names a YAML file (a Path, a .yaml/.yml name, or a path with /) not a preset."""
    text = str(ref)
    return isinstance(ref, Path) or text.endswith((".yaml", ".yml")) or "/" in text


def _read(path: Path) -> dict[str, Any]:
    try:
        return load_yaml_file(path)
    except YamlError as exc:
        raise ConfigError(str(exc)) from None


def preset_layers(ref: str | Path, *, _chain: tuple[str, ...] = ()) -> list[PresetLayer]:
    """The layers a preset or config file stands for, base first, with `extends` expanded.

    Args:
        ref: a shipped preset name, or a path to a YAML file (anything with a `.yaml`/`.yml`
            suffix or a path separator is read as a file).

    Returns:
        One `PresetLayer` per file in the `extends` chain; the `extends` key itself is removed.

    Raises:
        ConfigError: unknown preset, unreadable or invalid YAML, a non-string `extends`, or a cycle.
    """
    ref_str = str(ref)
    is_file = is_file_ref(ref)
    path = Path(ref_str) if is_file else preset_path(ref_str)
    label = str(path) if is_file else f"preset {ref_str} ({path.name})"
    key = str(path.resolve())
    if key in _chain:
        raise ConfigError(f"{label}: 'extends' forms a cycle: {' -> '.join([*_chain, key])}")
    data = dict(_read(path))
    parent = data.pop("extends", None)
    if parent is None:
        return [PresetLayer(label, data)]
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{label}: 'extends' must name one preset or YAML file, got {parent!r}")
    if is_file and is_file_ref(parent):
        parent = str(path.parent / parent)  # relative to the file that extends it
    return [*preset_layers(parent, _chain=(*_chain, key)), PresetLayer(label, data)]
