"""The isubg (ISubGVQA) branch on hand-sized batches: shapes, exact-k explanations, padding, batch independence,
gradients, every hyperparameter's effect, the deep/wide presets, masked layers and memory-efficient mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch as GraphBatch
from torch_geometric.data import Data

from isubg.batch import Batch, DataSpec
from isubg.config import RunConfig
from isubg.models.common import BranchOutput, parameter_count
from isubg.models.isubg import InstructedGATLayer, ISubGBranch, NodeScorer, build, selected_nodes
from isubg.resolve import resolve_config

SPEC = DataSpec(num_words=40, num_answers=7, num_graph_tokens=25, feature_dim=8, max_attributes=3)
SMALL = {"general_hidden_dim": 16, "mgat_layers": 2}
# (question length, graph nodes, boxes): sizes differ, one graph is smaller than k and one has one node.
ITEMS = [(3, 5, 2), (9, 1, 6), (6, 8, 3), (12, 2, 4)]


def _graph(nodes: int, rng: np.random.Generator) -> Data:
    x = np.zeros((nodes, 1 + SPEC.max_attributes), dtype=np.int64)
    x[:, 0] = rng.integers(1, SPEC.num_graph_tokens, nodes)
    for row, count in enumerate(rng.integers(0, SPEC.max_attributes + 1, nodes)):
        x[row, 1 : 1 + count] = rng.integers(1, SPEC.num_graph_tokens, count)
    edges = rng.integers(0, nodes, (2, 2 * nodes))
    return Data(
        x=torch.from_numpy(x),
        edge_index=torch.from_numpy(edges),
        edge_attr=torch.from_numpy(rng.integers(1, SPEC.num_graph_tokens, 2 * nodes)),
        edge_reverse=torch.from_numpy(rng.random(2 * nodes) < 0.3),
        box=torch.from_numpy(rng.random((nodes, 4))).float(),
        num_nodes=nodes,
    )


def _batch(items: list[tuple[int, int, int]], length: int = 12, seed: int = 0) -> Batch:
    """A Batch of questions (q_len, nodes, boxes); item i's content depends only on (seed, i's sizes)."""
    rngs = [np.random.default_rng([seed, *item]) for item in items]
    b, boxes = len(items), max(item[2] for item in items)
    q_tokens = torch.zeros(b, length, dtype=torch.long)
    features, box_mask = torch.zeros(b, boxes, SPEC.feature_dim), torch.zeros(b, boxes, dtype=torch.bool)
    for i, ((q_len, _, n_boxes), rng) in enumerate(zip(items, rngs, strict=True)):
        q_tokens[i, :q_len] = torch.from_numpy(rng.integers(1, SPEC.num_words, q_len))
        features[i, :n_boxes] = torch.from_numpy(rng.random((n_boxes, SPEC.feature_dim))).float()
        box_mask[i, :n_boxes] = True
    graphs = GraphBatch.from_data_list([_graph(item[1], rng) for item, rng in zip(items, rngs, strict=True)])
    q_mask = q_tokens != 0
    return Batch(
        question_ids=[str(i) for i in range(b)],
        image_ids=[str(i) for i in range(b)],
        questions=["q"] * b,
        q_tokens=q_tokens,
        q_mask=q_mask,
        entity_mask=q_mask.clone(),
        features=features,
        spatials=torch.zeros(b, boxes, 6),
        box_mask=box_mask,
        stat_tokens=torch.ones(b, 2, dtype=torch.long),
        stat_mask=torch.ones(b, 2, dtype=torch.bool),
        graphs=graphs,
        targets=torch.from_numpy(np.stack([rng.random(SPEC.num_answers) for rng in rngs])).float(),
        question_types=["t"] * b,
    )


def _config(memory_efficient: bool = False, **isubg: Any) -> RunConfig:
    settings = {**SMALL, **isubg}
    return RunConfig.model_validate(
        {"model": {"isubg": settings}, "memory": {"memory_efficient_attention": memory_efficient}}
    )


def _model(cfg: RunConfig, seed: int = 0, spec: DataSpec = SPEC) -> ISubGBranch:
    torch.manual_seed(seed)
    return build(cfg, spec)


def _loss(out: BranchOutput, batch: Batch) -> torch.Tensor:
    assert batch.targets is not None
    return F.binary_cross_entropy_with_logits(out.logits, batch.targets, reduction="sum") / len(batch)


def _per_graph(values: torch.Tensor, batch: Batch) -> list[float]:
    sums = torch.zeros(batch.graphs.num_graphs).index_add_(0, batch.graphs.batch, values.detach())
    return sums.tolist()


@pytest.mark.parametrize("sampler_type", ["imle", "gumbel"])
@pytest.mark.parametrize("use_mgat", [False, True])
def test_shapes_and_exactly_k_nodes_per_graph_in_eval(sampler_type: str, use_mgat: bool) -> None:
    batch = _batch(ITEMS)
    model = _model(_config(sampler_type=sampler_type, use_mgat=use_mgat, sample_k=3)).eval()
    with torch.no_grad():
        out = model(batch)
    assert out.logits.shape == (4, SPEC.num_answers) and torch.isfinite(out.logits).all()
    assert out.node_mask is not None and out.node_mask.shape == (batch.graphs.num_nodes,)
    assert set(out.node_mask.tolist()) <= {0.0, 1.0}
    assert _per_graph(out.node_mask, batch) == [3.0, 1.0, 3.0, 2.0]


CONFIGS = [
    {},
    {"use_mgat": True},
    {"use_instruction": False, "sampler_type": "gumbel"},
    {"use_masking": False, "mgat_layers": 3},
]


@pytest.mark.parametrize("settings", CONFIGS, ids=["default", "mgat", "no-instr-gumbel", "no-masking"])
def test_a_sample_does_not_depend_on_its_batch_mates(settings: dict[str, Any]) -> None:
    model = _model(_config(**settings)).eval()
    with torch.no_grad():
        together = model(_batch(ITEMS))
        assert together.node_mask is not None
        offsets = np.cumsum([0] + [item[1] for item in ITEMS])
        for row, item in enumerate(ITEMS):
            alone = model(_batch([item]))
            torch.testing.assert_close(alone.logits[0], together.logits[row], atol=1e-5, rtol=1e-5)
            assert alone.node_mask is not None
            assert torch.equal(alone.node_mask, together.node_mask[offsets[row] : offsets[row + 1]])


def test_question_padding_is_masked() -> None:
    model = _model(_config(use_mgat=True)).eval()
    with torch.no_grad():
        short, long = model(_batch(ITEMS, length=12)), model(_batch(ITEMS, length=20))
    torch.testing.assert_close(short.logits, long.logits, atol=1e-6, rtol=1e-6)


GRAD_CONFIGS = [
    {},
    {"use_mgat": True, "nb_samples": 2},
    {"sampler_type": "gumbel", "use_mgat": True},
    {"use_instruction": False, "mgat_layers": 1},
    {"use_masking": False},
]


@pytest.mark.parametrize("settings", GRAD_CONFIGS, ids=["default", "mgat-2", "gumbel-mgat", "no-instr-1", "no-mask"])
def test_backward_reaches_every_parameter(settings: dict[str, Any]) -> None:
    batch = _batch(ITEMS)
    model = _model(_config(**settings)).train()
    _loss(model(batch), batch).backward()
    # Without masking the sampled mask touches no computation: the scorer legitimately gets no gradient.
    excluded = {"scorer."} if settings.get("use_masking") is False else set()
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in excluded):
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _signature(cfg: RunConfig) -> dict[str, Any]:
    """Parameter count, eval logits and mask, and a seeded training step's logits and gradients."""
    batch = _batch(ITEMS)
    model = _model(cfg)
    with torch.no_grad():
        model.eval()
        out = model(batch)
    model.train()
    torch.manual_seed(1)
    train = model(batch)
    _loss(train, batch).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {
        "params": parameter_count(model),
        "eval": torch.cat([out.logits.flatten(), out.node_mask]),
        "train": train.logits.detach(),
        "grads": grads,
    }


def _changed(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    same = [a["params"] == b["params"]]
    same += [a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-7) for k in ("eval", "train", "grads")]
    return [key for key, equal in zip(("params", "eval", "train", "grads"), same, strict=True) if not equal]


# (setting, base, changed, what must change).
EFFECTS = [
    ("general_hidden_dim", 16, 24, "params"),
    ("mgat_layers", 2, 3, "params"),
    ("sampler_type", "imle", "gumbel", "train"),
    ("sample_k", 2, 3, "eval"),
    ("nb_samples", 1, 3, "train"),
    # The I-MLE gradient is piecewise constant in alpha and beta (it changes only when a target top-k
    # flips), so the changes are large enough to flip one on this batch.
    ("alpha", 1.0, 0.2, "grads"),
    ("beta", 10.0, 1000.0, "grads"),
    ("tau", 1.0, 0.5, "train"),
    ("use_instruction", True, False, "params"),
    ("use_masking", True, False, "eval"),
    ("use_mgat", False, True, "eval"),
]


@pytest.mark.parametrize(("name", "base", "changed", "where"), EFFECTS, ids=[e[0] for e in EFFECTS])
def test_every_hyperparameter_has_an_effect(name: str, base: Any, changed: Any, where: str) -> None:
    assert where in _changed(_signature(_config(**{name: base})), _signature(_config(**{name: changed})))


def test_alpha_and_beta_act_only_through_the_imle_gradient() -> None:
    a, b = _signature(_config(alpha=1.0, beta=10.0)), _signature(_config(alpha=0.2, beta=1000.0))
    assert _changed(a, b) == ["grads"]


@pytest.mark.parametrize(
    "settings",
    [
        {"general_hidden_dim": 512, "mgat_layers": 6},
        {"mgat_layers": 2, "use_mgat": True},
        {"mgat_layers": 3, "use_mgat": True},
        {"mgat_layers": 3, "use_mgat": False},
    ],
    ids=["512x6", "mgat-2", "mgat-3", "plain-3"],
)
def test_deep_wide_and_shallow_settings_run_with_masking(settings: dict[str, Any]) -> None:
    batch = _batch(ITEMS[:2])
    model = _model(_config(**settings)).train()
    out = model(batch)
    _loss(out, batch).backward()
    assert len(model.layers) == settings["mgat_layers"]
    assert all(p.grad is not None for p in model.scorer.parameters())  # the sampler is in the loss
    unmasked = _model(_config(**settings, use_masking=False)).eval()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(batch).logits, unmasked(batch).logits, atol=1e-6)


@pytest.mark.parametrize("preset", ["vqa", "high-performance"])
def test_presets_that_crashed_the_reference_build_and_run(preset: str) -> None:
    cfg = resolve_config(preset).config
    assert (cfg.model.isubg.general_hidden_dim, cfg.model.isubg.mgat_layers) == (512, 6)
    batch = _batch(ITEMS[:1])
    with torch.no_grad():
        out = _model(cfg).eval()(batch)
    assert out.logits.shape == (1, SPEC.num_answers) and torch.isfinite(out.logits).all()


def test_masked_layers_silence_unselected_nodes() -> None:
    """In a masked layer, changing an unselected node changes no other node; unmasked, it reaches its targets."""
    torch.manual_seed(0)
    layer = InstructedGATLayer(8).eval()
    edge_index = torch.tensor([[0, 0, 1, 2, 3], [1, 2, 2, 3, 0]])
    edges, instr, h = torch.randn(5, 8), torch.randn(4, 8), torch.randn(4, 8)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # node 3 is not selected; it has an edge into node 0
    moved = h.clone()
    moved[3] += 1.0
    with torch.no_grad():
        masked = layer(h, edge_index, edges, instr, mask), layer(moved, edge_index, edges, instr, mask)
        plain = layer(h, edge_index, edges, instr, None), layer(moved, edge_index, edges, instr, None)
    torch.testing.assert_close(masked[0][:3], masked[1][:3], atol=0, rtol=0)
    assert not torch.allclose(plain[0][0], plain[1][0], atol=1e-4)


def test_node_scores_are_standardised_within_each_graph() -> None:
    torch.manual_seed(0)
    scorer = NodeScorer(8)
    sizes = [3, 1, 6]
    index = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    h, u = torch.randn(10, 8), torch.randn(3, 8)
    with torch.no_grad():
        theta = scorer(h, u, index, 3)
        alone = scorer(h[4:], u[2:], torch.zeros(6, dtype=torch.long), 1)
    torch.testing.assert_close(theta[4:], alone, atol=1e-5, rtol=1e-5)  # training noise sees the same scale
    assert theta[3] == 0  # a one-node graph
    for part in (theta[:3], theta[4:]):
        assert abs(part.mean().item()) < 1e-5 and abs(part.var(unbiased=False).item() - 1) < 1e-2


def test_reverse_flags_attributes_and_boxes_reach_the_output() -> None:
    model = _model(_config()).eval()
    base = _batch(ITEMS)
    changes = {
        "edge_reverse": lambda g: g.edge_reverse.logical_not_(),
        "attributes": lambda g: g.x[:, 1:].clamp_(max=1),
        "box": lambda g: g.box.mul_(0.5),
    }
    with torch.no_grad():
        reference = model(base).logits
        for name, change in changes.items():
            batch = _batch(ITEMS)
            change(batch.graphs)
            assert not torch.allclose(model(batch).logits, reference, atol=1e-6), name


def test_use_masking_off_keeps_the_explanation_out_of_the_answer() -> None:
    batch = _batch(ITEMS)
    model = _model(_config(use_masking=False, sample_k=1)).eval()
    with torch.no_grad():
        before = model(batch)
        model.scorer.out.bias.add_(torch.linspace(0, 1, 1))
        model.scorer.out.weight.mul_(-1)
        after = model(batch)
    assert before.node_mask is not None and after.node_mask is not None
    assert _per_graph(after.node_mask, batch) == [1.0, 1.0, 1.0, 1.0]
    assert not torch.equal(before.node_mask, after.node_mask)  # the explanation follows the scorer
    torch.testing.assert_close(before.logits, after.logits, atol=0, rtol=0)  # the answer does not


@pytest.mark.parametrize("use_mgat", [True, False])
def test_memory_efficient_mode_computes_the_same_function(use_mgat: bool) -> None:
    batch = _batch(ITEMS)
    plain = _model(_config(use_mgat=use_mgat, mgat_layers=3, nb_samples=2))
    efficient = _model(_config(True, use_mgat=use_mgat, mgat_layers=3, nb_samples=2))
    efficient.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(batch).logits, efficient.eval()(batch).logits, atol=1e-5, rtol=1e-5)
    grads = []
    for model in (plain.train(), efficient.train()):
        torch.manual_seed(5)
        _loss(model(batch), batch).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert efficient.memory_efficient and not plain.memory_efficient
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-4, rtol=1e-4, msg=name)


def test_selected_nodes_are_local_indices_per_question() -> None:
    batch = _batch(ITEMS)
    model = _model(_config(sample_k=2)).eval()
    with torch.no_grad():
        out = model(batch)
    chosen = selected_nodes(out, batch)
    assert [len(c) for c in chosen] == [2, 1, 2, 2]
    assert out.node_mask is not None
    selected = torch.nonzero(out.node_mask).flatten()
    for g, local in enumerate(chosen):
        in_graph = selected[batch.graphs.batch[selected] == g]
        assert (in_graph - batch.graphs.ptr[g]).tolist() == local
        assert all(0 <= i < ITEMS[g][1] for i in local)
    with pytest.raises(ValueError, match="no node mask"):
        selected_nodes(BranchOutput(out.logits), batch)


def test_glove_rows_initialise_a_300_wide_embedding() -> None:
    glove = np.random.default_rng(0).standard_normal((SPEC.num_words, 300)).astype(np.float32)
    spec = DataSpec(SPEC.num_words, SPEC.num_answers, SPEC.num_graph_tokens, SPEC.feature_dim, glove=glove)
    model = _model(_config(), spec=spec)
    torch.testing.assert_close(model.question.embed.weight[1:], torch.from_numpy(glove[1:]))
    assert model.question.embed.weight.requires_grad
    assert model(_batch(ITEMS)).logits.shape == (4, SPEC.num_answers)


@pytest.fixture(scope="module")
def demo_gqa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from isubg.data.embedded import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), size="tiny", seed=0).processed("gqa")


def test_a_demo_batch_trains_a_step(demo_gqa: Path) -> None:
    from isubg.data.dataset import VQADataset, collate

    data = VQADataset(demo_gqa, "train", question_len=12, max_boxes=36, num_stat_word=10)
    batch = collate([data[i] for i in range(6)], data.num_answers)
    model = _model(_config(use_mgat=True, sample_k=2), spec=data.spec()).train()
    out = model(batch)
    _loss(out, batch).backward()
    assert out.logits.shape == (6, data.num_answers) and torch.isfinite(out.logits).all()
    sizes = torch.bincount(batch.graphs.batch).tolist()
    assert out.node_mask is not None and _per_graph(out.node_mask, batch) == [float(min(2, n)) for n in sizes]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _tied_spec(glove: np.ndarray | None = None) -> DataSpec:
    """Graph token t has words (t % 7 + 1) and, for odd t, also (t % 5 + 10); token 0 and 3 have none."""
    words = np.zeros((SPEC.num_graph_tokens, 4), dtype=np.int64)
    for t in range(1, SPEC.num_graph_tokens):
        if t != 3:
            words[t, 0] = t % 7 + 1
            if t % 2:
                words[t, 1] = t % 5 + 10
    return DataSpec(SPEC.num_words, SPEC.num_answers, SPEC.num_graph_tokens, SPEC.feature_dim, graph_words=words,
                    glove=glove)  # fmt: skip


@pytest.mark.parametrize("glove", [False, True], ids=["learned", "glove"])
def test_graph_tokens_share_the_question_word_vectors(glove: bool) -> None:
    rows = np.random.default_rng(1).standard_normal((SPEC.num_words, 300)).astype(np.float32) if glove else None
    spec = _tied_spec(rows)
    model = _model(_config(), spec=spec)
    assert "graph_words" not in model.state_dict()  # derived from the data folder, not a weight
    table = model.question.phrase_vectors(model.graph_words)
    project = model.question.embed_proj
    expected_5 = project((model.question.embed.weight[6] + model.question.embed.weight[10]) / 2)  # token 5: 6, 10
    torch.testing.assert_close(table[5], expected_5)
    torch.testing.assert_close(table[3], torch.zeros_like(table[3]))  # no known word: nothing added
    batch = _batch(ITEMS)
    batch.q_tokens[:] = torch.where(batch.q_tokens > 0, 30, 0)  # the questions use none of the graph words
    _loss(model(batch), batch).backward()
    grad = model.question.embed.weight.grad
    assert grad is not None and grad[1:8].abs().sum() > 0 and grad[10:15].abs().sum() > 0  # reached via the graph


def test_share_word_embeddings_off_keeps_graph_and_question_vocabularies_apart() -> None:
    model = _model(_config(share_word_embeddings=False), spec=_tied_spec())
    assert model.graph_words is None
    batch = _batch(ITEMS)
    batch.q_tokens[:] = torch.where(batch.q_tokens > 0, 30, 0)
    _loss(model(batch), batch).backward()
    grad = model.question.embed.weight.grad
    assert grad is not None and grad[1:15].abs().sum() == 0


def test_demo_graph_tokens_map_to_question_words(demo_gqa: Path) -> None:
    from isubg.data.dataset import VQADataset
    from isubg.data.text import Dictionary

    data = VQADataset(demo_gqa, "train", question_len=12, max_boxes=36, num_stat_word=10)
    words = data.spec().graph_words
    dictionary = Dictionary.load(demo_gqa / "dictionary.json")
    assert words.shape == (len(data.graph_vocab), 4)
    assert not words[:3].any()  # <pad>, <unk>, <empty>
    cup = data.graph_vocab.index("cup")
    assert words[cup].tolist() == [dictionary.word_to_id("cup"), 0, 0, 0]
    left = data.graph_vocab.index("to the left of")
    assert [dictionary.id_to_word(i) for i in words[left] if i] == ["to", "the", "left", "of"]
