"""The multi-branch model: run the configured branches and fuse their answer probabilities per answer.

Fusion (after MGHR, corrected): each branch k gives logits l_k (B, A) and probabilities p_k = sigmoid(l_k),
the natural probabilities of a BCE-with-logits branch. A learnable `adapted_w` of shape (branches, A) is
softmaxed over the branches separately for every answer, W = softmax(adapted_w, dim=0), and the fused
probability is P[b, a] = sum_k W[k, a] p_k[b, a], in [0, 1]. With all three branches `adapted_w` is
(3, A) as in the reference; with a subset it has one row per branch present, so no parameter is dead.

Loss = sum over branches of BCE-with-logits(l_k, targets) (+ a branch's own auxiliary loss, such as the
xvlm candidate loss) + fusion_ratio x BCE(P, targets). Nothing is detached: the fused loss reaches every
branch (the reference detached X-VLM). With a single branch there is nothing to fuse, so the fused term
is left out and `fusion_ratio` has no effect (the config warns about that).

Held-out fusion (`model.fusion.holdout` = h > 0, a deviation from the reference): the weights above are a
stacking model, and fitted on questions the branches train on they favour the branch that fits the training
set best, not the one that answers unseen questions best (on the demo, isubg fit 93% of its training questions
and answered 61% of validation; cfrf 81% and 76%, yet isubg got two thirds of the weight). A fixed share h of
the training questions, picked by a hash of the question id (the same in every epoch, process and resume), is
then held out: the branch losses skip them, and the fused loss is computed on them alone from detached branch
probabilities, so it trains `adapted_w` only, on answers the branches gave to questions they never learned.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from isubg.batch import Batch
from isubg.models.common import BranchOutput

__all__ = ["FusedModel", "FusedOutput", "held_out"]

_EPS = 1e-6  # keeps BCE on probabilities finite when a fused probability saturates


def held_out(question_ids: Sequence[str], share: float) -> torch.Tensor:
    """(B,) bool, True for the questions held out for the fusion weights: those whose id hashes (CRC-32, stable
    across processes, unlike `hash`) below `share` of the 32-bit range. share 0 holds out nothing."""
    return torch.tensor([zlib.crc32(str(q).encode()) < share * 2**32 for q in question_ids], dtype=torch.bool)


@dataclass
class FusedOutput:
    """Everything a forward pass produced.

    Attributes:
        branches: branch name -> its BranchOutput (logits (B, A), optional node_mask (N,)).
        fused: (B, A) fused probabilities in [0, 1].
    """

    branches: dict[str, BranchOutput]
    fused: torch.Tensor

    def probabilities(self) -> dict[str, torch.Tensor]:
        """Branch name -> (B, A) sigmoid probabilities, plus "fused"."""
        out = {name: torch.sigmoid(o.logits.float()) for name, o in self.branches.items()}
        out["fused"] = self.fused
        return out

    @property
    def node_mask(self) -> torch.Tensor | None:
        """(N,) the isubg branch's selected-node mask (the explanation), when that branch runs."""
        isubg = self.branches.get("isubg")
        return None if isubg is None else isubg.node_mask


class FusedModel(nn.Module):
    """Runs `branches` on a Batch and fuses them (see the module docstring).

    Args:
        branches: branch name -> module with `forward(batch) -> BranchOutput`; order is kept.
        num_answers: A.
        fusion_ratio: weight of the fused-probability loss.
        holdout: share of training questions held out for the fusion weights (module docstring); 0 = none.
    """

    def __init__(
        self, branches: dict[str, nn.Module], num_answers: int, fusion_ratio: float, holdout: float = 0.0
    ) -> None:
        super().__init__()
        if not branches:
            raise ValueError("at least one branch is needed")
        self.branches = nn.ModuleDict(branches)
        self.fusion_ratio = fusion_ratio
        self.holdout = holdout if len(branches) > 1 else 0.0
        # Ones, as in the reference: every branch starts with weight 1/K for every answer.
        self.adapted_w = nn.Parameter(torch.ones(len(branches), num_answers))

    def branch(self, name: str) -> nn.Module | None:
        """The branch called `name`, or None when this model does not build it."""
        return self.branches[name] if name in self.branches else None  # noqa: SIM401 (ModuleDict has no get)

    def forward(self, batch: Batch) -> FusedOutput:
        """Run every branch and fuse.

        Shapes:
            batch: a Batch of B questions -> FusedOutput with (B, A) logits per branch and (B, A) fused.
        """
        outputs = {name: branch(batch) for name, branch in self.branches.items()}
        # float32: under autocast the logits are bf16/fp16, and a low-precision sigmoid rounds confident answers to
        # exactly 1 (no gradient through the clamped fused BCE) and coarsens everything the fusion weighs.
        probs = torch.stack([torch.sigmoid(o.logits.float()) for o in outputs.values()])  # (K, B, A)
        weights = torch.softmax(self.adapted_w, dim=0).unsqueeze(1)  # (K, 1, A)
        return FusedOutput(branches=outputs, fused=(weights * probs).sum(0))

    def loss(
        self, output: FusedOutput, targets: torch.Tensor, question_ids: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss and its parts (each already weighted), named by branch and "fused".

        Branch BCE terms are summed over answers and averaged over the batch, the BAN convention, so
        the loss scale does not depend on the answer-vocabulary size. With `question_ids` and a holdout
        share, the held-out questions train the fusion weights only (module docstring); without them
        (validation, memory probes) every question counts everywhere.

        Shapes:
            targets: (B, A) soft scores in [0, 1] -> a scalar loss.
        """
        batch = targets.shape[0]
        targets = targets.float()  # losses in float32 even under autocast: BCE is not safe in half precision
        held = None
        if self.holdout > 0 and question_ids is not None:
            held = held_out(question_ids, self.holdout).to(targets.device)
        keep = slice(None) if held is None else ~held
        parts: dict[str, torch.Tensor] = {}
        for name, out in output.branches.items():
            logits = out.logits.float()[keep]
            parts[name] = F.binary_cross_entropy_with_logits(logits, targets[keep], reduction="sum") / batch
            extra = getattr(self.branches[name], "candidate_loss", None)
            if extra is not None and logits.shape[0] > 0:
                # candidate_loss is a mean over its rows; rescaled to a mean over the whole batch like the BCE.
                parts[f"{name}_candidates"] = extra(logits, targets[keep]) * (logits.shape[0] / batch)
        if len(output.branches) > 1:
            fused, fused_targets = output.fused, targets
            if held is not None:
                probs = torch.stack([torch.sigmoid(o.logits.detach().float()[held]) for o in output.branches.values()])
                fused = (torch.softmax(self.adapted_w.float(), dim=0).unsqueeze(1) * probs).sum(0)
                fused_targets = targets[held]
            fused = fused.float().clamp(_EPS, 1 - _EPS)
            # BCE written out: F.binary_cross_entropy raises on a NaN input, and a NaN here must reach the
            # trainer as a NaN loss (a diverged run it stops cleanly), not as a crash.
            bce = -(fused_targets * fused.log() + (1 - fused_targets) * (1 - fused).log()).sum()
            parts["fused"] = self.fusion_ratio * bce / batch
        return torch.stack(list(parts.values())).sum(), parts
