"""The cfrf branch: shapes, masking, batch independence, every hyperparameter's effect, the counter, tf-idf words."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch as GraphBatch

from isubg.batch import Batch, DataSpec
from isubg.config import RunConfig
from isubg.data.dataset import VQADataset, collate
from isubg.data.embedded import build_demo
from isubg.data.synthetic import random_batch
from isubg.models.cfrf import COUNTER_OBJECTS, CfrfBranch, _AoAAttention, _Counter, _heads, _WordEmbedding, build
from isubg.models.common import parameter_count
from isubg.resolve import resolve_config

WORDS, ANSWERS, FEATURES = 40, 9, 12


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Hand-sized tensors gain nothing from intra-op threads; on a busy 2-core machine they cost ~4x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tfidf(num_words: int = WORDS, nnz: int = 300, seed: int = 0) -> tuple[Any, ...]:
    """A random sparse (rows, cols, values, shape) triple with an empty <pad> row and column."""
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(1, num_words, nnz), rng.integers(1, num_words, nnz)
    return rows, cols, rng.random(nnz).astype(np.float32), (num_words, num_words)


SPEC = DataSpec(num_words=WORDS, num_answers=ANSWERS, num_graph_tokens=20, feature_dim=FEATURES, tfidf=_tfidf())


def _cfg(tfidf: bool = True, efficient: bool = False, **cfrf: Any) -> RunConfig:
    settings = {"num_hid": 24, "gamma": 2, "AOA_layers": 2, "use_counter": True, **cfrf}
    return RunConfig.model_validate(
        {"data": {"tfidf": tfidf}, "model": {"cfrf": settings}, "memory": {"memory_efficient_attention": efficient}}
    )


def _model(seed: int = 0, spec: DataSpec = SPEC, **kwargs: Any) -> CfrfBranch:
    torch.manual_seed(seed)
    return build(_cfg(**kwargs), spec).eval()


def _batch(
    boxes: tuple[int, ...] = (3, 7, 12, 15),
    tokens: tuple[int, ...] = (8, 3, 5, 1),
    stats: tuple[int, ...] = (5, 2, 4, 1),
) -> Batch:
    """Samples of different box counts (some under the counter's 10), question lengths, stat words, graphs."""
    n = len(boxes)
    b = random_batch(SPEC, n, boxes=boxes, question_len=8, tokens=tokens, stat_words=max(stats),
                     nodes=[2 + i for i in range(n)], edges=[1 + 2 * i for i in range(n)], seed=1)  # fmt: skip
    stat_mask = torch.arange(max(stats))[None] < torch.tensor(stats)[:, None]
    entity = b.entity_mask.clone()
    entity[:, 0] = True  # every sample names at least one entity, so the entity fusion acts on all of them
    return dataclasses.replace(
        b, stat_tokens=b.stat_tokens * stat_mask, stat_mask=stat_mask, entity_mask=entity & b.q_mask
    )


def _sample(batch: Batch, i: int) -> Batch:
    """Sample i alone, its boxes trimmed to its own count (as a batch of one would be collated)."""
    k = int(batch.box_mask[i].sum())
    one = slice(i, i + 1)
    return dataclasses.replace(
        batch,
        question_ids=batch.question_ids[one], image_ids=batch.image_ids[one], questions=batch.questions[one],
        question_types=batch.question_types[one], q_tokens=batch.q_tokens[one], q_mask=batch.q_mask[one],
        entity_mask=batch.entity_mask[one], features=batch.features[one, :k], spatials=batch.spatials[one, :k],
        box_mask=batch.box_mask[one, :k], stat_tokens=batch.stat_tokens[one], stat_mask=batch.stat_mask[one],
        graphs=GraphBatch.from_data_list([batch.graphs.get_example(i)]),
        targets=None if batch.targets is None else batch.targets[one],
    )  # fmt: skip


def _perturb_counter_maps(model: CfrfBranch) -> None:
    """Move the Zhang maps away from their identity initialisation (as training would)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "counter" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 2 + 0.05)


def _logits(model: CfrfBranch, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).logits


# ------------------------------------------------------------------------------------- shapes, masks


@pytest.mark.parametrize("use_counter", [False, True])
@pytest.mark.parametrize("tfidf", [False, True])
def test_forward_shapes_and_finite(use_counter: bool, tfidf: bool) -> None:
    out = _model(use_counter=use_counter, tfidf=tfidf)(_batch())
    assert out.logits.shape == (4, ANSWERS) and out.node_mask is None
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("counter_act", ["zhang", "identity"])
@pytest.mark.parametrize("efficient", [False, True])
def test_sample_output_does_not_depend_on_its_batch(counter_act: str, efficient: bool) -> None:
    model = _model(counter_act=counter_act, efficient=efficient)
    _perturb_counter_maps(model)
    batch = _batch()
    together = _logits(model, batch)
    for i in range(len(batch)):
        torch.testing.assert_close(_logits(model, _sample(batch, i))[0], together[i], atol=1e-5, rtol=0)


def test_padding_content_is_ignored() -> None:
    model, batch = _model(), _batch()
    gen = torch.Generator().manual_seed(3)
    pad_box, pad_q, pad_s = ~batch.box_mask, ~batch.q_mask, ~batch.stat_mask
    noisy = dataclasses.replace(
        batch,
        features=torch.where(pad_box[..., None], torch.randn(batch.features.shape, generator=gen) * 9, batch.features),
        spatials=torch.where(pad_box[..., None], torch.rand(batch.spatials.shape, generator=gen), batch.spatials),
        q_tokens=torch.where(pad_q, torch.randint(1, WORDS, batch.q_tokens.shape, generator=gen), batch.q_tokens),
        entity_mask=batch.entity_mask | pad_q,  # entity flags on padding must not count either
        stat_tokens=torch.where(pad_s, torch.randint(1, WORDS, batch.stat_tokens.shape, generator=gen),
                                batch.stat_tokens),
    )  # fmt: skip
    torch.testing.assert_close(_logits(model, noisy), _logits(model, batch), atol=1e-6, rtol=0)


def _pad(t: torch.Tensor, extra: int) -> torch.Tensor:
    """t with `extra` more padding positions (zeros / False) on axis 1."""
    return torch.cat([t, torch.zeros(t.shape[0], extra, *t.shape[2:], dtype=t.dtype)], 1)


def test_more_padding_changes_nothing() -> None:
    model, batch = _model(), _batch()
    longer = dataclasses.replace(
        batch,
        q_tokens=_pad(batch.q_tokens, 4), q_mask=_pad(batch.q_mask, 4), entity_mask=_pad(batch.entity_mask, 4),
        stat_tokens=_pad(batch.stat_tokens, 3), stat_mask=_pad(batch.stat_mask, 3),
        features=_pad(batch.features, 5), spatials=_pad(batch.spatials, 5), box_mask=_pad(batch.box_mask, 5),
    )  # fmt: skip
    torch.testing.assert_close(_logits(model, longer), _logits(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("setting", "mask"), [("omega_q", "entity_mask"), ("omega_v", "stat_mask")])
def test_a_fusion_without_context_words_changes_nothing(setting: str, mask: str) -> None:
    batch = _batch()
    batch = dataclasses.replace(batch, **{mask: torch.zeros_like(getattr(batch, mask))})
    with_fusion, without = _model(**{setting: 0.5}), _model(**{setting: 0.0})
    # omega = 0 does not build the fusion; give the rest of the model the same weights.
    without.load_state_dict(with_fusion.state_dict(), strict=False)
    torch.testing.assert_close(_logits(with_fusion, batch), _logits(without, batch))


@pytest.mark.parametrize("setting", ["omega_q", "omega_v"])
def test_omega_zero_switches_the_fusion_off(setting: str) -> None:
    batch = _batch()
    on, off = _model(**{setting: 1e-9}), _model(**{setting: 0.0})
    assert sum(p.numel() for p in off.parameters()) < sum(p.numel() for p in on.parameters())
    off.load_state_dict(on.state_dict(), strict=False)
    torch.testing.assert_close(_logits(on, batch), _logits(off, batch), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("efficient", [False, True])
def test_empty_question_entities_and_stat_words_are_finite_and_ignore_padding(efficient: bool) -> None:
    batch = _batch()
    none = torch.zeros_like(batch.q_mask)
    empty = dataclasses.replace(batch, q_mask=none, entity_mask=none, stat_mask=torch.zeros_like(batch.stat_mask))
    model = _model(efficient=efficient)
    # Nothing real to attend to: the padded tokens' content must still not leak in.
    torch.testing.assert_close(_logits(model, empty), _logits(model, dataclasses.replace(empty, q_tokens=none.long())))
    model.train()
    logits = model(empty).logits
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("shape", [(5, 3, 4), (14, 9, 30)])
def test_question_len_stat_words_and_boxes_come_from_the_batch(shape: tuple[int, int, int]) -> None:
    length, stats, boxes = shape
    batch = random_batch(SPEC, 2, boxes=[boxes, 2], question_len=length, tokens=[length, 1], stat_words=stats,
                         nodes=3, edges=2)  # fmt: skip
    assert _logits(_model(), batch).shape == (2, ANSWERS)


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("counter_act", ["zhang", "identity"])
def test_backward_reaches_every_parameter(counter_act: str) -> None:
    model = _model(counter_act=counter_act, AOA_layers=1)
    model.train()
    batch = _batch()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch).logits, batch.targets)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # the tf-idf half of the words reaches the table too: W @ E trains with E
    assert model.words.tfidf and model.gru.weight_ih_l0.grad[:, 300:].abs().sum() > 0


def test_memory_efficient_path_matches_plain() -> None:
    plain, efficient = _model(), _model(efficient=True)
    efficient.load_state_dict(plain.state_dict())
    batch = _batch()
    torch.testing.assert_close(_logits(efficient, batch), _logits(plain, batch), atol=1e-5, rtol=0)
    grads = []
    for model in (plain, efficient):
        model.train()  # dropout draws the same masks in both: same seed, same random calls in the same order
        torch.manual_seed(11)
        model(batch).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-4, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------ hyperparameters


@pytest.mark.parametrize(
    ("setting", "a", "b"),
    [
        ("gamma", 1, 3),
        ("use_counter", False, True),
        ("counter_act", "identity", "zhang"),
        ("AOA_layers", 0, 3),
        ("num_hid", 16, 24),
        ("tfidf", False, True),
    ],
)
def test_structural_settings_change_the_parameters(setting: str, a: Any, b: Any) -> None:
    assert parameter_count(_model(**{setting: a})) != parameter_count(_model(**{setting: b}))


@pytest.mark.parametrize(
    ("setting", "a", "b"),
    [
        ("activation", "relu", "tanh"),
        ("omega_q", 0.1, 0.6),
        ("omega_v", 0.01, 0.6),
        ("gamma", 1, 2),
        ("use_counter", False, True),
        ("counter_act", "identity", "zhang"),
        ("AOA_layers", 0, 1),
        ("aoa_norm", "pre", "post"),
        ("aoa_norm", "pre", "none"),
        ("tfidf", False, True),
    ],
)
def test_every_setting_changes_the_output(setting: str, a: Any, b: Any) -> None:
    batch, outputs = _batch(), []
    for value in (a, b):
        model = _model(**{setting: value})
        _perturb_counter_maps(model)
        outputs.append(_logits(model, batch))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-5
    torch.testing.assert_close(_logits(_model(**{setting: a}), batch), _logits(_model(**{setting: a}), batch))


def test_tfidf_values_matter() -> None:
    other = dataclasses.replace(SPEC, tfidf=_tfidf(seed=5))
    batch = _batch()
    assert (_logits(_model(), batch) - _logits(_model(spec=other), batch)).abs().max() > 1e-5


def test_dropout_acts_in_training_only() -> None:
    batch, out = _batch(), {}
    for rate in (0.0, 0.6):
        model = _model(dropout=rate)
        out["eval", rate] = _logits(model, batch)
        model.train()
        torch.manual_seed(5)
        out["train", rate] = model(batch).logits.detach()
    torch.testing.assert_close(out["eval", 0.0], out["eval", 0.6])
    assert (out["train", 0.0] - out["train", 0.6]).abs().max() > 1e-4


@pytest.mark.parametrize("num_hid", [512, 768, 1536])
def test_presets_that_crashed_the_reference_build_and_run(num_hid: int) -> None:
    spec = DataSpec(num_words=20, num_answers=5, num_graph_tokens=10, feature_dim=8)
    model = _model(spec=spec, tfidf=False, num_hid=num_hid, AOA_layers=8)
    batch = random_batch(spec, 2, boxes=[3, 5], question_len=6, tokens=[6, 2], stat_words=3, nodes=2, edges=1)
    logits = _logits(model, batch)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_aoa_heads_divide_any_width() -> None:
    assert [_heads(d) for d in (1024, 768, 1536, 512, 128, 100, 24, 7)] == [16, 12, 24, 8, 2, 4, 8, 1]


def test_aoa_attention_masks_keys_in_both_kernels() -> None:
    torch.manual_seed(0)
    attn = _AoAAttention(24)
    x, context = torch.randn(2, 3, 24), torch.randn(2, 5, 24)
    mask = torch.tensor([[True, True, False, False, False], [False] * 5])  # the second query set has no keys
    other = torch.where(mask[..., None], context, torch.randn(2, 5, 24))  # new content at every masked key
    outputs = [attn(x, c, mask, fused) for c in (context, other) for fused in (False, True)]
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], atol=1e-6, rtol=0)
    # no key at all: the attention result is 0, so only the gated query is left
    torch.testing.assert_close(outputs[0][1], F.glu(attn.aoa(torch.cat([torch.zeros(3, 24), attn.to_q(x[1])], -1))))


def test_demo_preset_learns_a_real_demo_batch(tmp_path: Path) -> None:
    demo = build_demo(tmp_path / "demo", size="tiny", seed=0)
    data = VQADataset(demo.processed("gqa"), "train", question_len=12, max_boxes=36, num_stat_word=10)
    batch = collate([data[i] for i in range(16)], data.num_answers)
    torch.manual_seed(0)
    model = build(resolve_config("demo", sets=["use_counter=true"]).config, data.spec())
    optimizer = torch.optim.Adamax(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = F.binary_cross_entropy_with_logits(model(batch).logits, batch.targets, reduction="sum") / len(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Far below the first loss (which answer-bias learning alone roughly halves), and the answers are right.
    assert losses[-1] < 0.1 * losses[0]
    score = batch.targets.gather(1, _logits(model.eval(), batch).argmax(1, keepdim=True)).mean()
    assert score >= 0.75


# ---------------------------------------------------------------------------------------------- words


def test_tfidf_words_are_the_weighted_sum_of_word_rows() -> None:
    torch.manual_seed(0)
    words = _WordEmbedding(WORDS, tfidf=SPEC.tfidf)
    rows, cols, values, shape = SPEC.tfidf
    dense = torch.zeros(shape).index_put_((torch.as_tensor(rows), torch.as_tensor(cols)), torch.as_tensor(values),
                                          accumulate=True)  # fmt: skip
    tokens = torch.tensor([[3, 0, 17, 3], [39, 1, 0, 0]])
    out = words(tokens)
    assert out.shape == (2, 4, 600)
    torch.testing.assert_close(out[..., :300], words.table.weight[tokens])
    torch.testing.assert_close(out[..., 300:], (dense @ words.table.weight)[tokens], atol=1e-5, rtol=1e-5)
    assert not out[0, 1].any()  # <pad> is zero in both halves


def test_glove_initialises_the_table_and_bad_data_is_refused() -> None:
    glove = np.random.default_rng(0).standard_normal((WORDS, 300)).astype(np.float32)
    model = build(_cfg(), dataclasses.replace(SPEC, glove=glove))
    torch.testing.assert_close(model.words.table.weight[1:], torch.from_numpy(glove[1:]))
    with pytest.raises(ValueError, match=r"data\.tfidf is true"):
        build(_cfg(), dataclasses.replace(SPEC, tfidf=None))
    with pytest.raises(ValueError, match=r"spec\.glove"):
        build(_cfg(), dataclasses.replace(SPEC, glove=glove[:, :50]))
    rows, cols, values, _ = SPEC.tfidf
    with pytest.raises(ValueError, match=r"spec\.tfidf"):
        build(_cfg(), dataclasses.replace(SPEC, tfidf=(rows, cols, values, (WORDS, WORDS + 1))))
    assert parameter_count(build(_cfg(tfidf=False), dataclasses.replace(SPEC, tfidf=None))) > 0


# -------------------------------------------------------------------------------------------- counter


def _disjoint_boxes(n: int) -> torch.Tensor:
    """n non-overlapping normalised boxes in a row, (1, n, 4)."""
    left = torch.arange(n, dtype=torch.float32) / n
    return torch.stack([left, torch.zeros(n), left + 0.8 / n, torch.full((n,), 0.5)], -1)[None]


def test_identity_counter_counts_separate_boxes_and_merges_duplicates() -> None:
    counter = _Counter("identity")
    boxes = _disjoint_boxes(3)
    out = counter(boxes, torch.full((1, 3), 30.0), torch.ones(1, 3, dtype=torch.bool))
    assert out.shape == (1, COUNTER_OBJECTS + 1)
    torch.testing.assert_close(out[0], torch.eye(COUNTER_OBJECTS + 1)[3], atol=1e-4, rtol=0)
    twice = torch.cat([boxes[:, :1], boxes[:, :1]], 1)  # the same object proposed twice counts once
    out = counter(twice, torch.full((1, 2), 30.0), torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(out[0], torch.eye(COUNTER_OBJECTS + 1)[1], atol=1e-4, rtol=0)
    two_objects = torch.cat([twice, _disjoint_boxes(3)[:, 2:]], 1)  # a duplicated object and a separate one
    out = counter(two_objects, torch.full((1, 3), 30.0), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(out[0], torch.eye(COUNTER_OBJECTS + 1)[2], atol=1e-4, rtol=0)


@pytest.mark.parametrize("act", ["zhang", "identity"])
def test_counter_never_selects_padding(act: str) -> None:
    counter = _Counter(act)
    if act == "zhang":
        with torch.no_grad():
            for p in counter.parameters():
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) + 0.1)
    gen = torch.Generator().manual_seed(2)
    for real in (4, 12):  # fewer and more than the counter's 10 objects
        boxes = torch.rand(1, real + 6, 2, generator=gen)
        boxes = torch.cat([boxes, boxes + 0.3], -1)
        logits = torch.randn(1, real + 6, generator=gen)
        logits[:, real:] = 50.0  # padding with the highest attention of all
        mask = torch.arange(real + 6)[None] < real
        alone = counter(boxes[:, :real], logits[:, :real], mask[:, :real])
        torch.testing.assert_close(counter(boxes, logits, mask), alone, atol=1e-6, rtol=0)
        assert torch.isfinite(alone).all() and alone.sum() > 0


def test_zhang_maps_start_as_identity_and_then_differ() -> None:
    zhang, identity = _Counter("zhang"), _Counter("identity")
    assert parameter_count(zhang) == 8 * 16 and parameter_count(identity) == 0
    gen = torch.Generator().manual_seed(4)
    boxes = torch.rand(2, 9, 2, generator=gen)
    boxes, logits = torch.cat([boxes, boxes + 0.2], -1), torch.randn(2, 9, generator=gen)
    mask = torch.ones(2, 9, dtype=torch.bool)
    torch.testing.assert_close(zhang(boxes, logits, mask), identity(boxes, logits, mask))
    with torch.no_grad():
        zhang.maps[0].slopes.copy_(torch.linspace(0.1, 3.0, 16))
    assert (zhang(boxes, logits, mask) - identity(boxes, logits, mask)).abs().max() > 1e-3
