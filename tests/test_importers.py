"""`isubg import-checkpoint`: ban-vqa, X-VLM and MGHR state dicts in their exact key layouts, mapped onto isubg.

The foreign state dicts are built here by name and shape (the facts of each program's saved files): ban-vqa's
`model_epoch*.pth` {'epoch', 'model_state', 'optimizer_state'} with weight-normed Linears (scalar weight_g, weight_v),
X-VLM's {'model': ...} with `text_encoder.*`, `vision_encoder.*` (Microsoft Swin layout) and `text_decoder.*`, and
MGHR's {'model_state': ...} holding all three models. A small BAN forward written from ban-vqa's equations checks
that the imported cfrf branch computes what ban-vqa computes.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import FAST, TINY
from torch import nn
from transformers import SwinConfig, SwinModel, ViTConfig, ViTModel
from typer.testing import CliRunner

from isubg.batch import DataSpec
from isubg.checkpoint import initialise_from, load_checkpoint, vocab_checksum
from isubg.cli import app
from isubg.config import RunConfig, XvlmConfig
from isubg.data.loaders import open_split
from isubg.data.synthetic import random_batch
from isubg.errors import ConfigError, DataError
from isubg.evaluate import load_trained
from isubg.importers.ban import counter_slopes, roll_padding_row
from isubg.importers.convert import import_checkpoint, write_import
from isubg.importers.core import NO_REASON, apply_plan, read_foreign, weight_norm
from isubg.importers.xvlm import clip_plan, swin_plan, xvlm_plan
from isubg.models import build_model
from isubg.models.xvlm import XvlmBranch
from isubg.resolve import resolve_config

RUNNER = CliRunner()
GEN = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * 0.3


def wn_linear(state: dict[str, torch.Tensor], prefix: str, n_in: int, n_out: int) -> None:
    """A `weight_norm(nn.Linear(n_in, n_out), dim=None)` as saved: scalar weight_g, weight_v, bias."""
    state[f"{prefix}.weight_g"] = torch.tensor(1.0 + torch.rand((), generator=GEN).item())
    state[f"{prefix}.weight_v"] = rand(n_out, n_in)
    state[f"{prefix}.bias"] = rand(n_out)


def ban_state(ntoken: int = 20, hid: int = 8, gamma: int = 2, v_dim: int = 6, answers: int = 7) -> dict:
    """ban-vqa build_ban(task='vqa', op='') state_dict names and shapes."""
    s: dict[str, torch.Tensor] = {"w_emb.emb.weight": rand(ntoken + 1, 300)}
    s["w_emb.emb.weight"][ntoken] = 0  # ban-vqa's padding row is the last
    for name, shape in (("weight_ih_l0", (3 * hid, 300)), ("weight_hh_l0", (3 * hid, hid))):
        s[f"q_emb.rnn.{name}"] = rand(*shape)
    s["q_emb.rnn.bias_ih_l0"], s["q_emb.rnn.bias_hh_l0"] = rand(3 * hid), rand(3 * hid)
    s["v_att.logits.h_bias"] = rand(1, gamma, 1, 1)
    s["v_att.logits.h_mat_g"] = torch.tensor(2.0)
    s["v_att.logits.h_mat_v"] = rand(1, gamma, 1, 3 * hid)
    wn_linear(s, "v_att.logits.v_net.main.1", v_dim, 3 * hid)
    wn_linear(s, "v_att.logits.q_net.main.1", hid, 3 * hid)
    for g in range(gamma):
        wn_linear(s, f"b_net.{g}.v_net.main.1", v_dim, hid)
        wn_linear(s, f"b_net.{g}.q_net.main.1", hid, hid)
        wn_linear(s, f"q_prj.{g}.main.1", hid, hid)
        wn_linear(s, f"c_prj.{g}.main.0", 11, hid)
    wn_linear(s, "classifier.main.0", hid, 2 * hid)
    wn_linear(s, "classifier.main.3", 2 * hid, answers)
    for k in range(16):
        s[f"counter.f.{k}.weight"] = torch.cat([torch.zeros(1), torch.rand(16, generator=GEN) + 0.2])
    return s


def save_ban(path: Path, state: dict) -> Path:
    torch.save({"epoch": 3, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []}}, path)
    return path


# ------------------------------------------------------------------ ban-vqa's forward, from its equations


def _linear(s: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    v = s[f"{prefix}.weight_v"].double()
    return x @ (s[f"{prefix}.weight_g"].double() * v / v.norm()).T + s[f"{prefix}.bias"].double()


def _piecewise(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Zhang's monotone map with n + 1 weights: cumulative |w| normalised, linear inside each of n segments."""
    w = w.double().abs() / w.double().abs().sum()
    n = w.numel() - 1
    y = n * x
    idx = y.floor().long().clamp(max=n)
    return w.cumsum(0)[idx] + (y - y.floor()) * w[(idx + 1).clamp(max=n)]


def _counter(s: dict, boxes: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """Zhang et al.'s counter over the 10 most attended boxes (boxes (B, K, 4), att (B, K)) -> (B, 11)."""

    def f(k: int, x: torch.Tensor) -> torch.Tensor:
        return _piecewise(s[f"counter.f.{k}.weight"], x)

    top, idx = att.topk(10, dim=1)
    box = boxes.gather(1, idx[..., None].expand(-1, -1, 4))
    a = torch.sigmoid(top)
    lo = torch.maximum(box[:, :, None, :2], box[:, None, :, :2])
    hi = torch.minimum(box[:, :, None, 2:], box[:, None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = (box[..., 2:] - box[..., :2]).clamp(min=0).prod(-1)
    distance = 1 - inter / (area[:, :, None] + area[:, None, :] - inter + 1e-12)
    relevancy = a[:, :, None] * a[:, None, :]
    score = f(0, relevancy) * f(1, distance)
    dedup = f(3, relevancy) * f(4, distance)
    sim = f(2, 1 - (dedup[:, :, :, None] - dedup[:, :, None, :]).abs()).prod(1)
    sim = sim * f(2, 1 - (a[:, :, None] - a[:, None, :]).abs())
    rows = sim.sum(2)
    total = (score / (rows[:, :, None] * rows[:, None, :])).sum((1, 2)) + (f(0, a * a) / rows).sum(1)
    count = (total + 1e-20).sqrt().clamp(0, 10)
    one_hot = (1 - (count[:, None] - torch.arange(11, dtype=count.dtype)).abs()).clamp(min=0)
    conf = f(7, (f(5, a) - 0.5).abs().mean(1) + (f(6, distance) - 0.5).abs().mean((1, 2)))
    return one_hot * conf[:, None]


def ban_forward(s: dict, v: torch.Tensor, b: torch.Tensor, q: torch.Tensor, gamma: int) -> torch.Tensor:
    """ban-vqa BanModel.forward in eval mode (float64), from its state dict: v (B, K, D), b (B, K, 6), q (B, L)."""
    hid = s["q_emb.rnn.weight_hh_l0"].shape[1]
    gru = nn.GRU(300, hid, batch_first=True).double()
    gru.load_state_dict({k.removeprefix("q_emb.rnn."): t.double() for k, t in s.items() if k.startswith("q_emb.")})
    q_emb = gru(s["w_emb.emb.weight"].double()[q])[0]
    v = v.double()
    h_v = s["v_att.logits.h_mat_v"].double()
    h_mat = s["v_att.logits.h_mat_g"].double() * h_v / h_v.norm()
    v_att = F.relu(_linear(s, "v_att.logits.v_net.main.1", v))
    q_att = F.relu(_linear(s, "v_att.logits.q_net.main.1", q_emb))
    logits = torch.einsum("xhyk,bvk,bqk->bhvq", h_mat, v_att, q_att) + s["v_att.logits.h_bias"].double()
    att = torch.softmax(logits.flatten(2), 2).view_as(logits)
    for g in range(gamma):
        bv = F.relu(_linear(s, f"b_net.{g}.v_net.main.1", v))
        bq = F.relu(_linear(s, f"b_net.{g}.q_net.main.1", q_emb))
        pooled = torch.einsum("bvk,bvq,bqk->bk", bv, att[:, g], bq)
        count = _counter(s, b[..., :4].double(), logits[:, g].max(2).values)
        q_emb = q_emb + _linear(s, f"q_prj.{g}.main.1", pooled)[:, None]
        q_emb = q_emb + F.relu(_linear(s, f"c_prj.{g}.main.0", count))[:, None]
    return _linear(s, "classifier.main.3", F.relu(_linear(s, "classifier.main.0", q_emb.sum(1))))


# ------------------------------------------------------------------------------------------------ ban


def test_ban_import_computes_what_ban_vqa_computes(tmp_path: Path) -> None:
    state = ban_state()
    imported = import_checkpoint("ban", save_ban(tmp_path / "model_epoch3.pth", state))
    report = imported.report
    assert report.problems() == []
    counts = report.counts()
    assert counts["unused"][0] == 8  # counter maps f8..f15, which ban-vqa never reads
    assert counts["missing"][0] == counts["mismatched"][0] == 0
    assert report.source_summary() == {
        "tensors": len(state),
        "with_destination": len(state) - 8,
        "unused_with_reason": 8,
        "unexplained": 0,
    }
    assert report.extras == ["epoch", "optimizer_state"]
    spec = DataSpec(**imported.state["spec"])
    assert (spec.num_words, spec.num_answers, spec.feature_dim) == (21, 7, 6)
    written = tmp_path / "ban.pt"
    write_import(imported, written)
    state_back = load_checkpoint(written)
    model = load_trained(state_back, spec, state_back["vocab_sha256"], written)  # what `isubg eval` runs
    batch = random_batch(spec, 3, boxes=12, question_len=5, seed=1)  # unpadded: ban-vqa would read padding
    with torch.no_grad():
        ours = model(batch).branches["cfrf"].logits
    theirs = ban_forward(state, batch.features, batch.spatials, batch.q_tokens - 1, gamma=2)
    assert torch.allclose(ours.double(), theirs, atol=1e-4), (ours.double() - theirs).abs().max()
    assert torch.equal(ours.argmax(1), theirs.argmax(1))


def test_ban_reshapes() -> None:
    linear = nn.utils.weight_norm(nn.Linear(5, 4), dim=None)
    assert torch.allclose(weight_norm(linear.weight_g, linear.weight_v), linear.weight, atol=1e-6)
    g, v = torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.randn(4, 5, generator=GEN)  # weight_norm(dim=0)
    assert torch.allclose(weight_norm(g, v), g * v / v.norm(dim=1, keepdim=True), atol=1e-6)
    table = torch.arange(4.0)[:, None].expand(4, 3)
    assert roll_padding_row(table)[:, 0].tolist() == [3.0, 0.0, 1.0, 2.0]  # the padding row (last) becomes row 0
    assert counter_slopes(torch.tensor([0.0, 1.0, 2.0])).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="not the fixed 0"):
        counter_slopes(torch.tensor([0.5, 1.0]))


def test_strict_fails_on_missing_unexplained_and_mismatched_tensors(tmp_path: Path) -> None:
    state = ban_state()
    del state["classifier.main.3.bias"]
    state["mystery.weight"] = torch.zeros(2)
    path = save_ban(tmp_path / "broken.pth", state)
    lenient = import_checkpoint("ban", path).report
    problems = lenient.problems()
    assert any("missing: branches.cfrf.classifier.net.3.bias" in p and "classifier.main.3.bias" in p for p in problems)
    assert any(e.source == "mystery.weight" and e.note == NO_REASON for e in lenient.by_status("unused"))
    with pytest.raises(DataError, match=r"--strict: .*mystery\.weight"):
        import_checkpoint("ban", path, strict=True)
    # A shape disagreement names both sides: the answers come from the classifier's weight (9), its bias has 7.
    bad = ban_state()
    bad["classifier.main.3.weight_v"] = rand(9, 16)
    report = import_checkpoint("ban", save_ban(tmp_path / "wide.pth", bad)).report
    wrong = report.by_status("mismatched")
    assert [(e.source, e.source_shape, e.target, e.target_shape) for e in wrong] == [
        ("classifier.main.3.bias", (7,), "branches.cfrf.classifier.net.3.bias", (9,))
    ]
    assert (
        report.details()[-1]
        == "mismatched: classifier.main.3.bias [7] vs isubg branches.cfrf.classifier.net.3.bias [9]"
    )
    assert any(p.startswith("shape: classifier.main.3.bias [7] -> branches.cfrf.classifier.net.3.bias [9]")
               for p in report.problems())  # fmt: skip


class Pickled:
    """A custom class: saving an instance pickles a reference to code."""

    def __init__(self) -> None:
        self.weights = torch.zeros(2)


def test_pickled_code_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"model_state": ban_state(), "extra": Pickled()}, path)
    with pytest.raises(DataError, match=r"pickled Python objects .*Pickled.*never runs pickled code"):
        read_foreign(path, "ban")
    result = RUNNER.invoke(app, ["import-checkpoint", "ban", str(path), "-o", str(tmp_path / "out.pt")])
    assert result.exit_code == 2 and "pickled Python objects" in result.output
    assert not (tmp_path / "out.pt").exists()


def test_not_a_ban_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"model_state": {"foo.weight": torch.zeros(1)}}, path)
    with pytest.raises(DataError, match=r"not a ban-vqa VQA checkpoint: its model_state lacks w_emb\.emb\.weight"):
        import_checkpoint("ban", path)


def _demo_sized_ban(folder: Path) -> dict:
    spec = open_split(RunConfig(), folder, "train", None).spec()
    return ban_state(ntoken=spec.num_words - 1, hid=16, v_dim=spec.feature_dim, answers=spec.num_answers)


def test_cli_import_then_train_and_eval_start_from_it(tiny_demo: Path, tmp_path: Path) -> None:
    data = tiny_demo / "processed" / "gqa"
    source = save_ban(tmp_path / "model_epoch9.pth", _demo_sized_ban(data))
    out = tmp_path / "ban.pt"
    result = RUNNER.invoke(app, ["import-checkpoint", "ban", str(source), "-o", str(out), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert re.search(r"mapped\s+│\s+16\s+│", result.output) and "counter maps f8..f15" in result.output
    assert "parity switch model.cfrf.box_input=features" in result.output
    written = load_checkpoint(out)
    assert written["imported"]["kind"] == "ban" and written["vocab_sha256"] is not None
    settings = out.with_suffix(".yaml").read_text()
    assert "box_input: features" in settings and "AOA_layers: 0" in settings

    evaluated = RUNNER.invoke(app, ["eval", str(out), "--data", str(data), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "cfrf" in json.loads(evaluated.output)["accuracy"]

    run = tmp_path / "run"
    fast = [a for s in FAST if not s.startswith(("num_hid", "AOA_layers")) for a in ("--set", s)]
    trained = RUNNER.invoke(app, ["train", "--preset", "demo", "--config", str(out.with_suffix(".yaml")), "--data",
                                  str(tiny_demo), "--init-from", str(out), *fast, "--max-steps", "1",
                                  "--output", str(run)])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    log = (run / "train.log").read_text()
    assert f"initialised all {len(written['model'])} model tensors from {out} (imported from ban {source})" in log


def test_init_from_refuses_weights_that_do_not_fit(tiny_demo: Path, tmp_path: Path) -> None:
    data = tiny_demo / "processed" / "gqa"
    out = tmp_path / "ban.pt"
    write_import(import_checkpoint("ban", save_ban(tmp_path / "m.pth", _demo_sized_ban(data)), data_dir=data), out)
    cfg = RunConfig.model_validate(load_checkpoint(out)["config"])
    cfg.model.cfrf.num_hid = 24
    model = build_model(cfg, open_split(cfg, data, "train", None).spec())
    with pytest.raises(DataError, match=r"branches.cfrf.gru.weight_hh_l0 \[48, 16\] in the file vs \[72, 24\]"):
        initialise_from(model, out, vocab_checksum(data))
    with pytest.raises(DataError, match="another dictionary/answer list"):
        initialise_from(model, out, "another vocabulary")


# ----------------------------------------------------------------------------------------------- X-VLM


def bert_layer(s: dict, prefix: str, hid: int, ffn: int, cross_width: int | None) -> None:
    for part in ("attention", "crossattention") if cross_width else ("attention",):
        kv = cross_width if part == "crossattention" else hid
        for name, n_in in (("self.query", hid), ("self.key", kv), ("self.value", kv), ("output.dense", hid)):
            s[f"{prefix}.{part}.{name}.weight"], s[f"{prefix}.{part}.{name}.bias"] = rand(hid, n_in), rand(hid)
        s[f"{prefix}.{part}.output.LayerNorm.weight"] = 1 + rand(hid)
        s[f"{prefix}.{part}.output.LayerNorm.bias"] = rand(hid)
    s[f"{prefix}.intermediate.dense.weight"], s[f"{prefix}.intermediate.dense.bias"] = rand(ffn, hid), rand(ffn)
    s[f"{prefix}.output.dense.weight"], s[f"{prefix}.output.dense.bias"] = rand(hid, ffn), rand(hid)
    s[f"{prefix}.output.LayerNorm.weight"], s[f"{prefix}.output.LayerNorm.bias"] = 1 + rand(hid), rand(hid)


def xvlm_text_state(hid: int = 64, ffn: int = 32, vocab: int = 30, cross_width: int = 24) -> dict:
    """X-VLM VQA text encoder (1 text + 1 fusion layer) and answer decoder names, without a vision encoder."""
    s: dict[str, torch.Tensor] = {
        "text_encoder.embeddings.position_ids": torch.arange(512)[None],
        "text_encoder.embeddings.word_embeddings.weight": rand(vocab, hid),
        "text_encoder.embeddings.position_embeddings.weight": rand(512, hid),
        "text_encoder.embeddings.token_type_embeddings.weight": rand(2, hid),
        "text_encoder.embeddings.LayerNorm.weight": 1 + rand(hid),
        "text_encoder.embeddings.LayerNorm.bias": rand(hid),
        "text_decoder.cls.predictions.bias": rand(vocab),
        "text_decoder.bert.embeddings.word_embeddings.weight": rand(vocab, hid),
    }
    bert_layer(s, "text_encoder.encoder.layer.0", hid, ffn, None)
    bert_layer(s, "text_encoder.encoder.layer.1", hid, ffn, cross_width)
    bert_layer(s, "text_decoder.bert.encoder.layer.0", hid, ffn, hid)
    return s


def test_xvlm_text_and_fusion_layers_map_with_the_vision_width(tmp_path: Path) -> None:
    state = xvlm_text_state()
    path = tmp_path / "xvlm.pth"
    torch.save({"model": state, "config": {"image_res": 384}}, path)
    imported = import_checkpoint("xvlm", path)
    report = imported.report
    x = imported.config.model.xvlm
    assert (x.hidden_size, x.num_heads, x.num_text_layers, x.num_cross_layers, x.cross_width) == (64, 1, 1, 1, 24)
    # The word table needs model.xvlm.text_encoder (BERT's vocabulary); without it the shapes disagree, named.
    assert [(e.source, e.source_shape) for e in report.by_status("mismatched")] == [
        ("text_encoder.embeddings.word_embeddings.weight", (30, 64))
    ]
    unused = {e.source: e.note for e in report.by_status("unused")}
    assert all("answer decoder" in unused[k] for k in state if k.startswith("text_decoder."))
    assert "recomputed" in unused["text_encoder.embeddings.position_ids"]
    new = {e.target for e in report.by_status("new")}
    isubg_only = ("branches.xvlm.head.", "branches.xvlm.vision.")  # the answer head; region tokens (no vision here)
    assert new == {"adapted_w"} | {k for k in imported.state["model"] if k.startswith(isubg_only)}
    assert report.source_summary()["unexplained"] == 0
    model = build_model(imported.config, DataSpec(**imported.state["spec"]))
    model.load_state_dict(imported.state["model"])
    branch = model.branches["xvlm"]
    assert isinstance(branch, XvlmBranch)
    key = branch.cross_layers[0].crossattention.self.key
    assert torch.equal(key.weight, state["text_encoder.encoder.layer.1.crossattention.self.key.weight"])
    branch.eval()
    ids, mask = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool)
    states = branch.fuse(ids, mask, torch.randn(1, 5, 24), torch.ones(1, 5, dtype=torch.bool))
    assert states.shape == (1, 3, 64) and torch.isfinite(states).all()


def swin_state(embed: int = 8, depths: tuple[int, ...] = (2, 2), heads: tuple[int, ...] = (1, 2), window: int = 2):
    """Microsoft/X-VLM Swin names and shapes under vision_encoder."""
    p = "vision_encoder."
    s = {f"{p}patch_embed.proj.weight": rand(embed, 3, 4, 4), f"{p}patch_embed.proj.bias": rand(embed)}
    s[f"{p}patch_embed.norm.weight"], s[f"{p}patch_embed.norm.bias"] = 1 + rand(embed), rand(embed)
    dim = embed
    for stage, (depth, h) in enumerate(zip(depths, heads, strict=True)):
        for b in range(depth):
            q = f"{p}layers.{stage}.blocks.{b}."
            s[f"{q}norm1.weight"], s[f"{q}norm1.bias"] = 1 + rand(dim), rand(dim)
            s[f"{q}attn.relative_position_bias_table"] = rand((2 * window - 1) ** 2, h)
            s[f"{q}attn.relative_position_index"] = torch.zeros(window**2, window**2, dtype=torch.long)
            s[f"{q}attn.qkv.weight"], s[f"{q}attn.qkv.bias"] = rand(3 * dim, dim), rand(3 * dim)
            s[f"{q}attn.proj.weight"], s[f"{q}attn.proj.bias"] = rand(dim, dim), rand(dim)
            s[f"{q}norm2.weight"], s[f"{q}norm2.bias"] = 1 + rand(dim), rand(dim)
            s[f"{q}mlp.fc1.weight"], s[f"{q}mlp.fc1.bias"] = rand(4 * dim, dim), rand(4 * dim)
            s[f"{q}mlp.fc2.weight"], s[f"{q}mlp.fc2.bias"] = rand(dim, 4 * dim), rand(dim)
        if stage < len(depths) - 1:
            m = f"{p}layers.{stage}.downsample."
            s[f"{m}reduction.weight"] = rand(2 * dim, 4 * dim)
            s[f"{m}norm.weight"], s[f"{m}norm.bias"] = 1 + rand(4 * dim), rand(4 * dim)
            dim *= 2
    s[f"{p}norm.weight"], s[f"{p}norm.bias"] = 1 + rand(dim), rand(dim)
    return s


def test_swin_weights_map_into_transformers_swin_with_qkv_split() -> None:
    state = swin_state()
    plan, sizes = swin_plan(state, "vision_encoder.", "")
    assert sizes == {"embed_dim": 8, "depths": [2, 2], "num_heads": [1, 2], "window_size": 2, "image_res": 64}
    model = SwinModel(SwinConfig(image_size=32, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=2))
    report = apply_plan(model, state, plan, Path("swin.pth"), [])
    assert report.problems() == []
    assert report.source_summary()["unexplained"] == 0
    assert {e.note for e in report.by_status("unused")} == {"buffer transformers' SwinModel computes itself"}
    own = model.state_dict()
    qkv = state["vision_encoder.layers.1.blocks.1.attn.qkv.weight"]
    names = [n for n in own if n.startswith("encoder.layers.1.blocks.1.attention.") and n.endswith("weight")]
    projections = [own[n] for n in names if re.search(r"(q_proj|k_proj|v_proj|query|key|value)\.weight$", n)]
    found = {tuple(t.flatten()[:3].tolist()) for t in projections}
    assert found == {tuple(part.flatten()[:3].tolist()) for part in qkv.chunk(3)}
    assert torch.equal(own["layernorm.weight"], state["vision_encoder.norm.weight"])


# ------------------------------------------------------------------------------------------------- MGHR


def mghr_state(ntoken: int = 20, hid: int = 64, gamma: int = 2, answers: int = 7) -> dict:
    """MGHR CFRF_Model names: X-VLM and ISubGVQA parts, the fine-grained parts and adapted_w."""
    s = {f"XVLM_model.{k}": v for k, v in xvlm_text_state(hid=32, cross_width=32).items()}
    s["ISubGVQA_model.question_encoder.layers.0.linear1.weight"] = rand(8, 4)
    for table in ("w_emb", "sw_emb", "ew_emb"):
        s[f"{table}.emb.weight"] = rand(ntoken + 1, 300)
        s[f"{table}.emb_.weight"] = rand(ntoken + 1, 300)
    for gru in ("q_emb", "s_emb"):
        s[f"{gru}.rnn.weight_ih_l0"], s[f"{gru}.rnn.weight_hh_l0"] = rand(3 * hid, 600), rand(3 * hid, hid)
        s[f"{gru}.rnn.bias_ih_l0"], s[f"{gru}.rnn.bias_hh_l0"] = rand(3 * hid), rand(3 * hid)
    for joint, width in (("qe_joint", 600), ("vs_joint", 2048), ("vq_joint", hid)):
        glimpses = gamma if joint == "vq_joint" else 1
        s[f"{joint}.v_att.logits.h_bias"] = rand(1, glimpses, 1, 1)
        s[f"{joint}.v_att.logits.h_mat_g"] = torch.tensor(1.5)
        s[f"{joint}.v_att.logits.h_mat_v"] = rand(1, glimpses, 1, 3 * hid)
        wn_linear(s, f"{joint}.v_att.logits.v_net.main.1", hid, 3 * hid)
        wn_linear(s, f"{joint}.v_att.logits.q_net.main.1", width, 3 * hid)
        for g in range(gamma):
            wn_linear(s, f"{joint}.b_net.{g}.v_net.main.1", hid, hid)
            wn_linear(s, f"{joint}.b_net.{g}.q_net.main.1", width, hid)
            wn_linear(s, f"{joint}.q_prj.{g}.main.1", hid, hid)
    for i in range(2):
        s[f"attn_AOA_fine.{i}.to_q.weight"] = rand(hid, hid)
        s[f"attn_AOA_fine.{i}.to_kv.weight"] = rand(2 * hid, hid)
        s[f"attn_AOA_fine.{i}.aoa.0.weight"], s[f"attn_AOA_fine.{i}.aoa.0.bias"] = rand(2 * hid, 2 * hid), rand(2 * hid)
    wn_linear(s, "classifier.main.0", hid, 2 * hid)
    wn_linear(s, "classifier.main.3", 2 * hid, answers)
    s["adapted_w"] = torch.arange(3.0)[:, None].expand(3, answers).clone()  # rows: ISubGVQA 0, X-VLM 1, fine 2
    return s


def test_mghr_parts_map_where_their_names_do(tmp_path: Path) -> None:
    path = tmp_path / "model_epoch_best.pth"
    source = mghr_state()
    torch.save({"epoch": 5, "model_state": {f"module.{k}": v for k, v in source.items()}}, path)
    imported = import_checkpoint("mghr", path, sets=["general_hidden_dim=16", "mgat_layers=1"])
    report = imported.report
    cfg = imported.config
    assert cfg.model.branches == ["cfrf", "isubg", "xvlm"] and cfg.model.cfrf.AOA_layers == 2
    assert cfg.model.cfrf.aoa_norm == "none" and cfg.data.tfidf and cfg.model.xvlm.cross_width == 32
    weights = imported.state["model"]["adapted_w"]
    assert weights[:, 0].tolist() == [2.0, 0.0, 1.0]  # isubg's rows: cfrf, isubg, xvlm
    assert torch.equal(
        imported.state["model"]["branches.cfrf.aoa.attn.1.aoa.bias"], source["attn_AOA_fine.1.aoa.0.bias"]
    )
    unused = {e.source: e.note for e in report.by_status("unused")}
    assert "ISubGVQA" in unused["ISubGVQA_model.question_encoder.layers.0.linear1.weight"]
    assert "stat-word" in unused["sw_emb.emb.weight"] and "CFR entity" in unused["vs_joint.v_att.logits.h_bias"]
    assert report.source_summary()["unexplained"] == 0
    filled = {e.target for e in report.entries if e.status in ("mapped", "reshaped")}
    assert {"branches.cfrf.gru.weight_ih_l0", "branches.cfrf.ban.attention.h_mat", "branches.xvlm.cross_layers.0."
            "crossattention.self.key.weight", "branches.cfrf.classifier.net.3.weight"} <= filled  # fmt: skip
    assert report.by_status("missing") == []
    assert [e.target for e in report.by_status("mismatched")] == ["branches.xvlm.embeddings.word_embeddings.weight"]
    isubg_only = ("branches.isubg.", "branches.xvlm.head.", "branches.xvlm.vision.", "branches.cfrf.entity_fusion.",
                  "branches.cfrf.stat_fusion.", "branches.cfrf.box_proj.")  # fmt: skip
    assert all(e.target.startswith(isubg_only) for e in report.by_status("new"))
    assert math.isclose(float(weights.sum()), 3 * 7.0)


# ------------------------------------------------------------------------------------ settings the imports set


def _model(*sets: str) -> nn.Module:
    cfg = resolve_config("demo", sets=[*TINY, "data.tfidf=false", *sets]).config
    return build_model(cfg, DataSpec(num_words=30, num_answers=7, num_graph_tokens=20, feature_dim=10))


def test_box_input_features_feeds_ban_the_raw_boxes() -> None:
    projected = _model("model.branches=[cfrf]", "AOA_layers=0", "use_counter=false").branches["cfrf"]
    raw = _model(
        "model.branches=[cfrf]", "AOA_layers=0", "use_counter=false", "model.cfrf.box_input=features"
    ).branches["cfrf"]
    assert projected.box_proj is not None and projected.ban.attention.y_net[1].in_features == 64
    assert raw.box_proj is None and raw.ban.attention.y_net[1].in_features == 10  # the box feature width
    assert raw.stat_fusion is not None and raw.stat_fusion.prj[1].out_features == 10
    # Without the counter, spatials reach BAN only through the projection: raw features never carry them.
    batch = random_batch(DataSpec(num_words=30, num_answers=7, num_graph_tokens=20, feature_dim=10), 2, boxes=6)
    moved = copy.copy(batch)
    moved.spatials = batch.spatials.flip(1)
    for branch, changes in ((projected, True), (raw, False)):
        branch.eval()
        assert branch.ban.counter is None
        assert torch.equal(branch(batch).logits, branch(moved).logits) is not changes
    with pytest.raises(ConfigError, match="box_input='features' feeds BAN the raw box features"):
        resolve_config("demo", sets=[*TINY, "model.cfrf.box_input=features", "AOA_layers=2"])


def test_cross_width_sets_the_width_cross_attention_reads() -> None:
    default = _model("model.branches=[xvlm]").branches["xvlm"]
    wide = _model("model.branches=[xvlm]", "model.xvlm.cross_width=24").branches["xvlm"]
    assert default.cross_layers[0].crossattention.self.key.in_features == 32  # the text width
    assert wide.cross_layers[0].crossattention.self.key.in_features == 24
    assert wide.cross_layers[0].crossattention.self.value.in_features == 24
    assert wide.vision.proj.out_features == 24 and default.vision.proj.out_features == 32
    batch = random_batch(DataSpec(num_words=30, num_answers=7, num_graph_tokens=20, feature_dim=10), 2, boxes=6)
    assert wide(batch).logits.shape == (2, 7)


def test_swin_tokens_go_unprojected_to_cross_attention_at_the_encoder_width() -> None:
    sizes = {"embed_dim": 8, "depths": [2, 2], "num_heads": [1, 2], "window_size": 2}
    xcfg = XvlmConfig(vision="swin", image_res=32, hidden_size=16, num_heads=2, num_text_layers=1,
                      num_cross_layers=1, intermediate_size=32, cross_width=16)  # fmt: skip
    spec = DataSpec(num_words=30, num_answers=7, num_graph_tokens=20, feature_dim=10)
    branch = XvlmBranch(xcfg, spec, vision_sizes=sizes).eval()
    assert isinstance(branch.vision.proj, nn.Identity) and isinstance(branch.vision.norm, nn.Identity)
    plan, _ = swin_plan(swin_state(), "vision_encoder.", "vision.backbone.")
    assert apply_plan(branch, swin_state(), plan, Path("x.pth"), []).by_status("mismatched") == []
    images = torch.randn(2, 3, 32, 32, generator=GEN)
    tokens, mask = branch.vision(images)
    out = branch.vision.backbone(pixel_values=images)
    assert tokens.shape == (2, 1 + 16, 16) and mask.all()  # 32 px: 8 x 8 patches, merged to 4 x 4
    assert torch.equal(tokens[:, 1:], out.last_hidden_state) and torch.equal(tokens[:, 0], out.pooler_output)
    assert branch.cross_layers[0].crossattention.self.key.in_features == 16


def clip_state(d: int = 8, p: str = "vision_encoder.") -> dict:
    """X-VLM CLIPVisionTransformer names and shapes (16 px patches, 32 px images: 4 patches + [CLS]; one layer)."""
    state = {
        f"{p}class_embedding": rand(d),
        f"{p}pos_embed.weight": rand(5, d),
        f"{p}patch_embed.weight": rand(d, 3, 16, 16),
    }
    for norm in ("pre_layrnorm", "post_layernorm", "encoder.layers.0.layer_norm1", "encoder.layers.0.layer_norm2"):
        state[f"{p}{norm}.weight"], state[f"{p}{norm}.bias"] = 1 + rand(d), rand(d)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        state[f"{p}encoder.layers.0.self_attn.{proj}.weight"] = rand(d, d)
        state[f"{p}encoder.layers.0.self_attn.{proj}.bias"] = rand(d)
    state[f"{p}encoder.layers.0.mlp.fc1.weight"], state[f"{p}encoder.layers.0.mlp.fc1.bias"] = rand(16, d), rand(16)
    state[f"{p}encoder.layers.0.mlp.fc2.weight"], state[f"{p}encoder.layers.0.mlp.fc2.bias"] = rand(d, 16), rand(d)
    return state


def test_clip_vit_maps_into_transformers_vit_where_the_layouts_agree() -> None:
    d, p = 8, "vision_encoder."
    state = clip_state(d, p)
    model = ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=d, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=16), add_pooling_layer=False)  # fmt: skip
    report = apply_plan(model, state, clip_plan(state, p, ""), Path("clip.pth"), [])
    assert report.problems() == [] and report.by_status("missing") == []
    assert {e.source for e in report.by_status("unused")} == {f"{p}pre_layrnorm.weight", f"{p}pre_layrnorm.bias"}
    own = model.state_dict()
    assert torch.equal(own["embeddings.cls_token"].flatten(), state[f"{p}class_embedding"])
    assert torch.equal(own["embeddings.position_embeddings"][0], state[f"{p}pos_embed.weight"])
    assert not own["embeddings.patch_embeddings.projection.bias"].any()
    sets = xvlm_plan({**xvlm_text_state(), **state}).sets
    assert "model.xvlm.vision=vit" in sets and "model.xvlm.image_res=32" in sets  # 16 px patches, 2 x 2 + [CLS]
    assert "model.xvlm.vit_layout=clip" in xvlm_plan({**xvlm_text_state(), **state}).switches


def _clip_forward(s: dict, p: str, images: torch.Tensor, heads: int) -> torch.Tensor:
    """X-VLM's CLIP-ViT with one layer, from its equations: patches, [CLS], positions, pre-LN, layer, post-LN."""

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], s[f"{p}{name}.weight"], s[f"{p}{name}.bias"], eps=1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, s[f"{p}{name}.weight"], s[f"{p}{name}.bias"])

    patches = F.conv2d(images, s[f"{p}patch_embed.weight"], stride=16).flatten(2).transpose(1, 2)
    cls = s[f"{p}class_embedding"].expand(images.shape[0], 1, -1)
    x = norm(torch.cat([cls, patches], 1) + s[f"{p}pos_embed.weight"], "pre_layrnorm")
    layer = "encoder.layers.0."
    h = norm(x, f"{layer}layer_norm1")
    q, k, v = (linear(h, f"{layer}self_attn.{n}_proj").unflatten(-1, (heads, -1)).transpose(1, 2) for n in "qkv")
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    x = x + linear(attended, f"{layer}self_attn.out_proj")
    h = linear(norm(x, f"{layer}layer_norm2"), f"{layer}mlp.fc1")
    x = x + linear(h * torch.sigmoid(1.702 * h), f"{layer}mlp.fc2")  # quick-GELU
    return norm(x, "post_layernorm")


def test_vit_layout_clip_computes_what_x_vlm_clip_vit_computes() -> None:
    d, p = 8, "vision_encoder."
    state = clip_state(d, p)
    sizes = {"vision_width": d, "patch_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 16}  # fmt: skip
    spec = DataSpec(num_words=30, num_answers=7, num_graph_tokens=20, feature_dim=10)
    branches = {
        layout: XvlmBranch(
            XvlmConfig(
                vision="vit",
                vit_layout=layout,
                image_res=32,
                hidden_size=16,
                num_heads=2,
                num_text_layers=1,
                num_cross_layers=1,
                intermediate_size=32,
                cross_width=d,
            ),
            spec,
            vision_sizes=sizes,
        ).eval()
        for layout in ("vit", "clip")
    }
    plain, clip = branches["vit"], branches["clip"]
    assert plain.vision.pre_norm is None and plain.vision.backbone.config.hidden_act == "gelu"
    assert clip.vision.pre_norm is not None and clip.vision.backbone.config.hidden_act == "quick_gelu"
    report = apply_plan(clip, state, clip_plan(state, p, "vision.backbone.", "vision.pre_norm"), Path("c.pth"), [])
    assert report.by_status("unused") == [] and report.by_status("mismatched") == []
    images = torch.randn(2, 3, 32, 32, generator=GEN)
    with torch.no_grad():
        tokens, _ = clip.vision(images)
        expected = _clip_forward(state, p, images, heads=2)
        apply_plan(plain, state, clip_plan(state, p, "vision.backbone."), Path("c.pth"), [])
        assert not torch.allclose(plain.vision(images)[0], expected, atol=1e-3)  # transformers' ViT layout differs
    assert torch.allclose(tokens, expected, atol=1e-5), (tokens - expected).abs().max()
