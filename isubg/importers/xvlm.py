"""X-VLM checkpoints (pre-training and VQA, {'model': state_dict}) onto the xvlm branch.

Text: `text_encoder.embeddings.*` and `text_encoder.encoder.layer.{i}.*` (pre-training writes `text_encoder.bert.`;
both spellings are read) go to the branch's embeddings, its text layers (i < fusion layer) and its cross layers,
through `isubg.models.xvlm.xvlm_key_map`. The layer counts, widths and the cross-attention key/value width (1024 for
Swin-B) are read from the file and become settings (model.xvlm.num_text_layers, ..., cross_width).

Vision, Swin (`vision_encoder.patch_embed.*`, `vision_encoder.layers.*`): into transformers' SwinModel. Reshapes:
each block's fused `attn.qkv` (3C, C) splits into query/key/value (rows [0, C), [C, 2C), [2C, 3C)); names change
(`norm1` -> `layernorm_before`, `attn.proj` -> the output projection, `norm2` -> `layernorm_after`,
`patch_embed.proj/norm` -> the patch embedding and its norm, `norm` -> the final `layernorm`); the relative position
tables, MLPs and patch-merging layers copy as they are (both concatenate the 2x2 neighbours in the same order).
`relative_position_index` and `attn_mask` are buffers SwinModel recomputes. The window and image size follow from the
tables: (2w - 1)^2 rows, image_res = 32 w.

Vision, CLIP-ViT (`vision_encoder.class_embedding`, `vision_encoder.encoder.layers.*`): into transformers' ViTModel
(attention projections, layer norms, MLPs, the final norm, the class and position embeddings, reshaped to (1, 1, D)
and (1, N, D); image_res = patch x sqrt(N - 1)), with model.xvlm.vit_layout 'clip' for what ViTModel lacks: CLIP's
`pre_layrnorm` goes to the image encoder's pre-norm, the activation is quick-GELU and the LayerNorm eps 1e-5.
ViT's patch-embedding bias, which CLIP lacks, is set to zero.

Unused by design: the answer decoder (`text_decoder.*`: isubg ranks answers with a classification head, whose
weights are new), pre-training heads (`vision_proj`, `text_proj`, `itm_head`, `bbox_head`, `temp`,
`text_encoder.cls.*`), `position_ids` buffers.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from isubg.errors import DataError
from isubg.importers.core import Plan
from isubg.models.xvlm import xvlm_key_map

__all__ = ["canonical_text_key", "clip_plan", "swin_plan", "xvlm_plan"]

_PREFIX = "branches.xvlm."
_BACKBONE = "vision.backbone."
_DECODER = "answer decoder: isubg ranks answers with a classification head over the answer list instead"
_PRETRAIN = "pre-training head (contrastive / matching / box / masked LM); VQA fine-tuning does not use it"
_SWIN_BUFFER = "buffer transformers' SwinModel computes itself"
# transformers 5 spells Swin/ViT attention q_proj/k_proj/v_proj/o_proj; 4.x attention.self.query/... (both listed;
# only the model's own names are applied).
_ATTN_NAMES = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("self.query", "self.key", "self.value", "output.dense"),
)


def canonical_text_key(key: str) -> str:
    """`text_encoder.bert.x` -> `text_encoder.x`, LayerNorm gamma/beta -> weight/bias (older BERT spellings)."""
    if key.startswith("text_encoder.bert."):
        key = "text_encoder." + key.removeprefix("text_encoder.bert.")
    if key.endswith("LayerNorm.gamma"):
        key = key.removesuffix("gamma") + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key.removesuffix("beta") + "bias"
    return key


def _text_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Hidden size, FFN width, text/cross layer counts and the cross K/V width of the text encoder."""
    canon = {canonical_text_key(k): v for k, v in state.items()}
    word = canon.get("text_encoder.embeddings.word_embeddings.weight")
    if word is None:
        raise DataError("not an X-VLM checkpoint: it has no text_encoder.embeddings.word_embeddings.weight")
    layers = {int(m.group(1)) for k in canon if (m := re.match(r"text_encoder\.encoder\.layer\.(\d+)\.", k))}
    cross = {i for i in layers if f"text_encoder.encoder.layer.{i}.crossattention.self.key.weight" in canon}
    if not cross:
        raise DataError("not an X-VLM checkpoint: no text_encoder layer has cross-attention")
    first = min(cross)
    return {
        "hidden_size": int(word.shape[1]),
        "vocab": int(word.shape[0]),
        "intermediate_size": int(canon[f"text_encoder.encoder.layer.{first}.intermediate.dense.weight"].shape[0]),
        "num_text_layers": first,
        "num_cross_layers": len(layers) - first,
        "cross_width": int(canon[f"text_encoder.encoder.layer.{first}.crossattention.self.key.weight"].shape[1]),
    }


def _split(part: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The `part`-th third (0 query, 1 key, 2 value) of a fused qkv weight or bias along its first axis."""
    return lambda t: t.chunk(3, dim=0)[part]


def swin_plan(state: dict[str, torch.Tensor], src: str, dst: str) -> tuple[Plan, dict[str, int]]:
    """Microsoft/timm Swin keys under `src` onto a transformers SwinModel under `dst`; also the sizes it implies.

    Sizes: embed_dim, depths, num_heads, window_size, image_res (32 x window, X-VLM's pairing).
    """
    plan = Plan(kind="xvlm")
    blocks: dict[int, set[int]] = {}
    for key in state:
        if m := re.match(re.escape(src) + r"layers\.(\d+)\.blocks\.(\d+)\.", key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    heads, window = [], 0
    for stage in sorted(blocks):
        table = state[f"{src}layers.{stage}.blocks.0.attn.relative_position_bias_table"]
        heads.append(int(table.shape[1]))
        window = (round(table.shape[0] ** 0.5) + 1) // 2
    sizes = {
        "embed_dim": int(state[f"{src}patch_embed.proj.weight"].shape[0]),
        "depths": [len(blocks[s]) for s in sorted(blocks)],
        "num_heads": heads,
        "window_size": window,
        "image_res": 32 * window,
    }
    for kind in ("weight", "bias"):
        plan.copy(f"{dst}embeddings.patch_embeddings.projection.{kind}", f"{src}patch_embed.proj.{kind}")
        plan.copy(f"{dst}embeddings.norm.{kind}", f"{src}patch_embed.norm.{kind}")
        plan.copy(f"{dst}layernorm.{kind}", f"{src}norm.{kind}")
    for stage in sorted(blocks):
        _swin_stage(plan, src, dst, stage, sorted(blocks[stage]))
    return plan, sizes


def _swin_stage(plan: Plan, src: str, dst: str, stage: int, blocks: list[int]) -> None:
    """One Swin stage's blocks and its patch merging."""
    for b in blocks:
        s, d = f"{src}layers.{stage}.blocks.{b}.", f"{dst}encoder.layers.{stage}.blocks.{b}."
        plan.unused[f"{s}attn.relative_position_index"] = _SWIN_BUFFER
        plan.unused[f"{s}attn_mask"] = _SWIN_BUFFER
        for q, k, v, o in _ATTN_NAMES:
            for kind in ("weight", "bias"):
                for part, name in enumerate((q, k, v)):
                    plan.reshape(f"{d}attention.{name}.{kind}", (f"{s}attn.qkv.{kind}",), "qkv split", _split(part))
                plan.copy(f"{d}attention.{o}.{kind}", f"{s}attn.proj.{kind}")
        tables = (
            "attention.relative_position_bias.relative_position_bias_table",
            "attention.self.relative_position_bias_table",
        )
        for table in tables:
            plan.copy(f"{d}{table}", f"{s}attn.relative_position_bias_table")
        for kind in ("weight", "bias"):
            plan.copy(f"{d}layernorm_before.{kind}", f"{s}norm1.{kind}")
            plan.copy(f"{d}layernorm_after.{kind}", f"{s}norm2.{kind}")
            plan.copy(f"{d}mlp.fc1.{kind}", f"{s}mlp.fc1.{kind}")
            plan.copy(f"{d}mlp.fc2.{kind}", f"{s}mlp.fc2.{kind}")
            plan.copy(f"{d}intermediate.dense.{kind}", f"{s}mlp.fc1.{kind}")
            plan.copy(f"{d}output.dense.{kind}", f"{s}mlp.fc2.{kind}")
    m, dm = f"{src}layers.{stage}.downsample.", f"{dst}encoder.layers.{stage}.downsample."
    plan.copy(f"{dm}reduction.weight", f"{m}reduction.weight")
    plan.copy(f"{dm}norm.weight", f"{m}norm.weight")
    plan.copy(f"{dm}norm.bias", f"{m}norm.bias")


def clip_plan(state: dict[str, torch.Tensor], src: str, dst: str, pre_norm: str | None = None) -> Plan:
    """X-VLM's CLIP-ViT keys under `src` onto a transformers ViTModel under `dst` (see the module docstring).

    `pre_norm`: the name of the LayerNorm that takes CLIP's `pre_layrnorm` (the ImageEncoder's, with
    model.xvlm.vit_layout 'clip'); None: it stays unused.
    """
    plan = Plan(kind="xvlm")
    plan.reshape(
        f"{dst}embeddings.cls_token", (f"{src}class_embedding",), "(D,) -> (1, 1, D)", lambda t: t.view(1, 1, -1)
    )
    plan.reshape(
        f"{dst}embeddings.position_embeddings", (f"{src}pos_embed.weight",), "(N, D) -> (1, N, D)", lambda t: t[None]
    )
    plan.copy(f"{dst}embeddings.patch_embeddings.projection.weight", f"{src}patch_embed.weight")
    plan.reshape(
        f"{dst}embeddings.patch_embeddings.projection.bias",
        (f"{src}class_embedding",),
        "zero bias (CLIP's patch embedding has none)",
        torch.zeros_like,
    )
    for kind in ("weight", "bias"):
        if pre_norm is None:
            plan.unused[f"{src}pre_layrnorm.{kind}"] = "CLIP's pre-encoder LayerNorm: no place in transformers' ViT"
        else:
            plan.copy(f"{pre_norm}.{kind}", f"{src}pre_layrnorm.{kind}")
        plan.copy(f"{dst}layernorm.{kind}", f"{src}post_layernorm.{kind}")
    plan.unused[f"{src}position_ids"] = "buffer"
    layers = {int(m.group(1)) for k in state if (m := re.match(re.escape(src) + r"encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        s = f"{src}encoder.layers.{i}."
        for layer_prefix, (q, k, v, o) in ((f"{dst}layers.{i}.attention.", _ATTN_NAMES[0]),):
            for kind in ("weight", "bias"):
                for name, clip in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj"), (o, "out_proj")):
                    plan.copy(f"{layer_prefix}{name}.{kind}", f"{s}self_attn.{clip}.{kind}")
        for kind in ("weight", "bias"):
            d = f"{dst}layers.{i}."
            plan.copy(f"{d}layernorm_before.{kind}", f"{s}layer_norm1.{kind}")
            plan.copy(f"{d}layernorm_after.{kind}", f"{s}layer_norm2.{kind}")
            plan.copy(f"{d}mlp.fc1.{kind}", f"{s}mlp.fc1.{kind}")
            plan.copy(f"{d}mlp.fc2.{kind}", f"{s}mlp.fc2.{kind}")
    return plan


def xvlm_plan(state: dict[str, torch.Tensor]) -> Plan:
    """The mapping of an X-VLM state dict onto a one-branch (xvlm) isubg model, with the settings it implies."""
    sizes = _text_sizes(state)
    plan = Plan(kind="xvlm")
    by_canon = {canonical_text_key(k): k for k in state}
    for source, target in xvlm_key_map(sizes["num_text_layers"], sizes["num_cross_layers"]).items():
        if source in by_canon:
            plan.copy(_PREFIX + target, by_canon[source])
    for key in state:
        if key.startswith("text_decoder."):
            plan.unused[key] = _DECODER
        elif (
            key.startswith(("vision_proj.", "text_proj.", "itm_head.", "bbox_head.", "text_encoder.cls."))
            or key == "temp"
        ):
            plan.unused[key] = _PRETRAIN
        elif key.endswith("position_ids"):
            plan.unused[key] = "buffer (positions 0..N-1), recomputed"
    plan.sets = [
        "model.branches=[xvlm]",
        f"model.xvlm.hidden_size={sizes['hidden_size']}",
        f"model.xvlm.num_heads={max(1, sizes['hidden_size'] // 64)}",
        f"model.xvlm.intermediate_size={sizes['intermediate_size']}",
        f"model.xvlm.num_text_layers={sizes['num_text_layers']}",
        f"model.xvlm.num_cross_layers={sizes['num_cross_layers']}",
        f"model.xvlm.cross_width={sizes['cross_width']}",
    ]
    if "vision_encoder.patch_embed.proj.weight" in state:
        swin, vision = swin_plan(state, "vision_encoder.", _PREFIX + _BACKBONE)
        plan.extend(swin)
        plan.sets += ["model.xvlm.vision=swin", f"model.xvlm.image_res={vision['image_res']}"]
    elif "vision_encoder.class_embedding" in state:
        plan.extend(clip_plan(state, "vision_encoder.", _PREFIX + _BACKBONE, _PREFIX + "vision.pre_norm"))
        patch = int(state["vision_encoder.patch_embed.weight"].shape[-1])
        side = round((state["vision_encoder.pos_embed.weight"].shape[0] - 1) ** 0.5)  # N = side^2 patches + [CLS]
        plan.sets += ["model.xvlm.vision=vit", f"model.xvlm.image_res={patch * side}"]
        plan.switches["model.xvlm.vit_layout=clip"] = (
            "CLIP's layout: a LayerNorm before the first layer, quick-GELU, LayerNorm eps 1e-5"
        )
    else:
        plan.new[_PREFIX + "vision."] = "region-token encoder: isubg's (the file has no vision encoder)"
    plan.new[_PREFIX + "head."] = "answer classifier: X-VLM ranks answers with its decoder (text_decoder.*)"
    plan.new["adapted_w"] = "fusion weights of a one-branch model: any value gives that branch weight 1"
    plan.switches[f"model.xvlm.cross_width={sizes['cross_width']}"] = (
        "X-VLM's cross-attention keys/values read the vision tokens at their own width, unprojected"
    )
    return plan
