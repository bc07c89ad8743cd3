"""Output parity of imported checkpoints: isubg computes what X-VLM and ban-vqa compute from the same weights.

    python benchmarks/bench_parity.py --ban-repo ../refs/ban-vqa --xvlm-repo ../refs/X-VLM \\
        --xvlm-python ../xvlm-venv/bin/python [--batch 4] [--threads 1] [--out benchmarks/results/bench_parity.json]

For each reference: build it with random weights from a fixed seed, save them in the reference's own file format,
import that file with `isubg.importers` (as `isubg import-checkpoint` does), feed both models the same batch in
eval mode, fp32, and print the largest absolute difference (goal: below 1e-4).

* ban: ban-vqa `base_model.build_ban(dataset, num_hid=1280, op='', gamma=8, task='vqa')` (its main.py defaults;
  ntoken 20000, 2048-d boxes, 3129 answers), saved as model_epoch*.pth ({'epoch', 'model_state',
  'optimizer_state'}). Its counter maps start at ones; they are redrawn at random (positive, the fixed leading 0
  kept) so the parity covers the counter's mapping. The batch: 4 questions of 14 tokens and 36 boxes, no padding
  (ban-vqa reads padding; isubg masks it: a deliberate deviation, so parity holds on unpadded batches). Compared:
  the answer logits, and the predicted answers after a round trip through the written isubg checkpoint (what `isubg
  eval` loads). isubg settings: those `isubg import-checkpoint ban` sets (its parity switches: AOA_layers=0,
  omega_q=omega_v=0, box_input=features, use_counter=true, activation=relu, data.tfidf=false); isubg's question ids
  are ban-vqa's plus one (isubg pads with row 0).
* xvlm: X-VLM's VQA model (Swin-B 384 + 6 text + 6 fusion BERT-base layers + the 6-layer answer decoder), built by
  benchmarks/xvlm_reference_worker.py under --xvlm-python (X-VLM's code needs transformers 4.x; isubg needs 5).
  X-VLM ranks answers with its decoder, isubg with a classification head, so the comparison is what both compute
  up to the decoder: the fused encoder's last hidden states (all of them, and [CLS]). Image mode: Swin-B over 384 px
  images, then the text and fusion layers (also the vision tokens alone); region mode: both fed the same 37
  visual tokens (1024 wide, the last row padded), no vision encoder. Parity switch: model.xvlm.cross_width=1024
  (keys/values read the unprojected vision tokens), which the import sets. The same again with X-VLM's
  CLIP-ViT-B/16 at 224 px (configs/config_clipvitB.json; visual tokens 768 wide), parity switches cross_width=768
  and model.xvlm.vit_layout=clip.
* X-VLM import cost: the full-size X-VLM VQA checkpoint the worker wrote (random weights, 1.1 GiB) imported by
  `isubg import-checkpoint xvlm` in a child process: the command's own time, the wall time with interpreter
  start-up, the child's peak RSS (its ru_maxrss), and the mapped / reshaped / unused / new counts; the ban counts
  come from the ban file above.

Setting up --xvlm-python (one-off, outside the repository; no CUDA torch download, no timm or torchvision):

    python3 -m venv ../xvlm-venv
    echo "$(python -c 'import site; print(site.getsitepackages()[0])')" \\
        > ../xvlm-venv/lib/python3.11/site-packages/zz_isubg_env.pth   # run inside isubg's venv: torch 2.13 CPU
    ../xvlm-venv/bin/pip install "transformers==4.30.2"

(transformers 4.30.2 installs into the new venv ahead of the shared packages; torch, numpy come from isubg's venv.)
The X-VLM checkout must hold models/ and configs/ (git clone github.com/zengyan-97/X-VLM). The ban-vqa import needs
the same in-process stubs as benchmarks/bench_reference.py (torch._six; PIL when absent), nothing else.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from isubg.batch import DataSpec
from isubg.checkpoint import load_checkpoint, save_checkpoint
from isubg.data.synthetic import random_batch
from isubg.evaluate import load_trained
from isubg.importers.ban import ban_plan
from isubg.importers.convert import import_checkpoint
from isubg.importers.core import apply_plan, read_foreign
from isubg.models import build_model
from isubg.models.xvlm import XvlmBranch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reference import install_ban_stubs

GOAL = 1e-4
BAN = {"num_hid": 1280, "gamma": 8, "ntoken": 20000, "v_dim": 2048, "answers": 3129, "boxes": 36, "tokens": 14}
BERT_VOCAB = 30522


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ----------------------------------------------------------------------------------------------------- ban


def ban_reference(repo: Path) -> nn.Module:
    """ban-vqa's VQA BAN at its main.py defaults, random weights, counter maps redrawn (module docstring)."""
    install_ban_stubs()
    sys.path.insert(0, str(repo))
    base_model = importlib.import_module("base_model")
    dataset = SimpleNamespace(
        dictionary=SimpleNamespace(ntoken=BAN["ntoken"]), v_dim=BAN["v_dim"], num_ans_candidates=BAN["answers"]
    )
    torch.manual_seed(0)
    model = base_model.build_ban(dataset, num_hid=BAN["num_hid"], op="", gamma=BAN["gamma"], task="vqa")
    with torch.no_grad():
        for piece in model.counter.f:
            piece.weight[1:] = torch.rand(piece.weight.shape[0] - 1) + 0.2
    return model.eval()


def _isubg_float64(source: Path, reference64: nn.Module, work: Path) -> nn.Module:
    """isubg's import of the float64 copy of the reference, built and filled in float64 (the mapping alone)."""
    file = work / "model_epoch12_float64.pth"
    torch.save({"model_state": reference64.state_dict()}, file)
    state, extras = read_foreign(file, "ban")
    plan = ban_plan(state)
    imported = import_checkpoint("ban", source)
    model = build_model(imported.config, DataSpec(**imported.state["spec"])).double()
    report = apply_plan(model, state, plan, file, extras)
    assert not report.problems(), report.problems()
    return model.eval()


def ban_parity(repo: Path, batch_size: int, work: Path) -> dict[str, Any]:
    """Logit differences and prediction agreement of ban-vqa and its isubg import on one unpadded batch.

    fp32: isubg (read back from the written checkpoint, as `isubg eval` does) vs the reference. The reference's own
    fp32 error (fp32 vs its float64 copy) is the floor any fp32 re-implementation meets; isubg's fp32 error is
    measured against the same float64 reference. float64: the float64
    reference vs isubg built in float64 from the float64 weights (isubg's counter still runs in float32).
    """
    reference = ban_reference(repo)
    source = work / "model_epoch12.pth"
    optimizer = torch.optim.Adamax(reference.parameters())
    torch.save({"epoch": 12, "model_state": reference.state_dict(), "optimizer_state": optimizer.state_dict()}, source)
    start = time.perf_counter()
    imported = import_checkpoint("ban", source)
    seconds = time.perf_counter() - start
    written = work / "ban_isubg.pt"
    save_checkpoint(written, imported.state)
    state = load_checkpoint(written)
    spec = DataSpec(**state["spec"])
    # `isubg eval`'s loader; imported without --data, the file has no vocabulary checksum to compare.
    model = load_trained(state, spec, state["vocab_sha256"], written)
    batch = random_batch(spec, batch_size, boxes=BAN["boxes"], question_len=BAN["tokens"], seed=3)
    batch.features = batch.features + 0.01  # ban-vqa takes all-zero boxes for padding; none here
    reference64 = ban_reference(repo).double()  # the same seed: the same weights
    model64 = _isubg_float64(source, reference64, work)
    batch64 = copy.copy(batch)
    batch64.features, batch64.spatials = batch.features.double(), batch.spatials.double()
    with torch.no_grad():
        ref_logits, _ = reference(batch.features, batch.spatials, batch.q_tokens - 1, None)
        ours = model(batch).branches["cfrf"].logits
        ref64, _ = reference64(batch64.features, batch64.spatials, batch.q_tokens - 1, None)
        ours64 = model64(batch64).branches["cfrf"].logits
    return {
        "model": "ban",
        "mode": "answer logits, fp32",
        "max_abs_diff": max_abs(ref_logits, ours),
        "reference_fp32_error": max_abs(ref_logits, ref64),
        "isubg_fp32_error": max_abs(ours, ref64),
        "float64_max_abs_diff": max_abs(ref64, ours64),
        "logit_scale": float(ref_logits.abs().max()),
        "same_predictions": int((ref_logits.argmax(1) == ours.argmax(1)).sum()),
        "questions": batch_size,
        "import_s": seconds,
        "counts": imported.report.to_json()["counts"],
        "source": imported.report.source_summary(),
        "switches": imported.report.switches,
    }


# ---------------------------------------------------------------------------------------------------- xvlm


VISION_LABELS = {"swin": "Swin-B 384", "clip": "CLIP-ViT-B/16 224"}


def run_worker(python: Path, repo: Path, out: Path, batch_size: int, vision: str) -> None:
    """benchmarks/xvlm_reference_worker.py under the transformers-4 interpreter."""
    worker = Path(__file__).resolve().parent / "xvlm_reference_worker.py"
    command = [str(python), str(worker), "--repo", str(repo), "--out", str(out), "--batch", str(batch_size)]
    command += ["--vision", vision]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def bert_vocab_folder(folder: Path) -> Path:
    """A vocab.txt with BERT-base-uncased's size and special-token ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [f"[unused{i}]" for i in range(BERT_VOCAB)]
    tokens[0], tokens[100], tokens[101], tokens[102], tokens[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return folder


def xvlm_sets(work: Path) -> list[str]:
    return [f"data.image_root={work}", f"model.xvlm.text_encoder={bert_vocab_folder(work / 'bert')}"]


def xvlm_parity(source: Path, reference: Path, work: Path, vision: str) -> list[dict[str, Any]]:
    """Image- and region-mode differences of the fused encoder states (module docstring)."""
    label = VISION_LABELS[vision]
    imported = import_checkpoint("xvlm", source, sets=xvlm_sets(work))
    model = build_model(imported.config, DataSpec(**imported.state["spec"]))
    model.load_state_dict(imported.state["model"])
    branch = model.branches["xvlm"]
    assert isinstance(branch, XvlmBranch)
    branch.eval()
    ref = torch.load(reference, weights_only=True)
    ids, mask = ref["ids"], ref["mask"].bool()
    with torch.no_grad():
        tokens, token_mask = branch.vision(ref["image"])
        image_states = branch.fuse(ids, mask, tokens, token_mask)
        region_states = branch.fuse(ids, mask, ref["regions"], ref["region_mask"].bool())
    real = mask[..., None]  # padded positions hold values nobody reads, in both models
    rows: list[dict[str, Any]] = []
    for mode, ours, theirs in (
        (f"image ({label})", image_states, ref["image_states"]),
        (f"region ({ref['regions'].shape[-1]}-wide tokens)", region_states, ref["region_states"]),
    ):
        rows.append(
            {
                "model": "xvlm",
                "mode": mode,
                "max_abs_diff": max_abs(ours * real, theirs * real),
                "cls_max_abs_diff": max_abs(ours[:, 0], theirs[:, 0]),
                "logit_scale": float(theirs.abs().max()),
            }
        )
    rows.append(
        {
            "model": "xvlm",
            "mode": f"vision tokens ({label})",
            "max_abs_diff": max_abs(tokens, ref["image_embeds"]),
            "logit_scale": float(ref["image_embeds"].abs().max()),
            "import": label,
            "counts": imported.report.to_json()["counts"],
            "source": imported.report.source_summary(),
            "switches": imported.report.switches,
        }
    )
    return rows


# Runs the CLI in a child and prints that child's own peak RSS (KiB) to stderr last, whatever the exit path.
_MEASURED_CLI = (
    "import resource, sys\n"
    "from isubg.cli import main\n"
    "sys.argv = ['isubg', *sys.argv[1:]]\n"
    "try:\n    main()\n"
    "finally:\n    print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def xvlm_import_cost(source: Path, work: Path) -> dict[str, Any]:
    """`isubg import-checkpoint xvlm` on the full-size file in a child process: time, its peak RSS, the counts."""
    sets = [arg for s in xvlm_sets(work) for arg in ("--set", s)]
    out = work / "xvlm_isubg.pt"
    command = [sys.executable, "-c", _MEASURED_CLI, "import-checkpoint", "xvlm", str(source), "-o", str(out), *sets]
    start = time.perf_counter()
    done = subprocess.run([*command, "--json"], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    report = json.loads(done.stdout)
    peak_kib = int(done.stderr.strip().splitlines()[-1].split()[-1])
    return {
        "file_bytes": source.stat().st_size,
        "wall_s": wall,
        "import_s": report["seconds"],
        "peak_rss_mib": peak_kib / 1024,
        "counts": report["counts"],
        "source": report["source"],
        "problems": report["problems"],
        "details": report["details"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ban-repo", type=Path)
    parser.add_argument("--xvlm-repo", type=Path)
    parser.add_argument("--xvlm-python", type=Path, help="Interpreter with transformers 4.x (see above).")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_parity.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    cost: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="isubg-parity-") as tmp:
        work = Path(tmp)
        # The import cost first: a child's ru_maxrss starts at its parent's RSS at fork (Linux), so the parent
        # must still be small when the child is measured.
        visions = ("swin", "clip") if args.xvlm_repo is not None and args.xvlm_python is not None else ()
        for vision in visions:
            run_worker(args.xvlm_python, args.xvlm_repo.resolve(), work / vision, min(args.batch, 2), vision)
        if visions:
            cost = xvlm_import_cost(work / "swin" / "xvlm_vqa.pth", work)
        if args.ban_repo is not None:
            rows.append(ban_parity(args.ban_repo.resolve(), args.batch, work))
        else:
            print("ban: skipped (no --ban-repo)")
        for vision in visions:
            rows += xvlm_parity(work / vision / "xvlm_vqa.pth", work / vision / "reference.pt", work, vision)
        if not visions:
            print("xvlm: skipped (needs --xvlm-repo and --xvlm-python)")
    print(f"{'model':6} {'mode':36} {'max |diff|':>12} {'scale':>10}  goal {GOAL:g}")
    for row in rows:
        flag = "ok" if row["max_abs_diff"] < GOAL else "ABOVE GOAL"
        print(f"{row['model']:6} {row['mode']:36} {row['max_abs_diff']:12.3e} {row['logit_scale']:10.3f}  {flag}")
    for row in rows:
        if "float64_max_abs_diff" in row:
            print(
                f"ban: fp32 error against the float64 reference: ban-vqa's own {row['reference_fp32_error']:.3e}, "
                f"isubg's {row['isubg_fp32_error']:.3e}; "
                f"float64 parity {row['float64_max_abs_diff']:.3e} (isubg's counter computes in float32); "
                f"same predicted answer {row['same_predictions']}/{row['questions']}"
            )
    counted = [(f"{r['model']} {r.get('import', '')}".strip(), r["counts"]) for r in rows if "counts" in r]
    for kind, counts in counted:
        print(f"{kind} import: " + ", ".join(f"{status} {c['tensors']}" for status, c in counts.items()))
    if cost:
        print(
            f"X-VLM import: {cost['file_bytes'] / 2**30:.2f} GiB file, {cost['import_s']:.1f} s in the command "
            f"({cost['wall_s']:.1f} s with start-up), peak RSS {cost['peak_rss_mib']:.0f} MiB"
        )
    result = {
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
        "goal": GOAL,
        "rows": rows,
        "xvlm_import": cost,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
