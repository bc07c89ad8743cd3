"""ban-vqa checkpoints (`model_epoch*.pth`: {'epoch', 'model_state', 'optimizer_state'}) onto the cfrf branch.

ban-vqa's VQA model (`build_ban(dataset, num_hid, op, gamma, task='vqa')`) is a word table (plus a second, tf-idf
initialised table with op 'c'), a one-layer GRU, a low-rank bilinear attention over (raw boxes, question) with
gamma glimpses, per glimpse a bilinear pooling, a question projection and a counter projection, the Zhang counter,
and a two-layer classifier. Every Linear is wrapped in `weight_norm(dim=None)` (a scalar `weight_g` and a
`weight_v`), as is the attention's `h_mat`.

isubg's cfrf branch computes the same with these settings (the parity switches): AOA_layers=0, omega_q=0,
omega_v=0 (no AoA, no entity or stat-word fusion), box_input='features' (BAN's nets read the raw box features),
use_counter=true with counter_act='zhang', activation='relu' and dropout=0.5 (ban-vqa's SimpleClassifier), and
data.tfidf on exactly when the file has the op-'c' table.

Reshapes: weight-norm pairs are folded into one weight (g * v / ||v||); `h_mat` (1, G, 1, 3H) and `h_bias`
(1, G, 1, 1) lose their unit axes; the word table is rolled by one row (ban-vqa pads with its last row, isubg with
row 0, so ban-vqa word i is isubg word i + 1); each counter map drops its first weight, a constant 0 in ban-vqa
(f(0) = 0), which isubg does not store. Unused: the op-'c' table (isubg computes the tf-idf mixture W @ E from the
data instead of storing a copy) and counter maps f8..f15 (allocated, never read by the reference).
"""

from __future__ import annotations

import torch

from isubg.errors import DataError
from isubg.importers.core import Plan, weight_norm

__all__ = ["ban_plan", "ban_sizes", "counter_slopes", "fold_weight_norm", "roll_padding_row"]

_COUNTER_MAPS = 8  # the reference's forward reads f[0]..f[7] of its 16 maps
_PREFIX = "branches.cfrf."


def ban_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """num_hid, gamma, feature_dim, num_words (ban-vqa ntoken + 1), num_answers and tfidf (0/1) of a state dict.

    Raises:
        DataError: a key every ban-vqa VQA model has is absent.
    """
    needed = (
        "w_emb.emb.weight",
        "q_emb.rnn.weight_hh_l0",
        "v_att.logits.h_mat_v",
        "b_net.0.v_net.main.1.weight_v",
        "classifier.main.3.weight_v",
    )
    lacking = [k for k in needed if k not in state]
    if lacking:
        raise DataError(f"not a ban-vqa VQA checkpoint: its model_state lacks {', '.join(lacking)}")
    return {
        "num_hid": int(state["q_emb.rnn.weight_hh_l0"].shape[1]),
        "gamma": int(state["v_att.logits.h_mat_v"].shape[1]),
        "feature_dim": int(state["b_net.0.v_net.main.1.weight_v"].shape[1]),
        "num_words": int(state["w_emb.emb.weight"].shape[0]),
        "num_answers": int(state["classifier.main.3.weight_v"].shape[0]),
        "tfidf": int("w_emb.emb_.weight" in state),
    }


def roll_padding_row(table: torch.Tensor) -> torch.Tensor:
    """ban-vqa's (ntoken + 1, 300) table with its padding row (the last) moved to row 0, where isubg pads."""
    return torch.roll(table, shifts=1, dims=0)


def counter_slopes(weight: torch.Tensor) -> torch.Tensor:
    """A ban-vqa PiecewiseLin weight (n + 1) as isubg's n slopes; its first entry must be the reference's fixed 0.

    Raises:
        ValueError: the first entry is not 0 (then f(0) != 0, which isubg's maps cannot represent).
    """
    if float(weight[0].abs()) != 0.0:
        raise ValueError(f"the counter map's first weight is {float(weight[0])}, not the fixed 0 isubg assumes")
    return weight[1:]


def fold_weight_norm(plan: Plan, target: str, source: str) -> None:
    """A weight-normed Linear (`source`.weight_g/_v/bias) onto a plain Linear `target`."""
    plan.reshape(f"{target}.weight", (f"{source}.weight_g", f"{source}.weight_v"), "weight-norm fold", weight_norm)
    plan.copy(f"{target}.bias", f"{source}.bias")


def ban_plan(state: dict[str, torch.Tensor]) -> Plan:
    """The mapping of a ban-vqa VQA state dict onto a one-branch (cfrf) isubg model, with its settings."""
    sizes = ban_sizes(state)
    plan = Plan(kind="ban")
    p = _PREFIX
    plan.reshape(f"{p}words.table.weight", ("w_emb.emb.weight",), "padding row last -> first", roll_padding_row)
    plan.unused["w_emb.emb_.weight"] = (
        "op 'c' tf-idf table: isubg computes the mixture W @ E from the data's tf-idf matrix (data.tfidf) instead"
    )
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        plan.copy(f"{p}gru.{name}", f"q_emb.rnn.{name}")
    # ban-vqa's attention is BCNet(v, q): its v side is isubg's y side, its q side isubg's x side.
    att = "v_att.logits"
    fold_weight_norm(plan, f"{p}ban.attention.y_net.1", f"{att}.v_net.main.1")
    fold_weight_norm(plan, f"{p}ban.attention.x_net.1", f"{att}.q_net.main.1")
    plan.reshape(
        f"{p}ban.attention.h_mat",
        (f"{att}.h_mat_g", f"{att}.h_mat_v"),
        "weight-norm fold, (1, G, 1, 3H) -> (G, 3H)",
        lambda g, v: weight_norm(g, v).reshape(v.shape[1], v.shape[3]),
    )
    plan.reshape(f"{p}ban.attention.h_bias", (f"{att}.h_bias",), "(1, G, 1, 1) -> (G,)", lambda b: b.reshape(-1))
    for g in range(sizes["gamma"]):
        fold_weight_norm(plan, f"{p}ban.pools.{g}.y_net.1", f"b_net.{g}.v_net.main.1")
        fold_weight_norm(plan, f"{p}ban.pools.{g}.x_net.1", f"b_net.{g}.q_net.main.1")
        fold_weight_norm(plan, f"{p}ban.q_prj.{g}.1", f"q_prj.{g}.main.1")
        fold_weight_norm(plan, f"{p}ban.c_prj.{g}.0", f"c_prj.{g}.main.0")
    for k in range(16):
        key = f"counter.f.{k}.weight"
        if k < _COUNTER_MAPS:
            plan.reshape(f"{p}ban.counter.maps.{k}.slopes", (key,), "counter map: drop the fixed 0", counter_slopes)
        else:
            plan.unused[key] = "counter maps f8..f15: allocated by the reference Counter, never read by its forward"
    fold_weight_norm(plan, f"{p}classifier.net.0", "classifier.main.0")
    fold_weight_norm(plan, f"{p}classifier.net.3", "classifier.main.3")
    plan.new["adapted_w"] = "fusion weights of a one-branch model: any value gives that branch weight 1"
    plan.spec = {k: sizes[k] for k in ("num_words", "num_answers", "feature_dim")}
    plan.sets = [
        "model.branches=[cfrf]",
        f"model.cfrf.num_hid={sizes['num_hid']}",
        f"model.cfrf.gamma={sizes['gamma']}",
        f"data.tfidf={'true' if sizes['tfidf'] else 'false'}",
    ]
    plan.switches = {
        "model.cfrf.AOA_layers=0": "ban-vqa has no AoA layers",
        "model.cfrf.omega_q=0": "ban-vqa has no entity fusion",
        "model.cfrf.omega_v=0": "ban-vqa has no stat-word fusion",
        "model.cfrf.box_input=features": "ban-vqa's attention and pooling nets read the raw box features",
        "model.cfrf.use_counter=true": "build_ban(task='vqa') always builds and uses the counter",
        "model.cfrf.counter_act=zhang": "the counter's learned piecewise-linear maps",
        "model.cfrf.activation=relu": "ban-vqa's SimpleClassifier uses ReLU",
        "model.cfrf.dropout=0.5": "ban-vqa's SimpleClassifier dropout (training only)",
    }
    return plan
