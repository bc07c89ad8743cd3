"""The X-VLM branch: BERT text layers, BERT fusion layers that cross-attend to visual tokens, an answer classifier.

Architecture (X-VLM for VQA, "6L text + 6L cross"): the question goes through `num_text_layers` bidirectional
self-attention layers, then `num_cross_layers` fusion layers (self-attention, cross-attention whose keys and values
are the visual tokens, feed-forward). All blocks are the `transformers` BERT modules (`BertEmbeddings`,
`BertAttention`, `BertIntermediate`, `BertOutput`), so an X-VLM checkpoint's text encoder loads into them by name.

Deviations from X-VLM, and why:

- Answers come from a classification head on the [CLS] state over the full answer list, not from X-VLM's 6-layer
  answer decoder that ranks the top `k_test=128` answers. The head gives every answer a probability (the per-answer
  fusion needs that) and keeps gradients (MGHR's ranker output was detached). `topk` keeps X-VLM's candidate
  idea as a training loss: `candidate_loss` is a soft cross-entropy restricted to the top-`topk` answers plus the
  gold ones, like MGHR's `--tune_xvlm` candidate loss.
- Visual tokens default to region features: each box (features + 6 spatials) goes through a LayerNorm'd linear
  projection straight to the text width, and a global [IMG] token (masked mean of the boxes plus a learned vector)
  comes first, in the place of Swin's average-pooled token. By default the visual tokens are projected to the text
  width, where `transformers` builds cross-attention keys/values. `model.xvlm.cross_width` (set by `isubg
  import-checkpoint xvlm`, 1024 for Swin-B) gives X-VLM's layout instead: keys/values read tokens of that width,
  Swin/ViT tokens go in unprojected when the width is the encoder's, and region tokens are projected to it.
- Text: with `model.xvlm.text_encoder` naming a local BERT folder (vocab.txt) the raw question is cleaned as X-VLM
  does (`pre_question`), WordPiece-tokenized and cut to `max_tokens`. Without it (the offline default) the isubg
  word ids are used with an embedding of `num_words + 2` rows ([CLS] and [SEP] appended); a real checkpoint's word
  embeddings then mismatch and are reported, so real weights need the real tokenizer folder.
- `vision: swin|vit` encodes `Batch.images` (data.image_root, preprocessed by isubg.data.images at `image_res`) with
  a `transformers` Swin or ViT (`ImageEncoder`, built from a config, nothing downloaded) whose tokens are projected
  to the text width, for the same reason as the region tokens (not with X-VLM's cross_width, see above). Its weights
  start random; `isubg import-checkpoint xvlm` (isubg.importers.xvlm) maps an X-VLM checkpoint's Swin weights into
  it (`load_xvlm_checkpoint` below maps the text and fusion layers only). The ViT stands in for X-VLM's CLIP-ViT
  (same sizes, HF ViT layout); `model.xvlm.vit_layout: clip` adds what CLIP has and ViT lacks (a LayerNorm before
  the first layer, quick-GELU, LayerNorm eps 1e-5), so an imported CLIP-ViT computes what X-VLM's does. With
  `memory_efficient_attention` the backbone recomputes activations in backward (gradient checkpointing).
- `model.xvlm.xvlm_config` (an X-VLM settings YAML) is applied by `build` through
  `isubg.models.xvlm_config.apply_xvlm_settings`; what it set is in `XvlmBranch.settings_report`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, SwinConfig, SwinModel, ViTConfig, ViTModel
from transformers.models.bert.modeling_bert import BertAttention, BertEmbeddings, BertIntermediate, BertOutput

from isubg.batch import Batch, DataSpec
from isubg.config import RunConfig, XvlmConfig
from isubg.errors import ConfigError, DataError
from isubg.models.common import BranchOutput, Classifier, masked_mean
from isubg.models.xvlm_config import XvlmSettings, apply_xvlm_settings

__all__ = [
    "FusionLayer",
    "ImageEncoder",
    "LoadReport",
    "RegionEncoder",
    "XvlmBranch",
    "bert_config",
    "build",
    "load_tokenizer",
    "load_xvlm_checkpoint",
    "pre_question",
    "vision_config",
    "xvlm_key_map",
]

# BERT-base constants X-VLM's config_bert.json uses (dropout 0.1, LayerNorm eps 1e-12, 512 positions, 2 token
# types, init std 0.02); the sizes that vary are the model.xvlm.* settings.
_DROPOUT = 0.1
_LN_EPS = 1e-12
_MIN_POSITIONS = 512
_INIT_STD = 0.02
_CLIP_LN_EPS = 1e-5  # CLIP's nn.LayerNorm default
# X-VLM's pre_question removes these characters and turns '-' and '/' into spaces.
_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key mask as the additive form both the eager and the sdpa BERT attention accept.

    Shapes:
        mask: (B, L) bool, True = attend. Returns (B, 1, 1, L): 0 where True, the dtype's minimum elsewhere.
    """
    blocked = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return blocked[:, None, None, :]


def _init_bert_weights(module: nn.Module, std: float = _INIT_STD) -> None:
    """BERT initialisation (normal(0, std) weights, zero biases, unit LayerNorm, zero padding row)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, 0.0, std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, 0.0, std)
            if sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def bert_config(xcfg: XvlmConfig, vocab_size: int, memory_efficient: bool) -> BertConfig:
    """The BertConfig of the branch's text/fusion layers from the model.xvlm sizes.

    `memory_efficient` picks torch's fused scaled_dot_product_attention ("sdpa") over the eager matmul-softmax
    path; both compute the same attention.
    """
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=xcfg.hidden_size,
        num_hidden_layers=xcfg.num_text_layers + xcfg.num_cross_layers,
        num_attention_heads=xcfg.num_heads,
        intermediate_size=xcfg.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=_DROPOUT,
        attention_probs_dropout_prob=_DROPOUT,
        # Every sequence is cut to max_tokens, so positions never run past this table.
        max_position_embeddings=max(_MIN_POSITIONS, xcfg.max_tokens),
        type_vocab_size=2,
        layer_norm_eps=_LN_EPS,
        pad_token_id=0,
        initializer_range=_INIT_STD,
        attn_implementation="sdpa" if memory_efficient else "eager",
    )


class FusionLayer(nn.Module):
    """One X-VLM encoder layer: bidirectional self-attention, optional cross-attention to visual tokens, FFN.

    Composed from BERT parts rather than `BertLayer`, because `BertLayer` only allows cross-attention in a
    decoder, whose self-attention is causal; X-VLM's fusion layers attend to the whole question. Attribute names
    follow BERT (`attention`, `crossattention`, `intermediate`, `output`) so checkpoint keys map one to one.

    Shapes:
        hidden: (B, T, H); self_mask: (B, 1, 1, T) additive; visual: (B, V, C), C = cross_width (default H);
        visual_mask: (B, 1, 1, V) additive. Returns (B, T, H).
    """

    def __init__(self, config: BertConfig, cross: bool, cross_width: int | None = None) -> None:
        super().__init__()
        self.attention = BertAttention(config, is_causal=False)
        self.crossattention = BertAttention(config, is_causal=False, is_cross_attention=True) if cross else None
        if self.crossattention is not None and cross_width is not None and cross_width != config.hidden_size:
            # X-VLM's layout: keys and values read the vision encoder's tokens at their own width (1024 for Swin-B);
            # transformers builds them at the text width, so they are replaced by projections from cross_width.
            heads = self.crossattention.self
            heads.key = nn.Linear(cross_width, config.hidden_size)
            heads.value = nn.Linear(cross_width, config.hidden_size)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor,
        visual: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden, _ = self.attention(hidden, attention_mask=self_mask)
        if self.crossattention is not None:
            if visual is None:
                raise ValueError("a cross-attention layer needs the visual tokens")
            hidden, _ = self.crossattention(hidden, encoder_hidden_states=visual, encoder_attention_mask=visual_mask)
        return self.output(self.intermediate(hidden), hidden)


class RegionEncoder(nn.Module):
    """Visual tokens from region features: a global [IMG] token followed by one token per box.

    Each box's features and spatials are projected to the text width and layer-normalised; the [IMG] token is the
    masked mean of the box tokens plus a learned vector (X-VLM puts Swin's average-pooled token first).

    Shapes:
        features: (B, K, D); spatials: (B, K, 6); box_mask: (B, K) bool.
        Returns tokens (B, 1 + K, H) and mask (B, 1 + K) bool (the [IMG] token is always valid).
    """

    def __init__(self, feature_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim + 6, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=_LN_EPS)
        self.img_token = nn.Parameter(torch.zeros(hidden_size))
        self.dropout = nn.Dropout(_DROPOUT)

    def forward(
        self, features: torch.Tensor, spatials: torch.Tensor, box_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = self.norm(self.proj(torch.cat([features, spatials], dim=-1)))
        # Padded boxes stay in `tokens`; the returned mask keeps them out of the mean and of cross-attention.
        global_token = masked_mean(boxes, box_mask, dim=1) + self.img_token
        tokens = torch.cat([global_token.unsqueeze(1), boxes], dim=1)
        always = torch.ones_like(box_mask[:, :1])
        return self.dropout(tokens), torch.cat([always, box_mask], dim=1)


def vision_config(
    kind: str, image_res: int, sizes: Mapping[str, Any] | None = None, clip: bool = False
) -> SwinConfig | ViTConfig:
    """X-VLM's image encoder sizes as a transformers config (built locally, nothing downloaded).

    'swin': Swin-B (patch 4, embed 128, depths 2/2/18/2, heads 4/8/16/32, window image_res/32: 15 at 480 px).
    'vit': ViT-B/16 (768 wide, 12 layers, 12 heads, FFN 3072), X-VLM's CLIP-ViT alternative.
    `sizes` overrides these with an X-VLM vision JSON's values, in its key names (`XvlmSettings.vision_sizes`:
    Swin embed_dim/depths/num_heads/window_size; ViT vision_width/patch_size/num_hidden_layers/num_attention_heads/
    intermediate_size/hidden_act/attention_dropout). `clip` (model.xvlm.vit_layout 'clip') gives the ViT CLIP's
    quick-GELU (unless `sizes` names an activation) and LayerNorm eps 1e-5.
    """
    got = dict(sizes or {})
    if kind == "swin":
        return SwinConfig(
            image_size=image_res,
            patch_size=4,
            embed_dim=got.get("embed_dim", 128),
            depths=list(got.get("depths", [2, 2, 18, 2])),
            num_heads=list(got.get("num_heads", [4, 8, 16, 32])),
            window_size=got.get("window_size", max(1, image_res // 32)),
            drop_path_rate=0.1,
        )
    if kind == "vit":
        return ViTConfig(
            image_size=image_res,
            patch_size=got.get("patch_size", 16),
            hidden_size=got.get("vision_width", 768),
            num_hidden_layers=got.get("num_hidden_layers", 12),
            num_attention_heads=got.get("num_attention_heads", 12),
            intermediate_size=got.get("intermediate_size", 3072),
            hidden_act=got.get("hidden_act", "quick_gelu" if clip else "gelu"),
            layer_norm_eps=_CLIP_LN_EPS if clip else ViTConfig().layer_norm_eps,
            attention_probs_dropout_prob=got.get("attention_dropout", 0.0),
        )
    raise ValueError(f"unknown vision encoder {kind!r}; expected 'swin' or 'vit'")


def _backbone_width(config: SwinConfig | ViTConfig) -> int:
    """Width of the tokens a Swin (last stage) or ViT backbone puts out."""
    if isinstance(config, SwinConfig):
        return config.embed_dim * 2 ** (len(config.depths) - 1)
    return config.hidden_size


def _checkpoint_backbone(backbone: nn.Module) -> None:
    """Recompute the backbone's layer activations in backward (transformers >= 5 renamed the switch)."""
    enable = getattr(backbone, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_enable({"use_reentrant": False})


class ImageEncoder(nn.Module):
    """Visual tokens from pixels: a Swin or ViT backbone, then a LayerNorm'd projection to the text width.

    Swin tokens are [average-pooled token, patches] as in X-VLM; ViT tokens are [CLS, patches]. `XvlmBranch` uses
    it for model.xvlm.vision swin/vit.

    With `hidden_size` equal to the backbone's width and `project=False` the tokens are the backbone's own (X-VLM
    feeds them to cross-attention as they are; model.xvlm.cross_width set to that width). `pre_norm` (ViT only,
    model.xvlm.vit_layout 'clip') normalises the patch and position embeddings before the first layer, as CLIP does.

    Shapes:
        pixel_values: (B, 3, R, R). Returns tokens (B, 1 + P, H) and mask (B, 1 + P) bool, all True.
    """

    def __init__(
        self, config: SwinConfig | ViTConfig, hidden_size: int, project: bool = True, pre_norm: bool = False
    ) -> None:
        super().__init__()
        if isinstance(config, SwinConfig):
            self.backbone: nn.Module = SwinModel(config, add_pooling_layer=True)
        elif isinstance(config, ViTConfig):
            self.backbone = ViTModel(config, add_pooling_layer=False)
        else:
            raise TypeError(f"expected a SwinConfig or ViTConfig, got {type(config).__name__}")
        width = _backbone_width(config)
        self.pre_norm: nn.LayerNorm | None = None
        if pre_norm:
            if not isinstance(config, ViTConfig):
                raise ValueError("pre_norm (CLIP's layout) needs a ViT backbone")
            self.pre_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
            # transformers' ViT has no norm between its embeddings and its first layer; a forward hook adds CLIP's
            # without renaming any backbone weight.
            self.backbone.embeddings.register_forward_hook(self._normalise_embeddings)
        if not project and width != hidden_size:
            raise ValueError(f"unprojected image tokens are {width} wide, not the {hidden_size} asked for")
        self.width = width
        self.proj: nn.Module = nn.Linear(width, hidden_size) if project else nn.Identity()
        self.norm: nn.Module = nn.LayerNorm(hidden_size, eps=_LN_EPS) if project else nn.Identity()

    def _normalise_embeddings(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        assert self.pre_norm is not None
        return self.pre_norm(output)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(pixel_values=pixel_values)
        tokens = out.last_hidden_state
        if getattr(out, "pooler_output", None) is not None:
            tokens = torch.cat([out.pooler_output.unsqueeze(1), tokens], dim=1)
        tokens = self.norm(self.proj(tokens))
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


def pre_question(text: str) -> str:
    """X-VLM's question cleaning: lower-case, drop ,.'!?"()*#:;~ and turn '-' and '/' into spaces."""
    text = _PUNCTUATION.sub("", text.lower()).replace("-", " ").replace("/", " ")
    return " ".join(text.split())


def load_tokenizer(folder: Path) -> Any:
    """The BERT WordPiece tokenizer in a local folder (vocab.txt), loaded without any download.

    Raises:
        ConfigError: the folder has no vocab.txt, cannot be read as a BERT tokenizer, or lacks [CLS]/[SEP].
    """
    from transformers import BertTokenizerFast

    key = "model.xvlm.text_encoder"
    if not (folder / "vocab.txt").is_file():
        raise ConfigError(f"{key}={folder} must be a local BERT folder holding vocab.txt (nothing is downloaded)")
    try:
        tokenizer = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}={folder}: cannot load a BERT tokenizer from it ({exc})") from exc
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ConfigError(f"{key}={folder}: vocab.txt has no [CLS] or [SEP] token")
    return tokenizer


def _frame_tokens(
    words: torch.Tensor, lengths: torch.Tensor, cls_id: int, sep_id: int, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] per row, cut to `max_tokens` in all (BERT truncation: keep [CLS], then words, then [SEP]).

    Shapes:
        words: (B, W) int64 right-padded word ids; lengths: (B,) real words per row.
        Returns ids (B, T) with T = 1 + min(W, max_tokens - 2) + [max_tokens >= 2], and mask (B, T) bool.
    """
    body = min(words.shape[1], max(0, max_tokens - 2))
    lengths = lengths.clamp(max=body)
    has_sep = max_tokens >= 2
    rows = words.shape[0]
    ids = torch.zeros(rows, 1 + body + int(has_sep), dtype=torch.long, device=words.device)
    ids[:, 0] = cls_id
    positions = torch.arange(body, device=words.device)
    ids[:, 1 : 1 + body] = words[:, :body] * (positions < lengths[:, None])
    if has_sep:
        ids[torch.arange(rows, device=words.device), 1 + lengths] = sep_id
    total = 1 + lengths + int(has_sep)
    mask = torch.arange(ids.shape[1], device=words.device) < total[:, None]
    return ids, mask


class XvlmBranch(nn.Module):
    """X-VLM question encoder fused with visual tokens, and an answer classifier on the [CLS] state.

    Attributes:
        tokenizer: the BERT tokenizer when model.xvlm.text_encoder names one, else None (isubg word ids).
        vision: `RegionEncoder` (vision regions) or `ImageEncoder` (swin/vit, over `Batch.images`).
        image_res: the image side R the ImageEncoder expects, or None with regions.
        load_report: what `build` loaded from model.xvlm.checkpoint, or None.
        settings_report: what `build` took from model.xvlm.xvlm_config, or None.

    Args:
        vision_sizes: image-encoder sizes from an X-VLM vision JSON (see `vision_config`); None: X-VLM's base.
    """

    def __init__(
        self,
        xcfg: XvlmConfig,
        spec: DataSpec,
        memory_efficient: bool = False,
        tokenizer: Any | None = None,
        vision_sizes: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_tokens = xcfg.max_tokens
        self.topk = xcfg.topk
        self.memory_efficient = memory_efficient
        self.load_report: LoadReport | None = None
        self.settings_report: XvlmSettings | None = None
        # Offline default: isubg ids plus two rows for [CLS] and [SEP] after the question dictionary.
        vocab = len(tokenizer) if tokenizer is not None else spec.num_words + 2
        self.config = bert_config(xcfg, vocab, memory_efficient)
        self.embeddings = BertEmbeddings(self.config)
        cross_width = xcfg.cross_width or xcfg.hidden_size
        self.text_layers = nn.ModuleList(FusionLayer(self.config, cross=False) for _ in range(xcfg.num_text_layers))
        self.cross_layers = nn.ModuleList(
            FusionLayer(self.config, cross=True, cross_width=cross_width) for _ in range(xcfg.num_cross_layers)
        )
        self.image_res: int | None = None
        self.vision: RegionEncoder | ImageEncoder
        if xcfg.vision == "regions":
            self.vision = RegionEncoder(spec.feature_dim, cross_width)
        else:
            self.image_res = xcfg.image_res
            clip = xcfg.vision == "vit" and xcfg.vit_layout == "clip"
            vcfg = vision_config(xcfg.vision, xcfg.image_res, vision_sizes, clip=clip)
            # X-VLM's layout (cross_width = the encoder's width): its tokens go to cross-attention as they are.
            project = _backbone_width(vcfg) != cross_width
            self.vision = ImageEncoder(vcfg, cross_width, project=project, pre_norm=clip)
            if memory_efficient:
                _checkpoint_backbone(self.vision.backbone)
        _init_bert_weights(self.embeddings)
        _init_bert_weights(self.text_layers)
        _init_bert_weights(self.cross_layers)
        if isinstance(self.vision, RegionEncoder):
            _init_bert_weights(self.vision)
        else:  # the backbone keeps its own (transformers) initialisation; only the projection gets BERT's
            _init_bert_weights(self.vision.proj)
            _init_bert_weights(self.vision.norm)
        self.head = Classifier(xcfg.hidden_size, 2 * xcfg.hidden_size, spec.num_answers, "gelu", _DROPOUT)

    def text_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of the question, [CLS] first, at most `max_tokens` long.

        Shapes:
            returns ids (B, T) int64 and mask (B, T) bool, T <= max_tokens, on batch.q_tokens' device.
        """
        device = batch.q_tokens.device
        if self.tokenizer is None:
            num_words = self.config.vocab_size - 2
            lengths = batch.q_mask.sum(dim=1)
            return _frame_tokens(batch.q_tokens, lengths, num_words, num_words + 1, self.max_tokens)
        pieces = self.tokenizer([pre_question(q) for q in batch.questions], add_special_tokens=False)["input_ids"]
        width = max((len(p) for p in pieces), default=0)
        words = torch.zeros(len(pieces), width, dtype=torch.long)
        for row, ids in enumerate(pieces):
            words[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in pieces], dtype=torch.long)
        ids, mask = _frame_tokens(
            words, lengths, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, self.max_tokens
        )
        return ids.to(device), mask.to(device)

    def _run(self, layer: FusionLayer, *args: torch.Tensor | None) -> torch.Tensor:
        """One layer, recomputed in backward instead of storing activations when memory-efficient and training."""
        if self.memory_efficient and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def visual_tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens the fusion layers cross-attend to: region tokens, or image tokens from `batch.images`.

        Shapes:
            regions: (B, 1 + K, H) and mask (B, 1 + K); images (B, 3, R, R) -> (B, 1 + P, H) and mask (B, 1 + P).

        Raises:
            ConfigError: vision is swin/vit and the batch has no images (the dataset was given no data.image_root),
                or its images are not image_res x image_res.
        """
        if isinstance(self.vision, RegionEncoder):
            return self.vision(batch.features, batch.spatials, batch.box_mask)
        images = batch.images
        if images is None:
            raise ConfigError(
                "the X-VLM branch encodes images (model.xvlm.vision swin/vit) but the batch carries none: the dataset "
                "needs data.image_root (VQADataset(image_root=..., image_res=model.xvlm.image_res))"
            )
        if tuple(images.shape[1:]) != (3, self.image_res, self.image_res):
            raise ConfigError(
                f"the batch's images are {tuple(images.shape[1:])}, but the X-VLM image encoder was built for "
                f"(3, {self.image_res}, {self.image_res}) (model.xvlm.image_res); give the dataset the same image_res"
            )
        return self.vision(images.to(next(self.vision.backbone.parameters()).dtype))

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Question states after the text layers and the fusion layers.

        Shapes:
            returns states (B, T, H) and the text mask (B, T) bool; padded positions hold values nobody reads.
        """
        ids, mask = self.text_inputs(batch)
        visual, visual_mask = self.visual_tokens(batch)
        return self.fuse(ids, mask, visual, visual_mask), mask

    def fuse(
        self, ids: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor
    ) -> torch.Tensor:
        """The text layers over token ids, then the fusion layers attending to given visual tokens.

        This is X-VLM's text encoder in multimodal mode (what its VQA model feeds its answer decoder).

        Shapes:
            ids, mask: (B, T) int64 / bool; visual: (B, V, C), C = cross width; visual_mask: (B, V) bool.
            Returns states (B, T, H).
        """
        hidden = self.embeddings(input_ids=ids)
        self_mask = _additive_mask(mask, hidden.dtype)
        cross_mask = _additive_mask(visual_mask, hidden.dtype)
        for layer in self.text_layers:
            hidden = self._run(layer, hidden, self_mask)
        for layer in self.cross_layers:
            hidden = self._run(layer, hidden, self_mask, visual, cross_mask)
        return hidden

    def forward(self, batch: Batch) -> BranchOutput:
        """Answer logits for a batch.

        Shapes:
            batch.q_tokens, batch.q_mask: (B, L) (or batch.questions, B strings, with a tokenizer);
            batch.features: (B, K, D); batch.spatials: (B, K, 6); batch.box_mask: (B, K) bool (vision regions);
            batch.images: (B, 3, R, R) float32, R = image_res (vision swin/vit).
            Internally: text ids (B, T), T <= max_tokens; visual tokens (B, 1 + K, H) from regions or (B, 1 + P, H)
            from P image patches; states (B, T, H).
            Returns BranchOutput(logits (B, A), node_mask None).
        """
        states, _ = self.encode(batch)
        return BranchOutput(logits=self.head(states[:, 0]))

    def candidate_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """X-VLM-style candidate ranking loss over the top-`topk` answers (by current score) plus the gold ones.

        A soft cross-entropy whose softmax runs over the candidate set only, with the targets normalised to sum to
        1 (MGHR's `--tune_xvlm` loss weights candidates by their soft scores the same way). The candidate choice
        is not differentiated. Samples without any gold answer contribute 0; the result is the mean over B.

        Shapes:
            logits: (B, A); targets: (B, A) soft scores in [0, 1]. Returns a scalar.
        """
        k = min(self.topk, logits.shape[1])
        top = logits.detach().topk(k, dim=1).indices
        candidates = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True) | (targets > 0)
        log_probs = F.log_softmax(logits.masked_fill(~candidates, torch.finfo(logits.dtype).min), dim=1)
        # where(), not a product, so the huge negative entries of non-candidates can never give 0 * -inf = nan.
        weighted = torch.where(candidates, targets * log_probs, torch.zeros_like(log_probs))
        per_sample = -weighted.sum(dim=1) / targets.sum(dim=1).clamp_min(1e-6)
        return per_sample.mean()


# --------------------------------------------------------------------------------------------------
# Real X-VLM checkpoints

_EMBEDDING_KEYS = (
    "word_embeddings.weight",
    "position_embeddings.weight",
    "token_type_embeddings.weight",
    "LayerNorm.weight",
    "LayerNorm.bias",
)
_SELF_MODULES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
)
_CROSS_MODULES = (
    "crossattention.self.query",
    "crossattention.self.key",
    "crossattention.self.value",
    "crossattention.output.dense",
    "crossattention.output.LayerNorm",
)


@dataclass
class LoadReport:
    """What `load_xvlm_checkpoint` did with each tensor.

    Attributes:
        path: the checkpoint file.
        loaded: checkpoint keys whose tensors were copied into the model.
        unmapped: checkpoint keys with no target (e.g. text_decoder.*, vision_encoder.* with region features).
        missing: model parameter names left at their initial values.
        mismatched: (checkpoint key, checkpoint shape, model shape) for mapped keys whose shapes differ.
    """

    path: Path
    loaded: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph: counts, with the unmapped and missing keys grouped by prefix and each mismatch listed."""
        lines = [f"X-VLM checkpoint {self.path}: loaded {len(self.loaded)} tensors"]
        if self.unmapped:
            lines.append(f"unmapped {len(self.unmapped)} ({_group(self.unmapped)})")
        if self.mismatched:
            shapes = "; ".join(f"{k} {list(a)} vs model {list(b)}" for k, a, b in self.mismatched)
            lines.append(f"shape mismatches {len(self.mismatched)} ({shapes})")
        if self.missing:
            lines.append(f"model parameters not filled {len(self.missing)} ({_group(self.missing)})")
        return "; ".join(lines)


def _group(keys: list[str]) -> str:
    """'prefix: count' for the first two name components, largest groups first."""
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{prefix}.*: {n}" for prefix, n in counts.most_common())


def xvlm_key_map(num_text_layers: int, num_cross_layers: int) -> dict[str, str]:
    """X-VLM text-encoder key -> XvlmBranch parameter name, for the configured layer counts.

    X-VLM layer i goes to text layer i for i < num_text_layers, otherwise to cross layer i - num_text_layers;
    cross-attention keys are mapped for the cross layers only. Keys are in canonical form (`text_encoder.`
    without X-VLM pre-training's `bert.`; see `_canonical`).
    """
    mapping = {f"text_encoder.embeddings.{k}": f"embeddings.{k}" for k in _EMBEDDING_KEYS}
    for i in range(num_text_layers + num_cross_layers):
        cross = i >= num_text_layers
        target = f"cross_layers.{i - num_text_layers}" if cross else f"text_layers.{i}"
        for module in _SELF_MODULES + (_CROSS_MODULES if cross else ()):
            for kind in ("weight", "bias"):
                mapping[f"text_encoder.encoder.layer.{i}.{module}.{kind}"] = f"{target}.{module}.{kind}"
    return mapping


def _canonical(key: str) -> str:
    """One spelling for the variants of a key: DDP's `module.`, `text_encoder.bert.`, old LayerNorm gamma/beta."""
    key = key.removeprefix("module.")
    if key.startswith("text_encoder.bert."):
        key = "text_encoder." + key.removeprefix("text_encoder.bert.")
    if key.endswith("LayerNorm.gamma"):
        key = key.removesuffix("gamma") + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key.removesuffix("beta") + "bias"
    return key


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an X-VLM checkpoint file ({'model': state_dict, ...} or a bare state dict).

    Raises:
        DataError: no such file, not a torch file, an object weights_only loading refuses, or non-tensor entries.
    """
    if not path.is_file():
        raise DataError(f"X-VLM checkpoint {path} does not exist or is not a file (model.xvlm.checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for a file it cannot read
        raise DataError(
            f"X-VLM checkpoint {path} is not a readable torch weights file (loaded with weights_only=True, which "
            f"refuses arbitrary Python objects): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state:
        raise DataError(f"X-VLM checkpoint {path} holds {type(state).__name__}, expected a non-empty state dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise DataError(
                f"X-VLM checkpoint {path}: entry {key!r} is a {type(value).__name__}, expected a tensor "
                "(a state dict, or {'model': state_dict})"
            )
    return state


def load_xvlm_checkpoint(model: XvlmBranch, path: Path) -> LoadReport:
    """Copy an X-VLM checkpoint's text-encoder weights into `model` through `xvlm_key_map`; report the rest.

    Tensors whose shapes match their target are copied (cast to the target dtype); everything else is listed in
    the report, nothing is silently skipped.

    Raises:
        DataError: the file cannot be read (see `_read_state_dict`), or not a single tensor fits the model.
    """
    state = _read_state_dict(Path(path))
    mapping = xvlm_key_map(len(model.text_layers), len(model.cross_layers))
    params = dict(model.named_parameters())
    report = LoadReport(path=Path(path))
    filled: set[str] = set()
    with torch.no_grad():
        for key, tensor in state.items():
            target = mapping.get(_canonical(key))
            if target is None or target not in params:
                report.unmapped.append(key)
            elif tuple(tensor.shape) != tuple(params[target].shape):
                report.mismatched.append((key, tuple(tensor.shape), tuple(params[target].shape)))
            else:
                params[target].copy_(tensor.to(params[target].dtype))
                report.loaded.append(key)
                filled.add(target)
    report.missing = [name for name in params if name not in filled]
    if not report.loaded:
        raise DataError(f"nothing in {path} fits the X-VLM branch. {report.summary()}")
    return report


# --------------------------------------------------------------------------------------------------
# Builder


def build(cfg: RunConfig, spec: DataSpec) -> XvlmBranch:
    """The X-VLM branch for a run config.

    model.xvlm.xvlm_config is applied first (`apply_xvlm_settings`; report in `settings_report`), then
    model.xvlm.checkpoint is loaded when set (report in `load_report`). With vision swin/vit the branch reads
    `Batch.images`, so the dataset must be built with data.image_root and the effective image_res
    (`apply_xvlm_settings(cfg)[0].model.xvlm.image_res`).

    Raises:
        ConfigError: the X-VLM settings file cannot be used (see `apply_xvlm_settings`), or
            model.xvlm.text_encoder is not a usable local BERT tokenizer folder.
        DataError: the checkpoint cannot be read or fits nothing.
    """
    cfg, settings = apply_xvlm_settings(cfg)
    xcfg = cfg.model.xvlm
    tokenizer = load_tokenizer(Path(xcfg.text_encoder)) if xcfg.text_encoder is not None else None
    sizes = settings.vision_sizes if settings is not None else None
    model = XvlmBranch(xcfg, spec, cfg.memory.memory_efficient_attention, tokenizer, sizes)
    model.settings_report = settings
    if xcfg.checkpoint is not None:
        model.load_report = load_xvlm_checkpoint(model, Path(xcfg.checkpoint))
    return model
