"""One import: read a foreign checkpoint, build the isubg model it implies, fill it, and write an isubg checkpoint.

The written file is an isubg checkpoint (isubg.checkpoint layout) holding `version`, `model`, `config`, `spec`,
`vocab_sha256` (of the data folder given, else None) and `imported` (the report as JSON), without optimizer state:
`isubg train --init-from OUT.pt` starts a run from its weights and `isubg eval OUT.pt --data DIR` evaluates it.
Next to it, OUT.yaml holds the settings the import used (the sizes the file implies, the parity switches and the
user's --set), for `isubg train --config OUT.yaml`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isubg.batch import DataSpec
from isubg.checkpoint import CHECKPOINT_VERSION, save_checkpoint, vocab_checksum
from isubg.config import RunConfig
from isubg.data.loaders import open_split
from isubg.errors import ConfigError, DataError
from isubg.importers.ban import ban_plan
from isubg.importers.core import ImportReport, Plan, apply_plan, read_foreign
from isubg.importers.mghr import mghr_plan
from isubg.importers.xvlm import xvlm_plan
from isubg.models import build_model
from isubg.resolve import canonical_key, nest_paths, parse_set, resolve_config
from isubg.yamlio import dump_yaml

__all__ = ["PLANS", "Imported", "import_checkpoint", "write_import"]

PLANS: dict[str, Callable[[dict[str, torch.Tensor]], Plan]] = {"xvlm": xvlm_plan, "ban": ban_plan, "mghr": mghr_plan}
# Sizes a plan may not know (X-VLM has no answer list or box features): VQA v2's answers, bottom-up features.
_DEFAULT_SPEC = {"num_words": 2, "num_answers": 3129, "feature_dim": 2048, "num_graph_tokens": 2}


@dataclass
class Imported:
    """The result of `import_checkpoint`: the isubg checkpoint dict, its config, the report and the settings used."""

    state: dict[str, Any]
    config: RunConfig
    report: ImportReport
    settings: list[str]


def import_checkpoint(
    kind: str,
    path: Path,
    *,
    preset: str = "default",
    config_file: Path | None = None,
    sets: Sequence[str] = (),
    data_dir: Path | None = None,
    strict: bool = False,
) -> Imported:
    """Map a foreign checkpoint of `kind` (xvlm, ban, mghr) onto the isubg model it implies.

    Settings are layered: the preset, `config_file`, the sizes and parity switches the file implies, then `sets`
    (the user's word wins). With `data_dir` the model is built for that processed folder (its vocabulary checksum is
    stored, so `isubg eval` accepts it); without it, for the sizes the file implies.

    Raises:
        ConfigError: an unknown kind or a bad setting.
        DataError: the file cannot be read safely or is not a `kind` checkpoint; with `strict`, any isubg tensor
            left unfilled, any shape disagreement or any source tensor without a stated reason.
    """
    if kind not in PLANS:
        raise ConfigError(f"unknown checkpoint kind {kind!r}; expected one of {', '.join(PLANS)}")
    state, extras = read_foreign(path, kind)
    plan = PLANS[kind](state)
    settings = [*plan.sets, *plan.switches, *sets]
    cfg = resolve_config(preset, config_file=config_file, sets=settings).config
    spec = _spec(cfg, plan, data_dir)
    model = build_model(cfg, spec)
    report = apply_plan(model, state, plan, path, extras)
    if strict and report.problems():
        raise DataError(f"--strict: {path} does not fill the isubg model exactly: " + "; ".join(report.problems()))
    sizes = {k: getattr(spec, k) for k in ("num_words", "num_answers", "num_graph_tokens", "feature_dim")}
    checkpoint = {
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "config": cfg.model_dump(mode="json"),
        "spec": sizes,
        "vocab_sha256": vocab_checksum(data_dir) if data_dir is not None else None,
        "imported": report.to_json(),
    }
    return Imported(checkpoint, cfg, report, settings)


def write_import(imported: Imported, out: Path) -> Path:
    """Write the checkpoint to `out` (atomically) and its settings to `out` with suffix .yaml; returns the YAML."""
    out = Path(out)
    save_checkpoint(out, imported.state)
    settings = out.with_suffix(".yaml")
    header = f"settings of `isubg import-checkpoint {imported.report.kind} {imported.report.path}`"
    tmp = settings.with_name(f".{settings.name}.tmp")
    layer = parse_set(imported.settings).data  # later settings win, as in resolve_config
    flat = {canonical_key(key, "import settings"): value for key, value in layer.items()}
    tmp.write_text(dump_yaml(nest_paths(flat), header), encoding="utf-8")
    tmp.replace(settings)
    return settings


def _spec(cfg: RunConfig, plan: Plan, data_dir: Path | None) -> DataSpec:
    """The data spec to build for: the data folder's, or the plan's sizes (an empty tf-idf matrix when needed).

    Raises:
        DataError: the data folder's sizes disagree with the ones the file implies.
    """
    if data_dir is not None:
        spec = open_split(cfg, Path(data_dir), cfg.data.train_split, None).spec()
        clash = [f"{k} {getattr(spec, k)} (data) vs {v} (file)" for k, v in plan.spec.items() if getattr(spec, k) != v]
        if clash:
            raise DataError(f"{data_dir} does not fit the checkpoint: {'; '.join(clash)}")
        return spec
    sizes = {**_DEFAULT_SPEC, **plan.spec}
    # tf-idf weights are data (rebuilt from the processed folder, never saved), so an empty matrix of the right
    # shape builds the same parameters.
    n = sizes["num_words"]
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), (n, n))
    return DataSpec(**sizes, tfidf=empty if cfg.data.tfidf else None)
