"""The trainer on the tiny demo data: run directory, reproducibility, exact resume, NaN stop, early stopping,
accumulation, mixed precision, and the schedule."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

import isubg.train
from isubg.checkpoint import load_checkpoint
from isubg.config import RunConfig
from isubg.data.dataset import collate
from isubg.data.loaders import open_split
from isubg.device import Precision
from isubg.models.fusion import FusedModel
from isubg.report import read_metrics
from isubg.resolve import resolve_config
from isubg.step import apply_update, forward_backward
from isubg.train import Processes, ban_multiplier, make_trainer, train

TINY = [
    "model.xvlm.hidden_size=32", "model.xvlm.num_heads=2", "model.xvlm.intermediate_size=64",
    "model.xvlm.num_text_layers=1", "model.xvlm.num_cross_layers=1", "num_hid=64", "general_hidden_dim=32",
    "AOA_layers=1", "mgat_layers=2",
]  # fmt: skip
FAST = [*TINY, "data.train_limit=48", "data.val_limit=16", "batch_size=8", "update_freq=1", "train.log_every=1"]


def config(*sets: str) -> RunConfig:
    return resolve_config("demo", sets=[*FAST, *sets]).config


def run(cfg: RunConfig, run_dir: Path, data: Path, **kwargs: Any) -> Any:
    return train(cfg, run_dir, data_dir=data, console=Console(file=io.StringIO()), **kwargs)


def weights(run_dir: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / f"{name}.pt")["model"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def gqa(tiny_demo: Path) -> Path:
    return tiny_demo / "processed" / "gqa"


def test_run_directory_holds_config_metrics_log_summary_and_checkpoints(gqa: Path, tmp_path: Path) -> None:
    result = run(config("epochs=2"), tmp_path / "run", gqa)
    run_dir = tmp_path / "run"
    assert result.status == "finished" and result.steps == 12
    for name in ("config.yaml", "metrics.jsonl", "train.log", "summary.json", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    events = [r["event"] for r in read_metrics(run_dir).records]
    assert events[0] == "start" and events[-1] == "end"
    assert events.count("epoch") == 2 and events.count("step") == 12
    epoch = next(r for r in read_metrics(run_dir).records if r["event"] == "epoch")
    assert set(epoch["val_acc"]) == {"cfrf", "isubg", "xvlm", "fused", "ens", "bound"}
    assert epoch["peak_memory_mib"] > 0 and epoch["samples_per_s"] > 0
    step = next(r for r in read_metrics(run_dir).records if r["event"] == "step")
    assert {"loss", "lr", "xvlm_lr", "samples_per_s", "memory_mib", "grad_norm"} <= set(step)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    saved = resolve_config("default", config_file=run_dir / "config.yaml").config
    assert RunConfig.model_validate(state["config"]) == saved == config("epochs=2")
    assert state["progress"]["epoch"] == 2 and state["progress"]["step"] == 12
    assert set(state["optimizers"]) == {"main", "xvlm"} and len(state["vocab_sha256"]) == 64
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["best_epoch"] in (1, 2)
    assert 0 <= summary["majority_baseline"] <= 1


def test_same_seed_same_weights_other_seed_other_weights(gqa: Path, tmp_path: Path) -> None:
    run(config(), tmp_path / "a", gqa)
    run(config(), tmp_path / "b", gqa)
    run(config("seed=7"), tmp_path / "c", gqa)
    assert same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert not same(weights(tmp_path / "a"), weights(tmp_path / "c"))


@pytest.mark.parametrize("fusion_lr", [None, 0.05])
def test_fusion_weights_step_at_their_own_learning_rate(gqa: Path, fusion_lr: float | None) -> None:
    sets = ["model.branches=[cfrf,isubg]", "lr=1e-3"] + ([] if fusion_lr is None else [f"train.fusion_lr={fusion_lr}"])
    cfg = config(*sets)
    data = open_split(cfg, gqa, "train", 8)
    from isubg.models import build_model

    model = build_model(cfg, data.spec())
    t = make_trainer(cfg, model, 1, torch.device("cpu"), Precision(None, False, "fp32"), Processes())
    before = model.adapted_w.detach().clone()
    forward_backward(t, collate([data[i] for i in range(8)], data.num_answers), 1.0, sync=True)
    moved = model.adapted_w.grad.abs() > 1e-3 * model.adapted_w.grad.abs().max()
    apply_update(t)
    # Adamax's first step moves each parameter by lr x sign(gradient) (no clipping at this gradient norm).
    step = (model.adapted_w.detach() - before).abs()[moved]
    torch.testing.assert_close(step, torch.full_like(step, fusion_lr or 1e-3), rtol=1e-3, atol=0.0)


def test_resuming_a_checkpoint_with_one_main_parameter_group_is_a_clear_error(gqa: Path, tmp_path: Path) -> None:
    from isubg.errors import ConfigError

    run(config(), tmp_path / "old", gqa, stop_after_steps=1)
    file = tmp_path / "old" / "checkpoints" / "last.pt"
    state = load_checkpoint(file)
    groups = state["optimizers"]["main"]["param_groups"]
    groups[0]["params"] += groups.pop()["params"]  # the layout before train.fusion_lr: one group
    torch.save(state, file)
    with pytest.raises(ConfigError, match="1 parameter group"):
        run(config(), tmp_path / "old", gqa, resume=True)


@pytest.mark.parametrize("stop_at", [2, 4], ids=["inside-epoch-1", "inside-epoch-2"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(gqa: Path, tmp_path: Path, stop_at: int) -> None:
    # update_freq 2 over 6 micro-batches per epoch: 3 updates an epoch, so both stops fall inside an epoch.
    cfg = config("epochs=2", "update_freq=2")
    whole = run(cfg, tmp_path / "whole", gqa)
    first = run(cfg, tmp_path / "split", gqa, stop_after_steps=stop_at)
    assert first.status == "interrupted" and first.steps == stop_at
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["progress"]["step"] == stop_at
    second = run(cfg, tmp_path / "split", gqa, resume=True)
    assert second.status == "finished" and second.steps == whole.steps == 6
    assert same(weights(tmp_path / "whole"), weights(tmp_path / "split"))
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["optimizers"]["main"]["state"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["optimizers"]["main"]["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
    events = [r["event"] for r in read_metrics(tmp_path / "split").records]
    assert "resume" in events and events[-1] == "end"


def test_resume_without_a_checkpoint_is_a_config_error(gqa: Path, tmp_path: Path) -> None:
    from isubg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"no checkpoints/last\.pt"):
        run(config(), tmp_path / "nothing", gqa, resume=True)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    gqa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_loss = FusedModel.loss
    calls = {"n": 0}

    def poisoned(self: FusedModel, output: Any, targets: torch.Tensor, question_ids: Any = None) -> Any:
        calls["n"] += 1
        total, parts = real_loss(self, output, targets, question_ids)
        return (total * math.nan if calls["n"] == 8 else total), parts  # micro-batch 8 = epoch 2, step 8

    monkeypatch.setattr(FusedModel, "loss", poisoned)
    result = run(config("epochs=3"), tmp_path / "run", gqa)
    assert result.status == "diverged" and "nan" in result.message and "step 8" in result.message
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert read_metrics(tmp_path / "run").records[-1]["status"] == "diverged"


def test_patience_stops_when_validation_accuracy_stops_improving(gqa: Path, tmp_path: Path) -> None:
    # A learning rate too small to move a prediction: accuracy never improves after epoch 1.
    result = run(config("epochs=6", "train.patience=2", "lr=1e-12", "xvlm_lr=1e-12"), tmp_path / "run", gqa)
    assert result.status == "early_stopped" and result.best_epoch == 1
    assert [r["epoch"] for r in read_metrics(tmp_path / "run").records if r["event"] == "epoch"] == [1, 2, 3]


def test_accumulated_micro_batches_give_the_big_batch_gradient(gqa: Path) -> None:
    cfg = config("model.branches=[cfrf]", "dropout=0.0")
    data = open_split(cfg, gqa, "train", 16)
    torch.manual_seed(0)
    from isubg.models import build_model

    model = build_model(cfg, data.spec()).eval()  # eval: no dropout, so both paths compute the same function
    t = make_trainer(cfg, model, 1, torch.device("cpu"), Precision(None, False, "fp32"), Processes())
    samples = [data[i] for i in range(16)]
    forward_backward(t, collate(samples, data.num_answers), 1.0, sync=True)
    big = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for half in (samples[:8], samples[8:]):
        forward_backward(t, collate(half, data.num_answers), 0.5, sync=True)
    for name, grad in big.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_path_trains_on_cpu(gqa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CPUs without native bf16 train in fp32 (see isubg.device); force the autocast path to test its logic here.
    import isubg.train as train_module

    forced = Precision(torch.bfloat16, False, "bf16 autocast (forced by the test)")
    monkeypatch.setattr(train_module, "pick_precision", lambda device, mixed: forced)
    result = run(config("data.train_limit=16", "mixed_precision=true"), tmp_path / "run", gqa)
    assert result.status == "finished"
    start = read_metrics(tmp_path / "run").records[0]
    assert start["precision"] == "bf16"
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run").records if r["event"] == "step")


def test_ban_schedule_equals_the_reference_at_twenty_epochs() -> None:
    # MGHR's per-epoch lr multipliers (docs/deviations.md#ban-schedule): warm-up, hold 2x, x0.25 every 2 epochs from 10.
    expected = [0.5, 1.0, 1.5, 2.0] + [2.0] * 6 + [0.5, 0.5, 0.125, 0.125, 2 / 4**3, 2 / 4**3, 2 / 4**4, 2 / 4**4]
    expected += [2 / 4**5, 2 / 4**5]
    assert [ban_multiplier(e * 7, 7, 20) for e in range(20)] == expected
    # Ten epochs: the same shape in half the epochs.
    assert [ban_multiplier(e * 7, 7, 10) for e in range(10)] == expected[::2]


def _oom_above(limit: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make every training forward over more than `limit` questions raise the CUDA out-of-memory error."""
    real_forward = FusedModel.forward
    seen = {"ooms": 0}

    def forward(self: FusedModel, batch: Any) -> Any:
        if self.training and len(batch) > limit:
            seen["ooms"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return real_forward(self, batch)

    monkeypatch.setattr(FusedModel, "forward", forward)
    return seen


def test_out_of_memory_halves_the_micro_batch_and_keeps_every_update(
    gqa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _oom_above(4, monkeypatch)
    cfg = config("epochs=2", "update_freq=2", "dynamic_batch_size=true")
    result = run(cfg, tmp_path / "run", gqa)
    assert seen["ooms"] == 1 and result.status == "finished"
    assert result.steps == 6, "48 questions / (8 x 2) = 3 updates an epoch, none lost to the OOM"
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    saved = RunConfig.model_validate(state["config"])
    assert saved.train.batch_size == 4 and saved.optim.gradient_accumulation_steps == 2
    assert saved.effective_batch == cfg.effective_batch
    events = read_metrics(tmp_path / "run").records
    oom = next(r for r in events if r["event"] == "oom")
    assert oom["batch_size"] == 4 and oom["step"] == 0
    assert cfg.train.batch_size == 8, "the caller's config is not changed"
    assert "batch_size: 4" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_run_shrunk_by_an_oom_resumes_with_its_new_micro_batch(
    gqa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _oom_above(4, monkeypatch)
    cfg = config("epochs=2", "update_freq=2", "dynamic_batch_size=true")
    assert run(cfg, tmp_path / "run", gqa, stop_after_steps=4).status == "interrupted"
    # The original config (micro-batch 8) is what a user would pass again; the checkpoint's geometry wins.
    result = run(cfg, tmp_path / "run", gqa, resume=True)
    assert result.status == "finished" and result.steps == 6


def test_out_of_memory_without_dynamic_batch_size_is_a_clear_error(
    gqa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from isubg.errors import ResourceError

    _oom_above(4, monkeypatch)
    with pytest.raises(ResourceError, match="dynamic_batch_size is off"):
        run(config(), tmp_path / "run", gqa)


def test_halving_picks_a_divisor_and_rescales_the_position() -> None:
    from isubg.train import Progress, Trainer, halve_micro_batch

    for old, new in [(48, 24), (9, 3), (5, 1), (2, 1)]:
        cfg = config(f"batch_size={old}", "gradient_accumulation_steps=2")
        t = Trainer.__new__(Trainer)
        t.cfg, t.progress = cfg, Progress(batch=4)
        assert halve_micro_batch(t) == (new, 2 * old // new)
        assert t.progress.batch * new == 4 * old


def test_dynamic_batch_size_fits_the_micro_batch_before_training_on_cuda(
    gqa: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CUDA sizing logic with the device and the memory model faked.
    import isubg.train
    from isubg.memory import BranchMemory, Linear, MemoryEstimate, WorstCase
    from isubg.train import fit_micro_batch

    def linear(cfg: RunConfig, gib_per_sample: float) -> MemoryEstimate:
        part = BranchMemory("cfrf", 0, 0, "Adamax", Linear(0.0, gib_per_sample * 2**30))
        return MemoryEstimate(
            cfg=cfg, spec=None, worst=WorstCase.for_config(cfg), branches=(part,), inputs=Linear(), autocast_cache=0,
            precision="fp32", memory_efficient=False, cuda_context=0, allocator_overhead=0.0,
        )  # fmt: skip

    per_sample = {"gib": 3.0}
    monkeypatch.setattr(isubg.train, "estimate", lambda cfg, spec, worst: linear(cfg, per_sample["gib"]))
    props = type("Props", (), {"total_memory": 80 * 2**30})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    # 64 GiB budget at 3 GiB a sample: 21 fit; 12 is the largest divisor of the 24 samples per update.
    cfg = config("batch_size=24", "update_freq=1", "dynamic_batch_size=true", "max_memory_usage=0.8")
    line = fit_micro_batch(cfg, None, torch.device("cuda"), gqa)
    assert (cfg.train.batch_size, cfg.optim.gradient_accumulation_steps, cfg.train.update_freq) == (12, 2, 1)
    assert line is not None and "using 12 x accumulation 2 x update_freq 1" in line
    # A large card: 48 x update_freq 4 grows to micro-batches of 96 (0.5 GiB a sample: 128 fit), same 192 samples.
    per_sample["gib"] = 0.5
    cfg = config("batch_size=48", "update_freq=4", "dynamic_batch_size=true", "max_memory_usage=0.8")
    line = fit_micro_batch(cfg, None, torch.device("cuda"), gqa)
    assert (cfg.train.batch_size, cfg.optim.gradient_accumulation_steps, cfg.train.update_freq) == (96, 2, 1)
    assert line is not None and "takes only" in line
    assert fit_micro_batch(config(), None, torch.device("cuda"), gqa) is None, "off by default"
    cpu = fit_micro_batch(config("dynamic_batch_size=true"), None, torch.device("cpu"), gqa)
    assert cpu is not None and "CPU" in cpu


def test_resume_loads_the_checkpoint_on_the_cpu(gqa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # On the CPU load_state_dict moves weights and moments to their parameters and keeps the optimizers' step
    # counters on the CPU; loaded onto the GPU, foreach Adamax/AdamW would sync on each counter every step.
    import isubg.train as train_module

    seen: list[Any] = []
    real = train_module.load_checkpoint

    def spy(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
        seen.append(map_location)
        return real(path, map_location)

    monkeypatch.setattr(train_module, "load_checkpoint", spy)
    cfg = config("epochs=1")
    run(cfg, tmp_path / "run", gqa, stop_after_steps=1)
    assert run(cfg, tmp_path / "run", gqa, resume=True).status == "finished"
    assert seen == ["cpu"]


def test_each_rank_gets_its_own_random_state_back(gqa: Path) -> None:
    import dataclasses
    import random

    import numpy as np

    from isubg.checkpoint import rng_state, vocab_checksum
    from isubg.models import build_model
    from isubg.train import checkpoint_state, restore

    cfg = config()
    model = build_model(cfg, open_split(cfg, gqa, "train", 8).spec())
    t = make_trainer(cfg, model, 1, torch.device("cpu"), Precision(None, False, "fp32"), Processes())
    vocab = vocab_checksum(gqa)
    states = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        states.append(rng_state(torch.device("cpu")))
    saved = checkpoint_state(t, {}, vocab, states[:2])
    assert saved["rng"] is states[0] and saved["rng_ranks"] == states[:2]
    rank1 = dataclasses.replace(t, procs=Processes(rank=1, world=2))
    restore(rank1, saved, vocab, Path("last.pt"))
    assert torch.equal(torch.get_rng_state(), states[1]["torch"]) and random.random() == _first_draw(2)
    # Saved by three processes, resumed by two: rank 1 has no state of its own and must not share rank 0's noise.
    restore(rank1, checkpoint_state(t, {}, vocab, states), vocab, Path("last.pt"))
    assert all(not torch.equal(torch.get_rng_state(), s["torch"]) for s in states)
    single = checkpoint_state(t, {}, vocab, states[2:])
    assert "rng_ranks" not in single
    restore(t, single, vocab, Path("last.pt"))
    assert torch.equal(torch.get_rng_state(), states[2]["torch"])


def _first_draw(seed: int) -> float:
    import random

    return random.Random(seed).random()


def test_the_cuda_random_state_is_the_runs_device_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from isubg.checkpoint import rng_state, set_rng_state

    calls: list[tuple[list[int], torch.device]] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state.tolist(), device)))
    state = rng_state(torch.device("cuda", 1))
    assert state["cuda"].tolist() == [7]
    set_rng_state(state, torch.device("cuda", 1))
    # A checkpoint of the former layout (every visible GPU's state) resumed on an index it has no entry for.
    set_rng_state({**state, "cuda": [torch.tensor([1]), torch.tensor([2])]}, torch.device("cuda", 3))
    set_rng_state(state, torch.device("cpu"))
    assert "cuda" not in rng_state(torch.device("cpu"))
    assert calls == [([7], torch.device("cuda", 1)), ([2], torch.device("cuda", 3))]


def test_out_of_memory_is_handled_after_the_exception_is_released(
    gqa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory is freed only once nothing references the failed step: inside the except block the traceback
    # still holds its frames (the graph and the batch on the device).
    import sys

    import isubg.train as train_module

    handling: list[Any] = []
    real = train_module.out_of_memory

    def spy(t: Any) -> None:
        handling.append(sys.exc_info()[0])
        real(t)

    monkeypatch.setattr(train_module, "out_of_memory", spy)
    _oom_above(4, monkeypatch)
    assert run(config("epochs=1", "dynamic_batch_size=true"), tmp_path / "run", gqa).status == "finished"
    assert handling == [None]


def test_out_of_memory_in_the_optimizer_step_is_a_clear_error(
    gqa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import isubg.train as train_module
    from isubg.errors import ResourceError

    def step(_t: Any) -> tuple[float, bool]:
        raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    monkeypatch.setattr(train_module, "apply_update", step)
    with pytest.raises(ResourceError, match=r"optimizer step .* whatever the micro-batch"):
        run(config("epochs=1", "dynamic_batch_size=true"), tmp_path / "run", gqa)


def test_a_crash_while_validating_loses_no_training(gqa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import isubg.train as train_module

    cfg = config("epochs=2")
    whole = run(cfg, tmp_path / "whole", gqa)
    real = train_module.validate
    calls = {"n": 0}

    def crash_on_the_first(t: Any, val_set: Any) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("validation crashed (injected by the test)")
        return real(t, val_set)

    monkeypatch.setattr(train_module, "validate", crash_on_the_first)
    with pytest.raises(RuntimeError, match="injected"):
        run(cfg, tmp_path / "split", gqa)
    progress = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["progress"]
    assert progress["epoch"] == 1 and progress["pending_validation"] and progress["step"] == whole.steps // 2
    resumed = run(cfg, tmp_path / "split", gqa, resume=True)
    assert resumed.status == "finished" and resumed.best_epoch == whole.best_epoch
    assert same(weights(tmp_path / "whole"), weights(tmp_path / "split"))
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "split").records if r["event"] == "epoch"]
    assert epochs == [1, 2]


def test_ddp_wraps_without_broadcasting_the_constant_buffers(gqa: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Buffers are data-derived constants (tf-idf matrix, graph word ids): a training step leaves them unchanged,
    # so DDP need not broadcast them from rank 0 on every forward.
    from isubg.models import build_model

    cfg = config("tfidf=true")
    data = open_split(cfg, gqa, "train", 8)
    model = build_model(cfg, data.spec())
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    assert buffers, "the demo model has the tf-idf and graph-word buffers"
    t = make_trainer(cfg, model, 1, torch.device("cpu"), Precision(None, False, "fp32"), Processes())
    forward_backward(t, collate([data[i] for i in range(8)], data.num_answers), 1.0)
    apply_update(t)
    assert all(torch.equal(buffers[name], b) for name, b in model.named_buffers())
    wrapped: dict[str, Any] = {}

    class FakeDDP(torch.nn.Module):
        def __init__(self, module: torch.nn.Module, **kwargs: Any) -> None:
            super().__init__()
            wrapped.update(kwargs)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    make_trainer(cfg, model, 1, torch.device("cpu"), Precision(None, False, "fp32"), Processes(rank=0, world=2))
    assert wrapped == {"find_unused_parameters": True, "broadcast_buffers": False, "gradient_as_bucket_view": True}


def test_checkpoint_every_n_updates_writes_mid_epoch_checkpoints(gqa: Path, tmp_path: Path) -> None:
    # 6 updates per epoch: due at step 4; the epoch-end save at 6 restarts the count, so next at 10
    result = run(config("epochs=2", "train.checkpoint_every=4"), tmp_path / "run", gqa)
    records = [r for r in read_metrics(tmp_path / "run").records if r["event"] == "checkpoint"]
    assert result.status == "finished"
    assert [(r["step"], r["epoch"], r["batch"]) for r in records] == [(4, 1, 4), (10, 2, 4)]
    off = run(config("epochs=1", "train.checkpoint_every=off"), tmp_path / "off", gqa)
    assert off.status == "finished"
    assert not [r for r in read_metrics(tmp_path / "off").records if r["event"] == "checkpoint"]


def test_a_run_killed_after_a_periodic_checkpoint_resumes_to_the_same_weights(
    gqa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process stand-in for the SIGKILL test (tests/test_cli_train.py): the run dies right after its first
    mid-epoch checkpoint, with nothing saved on the way out."""
    cfg = config("epochs=1", "train.checkpoint_every=3")
    run(cfg, tmp_path / "whole", gqa)
    real_save = isubg.train._save

    def save_then_die(t: Any, *args: Any, **kwargs: Any) -> None:
        real_save(t, *args, **kwargs)
        if t.progress.batch > 0:  # a mid-epoch checkpoint
            raise _Killed

    monkeypatch.setattr(isubg.train, "_save", save_then_die)
    with pytest.raises(_Killed):
        run(cfg, tmp_path / "split", gqa)
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert state["progress"]["batch"] == 3 and state["progress"]["step"] == 3
    resumed = run(cfg, tmp_path / "split", gqa, resume=True)
    assert resumed.status == "finished" and resumed.steps == 6
    assert same(weights(tmp_path / "whole"), weights(tmp_path / "split"))


class _Killed(BaseException):
    """Ends a run without any handler saving on the way out, as SIGKILL does."""
