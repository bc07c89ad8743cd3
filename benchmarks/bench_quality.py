"""Does each branch learn from what it is given? Train every branch alone and fused, then ablate its inputs.

    python benchmarks/bench_quality.py                       # the small demo, GQA and VQA, demo preset
    python benchmarks/bench_quality.py --data data/gqa --preset gqa --epochs 4 --models cfrf,fused
    python benchmarks/bench_quality.py --ban-repo ../refs/ban-vqa   # + the reference BAN on the same batches

For every processed folder (default: the embedded demo's GQA and VQA folders) and every model in `--models`
(`cfrf`, `isubg`, `xvlm`: that branch alone; `fused`: every branch of the preset together), the script trains
with `isubg.train.train` (the trainer users run: same preset, epochs, batch, learning rate and seed for all)
and scores the best checkpoint on the validation split with the official metric:

* `val`: the plain accuracy, and the accuracy per question kind (for the demo: the template that asked it; for
  other data: GQA's semantic type or VQA's answer type);
* the same after an ablation of the input, applied to each validation batch:
  `boxes`: box features and spatials shuffled across the batch (each question sees another image's boxes),
  `zero`: box features and spatials set to zero,
  `graphs`: scene graphs shuffled across the batch,
  `stats`: stat words (the image's label words) shuffled across the batch,
  `image`: all three shuffled together (the question alone).
  A model that uses an input loses accuracy when it is shuffled; one that learned question priors does not.

Two baselines come with every dataset: the majority answer, and `qonly`, the best a model can do from the
question alone (each question's most frequent training answer among questions of the same text).

`--ban-repo DIR` (a checkout of jnhwkim/ban-vqa kept outside this repository; nothing from it is copied)
adds the reference `BanModel` (`build_ban(num_hid, op='', gamma, 'vqa')`, its own counter always on) at the
cfrf branch's num_hid and gamma, trained on the same batches in the same order with the same Adamax learning
rate, schedule and gradient clipping, and scored with the same code. In-process changes it needs on torch 2.13
(none changes its math): `torch._six` is stubbed, and its classifier's `Dropout(inplace=True)` after a ReLU is
made out-of-place (current autograd rejects it).

Results: a table per dataset on stdout and `--out` (JSON; default benchmarks/results/bench_quality.json).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import re
import sys
import tempfile
import time
import types
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from rich.console import Console
from torch import nn

from isubg.ablation import ABLATIONS, ablated
from isubg.batch import Batch
from isubg.checkpoint import load_checkpoint, vocab_checksum
from isubg.config import RunConfig
from isubg.data.dataset import VQADataset
from isubg.data.loaders import make_batches, open_split
from isubg.evaluate import evaluate, load_trained
from isubg.models.common import BranchOutput
from isubg.models.fusion import FusedModel
from isubg.resolve import override_config, resolve_config
from isubg.train import ban_multiplier, majority_baseline, seed_everything, train

# Demo question templates (isubg.data.demo), first match wins; other data falls back to the record's types.
DEMO_KINDS: tuple[tuple[str, str], ...] = (
    ("logical", r"^(is there an? .* or an? |are there both )"),
    ("compare", r"^are the .* the same "),
    ("exist", r"^is there "),
    ("count", r"^how many "),
    ("color", r"^what color "),
    ("material", r"^what material "),
    ("relation", r"^what is (to the left of|to the right of|above|below) "),
    ("name", r"^what is the "),
)


# ------------------------------------------------------------------------------------------------- scoring


def question_kind(record: dict[str, Any], demo: bool) -> str:
    if demo:
        text = record["question"].lower()
        for kind, pattern in DEMO_KINDS:
            if re.search(pattern, text):
                return kind
    return record.get("detail") or record.get("qtype") or "other"


def score(model: nn.Module, val_set: VQADataset, cfg: RunConfig, kind: str | None, demo: bool) -> dict[str, Any]:
    """Accuracy of the primary output (fused, or the single branch) overall and per question kind."""
    loader = make_batches(val_set, cfg, epoch=0, train=False)
    result = evaluate(model, ablated(loader, kind), val_set, device="cpu")
    answers = dict(result.predictions)
    per_kind: dict[str, list[float]] = defaultdict(list)
    from isubg.metrics import gqa_accuracy, vqa_accuracy

    is_vqa = str(val_set.manifest["dataset"]).lower() == "vqa"
    for record in val_set.records:
        predicted = answers[str(record["question_id"])]
        value = vqa_accuracy(predicted, record["answers"]) if is_vqa else gqa_accuracy(predicted, record["answer"])
        per_kind[question_kind(record, demo)].append(value)
    assert result.accuracy is not None
    return {
        "accuracy": result.accuracy[result.primary],
        "branches": {k: v for k, v in result.accuracy.items() if k not in ("bound",)},
        "per_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
    }


def question_only_bound(train_set: VQADataset, val_set: VQADataset) -> float:
    """Accuracy of answering each validation question with its text's most frequent training answer."""
    by_text: dict[str, Counter[str]] = defaultdict(Counter)
    overall: Counter[str] = Counter()
    for r in train_set.records:
        by_text[r["question"].lower()][r["answer"]] += 1
        overall[r["answer"]] += 1
    fallback = overall.most_common(1)[0][0]
    from isubg.metrics import gqa_accuracy, vqa_accuracy

    is_vqa = str(val_set.manifest["dataset"]).lower() == "vqa"
    total = 0.0
    for r in val_set.records:
        seen = by_text.get(r["question"].lower())
        guess = seen.most_common(1)[0][0] if seen else fallback
        total += vqa_accuracy(guess, r["answers"]) if is_vqa else gqa_accuracy(guess, r["answer"])
    return total / len(val_set.records)


# ----------------------------------------------------------------------------------------- isubg models


def train_isubg(cfg: RunConfig, data_dir: Path, run_dir: Path) -> tuple[FusedModel, dict[str, Any]]:
    """Train with the real trainer; the best checkpoint's model and the run's summary."""
    started = time.perf_counter()
    result = train(cfg, run_dir, data_dir=data_dir, console=Console(quiet=True), preset="bench")
    if result.status not in ("finished", "early_stopped"):
        raise RuntimeError(f"training ended {result.status}: {result.message}")
    best = run_dir / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    val = open_split(cfg, data_dir, cfg.data.val_split, cfg.data.val_limit)
    model = load_trained(state, val.spec(), vocab_checksum(data_dir), best)
    info = {
        "train_s": round(time.perf_counter() - started, 1),
        "best_epoch": result.best_epoch,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return model, info


# ----------------------------------------------------------------------------------- reference BAN


class ReferenceBan(nn.Module):
    """ban-vqa's BanModel behind the Batch contract: ids shifted to its padding row, (B, A) logits out."""

    def __init__(self, repo: Path, num_words: int, feature_dim: int, num_answers: int, num_hid: int, gamma: int):
        super().__init__()
        if "torch._six" not in sys.modules:  # gone in torch 2.x; ban-vqa's utils imports string_classes from it
            six = types.ModuleType("torch._six")
            six.string_classes = (str, bytes)  # type: ignore[attr-defined]
            sys.modules["torch._six"] = six
        sys.path.insert(0, str(repo))
        base_model = importlib.import_module("base_model")
        dataset = SimpleNamespace(
            dictionary=SimpleNamespace(ntoken=num_words), v_dim=feature_dim, num_ans_candidates=num_answers
        )
        self.num_words = num_words
        self.ban = base_model.build_ban(dataset, num_hid=num_hid, op="", gamma=gamma, task="vqa")
        for module in self.ban.modules():  # Dropout(inplace=True) after ReLU breaks backward on current autograd
            if isinstance(module, nn.Dropout):
                module.inplace = False

    def forward(self, batch: Batch) -> BranchOutput:
        # ban-vqa pads questions with id ntoken (its last embedding row); isubg pads with 0.
        tokens = torch.where(batch.q_mask, batch.q_tokens, torch.full_like(batch.q_tokens, self.num_words))
        logits, _ = self.ban(batch.features, batch.spatials, tokens, None)
        return BranchOutput(logits=logits)


def train_reference(
    cfg: RunConfig, data_dir: Path, repo: Path, say: Callable[[str], None]
) -> tuple[FusedModel, dict[str, Any]]:
    """The reference BAN trained on the batches isubg trains on, with its optimizer, schedule and clip."""
    started = time.perf_counter()
    seed_everything(cfg.train.seed)
    train_set = open_split(cfg, data_dir, cfg.data.train_split, cfg.data.train_limit)
    val_set = open_split(cfg, data_dir, cfg.data.val_split, cfg.data.val_limit)
    spec = train_set.spec()
    c = cfg.model.cfrf
    ref = ReferenceBan(repo, spec.num_words, spec.feature_dim, spec.num_answers, c.num_hid, c.gamma)
    model = FusedModel({"ban_ref": ref}, spec.num_answers, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adamax(params, lr=cfg.train.lr)
    group = cfg.train.update_freq * cfg.optim.gradient_accumulation_steps
    steps = math.ceil(math.ceil(len(train_set) / cfg.train.batch_size) / group)
    rule = (lambda s: ban_multiplier(s, steps, cfg.train.epochs)) if cfg.train.schedule == "ban" else (lambda s: 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, rule)
    best, best_state, best_epoch = -1.0, None, 0
    for epoch in range(cfg.train.epochs):
        model.train()
        loader = list(make_batches(train_set, cfg, epoch=epoch, train=True))
        for i, batch in enumerate(loader):
            in_group = min(group, len(loader) - (i - i % group))
            loss, _ = model.loss(model(batch), batch.targets)
            (loss / in_group).backward()
            if (i + 1) % group == 0 or i + 1 == len(loader):
                nn.utils.clip_grad_norm_(params, cfg.optim.clip_norm)
                opt.step()
                schedule.step()
                opt.zero_grad(set_to_none=True)
        accuracy = score(model, val_set, cfg, None, demo=False)["accuracy"]
        say(f"  ban_ref epoch {epoch + 1}: val {accuracy:.1%}")
        if accuracy > best:
            best, best_epoch = accuracy, epoch + 1
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    info = {"train_s": round(time.perf_counter() - started, 1), "best_epoch": best_epoch, "params": len(params)}
    info["params"] = sum(p.numel() for p in params)
    return model.eval(), info


# -------------------------------------------------------------------------------------------------- driver


def model_config(base: RunConfig, name: str) -> RunConfig:
    branches = list(base.model.branches) if name == "fused" else [name]
    return override_config(base, {"model.branches": branches}, "bench_quality")


def bench_dataset(data_dir: Path, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    dataset = json.loads((data_dir / "manifest.json").read_text())["dataset"].upper()
    resolved = resolve_config(args.preset, sets=[f"data.dataset={dataset}", f"data.root={data_dir}", *args.set])
    base = resolved.config
    # The demo's question templates are known; a folder generated by isubg's demo has demo.json above it.
    demo_root = next((p for p in data_dir.resolve().parents if (p / "demo.json").is_file()), None)
    demo = demo_root is not None
    train_set = open_split(base, data_dir, base.data.train_split, base.data.train_limit)
    val_set = open_split(base, data_dir, base.data.val_split, base.data.val_limit)
    out: dict[str, Any] = {
        # No machine's absolute path in the results: the demo folder by its place in the demo, else its name.
        "data": f"demo:{data_dir.resolve().relative_to(demo_root)}" if demo_root else data_dir.name,
        "dataset": dataset,
        "train_questions": len(train_set),
        "val_questions": len(val_set),
        "majority": majority_baseline(train_set, val_set),
        "question_only": question_only_bound(train_set, val_set),
        "models": {},
    }
    names = list(args.models) + (["ban_ref"] if args.ban_repo else [])
    for name in names:
        say(f"[{dataset}] training {name}")
        with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
            if name == "ban_ref":
                cfg = model_config(base, "cfrf")
                model, info = train_reference(cfg, data_dir, args.ban_repo, say)
            else:
                cfg = model_config(base, name)
                model, info = train_isubg(cfg, data_dir, Path(tmp) / "run")
        row = {**info, "val": score(model, val_set, cfg, None, demo)}
        for kind in args.ablations:
            row[kind] = score(model, val_set, cfg, kind, demo)
        say(f"[{dataset}] {name}: " + ", ".join(f"{k} {row[k]['accuracy']:.1%}" for k in ("val", *args.ablations)))
        out["models"][name] = row
    return out


def print_tables(results: list[dict[str, Any]]) -> None:
    for res in results:
        print(f"\n{res['dataset']} ({res['data']}): {res['train_questions']} train / {res['val_questions']} val; "
              f"majority {res['majority']:.1%}, question-only {res['question_only']:.1%}")  # fmt: skip
        kinds = sorted({k for m in res["models"].values() for k in m["val"]["per_kind"]})
        done = [a for a in ABLATIONS if all(a in m for m in res["models"].values())]
        head = ["model", "val", *(f"-{a}" for a in done), *kinds, *(f"{k}|boxes" for k in kinds)]
        print(" | ".join(head))
        for name, m in res["models"].items():
            cells = [name, f"{m['val']['accuracy']:.1%}", *(f"{m[a]['accuracy']:.1%}" for a in done)]
            cells += [f"{m['val']['per_kind'].get(k, math.nan):.0%}" for k in kinds]
            if "boxes" in m:
                cells += [f"{m['boxes']['per_kind'].get(k, math.nan):.0%}" for k in kinds]
            print(" | ".join(cells))
        single = {n: m["val"]["accuracy"] for n, m in res["models"].items() if n in ("cfrf", "isubg", "xvlm")}
        if "fused" in res["models"] and single:
            best = max(single, key=single.get)
            fused = res["models"]["fused"]["val"]
            print(f"fused {fused['accuracy']:.1%} (ens {fused['branches'].get('ens', math.nan):.1%}) "
                  f"vs best single branch {best} {single[best]:.1%}")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, action="append", help="processed folder (repeatable); default: the demo's")
    p.add_argument("--demo-size", default="small", choices=("tiny", "small", "medium"))
    p.add_argument("--preset", default="demo")
    p.add_argument("--models", default="cfrf,isubg,xvlm,fused", type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--ablations", default=",".join(ABLATIONS), type=lambda s: [a for a in s.split(",") if a])
    p.add_argument("--ban-repo", type=Path, help="jnhwkim/ban-vqa checkout: adds the reference BAN")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_quality.json")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    say = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731
    folders = args.data
    if not folders:
        from isubg.data.embedded import ensure_demo

        build = ensure_demo(args.demo_size)
        folders = [build.processed("gqa"), build.processed("vqa")]
    started = time.perf_counter()
    results = [bench_dataset(Path(f), args, say) for f in folders]
    print_tables(results)
    meta = {
        "preset": args.preset,
        "sets": args.set,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
