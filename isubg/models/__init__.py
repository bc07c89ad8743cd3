"""The models: three branches (cfrf, isubg, xvlm) and their per-answer fusion.

`BRANCHES` maps a branch name (as in `model.branches`) to the module that builds it; every module
exposes `build(cfg, spec) -> nn.Module`. Modules are imported on demand, so importing this package
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from isubg.batch import DataSpec
    from isubg.config import RunConfig
    from isubg.models.fusion import FusedModel

__all__ = ["BRANCHES", "build_branch", "build_model", "parameter_counts"]

BRANCHES: dict[str, str] = {"cfrf": "isubg.models.cfrf", "isubg": "isubg.models.isubg", "xvlm": "isubg.models.xvlm"}


def build_branch(name: str, cfg: RunConfig, spec: DataSpec) -> nn.Module:
    """Build one branch by name.

    Raises:
        KeyError: an unknown branch name (the config schema prevents it for user input).
    """
    module = importlib.import_module(BRANCHES[name])
    return module.build(cfg, spec)


def build_model(cfg: RunConfig, spec: DataSpec) -> FusedModel:
    """The fused model over `cfg.model.branches`, in that order."""
    from isubg.models.fusion import FusedModel

    branches = {name: build_branch(name, cfg, spec) for name in cfg.model.branches}
    fusion = cfg.model.fusion
    return FusedModel(branches, spec.num_answers, fusion.fusion_ratio, fusion.holdout)


def parameter_counts(model: FusedModel) -> dict[str, int]:
    """Trainable parameters per branch, of the fusion weights, and in total."""
    from isubg.models.common import parameter_count

    counts = {name: parameter_count(branch) for name, branch in model.branches.items()}
    counts["fusion"] = model.adapted_w.numel()
    counts["total"] = parameter_count(model)
    return counts
