"""The models: three branches (cfrf, isubg, xvlm) and their per-answer fusion.

`isubg.branches.BRANCHES` names each branch's module (as in `model.branches`); every branch module
exposes `build(cfg, spec) -> nn.Module`. Modules are imported on demand, so importing this package
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from isubg.branches import BRANCHES

if TYPE_CHECKING:
    from torch import nn

    from isubg.batch import DataSpec
    from isubg.config import RunConfig
    from isubg.models.fusion import FusedModel

__all__ = ["build_branch", "build_model", "parameter_counts"]


def build_branch(name: str, cfg: RunConfig, spec: DataSpec) -> nn.Module:
    """Build one branch by name.

    Raises:
        KeyError: an unknown branch name (the config schema prevents it for user input).
    """
    module = importlib.import_module(BRANCHES[name].module)
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
