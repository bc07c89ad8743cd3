"""MGHR saves (`model_epoch*.pth`: {'epoch', 'model_state', 'optimizer_state'}) onto the three-branch isubg model.

MGHR's `CFRF_Model` holds the X-VLM VQA model (`XVLM_model.*`), the ISubGVQA model (`ISubGVQA_model.*`), the
fine-grained parts (`w_emb`, `q_emb`, `sw_emb`, `s_emb`, `ew_emb`, `qe_joint`, `vs_joint`, `vq_joint`,
`attn_AOA_fine`, `classifier`) and the fusion weights `adapted_w` (3, A), rows [ISubGVQA, X-VLM, fine-grained].

Where the names map:

- `XVLM_model.*`: as an X-VLM checkpoint (isubg.importers.xvlm), into the xvlm branch.
- Fine-grained: the question word table (rolled by one row, as ban-vqa's), the question GRU, the AoA layers
  (`attn_AOA_fine.{i}.to_q/to_kv/aoa.0` -> `aoa.attn.{i}.to_q/to_kv/aoa`, with aoa_norm='none': MGHR has no AoA
  norms), `vq_joint` (gamma glimpses over question x stat-word slots) into BAN (weight-norm folds; its bilinear
  "v" side is the question, isubg's x side), and the classifier.
- `adapted_w`: rows reordered to isubg's branch order (cfrf, isubg, xvlm).

Unused, with the reason in the report: the stat-word and entity tables and the stat-word GRU (isubg embeds stat
words and entities with the question's table and no GRU), `qe_joint` / `vs_joint` (rank-3 attention in MGHR,
rank 1 in isubg, and vs_joint refines the stat words by the boxes where isubg refines the boxes by the stat words),
and every `ISubGVQA_model.*` tensor (isubg's graph branch is its own design: a GRU question encoder and GATv2
layers instead of CLIP-text transformers and MaskingGATv2). The isubg branch's weights are therefore new.
No output parity is claimed for MGHR: its vq_joint update is multiplicative (q + q_prj(b) * q), BAN's additive.
"""

from __future__ import annotations

import torch

from isubg.errors import DataError
from isubg.importers.ban import fold_weight_norm, roll_padding_row
from isubg.importers.core import Plan, weight_norm
from isubg.importers.xvlm import xvlm_plan

__all__ = ["mghr_plan"]

_CFRF = "branches.cfrf."
_ISUBG_REASON = "ISubGVQA weights: isubg's graph branch is its own design (GRU question encoder, GATv2 layers)"
# MGHR's adapted_w rows are [ISubGVQA, X-VLM, fine-grained]; isubg's follow model.branches = [cfrf, isubg, xvlm].
_ROW_ORDER = [2, 0, 1]


def _fine_grained(plan: Plan, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Rules for the fine-grained parts; returns num_hid, gamma and the AoA layer count."""
    plan.reshape(f"{_CFRF}words.table.weight", ("w_emb.emb.weight",), "padding row last -> first", roll_padding_row)
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        plan.copy(f"{_CFRF}gru.{name}", f"q_emb.rnn.{name}")
    att = "vq_joint.v_att.logits"
    gamma = int(state[f"{att}.h_mat_v"].shape[1])
    fold_weight_norm(plan, f"{_CFRF}ban.attention.x_net.1", f"{att}.v_net.main.1")
    fold_weight_norm(plan, f"{_CFRF}ban.attention.y_net.1", f"{att}.q_net.main.1")
    plan.reshape(
        f"{_CFRF}ban.attention.h_mat",
        (f"{att}.h_mat_g", f"{att}.h_mat_v"),
        "weight-norm fold, (1, G, 1, 3H) -> (G, 3H)",
        lambda g, v: weight_norm(g, v).reshape(v.shape[1], v.shape[3]),
    )
    plan.unused[f"{att}.h_bias"] = "attention bias: a per-glimpse constant cannot change the softmax (no counter)"
    for g in range(gamma):
        fold_weight_norm(plan, f"{_CFRF}ban.pools.{g}.x_net.1", f"vq_joint.b_net.{g}.v_net.main.1")
        fold_weight_norm(plan, f"{_CFRF}ban.pools.{g}.y_net.1", f"vq_joint.b_net.{g}.q_net.main.1")
        fold_weight_norm(plan, f"{_CFRF}ban.q_prj.{g}.1", f"vq_joint.q_prj.{g}.main.1")
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("attn_AOA_fine.")})
    for i in layers:
        plan.copy(f"{_CFRF}aoa.attn.{i}.to_q.weight", f"attn_AOA_fine.{i}.to_q.weight")
        plan.copy(f"{_CFRF}aoa.attn.{i}.to_kv.weight", f"attn_AOA_fine.{i}.to_kv.weight")
        plan.copy(f"{_CFRF}aoa.attn.{i}.aoa.weight", f"attn_AOA_fine.{i}.aoa.0.weight")
        plan.copy(f"{_CFRF}aoa.attn.{i}.aoa.bias", f"attn_AOA_fine.{i}.aoa.0.bias")
    fold_weight_norm(plan, f"{_CFRF}classifier.net.0", "classifier.main.0")
    fold_weight_norm(plan, f"{_CFRF}classifier.net.3", "classifier.main.3")
    return {"num_hid": int(state["q_emb.rnn.weight_hh_l0"].shape[1]), "gamma": gamma, "aoa": len(layers)}


def _reasons(plan: Plan, state: dict[str, torch.Tensor]) -> None:
    """Why each MGHR tensor without an isubg destination stays unused."""
    for key in state:
        if key.startswith("ISubGVQA_model."):
            plan.unused[key] = _ISUBG_REASON
        elif key.startswith(("sw_emb.", "ew_emb.", "s_emb.")):
            plan.unused[key] = "stat-word / entity tables and stat-word GRU: isubg uses the question's table, no GRU"
        elif key.startswith(("qe_joint.", "vs_joint.")):
            plan.unused[key] = "CFR entity / stat-word fusion: rank-3 attention and other roles than isubg's fusions"
        elif key == "w_emb.emb_.weight":
            plan.unused[key] = "op 'c' tf-idf table: isubg computes W @ E from the data's tf-idf matrix (data.tfidf)"
        elif key.startswith("vq_joint.") and (".c_prj." in key or ".counter." in key):
            plan.unused[key] = "counter parts: MGHR never uses its counter"


def mghr_plan(state: dict[str, torch.Tensor]) -> Plan:
    """The mapping of an MGHR state dict onto the three-branch isubg model, with the settings it implies."""
    needed = ("adapted_w", "q_emb.rnn.weight_hh_l0", "vq_joint.v_att.logits.h_mat_v", "w_emb.emb.weight")
    lacking = [k for k in needed if k not in state]
    if lacking:
        raise DataError(f"not an MGHR checkpoint: its model_state lacks {', '.join(lacking)}")
    xvlm_state = {k.removeprefix("XVLM_model."): v for k, v in state.items() if k.startswith("XVLM_model.")}
    plan = Plan(kind="mghr")
    xvlm = xvlm_plan(xvlm_state)
    plan.extend(xvlm, source_prefix="XVLM_model.")
    plan.new.pop("adapted_w", None)
    plan.sets = [s for s in plan.sets if not s.startswith("model.branches=")]
    sizes = _fine_grained(plan, state)
    _reasons(plan, state)
    plan.reshape("adapted_w", ("adapted_w",), "rows [ISubGVQA, X-VLM, fine] -> [cfrf, isubg, xvlm]", _reorder_rows)
    plan.new["branches.isubg."] = _ISUBG_REASON
    for part in ("entity_fusion.", "stat_fusion.", "box_proj."):
        plan.new[_CFRF + part] = (
            "isubg's entity / stat-word fusion and box projection: MGHR's qe_joint / vs_joint differ"
        )
    plan.sets = [
        "model.branches=[cfrf, isubg, xvlm]",
        f"model.cfrf.num_hid={sizes['num_hid']}",
        f"model.cfrf.gamma={sizes['gamma']}",
        f"model.cfrf.AOA_layers={sizes['aoa']}",
        f"data.tfidf={'true' if 'w_emb.emb_.weight' in state else 'false'}",
        *plan.sets,
    ]
    plan.switches.update(
        {
            "model.cfrf.aoa_norm=none": "MGHR's AoA layers have plain residuals",
            "model.cfrf.use_counter=false": "MGHR never builds its counter",
        }
    )
    plan.spec = {"num_words": int(state["w_emb.emb.weight"].shape[0]), "num_answers": int(state["adapted_w"].shape[1])}
    return plan


def _reorder_rows(weights: torch.Tensor) -> torch.Tensor:
    """MGHR's (3, A) fusion weights in isubg's branch order."""
    return weights[_ROW_ORDER]
