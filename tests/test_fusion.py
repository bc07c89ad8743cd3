"""FusedModel: per-answer softmax over branches, the loss and its parts, gradients to every branch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from isubg.models.common import BranchOutput
from isubg.models.fusion import FusedModel, held_out


class Toy(nn.Module):
    """A stand-in branch: a linear map of the mean box feature."""

    def __init__(self, dim: int, answers: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(dim, answers)

    def forward(self, batch: object) -> BranchOutput:
        return BranchOutput(logits=self.head(batch.features.mean(1)))  # type: ignore[attr-defined]


class WithCandidates(Toy):
    def candidate_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits.square().mean()


class FakeBatch:
    def __init__(self, b: int = 3, k: int = 5, d: int = 4) -> None:
        torch.manual_seed(0)
        self.features = torch.randn(b, k, d)


def _model(names: tuple[str, ...] = ("cfrf", "isubg", "xvlm"), ratio: float = 0.1, answers: int = 6) -> FusedModel:
    return FusedModel({n: Toy(4, answers, i) for i, n in enumerate(names)}, answers, ratio)


def test_initial_fusion_is_the_mean_probability() -> None:
    model, batch = _model(), FakeBatch()
    out = model(batch)
    mean = torch.stack([torch.sigmoid(o.logits) for o in out.branches.values()]).mean(0)
    torch.testing.assert_close(out.fused, mean)
    assert model.adapted_w.shape == (3, 6)


def test_weights_are_a_softmax_over_branches_per_answer() -> None:
    model, batch = _model(answers=2), FakeBatch()
    with torch.no_grad():
        model.adapted_w.copy_(torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]]))
    out = model(batch)
    p = [torch.sigmoid(o.logits) for o in out.branches.values()]
    w0 = torch.softmax(torch.tensor([0.0, 1.0, 0.0]), 0)  # answer 0
    w1 = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)  # answer 1
    torch.testing.assert_close(out.fused[:, 0], sum(w0[k] * p[k][:, 0] for k in range(3)))
    torch.testing.assert_close(out.fused[:, 1], sum(w1[k] * p[k][:, 1] for k in range(3)))


def test_loss_parts_and_fusion_ratio() -> None:
    batch, targets = FakeBatch(), torch.tensor([[1.0, 0, 0, 0, 0, 0.3], [0, 0.6, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    model = _model(ratio=0.1)
    out = model(batch)
    total, parts = model.loss(out, targets)
    assert set(parts) == {"cfrf", "isubg", "xvlm", "fused"}
    torch.testing.assert_close(total, sum(parts.values()))
    expected = nn.functional.binary_cross_entropy_with_logits(out.branches["cfrf"].logits, targets, reduction="sum")
    torch.testing.assert_close(parts["cfrf"], expected / 3)
    model.fusion_ratio = 0.2
    _, doubled = model.loss(out, targets)
    torch.testing.assert_close(doubled["fused"], 2 * parts["fused"])


def test_fused_term_is_the_binary_cross_entropy_and_a_nan_becomes_a_nan_loss() -> None:
    batch, targets = FakeBatch(), torch.rand(3, 6)
    model = _model(ratio=1.0)
    out = model(batch)
    _, parts = model.loss(out, targets)
    expected = nn.functional.binary_cross_entropy(out.fused.clamp(1e-6, 1 - 1e-6), targets, reduction="sum") / 3
    torch.testing.assert_close(parts["fused"], expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # a diverged weight: the trainer must see a NaN loss, not an exception from BCE
        model.branches["cfrf"].head.weight.fill_(float("nan"))
    total, _ = model.loss(model(batch), targets)
    assert torch.isnan(total)


def test_single_branch_has_no_fused_term() -> None:
    model = _model(("isubg",))
    _, parts = model.loss(model(FakeBatch()), torch.zeros(3, 6))
    assert set(parts) == {"isubg"} and model.adapted_w.shape == (1, 6)


def test_the_fused_loss_reaches_every_branch_and_the_weights() -> None:
    model = _model(ratio=1.0)
    out = model(FakeBatch())
    _, parts = model.loss(out, torch.rand(3, 6))
    parts["fused"].backward()
    for name, branch in model.branches.items():
        assert branch.head.weight.grad is not None and branch.head.weight.grad.abs().sum() > 0, name
    assert model.adapted_w.grad is not None and model.adapted_w.grad.abs().sum() > 0


def test_a_branch_candidate_loss_is_added() -> None:
    model = FusedModel({"cfrf": Toy(4, 6, 0), "xvlm": WithCandidates(4, 6, 1)}, 6, 0.1)
    _, parts = model.loss(model(FakeBatch()), torch.zeros(3, 6))
    assert "xvlm_candidates" in parts and parts["xvlm_candidates"] > 0


def test_held_out_questions_are_a_stable_share_of_the_ids() -> None:
    ids = [f"q{i}" for i in range(20_000)]
    mask = held_out(ids, 0.1)
    assert mask.dtype == torch.bool and abs(mask.float().mean().item() - 0.1) < 0.01
    assert torch.equal(held_out(list(reversed(ids)), 0.1), mask.flip(0))  # per id, not per position
    assert not held_out(ids, 0.0).any() and held_out(ids[:50], 0.2).sum() <= held_out(ids[:50], 0.5).sum()


def test_held_out_questions_train_the_fusion_weights_only() -> None:
    ids = [f"q{i}" for i in range(64)]
    held = held_out(ids, 0.3)
    assert 0 < held.sum() < 64
    model = _model(ratio=1.0)
    model.holdout = 0.3
    batch, targets = FakeBatch(b=64), torch.rand(64, 6)
    out = model(batch)
    _, parts = model.loss(out, targets, ids)
    kept = out.branches["cfrf"].logits[~held]
    expected = nn.functional.binary_cross_entropy_with_logits(kept, targets[~held], reduction="sum") / 64
    torch.testing.assert_close(parts["cfrf"], expected)
    parts["fused"].backward()  # the fused term reaches the weights and no branch
    assert model.adapted_w.grad is not None and model.adapted_w.grad.abs().sum() > 0
    assert all(b.head.weight.grad is None for b in model.branches.values())
    w = torch.softmax(model.adapted_w.detach(), 0).unsqueeze(1)
    fused = (w * torch.stack([torch.sigmoid(o.logits.detach()[held]) for o in out.branches.values()])).sum(0)
    t = targets[held]
    bce = -(t * fused.log() + (1 - t) * (1 - fused).log()).sum() / 64
    torch.testing.assert_close(parts["fused"], bce)
    _, plain = model.loss(model(batch), targets)  # without ids (validation): every question everywhere
    assert plain["cfrf"] > parts["cfrf"]


def test_a_single_branch_holds_nothing_out() -> None:
    model = FusedModel({"cfrf": Toy(4, 6, 0)}, 6, 0.1, holdout=0.5)
    assert model.holdout == 0.0


def test_empty_branch_set_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one branch"):
        FusedModel({}, 4, 0.1)


def test_dropout_is_inverted_dropout() -> None:
    from isubg.models.common import Dropout

    drop = Dropout(0.25)
    x = torch.ones(200_000)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # drops about p of the entries
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))  # and rescales the rest
    x.requires_grad_(True)
    torch.manual_seed(0)
    drop(x).sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient flows through kept entries only, rescaled
    assert torch.equal(Dropout(0.0).train()(x), x)
