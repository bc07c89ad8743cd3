"""Each branch learns from its input: trained on a small learnable set, it loses a clear margin of accuracy when
that input is shuffled across the batch (isubg.ablation). A branch that learned question priors does not.

The set is the small demo's colour questions ("What color is the large ball?"): five answers, so question
priors stay near 20-30%, while the answer is in the boxes (cfrf, xvlm) and in the scene graph (isubg).
Margins and budgets come from measurement (benchmarks/bench_quality.py): at these budgets the trained
branches reach 75-100%, and shuffling their input brings them back to the prior. The cfrf check runs the guide's
six AoA layers: with a LayerNorm after each residual (`aoa_norm: post`, the former default) the branch
stayed at the prior (21% after 30 epochs against 99% with `pre`), and this test failed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from processed import rewrite_questions
from rich.console import Console

from isubg.ablation import ablated
from isubg.checkpoint import load_checkpoint, vocab_checksum
from isubg.config import RunConfig
from isubg.data.embedded import build_demo
from isubg.data.loaders import make_batches, open_split
from isubg.evaluate import evaluate, load_trained
from isubg.resolve import resolve_config
from isubg.train import train

MARGIN = 0.25  # accuracy the shuffled input must cost, at least
ABOVE_PRIOR = 0.30  # how far above the majority answer the trained branch must be

pytestmark = pytest.mark.slow  # trains each branch for minutes


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small demo's GQA folder with only its colour questions."""
    root = tmp_path_factory.mktemp("quality")
    source = build_demo(root / "demo", size="small", seed=0).processed("gqa")
    folder = root / "colours"
    shutil.copytree(source, folder)
    for split in ("train", "val"):
        rewrite_questions(folder, split, lambda r: r if r["question"].lower().startswith("what color") else None)
    return folder


def _accuracy(folder: Path, run: Path, kind: str | None) -> float:
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    cfg = RunConfig.model_validate(state["config"])
    val = open_split(cfg, folder, "val", None)
    model = load_trained(state, val.spec(), vocab_checksum(folder), run)
    batches = ablated(make_batches(val, cfg, epoch=0, train=False), kind)
    result = evaluate(model, batches, val, device="cpu")
    assert result.accuracy is not None
    return result.accuracy[result.primary]


BRANCHES = {
    # branch: (input it must use, settings that give it the budget it needs)
    "cfrf": ("boxes", ["AOA_layers=6", "num_hid=128", "epochs=30"]),
    "xvlm": ("boxes", ["epochs=30"]),
    "isubg": ("graphs", ["general_hidden_dim=128", "epochs=12"]),
}


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_a_trained_branch_uses_its_input(colours: Path, tmp_path: Path, branch: str) -> None:
    kind, sets = BRANCHES[branch]
    common = [f"data.root={colours}", f"model.branches=[{branch}]", "train.schedule=constant", "lr=2e-3"]
    cfg = resolve_config("demo", sets=[*common, *sets]).config
    result = train(cfg, tmp_path / "run", data_dir=colours, console=Console(quiet=True))
    assert result.status == "finished" and result.baseline is not None
    trained = _accuracy(colours, tmp_path / "run", None)
    shuffled = _accuracy(colours, tmp_path / "run", kind)
    assert trained >= result.baseline + ABOVE_PRIOR, (trained, result.baseline)
    assert shuffled <= trained - MARGIN, (trained, shuffled)
