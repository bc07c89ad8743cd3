"""Side-by-side training throughput of isubg's branches and the reference implementations they re-build.

    python benchmarks/bench_reference.py --ban-repo ../refs/ban-vqa --isubgvqa-repo ../refs/ISubGVQA
                                         [--batch 32] [--warmup 3] [--steps 7] [--threads 2] [--repeats 1]
                                         [--retries 3] [--max-others 0.3] [--pairs ban,isubgvqa]
                                         [--out benchmarks/results/bench_reference.json]

Two pairs, each measured in one run on identical random inputs (isubg.data.synthetic.random_batch: 50 boxes of
2048-d features with 6-d spatials, 12-token questions, 30 stat words, scene graphs of 30 nodes and 170 edges):

* ban: the reference BAN (jnhwkim/ban-vqa `base_model.build_ban(dataset, num_hid=1024, op='', gamma=2,
  task='vqa')`, counter on, ntoken 20000, 3129 answers; its train.py step: instance BCE, backward,
  clip_grad_norm_(0.25), Adamax 7e-4) against isubg's cfrf branch set up as the BAN core (AOA_layers=0,
  omega_q=omega_v=0, use_counter, no tf-idf, gamma 2, num_hid 1024).
* isubgvqa: the reference ISubGVQA model (DigitalPhonetics/Intrinsic-Subgraph-Generation-for-VQA, hidden 300,
  4 MGAT layers with run_training.sh's masks 1/1/1/0.1, I-MLE top-k with k=2; train_epoch.py's step:
  cross-entropy over its hard-coded 1842 answers, backward, Adam 5e-5) against isubg's isubg branch at
  general_hidden_dim 300, mgat_layers 4, sampler imle, sample_k 2. Both sides get 1842 answers here.

The isubg side is timed as benchmarks/bench_models.py does: the trainer's step (isubg.step.train_step), fp32.
Throughput is batch / median step time over `--steps` timed steps after `--warmup` untimed ones, with
torch.set_num_threads(`--threads`). Every model runs in its own subprocess, so `ru_maxrss` is its own peak RSS.

The references are imported from the checkouts given on the command line; nothing in a checkout is edited.
They need these in-process changes on torch 2.13 CPU (none changes their math):
BAN: stub `torch._six` (string_classes) and, when pillow is absent, `PIL`; the classifier's
Dropout(inplace=True) after ReLU is made out-of-place (autograd rejects it). ISubGVQA: a `torchtext` stub
(vocab() with torchtext 0.18's rules, str.split tokenizer, GloVe never built), a pure-torch `torch_scatter`
shim and a `torch_sparse` stub, random-init CLIP text embeddings (CLIPTextConfig defaults = ViT-B/32 text)
instead of the hub download, a dummy CLIP tokenizer, a scene-graph vocabulary stand-in (the repo's
meta_info lists, random vectors), the I-MLE samplers built on "cpu", `Tensor.cuda` as the identity, and
`MaskingGATv2Conv.propagate_type` declaring its `edge_mask` argument (PyG >= 2.5 parses the comment).
A pair whose checkout is not given is skipped with a message.

The host is shared: during each timed loop the CPU time other processes used is read from /proc/stat
(host busy time minus this process's CPU time). Above `--max-others` cores the timed loop is repeated,
up to `--retries` more times, after waiting for a quiet host; every attempt is recorded and the row
carries a `clean` flag. A 1024^3 sgemm check before each attempt records the speed the host gave.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch_geometric
from torch import nn
from torch_geometric.data import Batch as GraphBatch
from torch_geometric.data import Data

from isubg.batch import Batch, DataSpec
from isubg.data.synthetic import random_batch
from isubg.device import Precision
from isubg.models import build_model
from isubg.models.common import parameter_count
from isubg.resolve import resolve_config
from isubg.step import make_stepper, train_step

Step = Callable[[int], None]

BAN_ANSWERS = 3129  # VQA v2 answer vocabulary (ban-vqa)
ISUBGVQA_ANSWERS = 1842  # hard-coded in the reference ISubGVQA classifier
NUM_WORDS = 20000  # question dictionary (ban-vqa ntoken)
GRAPH_TOKENS = 2578  # the reference's scene-graph vocabulary size (meta_info lists + specials)
SIZES = {"boxes": 50, "question_len": 12, "stat_words": 30, "nodes": 30, "edges": 170}
CLIP_BOS, CLIP_EOS = 49406, 49407

ISUBG_SETS = {
    "ban": [
        "model.branches=[cfrf]",
        "AOA_layers=0",
        "omega_q=0",
        "omega_v=0",
        "use_counter=true",
        "tfidf=false",
        "gamma=2",
        "num_hid=1024",
    ],
    "isubgvqa": [
        "general_hidden_dim=300",
        "mgat_layers=4",
        "sampler_type=imle",
        "sample_k=2",
        "model.branches=[isubg]",
    ],
}
PAIR_WORKERS = {"ban": ("cfrf", "ban_ref"), "isubgvqa": ("isubg", "isubgvqa_ref")}
PAIR_LABELS = {"ban": "cfrf (BAN core) vs ban-vqa BAN", "isubgvqa": "isubg vs ISubGVQA"}

DIFFERENCES = {
    "ban": [
        "isubg runs its entity fusion (question x entity words) and stat-word fusion (boxes x 30 stat words) "
        "even at omega_q = omega_v = 0: two one-glimpse bilinear attentions + poolings + projections whose "
        "update is multiplied by 0 (2 x 3.77 M = 7.5 M extra parameters, their FLOPs and backward); BAN has neither.",
        "isubg projects the boxes once, Linear(2048+6 -> 1024) + ReLU, and every BAN net reads that 1024-d "
        "stream; the reference's attention v_net (2048 -> 3072) and each glimpse's pooling v_net (2048 -> 1024) "
        "read the raw 2048-d features (and never see the 6-d spatials).",
        "The reference wraps every Linear (and the attention's h_mat) in weight_norm (weight rebuilt each "
        "forward, plus its backward); isubg uses plain Linear layers.",
        "Classifier: the reference uses ReLU and dropout 0.5; the given cfrf config keeps isubg's default "
        "activation swish (SiLU) and dropout 0.45.",
        "Counter: isubg masks padding boxes and padded tokens, computes it in float32 and allocates 8 "
        "piecewise-linear maps of 16 slopes; the reference allocates 16 maps (uses 8) of 16 slopes plus a "
        "fixed 0, and does not mask. Same 10 top boxes, same 11 count bins, per glimpse.",
        "Masking: isubg uses masked softmaxes and masks the final token sum; the reference masks all-zero "
        "boxes only (none here) and sums all 12 tokens. All inputs here are unpadded, so the values agree.",
        "Word table: reference 20001 x 300 (padding row at the end), isubg 20000 x 300 (padding row 0).",
        "isubg runs inside its FusedModel with one branch: an extra (1, 3129) adapted_w, a sigmoid/softmax "
        "fusion in forward; the loss is the branch BCE only (sum over answers / batch, as BAN's "
        "instance_bce_with_logits).",
        "Optimizer step: reference clip_grad_norm_(0.25) + Adamax(lr 7e-4) as its train.py; isubg Adamax "
        "(lr from the preset) without clipping, as bench_models.py.",
    ],
    "isubgvqa": [
        "Different architectures at the same settings (hidden 300, 4 graph layers, I-MLE top-2): the "
        "reference encodes the question with CLIP ViT-B/32 token+position embeddings (49408 x 512, 25.3 M "
        "params), a 4-layer TransformerEncoder (d 512, 8 heads, ffn 2048) and a 3-layer TransformerDecoder "
        "producing the 4 instructions; isubg uses a 20000 x 300 word table, a bidirectional GRU (300) over "
        "the packed question and a GRUCell instruction decoder.",
        "Scene-graph encoder: the reference sums the 4 node-token embeddings, encodes boxes with "
        "BatchNorm/MLP (4 -> 16 -> 32), runs a MetaLayer (edge MLP over [src, dst, edge] and a two-MLP node "
        "model with scatter_mean) and a GraphNorm in float64; isubg embeds name + mean attributes + a box "
        "MLP with a LayerNorm, and relation embeddings + a reverse offset (no message passing).",
        "Graph layers: the reference MaskingGATv2Conv has biased lin_l/lin_r (GATv2 4 heads x 300), no added "
        "self-loops, then per layer an MLP 1200 -> 600 -> 300, a per-graph scatter attention with the "
        "instruction and a GraphNorm + residual; isubg uses PyG GATv2Conv (4 heads x 300, edge features, "
        "adds one self-loop per node, so 200 messages per graph instead of 170), Linear 1200 -> 300 + GELU, "
        "residual + LayerNorm, and a LayerNorm-ed instruction gate.",
        "Sampling: the reference (mgat_masks 1/1/1/0.1) samples an I-MLE top-2 mask inside layer 4 from its "
        "gated input (Gumbel(0, 0.3) noise, dense per-graph padding via to_dense_batch) and masks layer 4's "
        "edges; isubg's preset has use_mgat=false, so it samples the top-2 once from the final node states "
        "(Sum-of-Gamma noise, exact per-graph sort) and applies it only at pooling.",
        "Head: the reference pools with question-conditioned attention, concatenates [g, u, g*u] -> "
        "Linear(900, 512) + GELU + dropout -> Linear(512, 1842) and also allocates an unused node_logits "
        "MLP (300 -> 512 -> 2577); isubg pools with a key/query/value attention and uses "
        "Classifier(600, 600, 1842, gelu, 0.1).",
        "Loss / optimizer: the reference uses cross-entropy on one label per question and Adam(lr 5e-5) "
        "(its gradient clipping only acts on the first step, a warm-up here; GradScaler is disabled on CPU "
        "and left out); isubg uses BCE on the soft scores (the label is their argmax for the reference) and "
        "Adamax, inside a one-branch FusedModel (extra (1, 1842) adapted_w).",
        "Questions: the same 12 token ids on both sides, except that the reference gets CLIP's BOS/EOS ids "
        "in the first and last position; the reference adds its float attention mask (all ones) to the "
        "attention logits, a constant, as it does in training. The reference negates the reverse-edge "
        "embeddings of the first graph only (added_sym_edge is not offset when batched) — same cost.",
    ],
}


# ------------------------------------------------------------------------------------------ CPU accounting


def _host_busy_seconds() -> float:
    """CPU seconds all processes spent busy since boot (/proc/stat, first line)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Measures wall time, this process's CPU time and other processes' CPU use (in cores) over a block."""

    def __enter__(self) -> CpuMeter:
        self.start = (time.perf_counter(), time.process_time(), _host_busy_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, own, host = (time.perf_counter(), time.process_time(), _host_busy_seconds())
        self.wall = wall - self.start[0]
        self.own_cores = (own - self.start[1]) / self.wall
        self.others_cores = max(0.0, (host - self.start[2]) - (own - self.start[1])) / self.wall


def wait_quiet(max_others: float, timeout: float = 30.0) -> float:
    """Wait (1 s windows, at most `timeout` s) until other processes use at most `max_others` cores."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        with CpuMeter() as meter:
            time.sleep(1.0)
        if meter.others_cores <= max_others:
            break
    return time.perf_counter() - start


def gemm_gflops(n: int = 1024, reps: int = 5) -> float:
    """float32 matmul speed right now, a check of what the host gives this process."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def time_training(step: Step, batch_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then time `args.steps` steps; repeat the timed loop while other processes were busy."""
    for i in range(args.warmup):
        step(i)
    attempts: list[dict[str, Any]] = []
    for attempt in range(1 + args.retries):
        waited = wait_quiet(args.max_others)
        gflops = gemm_gflops()
        times = []
        with CpuMeter() as meter:
            for i in range(args.steps):
                start = time.perf_counter()
                step(args.warmup + attempt * args.steps + i)
                times.append(time.perf_counter() - start)
        attempts.append(
            {
                "samples_per_s": batch_size / statistics.median(times),
                "step_s": {"median": statistics.median(times), "min": min(times), "max": max(times)},
                "others_cores": round(meter.others_cores, 3),
                "own_cores": round(meter.own_cores, 3),
                "clean": meter.others_cores <= args.max_others,
                "waited_s": round(waited, 1),
                "gemm1024_gflops_before": round(gflops, 1),
            }
        )
        if attempts[-1]["clean"]:
            break
    best = next((a for a in attempts if a["clean"]), min(attempts, key=lambda a: a["others_cores"]))
    return {**best, "attempts": attempts}


# ------------------------------------------------------------------------------------------------- inputs


def data_spec(pair: str) -> DataSpec:
    """Sizes shared by both sides of a pair (the ISubGVQA reference hard-codes 1842 answers)."""
    answers = BAN_ANSWERS if pair == "ban" else ISUBGVQA_ANSWERS
    return DataSpec(num_words=NUM_WORDS, num_answers=answers, num_graph_tokens=GRAPH_TOKENS, feature_dim=2048)


def make_batches(pair: str, batch_size: int) -> list[Batch]:
    """Two random batches (seeds 0 and 1) at SIZES; steps alternate between them."""
    return [random_batch(data_spec(pair), batch_size, seed=s, **SIZES) for s in range(2)]


# -------------------------------------------------------------------------------------------- isubg side


def setup_isubg(pair: str, args: argparse.Namespace) -> tuple[Step, dict[str, Any]]:
    """isubg's branch for `pair` in a one-branch FusedModel, stepped by the trainer's step as bench_models.py does."""
    cfg = resolve_config("default", sets=ISUBG_SETS[pair]).config
    batches = make_batches(pair, args.batch)
    torch.manual_seed(0)
    model = build_model(cfg, data_spec(pair))
    model.train()
    stepper = make_stepper(cfg, model, torch.device("cpu"), Precision(None, False, "fp32"))

    def step(i: int) -> None:
        train_step(stepper, [batches[i % 2]])

    branch = cfg.model.branches[0]
    info = {
        "params": parameter_count(model),
        "branch_params": parameter_count(model.branches[branch]),
        "settings": ISUBG_SETS[pair],
    }
    return step, info


# ------------------------------------------------------------------------------------------ BAN reference


def _stub_module(name: str, **attrs: Any) -> types.ModuleType:
    """A module object in sys.modules holding `attrs` (replaces nothing that already imports)."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def install_ban_stubs() -> None:
    """torch._six is gone in torch 2.x; PIL is only used by utils.pil_loader (not called here)."""
    if "torch._six" not in sys.modules:
        _stub_module("torch._six", string_classes=(str, bytes))
    if importlib.util.find_spec("PIL") is None:
        _stub_module("PIL", Image=types.ModuleType("PIL.Image"))


def setup_ban_reference(repo: Path, args: argparse.Namespace) -> tuple[Step, dict[str, Any]]:
    """ban-vqa's BAN (1024, gamma 2, counter) stepped as its train.py: BCE, backward, clip 0.25, Adamax."""
    batches = make_batches("ban", args.batch)
    install_ban_stubs()
    sys.path.insert(0, str(repo))
    base_model = importlib.import_module("base_model")
    train = importlib.import_module("train")
    dataset = SimpleNamespace(dictionary=SimpleNamespace(ntoken=NUM_WORDS), v_dim=2048, num_ans_candidates=BAN_ANSWERS)
    torch.manual_seed(0)
    model = base_model.build_ban(dataset, num_hid=1024, op="", gamma=2, task="vqa")
    for module in model.modules():  # Dropout(inplace=True) after ReLU breaks backward on current autograd
        if isinstance(module, nn.Dropout):
            module.inplace = False
    model.train()
    optimizer = torch.optim.Adamax(filter(lambda p: p.requires_grad, model.parameters()), lr=7e-4)
    inputs = [(b.features, b.spatials, b.q_tokens, b.targets) for b in batches]

    def step(i: int) -> None:
        v, b, q, a = inputs[i % 2]
        pred, _ = model(v, b, q, a)
        loss = train.instance_bce_with_logits(pred, a)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        optimizer.zero_grad()

    info = {"params": parameter_count(model), "settings": "build_ban(num_hid=1024, op='', gamma=2, task='vqa')"}
    return step, info


# ------------------------------------------------------------------------------------- ISubGVQA reference


def _broadcast(index: torch.Tensor, src: torch.Tensor, dim: int) -> torch.Tensor:
    """torch_scatter.utils.broadcast: expand a 1-d index along `dim` to src's shape."""
    dim = dim % src.dim()
    if index.dim() == 1:
        index = index.view([1] * dim + [-1] + [1] * (src.dim() - dim - 1))
    while index.dim() < src.dim():
        index = index.unsqueeze(-1)
    return index.expand_as(src)


def _scatter(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: Any = None,
    reduce: str = "sum",
) -> torch.Tensor:
    """torch_scatter.scatter for sum/add/mean/max/min, built on scatter_add_ / scatter_reduce."""
    if out is not None:
        raise NotImplementedError("the torch_scatter shim does not support out=")
    dim = dim % src.dim()
    index = _broadcast(index, src, dim)
    size = list(src.shape)
    size[dim] = int(dim_size) if dim_size is not None else (int(index.max()) + 1 if index.numel() else 0)
    if reduce in ("sum", "add", "mean"):
        total = src.new_zeros(size).scatter_add_(dim, index, src)
        if reduce != "mean":
            return total
        count = src.new_zeros(size).scatter_add_(dim, index, torch.ones_like(src))
        return total / count.clamp_min(1)
    if reduce in ("max", "min"):
        op = "amax" if reduce == "max" else "amin"
        return src.new_zeros(size).scatter_reduce(dim, index, src, op, include_self=False)
    raise NotImplementedError(f"the torch_scatter shim has no reduce={reduce!r}")


def _scatter_add(src: torch.Tensor, index: torch.Tensor, dim: int = -1, **kw: Any) -> torch.Tensor:
    return _scatter(src, index, dim, reduce="sum", **kw)


def _scatter_mean(src: torch.Tensor, index: torch.Tensor, dim: int = -1, **kw: Any) -> torch.Tensor:
    return _scatter(src, index, dim, reduce="mean", **kw)


def _scatter_max(src: torch.Tensor, index: torch.Tensor, dim: int = -1, **kw: Any) -> tuple[torch.Tensor, None]:
    """Values of torch_scatter.scatter_max (the argmax is not used by the code paths benchmarked here)."""
    return _scatter(src, index, dim, reduce="max", **kw), None


def _scatter_softmax(src: torch.Tensor, index: torch.Tensor, dim: int = -1, dim_size: Any = None) -> torch.Tensor:
    """torch_scatter.scatter_softmax: exp(x - group max) / group sum."""
    dim = dim % src.dim()
    full = _broadcast(index, src, dim)
    peak = _scatter(src.detach(), index, dim, dim_size=dim_size, reduce="max").gather(dim, full)
    scores = (src - peak).exp()
    return scores / _scatter(scores, index, dim, dim_size=dim_size).gather(dim, full)


class _Vocab:
    """What the reference reads of a torchtext Vocab: .vocab.itos_, len(), get_stoi(), get_itos()."""

    def __init__(self, tokens: list[str]) -> None:
        self.itos_ = list(tokens)
        self.vocab = self

    def __len__(self) -> int:
        return len(self.itos_)

    def get_stoi(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.itos_)}

    def get_itos(self) -> list[str]:
        return list(self.itos_)


def _torchtext_vocab(
    ordered_dict: dict[str, int], min_freq: int = 1, specials: list[str] | None = None, special_first: bool = True
) -> _Vocab:
    """torchtext 0.18 `vocab()`: drop the specials, keep tokens with 'frequency' >= min_freq, add the specials."""
    specials = specials or []
    for token in specials:
        ordered_dict.pop(token, None)
    tokens = [token for token, freq in ordered_dict.items() if freq >= min_freq]
    return _Vocab(specials + tokens if special_first else tokens + specials)


class _NoGloVe:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("GloVe is not available offline; the benchmark uses random scene-graph vectors")


def install_isubgvqa_stubs() -> None:
    """torchtext, torch_scatter, torch_sparse, CLIP from_pretrained and Tensor.cuda for a CPU, offline run."""
    _stub_module("torchtext")
    _stub_module("torchtext.vocab", GloVe=_NoGloVe, vocab=_torchtext_vocab)
    _stub_module("torchtext.data")
    _stub_module("torchtext.data.utils", get_tokenizer=lambda *a, **k: str.split)
    _stub_module(
        "torch_scatter",
        scatter=_scatter,
        scatter_add=_scatter_add,
        scatter_sum=_scatter_add,
        scatter_mean=_scatter_mean,
        scatter_max=_scatter_max,
        scatter_softmax=_scatter_softmax,
    )
    _stub_module("torch_sparse", SparseTensor=type("SparseTensor", (), {}), set_diag=None)
    import transformers
    from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

    def clip_model(*args: Any, **kwargs: Any) -> SimpleNamespace:
        embeddings = CLIPTextEmbeddings(transformers.CLIPTextConfig())
        return SimpleNamespace(text_model=SimpleNamespace(embeddings=embeddings))

    transformers.CLIPModel.from_pretrained = classmethod(lambda cls, *a, **k: clip_model())
    transformers.CLIPTokenizerFast.from_pretrained = classmethod(lambda cls, *a, **k: SimpleNamespace(is_fast=True))
    torch.Tensor.cuda = lambda self, *a, **k: self


def scene_graph_stand_in(repo: Path) -> type:
    """GQASceneGraphs without scene-graph JSONs and GloVe: the repo's vocabulary rules, random 300-d vectors."""
    meta = repo / "ISubGVQA" / "meta_info"

    class SceneGraphs:
        def __init__(self) -> None:
            words: list[str] = []
            for name in ("name_gqa.txt", "attr_gqa.txt", "rel_gqa.txt"):
                words += (meta / name).read_text().splitlines()
            for name in ("objects.json", "predicates.json", "attributes.json"):
                words += json.loads((meta / name).read_text())
            words += ["<self>", "pokemon"]
            stoi = {token: i for i, token in enumerate(words)}
            self.vocab_sg = _torchtext_vocab(stoi, specials=["<unk>", "<pad>", "<sos>", "<eos>", "<self>"])
            self.vectors = torch.randn(len(self.vocab_sg), 300)

    return SceneGraphs


def import_isubgvqa(repo: Path) -> types.ModuleType:
    """Import the reference's model builder with the stubs and patches in place; returns models.build."""
    install_isubgvqa_stubs()
    sys.path.insert(0, str(repo))
    from torch_geometric.typing import OptTensor, PairTensor

    masking = importlib.import_module("ISubGVQA.models.masking")
    get_imle_samplers = masking.get_imle_samplers
    masking.get_imle_samplers = lambda *a, **k: get_imle_samplers(*a, **{**k, "device": "cpu"})
    conv = importlib.import_module("ISubGVQA.models.mgat_v2_conv")
    conv.MaskingGATv2Conv.propagate_type = {"x": PairTensor, "edge_attr": OptTensor, "edge_mask": OptTensor}
    encoder = importlib.import_module("ISubGVQA.models.scene_graph_encoder")
    encoder.GQASceneGraphs = scene_graph_stand_in(repo)
    return importlib.import_module("ISubGVQA.models.build")


def isubgvqa_args() -> SimpleNamespace:
    """main.py's arguments as run_training.sh sets them (argparse defaults otherwise), on CPU."""
    return SimpleNamespace(
        general_hidden_dim=300,
        mgat_layers=4,
        sampler_type="imle",
        sample_k=2,
        nb_samples=1,
        alpha=1.0,
        beta=10.0,
        tau=1.0,
        mgat_masks=[1.0, 1.0, 1.0, 0.1],
        use_masking=1,
        use_instruction=1,
        use_mgat=0,
        use_topk=True,
        interpretable_mode=False,
        concat_instr=0,
        embed_cat=0,
        use_all_instrs=False,
        use_global_mask=False,
        node_classification=False,
        text_sampling=False,
        distributed=False,
        device="cpu",
    )


def reference_inputs(batch: Batch) -> dict[str, Any]:
    """The isubg batch in the reference's format: CLIP-style ids, x (N, 4), edge_attr (E,), x_bbox, added_sym_edge."""
    graphs = []
    for g in batch.graphs.to_data_list():
        data = Data(x=g.x, edge_index=g.edge_index, edge_attr=g.edge_attr)
        data.added_sym_edge = g.edge_reverse.nonzero().view(-1)
        data.x_bbox = g.box
        graphs.append(data)
    sg = GraphBatch.from_data_list(graphs)
    questions = batch.q_tokens.clone()
    questions[:, 0], questions[:, -1] = CLIP_BOS, CLIP_EOS
    return {
        "node_embeddings": sg.x,
        "edge_index": sg.edge_index,
        "edge_embeddings": sg.edge_attr,
        "batch": sg.batch,
        "questions": questions,
        "qsts_att_mask": batch.q_mask.long(),
        "return_masks": True,
        "scene_graphs": sg,
    }


def setup_isubgvqa_reference(repo: Path, args: argparse.Namespace) -> tuple[Step, dict[str, Any]]:
    """ISubGVQA stepped as train_epoch.py: CE over 1842 answers, backward, clip (first step only), Adam."""
    batches = make_batches("isubgvqa", args.batch)
    build = import_isubgvqa(repo)
    torch.manual_seed(0)
    model = build.build_model(isubgvqa_args(), cfg=None)
    model.train()
    optimizer = torch.optim.Adam(params=model.parameters(), lr=5e-5)
    criterion = nn.CrossEntropyLoss()
    model_params = model.parameters()  # a generator, exhausted after the first clip (the reference's quirk)
    inputs = [(reference_inputs(b), b.targets.argmax(1)) for b in batches]

    def step(i: int) -> None:
        kwargs, labels = inputs[i % 2]
        logits = model(**kwargs)[0]
        loss = criterion(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model_params, max_norm=2.0)
        optimizer.step()

    vocab = len(model.scene_graph_encoder.sg_vocab)
    info = {"params": parameter_count(model), "settings": vars(isubgvqa_args()), "sg_vocab": vocab}
    return step, info


# --------------------------------------------------------------------------------------------- processes


def run_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build and time one model in this process (called in a subprocess by the driver)."""
    torch.set_num_threads(args.threads)
    setups: dict[str, Callable[[], tuple[Step, dict[str, Any]]]] = {
        "cfrf": lambda: setup_isubg("ban", args),
        "isubg": lambda: setup_isubg("isubgvqa", args),
        "ban_ref": lambda: setup_ban_reference(args.ban_repo, args),
        "isubgvqa_ref": lambda: setup_isubgvqa_reference(args.isubgvqa_repo, args),
    }
    start = time.perf_counter()
    step, info = setups[name]()
    built = time.perf_counter() - start
    result = time_training(step, args.batch, args)
    return {
        "worker": name,
        **info,
        **result,
        "build_s": round(built, 1),
        "threads": torch.get_num_threads(),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def spawn(name: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; its result, or the error it ended with."""
    result_file = out_dir / f".bench_reference_{name}_{os.getpid()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result-file", str(result_file)]
    for flag in ("batch", "warmup", "steps", "threads", "retries", "max_others", "ban_repo", "isubgvqa_repo"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout)
    wall = round(time.perf_counter() - start, 1)
    if proc.returncode != 0 or not result_file.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"worker": name, "error": "\n".join(tail), "wall_s": wall}
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return {**result, "wall_s": wall}


def checkout_problem(pair: str, repo: Path | None) -> str | None:
    """Why a pair cannot run (no path given, or not the expected checkout), or None."""
    flag, marker = ("--ban-repo", "base_model.py") if pair == "ban" else ("--isubgvqa-repo", "ISubGVQA/models")
    if repo is None:
        return f"skipped: {flag} not given (path to a checkout of the reference)"
    if not (repo / marker).exists():
        return f"skipped: {repo} has no {marker}; {flag} must point at a checkout of the reference repository"
    return None


def repo_commit(repo: Path | None) -> str | None:
    """HEAD of a git checkout, or None (e.g. a plain work tree without .git)."""
    if repo is None:
        return None
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def run_pair(pair: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Measure both sides of a pair `args.repeats` times, alternating which side goes first."""
    repo = args.ban_repo if pair == "ban" else args.isubgvqa_repo
    problem = checkout_problem(pair, repo)
    if problem is not None:
        print(f"[{pair}] {problem}", file=sys.stderr)
        return {"pair": pair, "label": PAIR_LABELS[pair], "skipped": problem}
    ours, ref = PAIR_WORKERS[pair]
    runs: dict[str, list[dict[str, Any]]] = {"isubg": [], "reference": []}
    for r in range(args.repeats):
        order = [("isubg", ours), ("reference", ref)]
        for side, worker in order if r % 2 == 0 else order[::-1]:
            print(f"[{pair}] run {r + 1}/{args.repeats}: {worker} ...", file=sys.stderr, flush=True)
            result = spawn(worker, args, out_dir)
            print(f"[{pair}]   {_brief(result)}", file=sys.stderr, flush=True)
            runs[side].append(result)
    row = {"pair": pair, "label": PAIR_LABELS[pair], "reference_repo": repo.name, "commit": repo_commit(repo)}
    for side, results in runs.items():
        row[side] = _summary(results)
    if "samples_per_s" in row["isubg"] and "samples_per_s" in row["reference"]:
        row["ratio"] = row["isubg"]["samples_per_s"] / row["reference"]["samples_per_s"]
    row["runs"] = runs
    row["differences"] = DIFFERENCES[pair]
    return row


def _brief(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"FAILED: {result['error'].splitlines()[-1] if result['error'] else 'no output'}"
    return (
        f"{result['samples_per_s']:.2f} samples/s, others {result['others_cores']:.2f} cores, "
        f"clean {result['clean']}, RSS {result['ru_maxrss_mib']:.0f} MiB, {result['wall_s']:.0f} s"
    )


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the successful runs of one side (all runs are kept under `runs`)."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"error": results[-1]["error"] if results else "not run"}
    return {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in ok),
        "params": ok[0]["params"],
        "ru_maxrss_mib": max(r["ru_maxrss_mib"] for r in ok),
        "clean": all(r["clean"] for r in ok),
        "others_cores": max(r["others_cores"] for r in ok),
        "runs": len(ok),
    }


# ----------------------------------------------------------------------------------------------- output


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'model pair':<32} {'isubg params':>12} {'ref params':>11} {'isubg samples/s':>15} "
        f"{'ref samples/s':>13} {'ratio':>6} {'isubg RSS':>10} {'ref RSS':>8} {'clean':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if "skipped" in row:
            print(f"{row['label']:<32} {row['skipped']}")
            continue
        ours, ref = row["isubg"], row["reference"]
        if "error" in ours or "error" in ref:
            print(f"{row['label']:<32} failed: {(ours.get('error') or ref.get('error')).splitlines()[-1]}")
            continue
        print(
            f"{row['label']:<32} {ours['params'] / 1e6:>11.2f}M {ref['params'] / 1e6:>10.2f}M "
            f"{ours['samples_per_s']:>15.2f} {ref['samples_per_s']:>13.2f} {row['ratio']:>6.2f} "
            f"{ours['ru_maxrss_mib']:>7.0f}MiB {ref['ru_maxrss_mib']:>5.0f}MiB {ours['clean'] and ref['clean']!s:>6}"
        )


def metadata(args: argparse.Namespace, started: float) -> dict[str, Any]:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "threads": args.threads,
        "repeats": args.repeats,
        "retries": args.retries,
        "max_others_cores": args.max_others,
        "sizes": SIZES,
        "torch": torch.__version__,
        "torch_geometric": torch_geometric.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "started": started,
        "duration_s": round(time.time() - started, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ban-repo", type=Path, help="checkout of jnhwkim/ban-vqa (pair skipped without it)")
    parser.add_argument("--isubgvqa-repo", type=Path, help="checkout of the ISubGVQA repository (pair skipped)")
    parser.add_argument("--pairs", default="ban,isubgvqa", help="comma-separated subset of: ban, isubgvqa")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per model, alternating which side goes first")
    parser.add_argument("--retries", type=int, default=3, help="extra timed loops when other processes were busy")
    parser.add_argument("--max-others", type=float, default=0.3, help="cores other processes may use (clean run)")
    parser.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds one model may take")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_reference.json")
    parser.add_argument("--worker", choices=["cfrf", "isubg", "ban_ref", "isubgvqa_ref"], help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.pairs.split(",")) - set(PAIR_WORKERS)
    if unknown:
        parser.error(f"--pairs: unknown pair(s) {', '.join(sorted(unknown))}; choose from ban, isubgvqa")
    return args


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        args.result_file.write_text(json.dumps(run_worker(args.worker, args), default=str))
        return
    started = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = [run_pair(pair, args, args.out.parent) for pair in args.pairs.split(",")]
    print_table(rows)
    meta = metadata(args, started)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out} ({meta['duration_s']:.0f} s)")


if __name__ == "__main__":
    main()
