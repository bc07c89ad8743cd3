"""The X-VLM side of benchmarks/bench_parity.py: runs under an interpreter with transformers 4.x, never imports isubg.

    <old-python> benchmarks/xvlm_reference_worker.py --repo DIR --out DIR [--batch 2] [--seed 0] [--vision swin|clip]

Builds X-VLM's VQA model (`models.model_vqa.XVLM`) from the checkout at --repo with configs/config_swinB_384.json
(Swin-B, 384 px, window 12) or configs/config_clipvitB.json, configs/config_bert.json (6 text + 6 fusion layers)
and a 6-layer answer decoder, from a fixed seed; writes its randomly initialised weights in X-VLM's own format
({'model': state_dict}) to OUT/xvlm_vqa.pth, and OUT/reference.pt holding one batch and what the reference computes
on it in eval mode, fp32:

- ids, mask: (B, T) BERT ids ([CLS] ... [SEP]; the last row padded) and their mask;
- image: (B, 3, R, R); image_embeds: the vision encoder's tokens (B, 1 + P, 1024) for Swin ([avg-pooled, patches]);
- image_states: text_encoder(ids, mask, encoder_hidden_states=image_embeds).last_hidden_state (B, T, 768);
- regions, region_mask: a random visual token tensor (B, 37, W) and its mask (the last row padded), W the vision
  width; region_states: the text encoder's states over them (the region mode: no vision encoder).

X-VLM's code needs timm, torchvision, scipy and its utils package only for helpers the forward pass does not use
here; this worker registers small stand-ins before importing it (timm: DropPath (identity: eval mode), to_2tuple,
trunc_normal_ (torch's), registry and vision_transformer names; torchvision.ops.boxes.box_area; scipy.interpolate
(position-table resizing, not called); utils.read_json). Nothing in the checkout is edited.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import torch
import transformers  # noqa: F401  (imported before the stand-ins, so its optional-package probes see no timm)
from torch import nn

IMAGE_RES = {"swin": 384, "clip": 224}
VISION_JSON = {"swin": "configs/config_swinB_384.json", "clip": "configs/config_clipvitB.json"}


class _DropPath(nn.Module):
    """timm's stochastic depth; the identity in eval mode, which is all the worker runs."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def install_stand_ins() -> None:
    """timm / torchvision / scipy / X-VLM utils names the model code imports (see the module docstring)."""

    def to_2tuple(x: Any) -> tuple[Any, Any]:
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    _module("timm")
    _module("timm.models")
    _module("timm.models.layers", DropPath=_DropPath, to_2tuple=to_2tuple, trunc_normal_=nn.init.trunc_normal_)
    _module("timm.models.vision_transformer", _cfg=lambda **kw: kw, PatchEmbed=nn.Module)
    _module("timm.models.registry", register_model=lambda fn: fn)
    _module("torchvision")
    _module("torchvision.ops")
    _module("torchvision.ops.boxes", box_area=lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    _module("scipy", interpolate=_module("scipy.interpolate"))
    _module("utils", read_json=lambda path: json.loads(Path(path).read_text()))


def build(repo: Path, vision: str) -> nn.Module:
    """X-VLM's VQA model with random weights (seeded by the caller)."""
    install_stand_ins()
    sys.path.insert(0, str(repo))
    os.chdir(repo)  # X-VLM opens its config JSONs by relative path
    from models.model_vqa import XVLM  # type: ignore[import-not-found]

    config = {
        "vision_config": VISION_JSON[vision],
        "use_clip_vit": vision == "clip",
        "use_swin": vision == "swin",
        "image_res": IMAGE_RES[vision],
        "patch_size": 32 if vision == "swin" else 16,
        "use_roberta": False,
        "text_config": "configs/config_bert.json",
        "text_encoder": "unused: no pretrained BERT is loaded",
        "num_dec_layers": 6,
        "pad_token_id": 0,
    }
    return XVLM(config).eval()


def batch(batch_size: int, res: int, width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Question ids, images and region tokens; the last row of the text and of the regions is padded."""
    length, regions = 12, 37
    ids = torch.randint(1000, 30000, (batch_size, length), generator=gen)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    ids[:, 0] = 101  # [CLS]
    ids[:, -1] = 102  # [SEP]
    ids[-1, -4:] = 0
    ids[-1, -5] = 102
    mask[-1, -4:] = 0
    region_mask = torch.ones(batch_size, regions, dtype=torch.long)
    region_mask[-1, 20:] = 0
    return {
        "ids": ids,
        "mask": mask,
        "image": torch.randn(batch_size, 3, res, res, generator=gen),
        "regions": torch.randn(batch_size, regions, width, generator=gen),
        "region_mask": region_mask,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision", choices=("swin", "clip"), default="swin")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = build(args.repo.resolve(), args.vision)
    torch.save({"model": model.state_dict()}, out / "xvlm_vqa.pth")
    gen = torch.Generator().manual_seed(args.seed + 1)
    data = batch(args.batch, IMAGE_RES[args.vision], model.vision_width, gen)
    with torch.no_grad():
        embeds = model.vision_encoder(data["image"])
        image_states = model.text_encoder(
            data["ids"],
            attention_mask=data["mask"],
            encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            return_dict=True,
        ).last_hidden_state
        region_states = model.text_encoder(
            data["ids"],
            attention_mask=data["mask"],
            encoder_hidden_states=data["regions"],
            encoder_attention_mask=data["region_mask"],
            return_dict=True,
        ).last_hidden_state
    result = {**data, "image_embeds": embeds, "image_states": image_states, "region_states": region_states}
    torch.save(result, out / "reference.pt")
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "vision_width": model.vision_width}))


if __name__ == "__main__":
    main()
