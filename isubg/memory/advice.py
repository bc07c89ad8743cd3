"""What to change when a run does not fit: each suggestion re-estimated with the change made.

`suggestions(est, device_bytes)` tries, where they apply: mixed precision, memory-efficient attention, both,
fewer boxes (FEWER_BOXES), and the smaller preset (SMALLER_PRESET) when its model is smaller than the run's.
Each line says how much the change saves and whether the micro-batch then fits (or which smaller micro-batch
does, with the accumulation that keeps the effective batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from isubg.branches import BRANCHES
from isubg.config import RunConfig
from isubg.memory.estimate import MemoryEstimate, WorstCase
from isubg.memory.measure import build_for_measure, measure_model
from isubg.resolve import resolve_config

__all__ = ["FEWER_BOXES", "SMALLER_PRESET", "format_bytes", "suggestions"]

SMALLER_PRESET = "memory-optimized"  # the preset suggested when the model itself is too large
FEWER_BOXES = 36  # the suggested data.max_boxes (the fixed-36 bottom-up features)


def suggestions(est: MemoryEstimate, device_bytes: int, fraction: float | None = None) -> list[str]:
    """Changes that make the run fit, each quantified by re-estimating with it (empty when it fits)."""
    if est.fits(device_bytes, fraction):
        return []
    budget = est.budget(device_bytes, fraction)
    out = []
    for label, variant in _variants(est):
        batch = variant.batch_size
        largest = variant.largest_batch(device_bytes, fraction, max_batch=batch)
        verdict = "fits" if largest >= batch else "still too large"
        if 0 < largest < batch:
            verdict += f"; micro-batch {largest} fits (gradient_accumulation_steps {variant.accumulation_for(largest)})"
        out.append(
            f"{label}: {format_bytes(variant.total(batch))} at micro-batch {batch} "
            f"({format_bytes(variant.total(batch) - est.total(est.batch_size), sign=True)}; "
            f"budget {format_bytes(budget)}), {verdict}"
        )
    return out


def format_bytes(value: float, sign: bool = False) -> str:
    """Bytes as GiB from 1 GiB up, else MiB ("7.34 GiB", "+12.5 MiB")."""
    plus = "+" if sign else ""
    return f"{value / 2**30:{plus}.2f} GiB" if abs(value) >= 2**30 else f"{value / 2**20:{plus}.1f} MiB"


def _variants(est: MemoryEstimate) -> Iterator[tuple[str, MemoryEstimate]]:
    """(label, estimate) for each memory-saving change that applies to `est`'s config.

    Changes that leave the model as it is (precision, box count) share one build of it.
    """
    cfg = est.cfg
    changes: list[tuple[str, RunConfig, WorstCase]] = []
    if not cfg.memory.mixed_precision:
        changes.append(("memory.mixed_precision=true", _changed(cfg, "memory", mixed_precision=True), est.worst))
    if not cfg.memory.memory_efficient_attention:
        efficient = _changed(cfg, "memory", memory_efficient_attention=True)
        changes.append(("memory.memory_efficient_attention=true", efficient, est.worst))
        if not cfg.memory.mixed_precision:
            both = _changed(efficient, "memory", mixed_precision=True)
            changes.append(("both mixed_precision and memory_efficient_attention", both, est.worst))
    if cfg.data.max_boxes > FEWER_BOXES:
        fewer = replace(est.worst, boxes=FEWER_BOXES)
        changes.append((f"data.max_boxes={FEWER_BOXES}", _changed(cfg, "data", max_boxes=FEWER_BOXES), fewer))
    smaller = _smaller_preset(cfg)
    if smaller is not None:
        changes.append((f"--preset {SMALLER_PRESET}", smaller, est.worst))
    built: tuple[str, Any] = ("", None)
    order = {key: i for i, key in reversed(list(enumerate(_model_key(c) for _, c, _ in changes)))}
    for label, changed, worst in sorted(changes, key=lambda change: order[_model_key(change[1])]):
        key = _model_key(changed)
        if key != built[0]:
            built = ("", None)  # free the previous model before building the next
            built = (key, build_for_measure(changed, est.spec))
        yield label, measure_model(built[1], changed, est.spec, worst)


def _model_key(cfg: RunConfig) -> str:
    """What the built model depends on: the model section, memory-efficient attention and tf-idf words."""
    return repr((cfg.model.model_dump(mode="json"), cfg.memory.memory_efficient_attention, cfg.data.tfidf))


def _changed(cfg: RunConfig, section: str, **values: Any) -> RunConfig:
    out = cfg.model_copy(deep=True)
    for key, value in values.items():
        setattr(getattr(out, section), key, value)
    return out


def _smaller_preset(cfg: RunConfig) -> RunConfig | None:
    """SMALLER_PRESET with this run's data settings and branches, when its model is smaller than this one's:
    no integer size of model.cfrf / isubg / xvlm larger and at least one smaller. Else None."""
    preset = resolve_config(SMALLER_PRESET).config
    pairs = [  # (the preset's size, this config's size)
        (value, getattr(getattr(cfg.model, section), key))
        for section in (spec.section for spec in BRANCHES.values())
        for key, value in getattr(preset.model, section).model_dump().items()
        if isinstance(value, int) and not isinstance(value, bool)
    ]
    if any(theirs > ours for theirs, ours in pairs) or all(theirs == ours for theirs, ours in pairs):
        return None
    out = preset.model_copy(deep=True)
    out.data = cfg.data.model_copy(deep=True)
    out.model.branches = list(cfg.model.branches)
    return out
