"""The fused model on real demo batches: every preset builds and trains, every model hyperparameter acts,
outputs do not depend on batch-mates, and memory-efficient attention computes the same function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from isubg.config import RunConfig
from isubg.data.dataset import VQADataset, collate
from isubg.data.embedded import build_demo
from isubg.models import build_model, parameter_counts
from isubg.presets import list_presets
from isubg.resolve import resolve_config

# Small X-VLM sizes for tests that sweep other settings; the preset test keeps each preset's own sizes.
TINY = [
    "model.xvlm.hidden_size=32", "model.xvlm.num_heads=2", "model.xvlm.intermediate_size=64",
    "model.xvlm.num_text_layers=1", "model.xvlm.num_cross_layers=1", "num_hid=64", "general_hidden_dim=32",
    "AOA_layers=1", "mgat_layers=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo"), size="tiny", seed=0).processed("gqa")


def _data(folder: Path, cfg: RunConfig) -> VQADataset:
    d = cfg.data
    return VQADataset(
        folder, "train", question_len=d.question_len, max_boxes=d.max_boxes, num_stat_word=d.num_stat_word
    )


def _batch(data: VQADataset, indices: list[int]) -> Any:
    return collate([data[i] for i in indices], data.num_answers)


def _config(*sets: str, preset: str = "demo") -> RunConfig:
    # Masking on: the sampler knobs act through the mask, whatever the demo preset chooses.
    return resolve_config(preset, sets=[*TINY, "use_masking=true", *sets]).config


def _signature(folder: Path, cfg: RunConfig) -> dict[str, Any]:
    """Parameter count, eval outputs, and a seeded training step's loss and gradient norm."""
    data = _data(folder, cfg)
    batch = _batch(data, list(range(16)))
    torch.manual_seed(0)
    model = build_model(cfg, data.spec())
    model.eval()
    with torch.no_grad():
        out = model(batch)
    model.train()
    # Sampler knobs (alpha, beta, tau, nb_samples) act through which nodes the noisy top-k picks; over
    # several seeded steps at least one pick differs, so the check does not hinge on one random draw.
    losses, grads = [], []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(model(batch), batch.targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))
    loss, grad = torch.stack(losses), torch.stack(grads)
    return {
        "params": parameter_counts(model)["total"],
        "eval": torch.cat([o.logits for o in out.branches.values()], 1),
        "loss": loss.detach(),
        "grad": grad,
    }


def _differs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["params"] != b["params"]:
        return True
    if a["eval"].shape != b["eval"].shape or not torch.allclose(a["eval"], b["eval"], atol=1e-6):
        return True
    return not torch.allclose(a["loss"], b["loss"], atol=1e-7) or not torch.allclose(a["grad"], b["grad"], rtol=1e-6)


# (guide name, base value, changed value): every model and data hyperparameter the tuning guide defines.
EFFECTS = [
    ("gamma", 2, 3), ("use_counter", False, True), ("AOA_layers", 1, 2), ("num_hid", 64, 48),
    ("activation", "swish", "relu"), ("dropout", 0.2, 0.5), ("omega_q", 0.1, 0.2), ("omega_v", 0.01, 0.05),
    ("general_hidden_dim", 32, 48), ("mgat_layers", 2, 3), ("sampler_type", "imle", "gumbel"),
    ("sample_k", 2, 1), ("nb_samples", 1, 2), ("alpha", 1.0, 5.0), ("beta", 10.0, 1000.0), ("tau", 1.0, 0.5),
    ("use_instruction", True, False), ("use_masking", True, False), ("use_mgat", False, True),
    ("fusion_ratio", 0.1, 0.2), ("topk", 6, 3), ("question_len", 12, 6), ("max_boxes", 50, 10),
    ("num_stat_word", 30, 5), ("tfidf", True, False), ("model.isubg.share_word_embeddings", True, False),
]  # fmt: skip


@pytest.mark.parametrize(("name", "base", "changed"), EFFECTS, ids=[e[0] for e in EFFECTS])
def test_every_model_hyperparameter_has_an_effect(processed: Path, name: str, base: Any, changed: Any) -> None:
    a = _signature(processed, _config(f"{name}={base}"))
    b = _signature(processed, _config(f"{name}={changed}"))
    assert _differs(a, b), f"{name}: {base} -> {changed} changed nothing"


def test_counter_activation_has_an_effect(processed: Path) -> None:
    a = _signature(processed, _config("use_counter=true", "counter_act=zhang"))
    b = _signature(processed, _config("use_counter=true", "counter_act=identity"))
    assert _differs(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_builds_and_trains_a_step(processed: Path, preset: str) -> None:
    cfg = resolve_config(preset).config
    data = _data(processed, cfg)
    torch.manual_seed(0)
    model = build_model(cfg, data.spec())
    batch = _batch(data, [0, 1, 2])
    out = model(batch)
    loss, _ = model.loss(out, batch.targets)
    assert torch.isfinite(loss)
    for name, o in out.branches.items():
        assert o.logits.shape == (3, data.num_answers) and torch.isfinite(o.logits).all(), name
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("branches", [["cfrf"], ["isubg"], ["xvlm"], ["cfrf", "isubg"], ["isubg", "xvlm"]])
def test_any_subset_of_branches(processed: Path, branches: list[str]) -> None:
    cfg = _config(f"model.branches=[{', '.join(branches)}]")
    data = _data(processed, cfg)
    model = build_model(cfg, data.spec())
    out = model(_batch(data, [0, 1]))
    assert list(out.branches) == branches and out.fused.shape == (2, data.num_answers)


def test_outputs_do_not_depend_on_batch_mates(processed: Path) -> None:
    cfg = _config("max_boxes=100")
    data = _data(processed, cfg)
    model = build_model(cfg, data.spec()).eval()
    # Pick batch-mates with different box counts, question lengths and graph sizes.
    sizes = sorted(range(len(data)), key=lambda i: (data[i].features.shape[0], data[i].q_len))
    mates = [sizes[0], sizes[len(sizes) // 2], sizes[-1]]
    with torch.no_grad():
        together = model(_batch(data, mates))
        for row, index in enumerate(mates):
            alone = model(_batch(data, [index]))
            for name in together.branches:
                torch.testing.assert_close(
                    alone.branches[name].logits[0], together.branches[name].logits[row], atol=1e-5, rtol=1e-5
                )
            torch.testing.assert_close(alone.fused[0], together.fused[row], atol=1e-5, rtol=1e-5)


def test_memory_efficient_attention_computes_the_same_function(processed: Path) -> None:
    plain, efficient = _config(), _config("memory_efficient_attention=true")
    data = _data(processed, plain)
    batch = _batch(data, list(range(4)))
    torch.manual_seed(0)
    a = build_model(plain, data.spec()).eval()
    torch.manual_seed(0)
    b = build_model(efficient, data.spec()).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        out_a, out_b = a(batch), b(batch)
    for name in out_a.branches:
        torch.testing.assert_close(out_a.branches[name].logits, out_b.branches[name].logits, atol=1e-5, rtol=1e-5)


def test_precision_sensitive_parts_run_in_float32_under_autocast(processed: Path) -> None:
    # Under bf16 autocast (CPU here; CUDA autocast casts the same way) the recurrences, the isubg node-score
    # standardisation and the fused probabilities stay in float32; everything else may run in bf16.
    from isubg.models.isubg import NodeScorer

    cfg = _config("use_masking=true")
    data = _data(processed, cfg)
    model = build_model(cfg, data.spec()).train()
    seen: dict[str, torch.dtype] = {}

    def record(name: str) -> Any:
        def hook(_module: Any, _args: Any, out: Any) -> None:
            first = out[0] if isinstance(out, tuple) else out
            seen[name] = getattr(first, "data", first).dtype  # a PackedSequence keeps its tensor in .data

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.GRU, torch.nn.GRUCell, NodeScorer)):
            module.register_forward_hook(record(name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch(data, [0, 1, 2]))
    assert any("cfrf" in n for n in seen) and any("isubg" in n for n in seen)
    assert all(dtype == torch.float32 for dtype in seen.values()), seen
    assert any(o.logits.dtype == torch.bfloat16 for o in out.branches.values()), "autocast was not active"
    assert out.fused.dtype == torch.float32
    logits = torch.stack([o.logits.float() for o in out.branches.values()])
    weights = torch.softmax(model.adapted_w.float(), dim=0).unsqueeze(1)
    torch.testing.assert_close(out.fused, (weights * torch.sigmoid(logits)).sum(0))
