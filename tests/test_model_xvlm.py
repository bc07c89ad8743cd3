"""The X-VLM branch: shapes, masking, batch independence, bidirectional text, memory-efficient path, every
hyperparameter's effect, the candidate loss, the X-VLM checkpoint loader and the image encoders."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from processed import question_records
from torch import nn
from torch_geometric.data import Batch as GraphBatch
from torch_geometric.data import Data

from isubg.batch import Batch, DataSpec
from isubg.config import RunConfig
from isubg.errors import ConfigError, DataError
from isubg.models import xvlm
from isubg.models.common import parameter_count
from isubg.models.xvlm import (
    ImageEncoder,
    XvlmBranch,
    build,
    load_xvlm_checkpoint,
    pre_question,
    vision_config,
)
from isubg.models.xvlm_config import apply_xvlm_settings, image_input

NUM_WORDS, NUM_ANSWERS, FEATURE_DIM, QUESTION_LEN = 20, 7, 8, 8
SPEC = DataSpec(num_words=NUM_WORDS, num_answers=NUM_ANSWERS, num_graph_tokens=9, feature_dim=FEATURE_DIM)
WORDS = ["what", "color", "is", "the", "car", "left", "of", "red", "ball", "how", "many"]
TINY = {"hidden_size": 16, "num_heads": 2, "num_text_layers": 1, "num_cross_layers": 1, "intermediate_size": 32}


# --------------------------------------------------------------------------------------------------
# Helpers


def _cfg(memory_efficient: bool = False, **xvlm_settings: Any) -> RunConfig:
    return RunConfig.model_validate(
        {"model": {"xvlm": {**TINY, **xvlm_settings}}, "memory": {"memory_efficient_attention": memory_efficient}}
    )


def _model(seed: int = 0, memory_efficient: bool = False, **xvlm_settings: Any) -> XvlmBranch:
    torch.manual_seed(seed)
    return build(_cfg(memory_efficient, **xvlm_settings), SPEC)


def _sample(seed: int, boxes: int, q_len: int, nodes: int) -> dict[str, Any]:
    """One question's unpadded data (boxes, words, a scene graph with `nodes` nodes)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, NUM_WORDS, (q_len,), generator=g)
    edges = torch.randint(0, nodes, (2, 2 * nodes), generator=g)
    graph = Data(
        x=torch.randint(1, 9, (nodes, 4), generator=g),
        edge_index=edges,
        edge_attr=torch.randint(1, 9, (edges.shape[1],), generator=g),
        edge_reverse=torch.zeros(edges.shape[1], dtype=torch.bool),
        box=torch.rand(nodes, 4, generator=g),
    )
    return {
        "features": torch.randn(boxes, FEATURE_DIM, generator=g),
        "spatials": torch.rand(boxes, 6, generator=g),
        "tokens": tokens,
        "question": " ".join(WORDS[int(t) % len(WORDS)] for t in tokens).capitalize() + "?",
        "graph": graph,
        "target": (torch.rand(NUM_ANSWERS, generator=g) > 0.7).float(),
    }


def _collate(samples: list[dict[str, Any]]) -> Batch:
    """Pad samples into a Batch the way the data loader does (zeros past each length, masks True on real rows)."""
    b, k = len(samples), max(s["features"].shape[0] for s in samples)
    features, spatials = torch.zeros(b, k, FEATURE_DIM), torch.zeros(b, k, 6)
    box_mask = torch.zeros(b, k, dtype=torch.bool)
    q_tokens = torch.zeros(b, QUESTION_LEN, dtype=torch.long)
    for i, s in enumerate(samples):
        n, q = s["features"].shape[0], min(len(s["tokens"]), QUESTION_LEN)
        features[i, :n], spatials[i, :n], box_mask[i, :n] = s["features"], s["spatials"], True
        q_tokens[i, :q] = s["tokens"][:q]
    return Batch(
        question_ids=[str(i) for i in range(b)],
        image_ids=[str(i) for i in range(b)],
        questions=[s["question"] for s in samples],
        q_tokens=q_tokens,
        q_mask=q_tokens > 0,
        entity_mask=torch.zeros(b, QUESTION_LEN, dtype=torch.bool),
        features=features,
        spatials=spatials,
        box_mask=box_mask,
        stat_tokens=torch.ones(b, 3, dtype=torch.long),
        stat_mask=torch.ones(b, 3, dtype=torch.bool),
        graphs=GraphBatch.from_data_list([s["graph"] for s in samples]),
        targets=torch.stack([s["target"] for s in samples]),
        question_types=["query"] * b,
    )


SAMPLES = [_sample(1, boxes=5, q_len=3, nodes=2), _sample(2, boxes=2, q_len=7, nodes=6), _sample(3, 9, 5, 4)]


def _batch() -> Batch:
    return _collate(SAMPLES)


@pytest.fixture
def vocab_dir(tmp_path: Path) -> Path:
    """A tiny local BERT tokenizer folder (vocab.txt only)."""
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return folder


def _no_dropout(model: nn.Module) -> None:
    """Dropout p=0 everywhere (BERT attention reads its Dropout module's p), so train-mode runs are deterministic."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# --------------------------------------------------------------------------------------------------
# Forward, masking, batch independence


def test_forward_shapes_and_finite() -> None:
    model = _model().eval()
    out = model(_batch())
    assert out.logits.shape == (3, NUM_ANSWERS) and out.node_mask is None
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("hidden, heads", [(12, 3), (8, 8), (24, 1)])
def test_any_width_and_head_count_works(hidden: int, heads: int) -> None:
    model = _model(hidden_size=hidden, num_heads=heads, intermediate_size=5).eval()
    assert model(_batch()).logits.shape == (3, NUM_ANSWERS)


@pytest.mark.parametrize("use_tokenizer", [False, True])
def test_sample_output_does_not_depend_on_its_batch(use_tokenizer: bool, vocab_dir: Path) -> None:
    torch.manual_seed(0)
    extra = {"text_encoder": str(vocab_dir)} if use_tokenizer else {}
    model = build(_cfg(**extra), SPEC).eval()
    together = model(_batch()).logits
    for i, sample in enumerate(SAMPLES):
        alone = model(_collate([sample])).logits
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=0)


def test_padding_content_is_ignored() -> None:
    model = _model().eval()
    batch = _batch()
    garbage = _batch()
    garbage.features[~garbage.box_mask] = 99.0
    garbage.spatials[~garbage.box_mask] = -5.0
    garbage.q_tokens[~garbage.q_mask] = 5  # word ids past a question's length must be ignored too
    torch.testing.assert_close(model(garbage).logits, model(batch).logits, atol=1e-6, rtol=0)


def test_text_padding_positions_are_masked() -> None:
    model = _model().eval()
    ids, mask = model.text_inputs(_batch())
    assert mask.sum(1).tolist() == [1 + 3 + 1, 1 + 7 + 1, 1 + 5 + 1]  # [CLS] words [SEP]
    assert (ids[~mask] == 0).all() and (ids[:, 0] == NUM_WORDS).all()


def test_self_attention_is_bidirectional() -> None:
    """An early token's state must change when a later token changes (a causal mask would hide it)."""
    model = _model(num_cross_layers=1, num_text_layers=2).eval()
    batch = _batch()
    changed = _batch()
    changed.q_tokens[1, 6] = 2 if batch.q_tokens[1, 6] != 2 else 3  # the last of sample 1's 7 words
    before, _ = model.encode(batch)
    after, _ = model.encode(changed)
    assert not torch.allclose(before[1, 1], after[1, 1], atol=1e-6)  # position 1 = first word
    torch.testing.assert_close(before[0], after[0])  # other samples untouched


def test_real_demo_batch_trains(tmp_path: Path) -> None:
    from isubg.data.dataset import VQADataset, collate
    from isubg.data.embedded import build_demo

    demo = build_demo(tmp_path, size="tiny", seed=0)
    data = VQADataset(demo.processed("gqa"), "train", question_len=12, max_boxes=36, num_stat_word=10)
    batch = collate([data[i] for i in range(6)], data.num_answers)
    torch.manual_seed(0)
    model = build(_cfg(), data.spec())
    out = model(batch)
    assert batch.targets is not None and out.logits.shape == (6, data.num_answers)
    loss = nn.functional.binary_cross_entropy_with_logits(out.logits, batch.targets)
    (loss + model.candidate_loss(out.logits, batch.targets)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Gradients and the memory-efficient path


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_backward_reaches_every_parameter(memory_efficient: bool) -> None:
    model = _model(memory_efficient=memory_efficient).train()
    batch = _batch()
    out = model(batch)
    assert batch.targets is not None
    loss = nn.functional.binary_cross_entropy_with_logits(out.logits, batch.targets)
    (loss + model.candidate_loss(out.logits, batch.targets)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_memory_efficient_path_matches_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = _model(memory_efficient=False)
    efficient = _model(memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    assert plain.config._attn_implementation == "eager" and efficient.config._attn_implementation == "sdpa"
    batch = _batch()
    plain.eval(), efficient.eval()
    torch.testing.assert_close(efficient(batch).logits, plain(batch).logits, atol=1e-5, rtol=0)

    calls = []
    real_checkpoint = xvlm.checkpoint
    monkeypatch.setattr(xvlm, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    for model in (plain, efficient):
        _no_dropout(model)
        model.train()
        model(batch).logits.square().sum().backward()
    assert len(calls) == 2  # one recomputed layer per text and cross layer, efficient model only
    grads = dict(plain.named_parameters())
    for name, param in efficient.named_parameters():
        assert param.grad is not None and grads[name].grad is not None, name
        torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# Hyperparameters


@pytest.mark.parametrize(
    "key, value",
    [("hidden_size", 24), ("intermediate_size", 48), ("num_text_layers", 2), ("num_cross_layers", 2)],
)
def test_size_hyperparameters_change_the_parameter_count(key: str, value: int) -> None:
    assert parameter_count(_model(**{key: value})) != parameter_count(_model())


def test_zero_text_layers_is_valid() -> None:
    model = _model(num_text_layers=0).eval()
    assert len(model.text_layers) == 0 and torch.isfinite(model(_batch()).logits).all()


def test_num_heads_changes_the_output() -> None:
    batch = _batch()
    two, four = _model(num_heads=2).eval(), _model(num_heads=4).eval()
    assert parameter_count(two) == parameter_count(four)
    assert not torch.allclose(two(batch).logits, four(batch).logits, atol=1e-6)


def test_max_tokens_truncates_word_ids() -> None:
    batch = _batch()
    short, full = _model(max_tokens=4).eval(), _model(max_tokens=40).eval()
    ids, mask = short.text_inputs(batch)
    assert ids.shape[1] == 4 and mask.sum(1).max() <= 4
    assert not torch.allclose(short(batch).logits, full(batch).logits, atol=1e-6)
    later = _batch()
    later.q_tokens[1, 5] = 2 if later.q_tokens[1, 5] != 2 else 3  # word 6 of sample 1 is past the cut
    torch.testing.assert_close(short(later).logits, short(batch).logits)
    assert _model(max_tokens=1).text_inputs(batch)[0].shape[1] == 1  # [CLS] alone


def test_max_tokens_truncates_wordpieces(vocab_dir: Path) -> None:
    batch = _batch()
    torch.manual_seed(0)
    short = build(_cfg(text_encoder=str(vocab_dir), max_tokens=3), SPEC).eval()
    torch.manual_seed(0)
    full = build(_cfg(text_encoder=str(vocab_dir), max_tokens=40), SPEC).eval()
    ids, _ = short.text_inputs(batch)
    assert ids.shape[1] == 3 and (ids[:, 0] == 2).all() and (ids[:, 2] == 3).all()  # [CLS] word [SEP]
    assert full.text_inputs(batch)[1].sum(1).tolist() == [5, 9, 7]
    assert not torch.allclose(short(batch).logits, full(batch).logits, atol=1e-6)


def test_tokenizer_sees_the_raw_question(vocab_dir: Path) -> None:
    model = build(_cfg(text_encoder=str(vocab_dir)), SPEC).eval()
    batch = _collate([SAMPLES[0]])
    batch.questions = ["What color is the car?"]
    ids, _ = model.text_inputs(batch)
    assert ids[0].tolist() == [2, 5, 6, 7, 8, 9, 3]
    assert model.embeddings.word_embeddings.num_embeddings == 5 + len(WORDS)


def test_pre_question_follows_xvlm() -> None:
    assert pre_question("What's left-of the Red/blue ball?!") == "whats left of the red blue ball"


def _loss_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 12, generator=g)
    targets = torch.zeros(4, 12)
    targets[0, 3], targets[1, [0, 7]], targets[2, 11] = 1.0, torch.tensor([0.6, 0.3]), 0.9
    return logits, targets  # row 3 has no gold answer


def test_topk_changes_the_candidate_loss() -> None:
    logits, targets = _loss_inputs()
    losses = [_model(topk=k).candidate_loss(logits, targets).item() for k in (1, 3, 12)]
    assert len({round(v, 6) for v in losses}) == 3
    full = -(targets * logits.log_softmax(1)).sum(1) / targets.sum(1).clamp_min(1e-6)
    assert losses[2] == pytest.approx(full.mean().item(), abs=1e-6)  # topk >= A: the full-list soft CE


def test_candidate_loss_keeps_gold_and_skips_unanswered() -> None:
    logits, targets = _loss_inputs()
    logits = logits.clone().requires_grad_(True)
    loss = _model(topk=1).candidate_loss(logits, targets)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 3] < 0  # the gold answer is pushed up even when it is not in the top-1
    assert (logits.grad[3] == 0).all()  # no gold answer: no loss, no gradient


# --------------------------------------------------------------------------------------------------
# X-VLM checkpoints

_SELF = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]  # fmt: skip
_CROSS = ["crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
          "crossattention.output.dense", "crossattention.output.LayerNorm"]  # fmt: skip


def _xvlm_state(model: XvlmBranch, prefix: str) -> dict[str, torch.Tensor]:
    """A tiny X-VLM-named state dict: layer 0 text-only, layer 1 fusion with 24-wide (vision) cross K/V, layer 2
    beyond the model, plus vision_encoder/text_decoder keys and the position_ids buffer."""
    g = torch.Generator().manual_seed(9)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    state = {f"{prefix}embeddings.position_ids": torch.arange(512)[None]}
    for name in ["word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
                 "LayerNorm.weight", "LayerNorm.bias"]:  # fmt: skip
        state[f"{prefix}embeddings.{name}"] = torch.randn(shapes[f"embeddings.{name}"], generator=g)
    for layer, modules, ours in [(0, _SELF, "text_layers.0"), (1, _SELF + _CROSS, "cross_layers.0")]:
        for module in modules:
            for kind in ("weight", "bias"):
                shape = shapes[f"{ours}.{module}.{kind}"]
                if module in _CROSS[1:3] and kind == "weight":
                    shape = (shape[0], 24)  # X-VLM's K/V read 1024-wide vision tokens
                state[f"{prefix}encoder.layer.{layer}.{module}.{kind}"] = torch.randn(shape, generator=g)
    state[f"{prefix}encoder.layer.2.attention.self.query.weight"] = torch.randn(16, 16, generator=g)
    state["vision_encoder.patch_embed.proj.weight"] = torch.randn(4, 3, 2, 2, generator=g)
    state["text_decoder.bert.encoder.layer.0.attention.self.query.weight"] = torch.randn(16, 16, generator=g)
    state["text_decoder.cls.predictions.bias"] = torch.randn(30, generator=g)
    return state


@pytest.mark.parametrize("prefix", ["text_encoder.", "text_encoder.bert."])
def test_checkpoint_loads_through_the_key_map(tmp_path: Path, prefix: str) -> None:
    model = _model()
    state = _xvlm_state(model, prefix)
    path = tmp_path / "model_state_epoch_9.th"
    torch.save({"model": state, "config": {"k_test": 128}}, path)
    report = load_xvlm_checkpoint(model, path)

    params = dict(model.named_parameters())
    assert torch.equal(params["embeddings.word_embeddings.weight"], state[f"{prefix}embeddings.word_embeddings.weight"])
    for i, ours in [(0, "text_layers.0"), (1, "cross_layers.0")]:
        for key in ("attention.self.query.weight", "intermediate.dense.bias", "output.LayerNorm.weight"):
            assert torch.equal(params[f"{ours}.{key}"], state[f"{prefix}encoder.layer.{i}.{key}"])
    cross_q = "crossattention.self.query.weight"
    assert torch.equal(params[f"cross_layers.0.{cross_q}"], state[f"{prefix}encoder.layer.1.{cross_q}"])

    assert len(report.loaded) == 5 + 16 + 16 + 10 - 2
    assert sorted(report.unmapped) == sorted(
        [
            f"{prefix}embeddings.position_ids",
            f"{prefix}encoder.layer.2.attention.self.query.weight",
            "vision_encoder.patch_embed.proj.weight",
            "text_decoder.bert.encoder.layer.0.attention.self.query.weight",
            "text_decoder.cls.predictions.bias",
        ]
    )
    assert sorted(report.mismatched) == [
        (f"{prefix}encoder.layer.1.crossattention.self.key.weight", (16, 24), (16, 16)),
        (f"{prefix}encoder.layer.1.crossattention.self.value.weight", (16, 24), (16, 16)),
    ]
    expected_missing = {n for n in params if n.startswith(("vision.", "head."))}
    expected_missing |= {f"cross_layers.0.crossattention.self.{kv}.weight" for kv in ("key", "value")}
    assert set(report.missing) == expected_missing
    summary = report.summary()
    assert "loaded 45" in summary and "vision_encoder.patch_embed.*: 1" in summary
    assert "[16, 24] vs model [16, 16]" in summary


def test_build_loads_the_configured_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "xvlm.th"
    torch.save(_xvlm_state(_model(), "text_encoder."), path)
    plain = _model().eval()
    loaded = _model(checkpoint=str(path)).eval()
    assert plain.load_report is None and loaded.load_report is not None and loaded.load_report.loaded
    assert not torch.allclose(plain(_batch()).logits, loaded(_batch()).logits, atol=1e-6)


class _NotATensor:
    pass


def test_bad_checkpoint_files_give_data_errors(tmp_path: Path) -> None:
    model = _model()
    text = tmp_path / "notes.th"
    text.write_text("not a checkpoint")
    with pytest.raises(DataError, match="not a readable torch weights file"):
        load_xvlm_checkpoint(model, text)
    objects = tmp_path / "objects.th"
    torch.save({"model": {"x": _NotATensor()}}, objects)
    with pytest.raises(DataError, match="weights_only=True"):
        load_xvlm_checkpoint(model, objects)
    numbers = tmp_path / "numbers.th"
    torch.save({"model": {"text_encoder.embeddings.LayerNorm.weight": [1.0, 2.0]}}, numbers)
    with pytest.raises(DataError, match="expected a tensor"):
        load_xvlm_checkpoint(model, numbers)
    foreign = tmp_path / "foreign.th"
    torch.save({"classifier.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(DataError, match=r"nothing in .* fits"):
        load_xvlm_checkpoint(model, foreign)
    with pytest.raises(DataError, match="does not exist"):
        load_xvlm_checkpoint(model, tmp_path / "absent.th")


# --------------------------------------------------------------------------------------------------
# Config errors and the image encoders


def test_text_encoder_without_vocab_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"vocab\.txt"):
        build(_cfg(text_encoder=str(tmp_path)), SPEC)


def test_xvlm_vision_configs() -> None:
    swin = vision_config("swin", 480)
    assert (swin.embed_dim, swin.depths, swin.num_heads, swin.window_size) == (128, [2, 2, 18, 2], [4, 8, 16, 32], 15)
    assert vision_config("vit", 384).patch_size == 16


def test_image_encoders_give_visual_tokens_at_the_text_width() -> None:
    from transformers import SwinConfig, ViTConfig

    pixels = torch.randn(2, 3, 32, 32)
    swin = ImageEncoder(SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                   window_size=4), hidden_size=16)  # fmt: skip
    tokens, mask = swin(pixels)
    assert tokens.shape == (2, 1 + 16, 16) and mask.all()  # pooled token + (32/4/2)^2 patches
    vit = ImageEncoder(ViTConfig(image_size=32, patch_size=8, hidden_size=12, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=24), hidden_size=16)  # fmt: skip
    tokens, _ = vit(pixels)
    assert tokens.shape == (2, 1 + 16, 16)  # [CLS] + (32/8)^2 patches
    tokens.sum().backward()
    assert all(p.grad is not None for p in vit.parameters())


def test_key_map_covers_every_transformer_parameter_for_any_layer_counts() -> None:
    mapping = xvlm.xvlm_key_map(2, 3)
    assert mapping["text_encoder.encoder.layer.1.output.dense.weight"] == "text_layers.1.output.dense.weight"
    assert mapping["text_encoder.encoder.layer.2.attention.self.key.bias"] == "cross_layers.0.attention.self.key.bias"
    assert mapping["text_encoder.encoder.layer.4.crossattention.output.LayerNorm.weight"] == (
        "cross_layers.2.crossattention.output.LayerNorm.weight"
    )
    assert "text_encoder.encoder.layer.1.crossattention.self.query.weight" not in mapping
    assert "text_encoder.encoder.layer.5.attention.self.query.weight" not in mapping
    model = _model(num_text_layers=2, num_cross_layers=3)
    transformer = {n for n, _ in model.named_parameters() if not n.startswith(("vision.", "head."))}
    assert set(mapping.values()) == transformer


# --------------------------------------------------------------------------------------------------
# Image input (vision swin/vit) and X-VLM settings files

# Tiny stand-ins for X-VLM's configs/config_swinB_480.json, config_clipvitB.json and config_bert.json (same keys).
TINY_SWIN = {"ckpt": "data/swin_base_patch4_window7_224_22k.pth", "vision_width": 16, "image_res": 32,
             "window_size": 4, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2]}  # fmt: skip
TINY_VIT = {"ckpt": "data/clip-vit-base-patch16.bin", "vision_width": 12, "patch_size": 8, "hidden_act": "quick_gelu",
            "num_attention_heads": 2, "attention_dropout": 0.0, "intermediate_size": 24, "num_hidden_layers": 1,
            "local_attn_depth": 0}  # fmt: skip
TINY_BERT = {"architectures": ["BertForMaskedLM"], "hidden_size": 16, "num_attention_heads": 2,
             "intermediate_size": 32, "num_hidden_layers": 3, "fusion_layer": 2, "encoder_width": 16,
             "vocab_size": 30522, "hidden_dropout_prob": 0.1}  # fmt: skip


def _xvlm_repo(root: Path, **overrides: Any) -> Path:
    """A tiny X-VLM checkout: configs/VQA_tiny.yaml in X-VLM's key names (as VQA_480.yaml, plus one unknown key),
    the JSON files it names under configs/, and data/bert-base-uncased/vocab.txt. Returns the YAML path."""
    import json

    import yaml

    (root / "configs").mkdir(parents=True, exist_ok=True)
    for name, data in [("config_swin_tiny.json", TINY_SWIN), ("config_vit_tiny.json", TINY_VIT),
                       ("config_bert.json", TINY_BERT)]:  # fmt: skip
        (root / "configs" / name).write_text(json.dumps(data))
    bert = root / "data" / "bert-base-uncased"
    bert.mkdir(parents=True, exist_ok=True)
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    settings: dict[str, Any] = {
        "train_file": ["data/finetune/vqa_train.json", "data/finetune/vg_qa.json"],
        "test_file": ["data/finetune/vqa_test.json"],
        "answer_list": "data/finetune/answer_list.json",
        "vqa_root": "images/coco/",
        "vg_root": "images/visualgenome/",
        "vision_config": "configs/config_swin_tiny.json",
        "use_clip_vit": False,
        "use_swin": True,
        "image_res": 32,
        "patch_size": 32,
        "use_roberta": False,
        "text_config": "configs/config_bert.json",
        "text_encoder": "data/bert-base-uncased",
        "num_dec_layers": 6,
        "batch_size_train": 24,
        "batch_size_test": 32,
        "max_tokens": 12,
        "k_test": 128,
        "optimizer": {"opt": "adamW", "lr": 5e-5, "weight_decay": 0.01, "lr_mult": 2},
        "schedular": {"sched": "linear", "lr": 5e-5, "epochs": 10, "num_warmup_steps": 0.1},
        "start_eval": 0,
        "my_own_key": 1,
        **overrides,
    }
    path = root / "configs" / "VQA_tiny.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def _image_cfg(yaml_path: Path, image_root: Path | None, memory_efficient: bool = False, **xvlm: Any) -> RunConfig:
    data = {"image_root": str(image_root)} if image_root is not None else {}
    return RunConfig.model_validate(
        {
            "data": data,
            "model": {"xvlm": {"xvlm_config": str(yaml_path), **xvlm}},
            "memory": {"memory_efficient_attention": memory_efficient},
        }
    )


def _settings(yaml_path: Path, image_root: Path | None = None, **xvlm: Any) -> tuple[RunConfig, Any]:
    with pytest.warns(UserWarning, match="my_own_key"):
        return apply_xvlm_settings(_image_cfg(yaml_path, image_root, **xvlm))


def _with_images(batch: Batch, res: int = 32, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return replace(batch, images=torch.randn(len(batch), 3, res, res, generator=g))


def test_settings_file_maps_xvlm_keys(tmp_path: Path) -> None:
    effective, report = _settings(_xvlm_repo(tmp_path / "X-VLM"))
    x = effective.model.xvlm
    assert (x.image_res, x.max_tokens, x.hidden_size, x.num_heads, x.intermediate_size) == (32, 12, 16, 2, 32)
    assert (x.num_text_layers, x.num_cross_layers) == (2, 1)  # fusion_layer 2 of 3 layers
    assert x.text_encoder == tmp_path / "X-VLM" / "data" / "bert-base-uncased"  # relative to the X-VLM root
    assert x.vision == "regions" and any("use_swin: True" in n and "image_root is unset" in n for n in report.notes)
    assert report.vision_sizes == {} and x.topk == 6  # k_test is not topk
    assert {"k_test", "optimizer", "schedular", "num_dec_layers", "answer_list", "vqa_root"} <= set(report.not_applied)
    assert "train.xvlm_lr" in report.not_applied["optimizer"]
    assert report.unknown == ["my_own_key"]
    summary = report.summary()
    assert "applied image_res=32" in summary and "unknown keys: my_own_key" in summary and "k_test (" in summary


def test_explicit_settings_win_and_are_reported(tmp_path: Path) -> None:
    yaml_path = _xvlm_repo(tmp_path / "X-VLM")
    effective, report = _settings(yaml_path, max_tokens=20, hidden_size=24, num_heads=4, text_encoder=str(tmp_path))
    x = effective.model.xvlm
    assert (x.max_tokens, x.hidden_size, x.num_heads, x.text_encoder) == (20, 24, 4, tmp_path)
    assert x.intermediate_size == 32 and x.image_res == 32  # still at their defaults: the file's values
    kept = {name: (ours, theirs) for name, ours, theirs in report.kept}
    assert kept["max_tokens"] == (20, 12) and kept["hidden_size"] == (24, 16) and kept["num_heads"] == (4, 2)
    assert "max_tokens=20 (file 12)" in report.summary()
    # Applying again to the effective config changes nothing (a saved config rebuilds the same model).
    with pytest.warns(UserWarning):
        again, _ = apply_xvlm_settings(effective)
    assert again.model.xvlm == effective.model.xvlm


def test_use_swin_and_use_clip_vit_pick_the_image_encoder(tmp_path: Path) -> None:
    yaml_path = _xvlm_repo(tmp_path / "X-VLM")
    effective, report = _settings(yaml_path, image_root=tmp_path)
    assert effective.model.xvlm.vision == "swin" and report.applied["vision"] == "swin"
    assert report.vision_sizes == {k: TINY_SWIN[k] for k in ("embed_dim", "depths", "num_heads", "window_size")}
    assert any("are not loaded" in n for n in report.notes)

    vit_yaml = _xvlm_repo(tmp_path / "X-VLM-vit", use_clip_vit=True, vision_config="configs/config_vit_tiny.json")
    effective, report = _settings(vit_yaml, image_root=tmp_path)
    assert effective.model.xvlm.vision == "vit"  # X-VLM checks use_clip_vit before use_swin
    assert report.vision_sizes["vision_width"] == 12 and report.vision_sizes["hidden_act"] == "quick_gelu"
    assert any("local_attn_depth" in n for n in report.notes)
    with pytest.warns(UserWarning):
        model = build(_image_cfg(vit_yaml, tmp_path), SPEC)
    vit = model.vision.backbone.config
    assert (vit.hidden_size, vit.patch_size, vit.num_hidden_layers, vit.image_size, vit.hidden_act) == (
        12, 8, 1, 32, "quick_gelu"
    )  # fmt: skip
    assert model.settings_report is not None and model.settings_report.applied["vision"] == "vit"

    # An explicit vision wins over the file's; the Swin JSON does not fit a ViT, so ViT-B sizes are noted.
    effective, report = _settings(yaml_path, image_root=tmp_path, vision="vit")
    assert effective.model.xvlm.vision == "vit" and ("vision", "vit", "swin") in report.kept
    assert report.vision_sizes == {} and any("not a vit config" in n for n in report.notes)


def test_image_input_tells_the_dataset_what_to_load(tmp_path: Path) -> None:
    yaml_path = _xvlm_repo(tmp_path / "X-VLM")
    with pytest.warns(UserWarning):
        assert image_input(_image_cfg(yaml_path, tmp_path)) == (tmp_path, 32)  # use_swin + image root
        assert image_input(_image_cfg(yaml_path, None)) == (None, 32)  # regions kept: no pixels to load
    regions = RunConfig.model_validate({"data": {"image_root": str(tmp_path)}, "model": {"xvlm": {"image_res": 64}}})
    assert image_input(regions) == (None, 64)
    vit = {"data": {"image_root": str(tmp_path)}, "model": {"xvlm": {"vision": "vit", "image_res": 64}}}
    assert image_input(RunConfig.model_validate(vit)) == (tmp_path, 64)
    vit["model"]["branches"] = ["cfrf", "isubg"]
    assert image_input(RunConfig.model_validate(vit)) == (None, 64)


@pytest.mark.filterwarnings("ignore:.*unknown X-VLM settings keys:UserWarning")
def test_settings_file_errors_name_the_file(tmp_path: Path) -> None:
    absent = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"model\.xvlm\.xvlm_config=.*absent\.yaml"):
        apply_xvlm_settings(_image_cfg(absent, None))
    broken = tmp_path / "broken.yaml"
    broken.write_text("image_res: [480\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        build(_image_cfg(broken, None, **TINY), SPEC)
    no_json = _xvlm_repo(tmp_path / "a", vision_config="configs/missing.json")
    with pytest.raises(ConfigError, match=r"vision_config: 'configs/missing\.json' names no file; tried .*configs"):
        apply_xvlm_settings(_image_cfg(no_json, tmp_path))
    bad_value = _xvlm_repo(tmp_path / "b", image_res="big")
    with pytest.raises(ConfigError, match="image_res must be an integer"):
        apply_xvlm_settings(_image_cfg(bad_value, None))
    (tmp_path / "c" / "configs").mkdir(parents=True)
    (tmp_path / "c" / "configs" / "odd_bert.json").write_text('{"hidden_size": 10, "num_attention_heads": 3}')
    odd = _xvlm_repo(tmp_path / "c", text_config="configs/odd_bert.json")
    with pytest.raises(ConfigError, match=r"not valid here.*multiple of"):
        apply_xvlm_settings(_image_cfg(odd, None))


def test_image_res_and_settings_file_no_longer_warn_as_unimplemented(tmp_path: Path) -> None:
    from isubg.config import config_warnings

    def paths(settings: dict[str, Any]) -> dict[str, str]:
        return {w.path: w.message for w in config_warnings(RunConfig.model_validate(settings))}

    regions = paths({"model": {"xvlm": {"image_res": 64, "xvlm_config": "x.yaml"}}})
    assert "regions" in regions["model.xvlm.image_res"] and "model.xvlm.xvlm_config" not in regions
    swin = {"data": {"image_root": str(tmp_path)}, "model": {"xvlm": {"image_res": 64, "vision": "swin"}}}
    assert "model.xvlm.image_res" not in paths(swin)
    via_file = {"data": {"image_root": str(tmp_path)}, "model": {"xvlm": {"image_res": 64, "xvlm_config": "x.yaml"}}}
    assert "model.xvlm.image_res" not in paths(via_file)


@pytest.fixture(scope="module")
def demo_with_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny GQA demo folder and an image folder with a random <imageId>.jpg for every train image."""
    import numpy as np
    from PIL import Image

    from isubg.data.embedded import build_demo

    root = tmp_path_factory.mktemp("demo")
    folder = build_demo(root, size="tiny", seed=0).processed("gqa")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for image_id in {r["image_id"] for r in question_records(folder, "train")}:
        Image.fromarray(rng.integers(0, 256, (18, 24, 3), dtype=np.uint8)).save(images / f"{image_id}.jpg")
    return folder, images


@pytest.mark.parametrize("kind", ["swin", "vit"])
def test_image_branch_trains_on_a_dataset_batch(kind: str, demo_with_images: tuple[Path, Path], tmp_path: Path) -> None:
    from isubg.data.dataset import VQADataset, collate

    folder, images = demo_with_images
    extra = {"use_clip_vit": True, "vision_config": "configs/config_vit_tiny.json"} if kind == "vit" else {}
    cfg, _ = _settings(_xvlm_repo(tmp_path / "X-VLM", **extra), image_root=images)
    x = cfg.model.xvlm
    data = VQADataset(folder, "train", question_len=12, max_boxes=36, num_stat_word=10, image_root=images,
                      image_res=x.image_res)  # fmt: skip
    batch = collate([data[i] for i in range(4)], data.num_answers)
    assert batch.images is not None and batch.images.shape == (4, 3, 32, 32)
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        model = build(_image_cfg(cfg.model.xvlm.xvlm_config, images), data.spec())
    assert isinstance(model.vision, ImageEncoder) and model.image_res == 32
    out = model(batch)
    assert out.logits.shape == (4, data.num_answers) and torch.isfinite(out.logits).all()
    assert batch.targets is not None
    nn.functional.binary_cross_entropy_with_logits(out.logits, batch.targets).backward()
    grads = [p.grad for p in model.vision.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def _swin_model(tmp_path: Path, memory_efficient: bool = False) -> XvlmBranch:
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        return build(_image_cfg(_xvlm_repo(tmp_path / "X-VLM"), tmp_path, memory_efficient), SPEC)


def test_image_tokens_replace_the_region_tokens(tmp_path: Path) -> None:
    model = _swin_model(tmp_path).eval()
    batch = _with_images(_batch())
    logits = model(batch).logits
    other_regions = replace(batch, features=torch.randn_like(batch.features), box_mask=torch.ones_like(batch.box_mask))
    torch.testing.assert_close(model(other_regions).logits, logits)
    assert not torch.allclose(model(_with_images(_batch(), seed=1)).logits, logits, atol=1e-5)


def test_image_branch_without_images_or_at_another_size_is_a_config_error(tmp_path: Path) -> None:
    model = _swin_model(tmp_path)
    with pytest.raises(ConfigError, match=r"carries none.*data\.image_root"):
        model(_batch())
    with pytest.raises(ConfigError, match=r"\(3, 64, 64\).*built for \(3, 32, 32\)"):
        model(_with_images(_batch(), res=64))


def test_memory_efficient_image_branch_checkpoints_the_backbone(tmp_path: Path) -> None:
    plain, efficient = _swin_model(tmp_path).eval(), _swin_model(tmp_path, memory_efficient=True).eval()
    new_name = hasattr(plain.vision.backbone, "is_activation_checkpointing")  # transformers >= 5 renamed it
    flag = "is_activation_checkpointing" if new_name else "is_gradient_checkpointing"
    assert getattr(efficient.vision.backbone, flag) and not getattr(plain.vision.backbone, flag)
    batch = _with_images(_batch())
    torch.testing.assert_close(efficient(batch).logits, plain(batch).logits)
    efficient.train()
    _no_dropout(efficient)
    efficient(batch).logits.sum().backward()
    assert all(p.grad is not None for p in efficient.vision.backbone.parameters())
