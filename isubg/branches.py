"""The branch registry: the one place a branch is declared.

A branch is a model over one view of the question and image that answers on its own; the fused model weighs
the branches per answer. Every list of branches in isubg derives from `BRANCHES`: the `model.branches`
choices, the accuracy columns of logs and reports, which optimizer trains which parameters (`isubg.step`),
the memory model's optimizer state, the no-effect warnings for a branch that is not built.

This module imports neither torch nor pydantic, so the config schema and the torch-free commands (`isubg
report`, `isubg tune report`, the CLI front door) can read it. The model itself lives in `module`, which
exposes `build(cfg, spec) -> nn.Module` (see `isubg.models.build_branch`).

Adding a branch: write `isubg/models/<name>.py` with `build`, add its settings section to `ModelConfig`
(isubg.config), and register it below. Nothing else lists branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ACCURACY_COLUMNS", "BRANCHES", "BranchSpec", "branch_names", "register_branch"]

OptimizerFamily = Literal["adamax", "adamw"]


@dataclass(frozen=True)
class BranchSpec:
    """How isubg builds and trains one branch.

    Attributes:
        name: the name in `model.branches`, checkpoints, logs and reports.
        section: the settings section, `model.<section>`.
        module: the module whose `build(cfg, spec)` builds it.
        optimizer: "adamax": the branch's parameters join the main Adamax at `train.lr` (with BAN's schedule);
            "adamw": the branch has an AdamW of its own, stored under its name in checkpoints, at `lr_field`,
            with weight decay `weight_decay_field`, at a constant rate.
        lr_field: the dotted config path of its learning rate.
        weight_decay_field: the dotted config path of its AdamW weight decay (None for Adamax).
        summary: one line for help texts.
    """

    name: str
    section: str
    module: str
    optimizer: OptimizerFamily
    lr_field: str
    weight_decay_field: str | None
    summary: str

    def __post_init__(self) -> None:
        if (self.optimizer == "adamw") != (self.weight_decay_field is not None):
            raise ValueError(f"branch {self.name}: an AdamW branch, and only one, names its weight decay setting")


BRANCHES: dict[str, BranchSpec] = {}


def register_branch(spec: BranchSpec) -> BranchSpec:
    """Add `spec` to `BRANCHES` (in registration order, which is the order of columns and defaults)."""
    if spec.name in BRANCHES:
        raise ValueError(f"branch {spec.name!r} is registered twice")
    BRANCHES[spec.name] = spec
    return spec


def branch_names() -> tuple[str, ...]:
    """The registered branch names, in registration order."""
    return tuple(BRANCHES)


register_branch(BranchSpec(
    name="cfrf", section="cfrf", module="isubg.models.cfrf", optimizer="adamax", lr_field="train.lr",
    weight_decay_field=None, summary="BAN with counter, CFR and attention-on-attention over box features",
))  # fmt: skip
register_branch(BranchSpec(
    name="isubg", section="isubg", module="isubg.models.isubg", optimizer="adamax", lr_field="train.lr",
    weight_decay_field=None, summary="ISubGVQA: graph attention over the scene graph, question-guided subgraph",
))  # fmt: skip
register_branch(BranchSpec(
    name="xvlm", section="xvlm", module="isubg.models.xvlm", optimizer="adamw", lr_field="train.xvlm_lr",
    weight_decay_field="optim.xvlm_weight_decay",
    summary="X-VLM: text and cross-attention transformer over box regions or image patches",
))  # fmt: skip

# The validation accuracies a run reports, in display order: each branch, the fused model, "ens" and "bound"
# (isubg.evaluate); logs and reports list them in this order.
ACCURACY_COLUMNS: tuple[str, ...] = (*BRANCHES, "fused", "ens", "bound")
