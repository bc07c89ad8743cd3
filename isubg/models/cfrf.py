"""The cfrf (fine-grained) branch: GRU question, entity and stat-word fusion, AoA layers, BAN with the Zhang counter.

Data flow for B questions of L tokens, K boxes of width D, S stat words, H = num_hid (every step masks padding):

1. Words: a 300-d table E (GloVe rows when the data has them). With `data.tfidf` each token also gets
   W @ E, its tf-idf weighted mixture of the rows of the words it co-occurs with, so a token is 600-d.
   W @ E is computed on the fly for the tokens of the batch only (never the whole (V, 300) product),
   so the mixture trains with E and stays W @ E; the reference kept a second trainable table
   initialised from W @ GloVe (V x 300 more parameters, drifting away from W @ E as both train).
2. Question: a one-layer GRU over the words -> q (B, L, H). The GRU runs forward and padding sits at
   the end (collate's prefix masks), so real positions never see padding; later steps mask the rest.
3. Entity fusion (CFR `qe_joint`): q is refined by the embeddings of its own entity words (entity_mask)
   through one bilinear glimpse: q <- q + omega_q * prj(f) * q, f the bilinear pooling of (q, entities).
4. Boxes: v = ReLU(Linear([features; spatials])) (B, K, H), then grounded in the image's stat words
   (CFR `vs_joint`): v <- v + omega_v * prj(f) * v.
5. AoA: `AOA_layers` layers (self-attention on q; then self-attention on v and v attending to q), each
   with the AoA gate, a residual and LayerNorm.
6. BAN: `gamma` low-rank (rank 3 x H) bilinear attention maps between q and v, softmax over each L x K grid;
   per glimpse q <- q + prj(bilinear pooling of (v, q) under the map), and with `use_counter`
   q <- q + prj(Zhang counter over the map's top-10 boxes).
7. Answer: Classifier(sum of q over real tokens).

With `box_input` 'features' step 4's projection is skipped: BAN's attention and pooling nets (and the stat-word
fusion) read the raw D-wide box features, as ban-vqa's BAN does, so a ban-vqa checkpoint computes the same here
(AoA needs the H-wide stream, so it requires AOA_layers = 0). `isubg import-checkpoint ban` sets it.

Hyperparameters (model.cfrf unless noted): gamma = attention maps, residual steps and per-glimpse nets;
use_counter = build and use the counter; counter_act = its eight maps f_k ("zhang": learned monotone
piecewise-linear, 16 segments; "identity": f(x) = x, no parameters); AOA_layers = AoA depth (0 = none);
num_hid = every width H; activation and dropout = the classifier's; omega_q and omega_v = the strength of
the entity and stat-word fusions; data.tfidf = the 600-d words; memory.memory_efficient_attention =
per-glimpse attention maps, scaled_dot_product_attention in AoA and checkpointed AoA layers in training
(same outputs and gradients). question_len, num_stat_word and max_boxes arrive as the batch's L, S, K.

Deviations from the reference code, and why (also in docs/deviations.md#fine-grained-branch-cfrf):
- Padding is masked on both sides of every attention, in the counter and in the final token sum, so a
  sample's output does not depend on its batch; a fusion with no context words (no entity or no stat
  word) leaves its stream unchanged instead of adding a bias-only update.
- The counter is built and used (the reference never built it); padding boxes are never among its top-10
  and every mean, sum and row-normalisation runs over real boxes only, so fewer than 10 boxes work.
  The Zhang maps keep their 16 slopes only: the reference's 17th parameter is a fixed 0 (f(0) = 0).
- BAN's v side is the box stream at width H, projected once with the spatials appended (the reference
  re-projected the raw 2048-d boxes in every glimpse); the stat words ground the boxes (CFR grounded the
  stat words and then dropped the boxes, but BAN and the counter need boxes). Stat and entity words use
  the question's embedding table (the reference loaded its three tables from one file anyway) and no
  stat-word GRU: they are a ranked label set, not a sentence.
- omega scales the fusion residual only (CFR also scaled the context before its ReLU projection).
- AoA layers have width num_hid (the reference hard-coded 1024 and crashed otherwise), masks on the keys,
  `_heads(num_hid)` heads, and LayerNorms placed by `aoa_norm` (default `pre`: on what each attention reads,
  so the residual streams keep their scale; docs/deviations.md#aoa-layer-norm). As in the reference one AoA
  module per depth serves its three roles (q self, v self, v <- q), which keeps the parameter count and
  memory of the presets; each role has its own LayerNorm.
- Plain Linear layers instead of weight norm (as the shared Classifier): weight norm rebuilt every weight
  each step and is deprecated; BCNet's fixed dropouts (0.2 on inputs, 0.5 on the attended side) are kept.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from isubg.batch import Batch, DataSpec
from isubg.config import RunConfig
from isubg.errors import DataError
from isubg.models.common import BranchOutput, Classifier, Dropout, masked_softmax

__all__ = ["CfrfBranch", "build"]

WORD_DIM = 300  # GloVe 6B-300d, the width of one word table
COUNTER_OBJECTS = 10  # boxes the counter looks at; it outputs COUNTER_OBJECTS + 1 count bins
COUNTER_SEGMENTS = 16  # linear pieces of each learned counter map
BAN_RANK = 3  # BCNet k of BAN's attention maps (ban-vqa); CFR's fusions and every pooling net use k = 1
_FC_DROPOUT = 0.2  # BCNet / FCNet input dropout (ban-vqa)
_ATT_DROPOUT = 0.5  # dropout on the attended side of a bilinear attention (ban-vqa)
AOA_NORMS = ("pre", "post", "none")  # where the AoA layers normalise (model.cfrf.aoa_norm)


def _heads(dim: int) -> int:
    """AoA heads for width `dim`, so that every num_hid works.

    Heads of 64 channels when 64 divides dim (1024 -> 16 heads, as the reference), else the largest of
    8, 4, 2, 1 that divides dim.
    """
    if dim % 64 == 0:
        return dim // 64
    return next(h for h in (8, 4, 2, 1) if dim % h == 0)


def _fc(in_dim: int, out_dim: int, relu: bool = True) -> nn.Sequential:
    """ban-vqa's FCNet layer: dropout, then Linear, then (optionally) ReLU."""
    layers: list[nn.Module] = [Dropout(_FC_DROPOUT), nn.Linear(in_dim, out_dim)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------- words


class _WordEmbedding(nn.Module):
    """Word ids -> 300-d vectors E[id], or 600-d [E[id]; (W @ E)[id]] with a tf-idf matrix W.

    Shapes:
        tokens: any shape (...), int64 ids in [0, num_words) -> (..., dim), dim = 300 or 600.
    """

    def __init__(self, num_words: int, glove: Any = None, tfidf: Any = None) -> None:
        super().__init__()
        self.table = nn.Embedding(num_words, WORD_DIM, padding_idx=0)
        if glove is not None:
            glove = torch.as_tensor(np.asarray(glove), dtype=torch.float32)
            if glove.shape != (num_words, WORD_DIM):
                raise ValueError(f"spec.glove must have shape ({num_words}, {WORD_DIM}), got {tuple(glove.shape)}")
            with torch.no_grad():
                self.table.weight.copy_(glove)
                self.table.weight[0].zero_()  # <pad> stays the zero vector
        self.tfidf = tfidf is not None
        self.dim = 2 * WORD_DIM if self.tfidf else WORD_DIM
        if self.tfidf:
            crow, cols, values = _csr(tfidf, num_words)
            # W is data, rebuilt from the processed folder by build(); keeping it out of the state dict
            # keeps checkpoints small (W has millions of entries for a VQA vocabulary).
            self.register_buffer("crow", crow, persistent=False)
            self.register_buffer("cols", cols, persistent=False)
            self.register_buffer("values", values, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        words = self.table(tokens)
        if not self.tfidf:
            return words
        return torch.cat([words, self._mixture(tokens)], -1)

    def _mixture(self, tokens: torch.Tensor) -> torch.Tensor:
        """(W @ E)[tokens] from the rows of W the batch needs: an embedding_bag over each row's entries."""
        ids, inverse = torch.unique(tokens, return_inverse=True)
        start, count = self.crow[ids], self.crow[ids + 1] - self.crow[ids]
        offsets = torch.cumsum(count, 0) - count
        total = int(count.sum())
        entry = torch.repeat_interleave(start - offsets, count, output_size=total)
        entry = entry + torch.arange(total, device=tokens.device)
        rows = F.embedding_bag(
            self.cols[entry], self.table.weight, offsets, mode="sum", per_sample_weights=self.values[entry]
        )
        return rows[inverse]


def _csr(tfidf: Any, num_words: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (rows, cols, values, shape) COO triple as CSR tensors (row pointers, columns, values).

    Raises:
        ValueError: the shape is not (num_words, num_words) or an entry lies outside it.
    """
    rows, cols, values, shape = tfidf
    if tuple(int(s) for s in shape) != (num_words, num_words):
        raise ValueError(f"spec.tfidf must be a ({num_words}, {num_words}) matrix, got shape {tuple(shape)}")
    rows = torch.as_tensor(np.asarray(rows), dtype=torch.int64)
    cols = torch.as_tensor(np.asarray(cols), dtype=torch.int64)
    values = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    if not len(rows) == len(cols) == len(values):
        raise ValueError(f"spec.tfidf: rows, cols, values differ in length ({len(rows)}, {len(cols)}, {len(values)})")
    if len(rows) and (min(rows.min(), cols.min()) < 0 or max(rows.max(), cols.max()) >= num_words):
        raise ValueError(f"spec.tfidf holds an entry outside the {num_words} x {num_words} shape")
    order = torch.argsort(rows, stable=True)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(torch.bincount(rows, minlength=num_words), 0)])
    return crow, cols[order], values[order]


# -------------------------------------------------------------------------------- bilinear blocks


class _BilinearAttention(nn.Module):
    """Low-rank bilinear attention maps between two token sets (ban-vqa BiAttention; BCNet k = `rank`).

    logits[b, g, i, j] = sum_c h[g, c] x'[b, i, c] y'[b, j, c] (+ bias[g]) over c < rank * hid, x' = ReLU(W_x x),
    y' = dropout(ReLU(W_y y)); each glimpse's map is a softmax over the whole masked Lx x Ly grid.

    Shapes:
        x: (B, Lx, x_dim), x_mask: (B, Lx) bool; y: (B, Ly, y_dim), y_mask: (B, Ly) bool
        -> att (B, G, Lx, Ly) (0 on padding, each glimpse sums to 1 over real pairs), logits (B, G, Lx, Ly).
    """

    def __init__(self, x_dim: int, y_dim: int, hid: int, glimpses: int, bias: bool, rank: int = 1) -> None:
        super().__init__()
        width = hid * rank
        self.x_net, self.y_net = _fc(x_dim, width), _fc(y_dim, width)
        self.drop = Dropout(_ATT_DROPOUT)
        self.h_mat = nn.Parameter(torch.randn(glimpses, width) / math.sqrt(width))
        # A per-glimpse constant cannot change a softmax; it matters only where the raw logits are
        # read (the counter), so it exists only then and no parameter is left without gradient.
        self.h_bias = nn.Parameter(torch.zeros(glimpses)) if bias else None

    def forward(
        self, x: torch.Tensor, x_mask: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor, chunked: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xp, yp = self.x_net(x), self.drop(self.y_net(y))
        if chunked:  # one glimpse at a time: the (B, Lx, rank*hid) product never exists G times at once
            logits = torch.stack([torch.bmm(xp * h, yp.transpose(1, 2)) for h in self.h_mat], 1)
        else:
            logits = torch.einsum("gc,bic,bjc->bgij", self.h_mat, xp, yp)
        if self.h_bias is not None:
            logits = logits + self.h_bias[:, None, None]
        grid = (x_mask[:, :, None] & y_mask[:, None, :])[:, None].flatten(2)
        att = masked_softmax(logits.flatten(2), grid).view_as(logits)
        return att, logits


class _BilinearPool(nn.Module):
    """Bilinear pooling under an attention map (BCNet.forward_with_weights, k = 1).

    f[b, c] = sum_ij x'[b, i, c] att[b, i, j] y'[b, j, c], x' = ReLU(W_x x), y' = ReLU(W_y y).

    Shapes:
        x: (B, Lx, x_dim), y: (B, Ly, y_dim), att: (B, Lx, Ly) -> (B, hid)
    """

    def __init__(self, x_dim: int, y_dim: int, hid: int) -> None:
        super().__init__()
        self.x_net, self.y_net = _fc(x_dim, hid), _fc(y_dim, hid)

    def forward(self, x: torch.Tensor, y: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return (self.x_net(x) * torch.bmm(att, self.y_net(y))).sum(1)


class _GatedFusion(nn.Module):
    """CFR's BanFusion with one glimpse: refine stream x by context y, x <- x + omega * prj(f) * x.

    f pools (x, y) under their bilinear attention map. A sample without context tokens keeps x as it is.

    Shapes:
        x: (B, Lx, x_dim), x_mask: (B, Lx); y: (B, Ly, y_dim), y_mask: (B, Ly) -> (B, Lx, x_dim)
    """

    def __init__(self, x_dim: int, y_dim: int, hid: int, omega: float) -> None:
        super().__init__()
        self.omega = omega
        self.attention = _BilinearAttention(x_dim, y_dim, hid, glimpses=1, bias=False)
        self.pool = _BilinearPool(x_dim, y_dim, hid)
        self.prj = _fc(hid, x_dim, relu=False)

    def forward(
        self, x: torch.Tensor, x_mask: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor, chunked: bool = False
    ) -> torch.Tensor:
        att, _ = self.attention(x, x_mask, y, y_mask, chunked)
        update = self.prj(self.pool(x, y, att[:, 0])) * y_mask.any(1, keepdim=True).to(x.dtype)
        # Multiplicative gate as in CFR: the context re-weights x's channels; omega bounds the change.
        return x + self.omega * update[:, None, :] * x


# ----------------------------------------------------------------------------------------- counter


class _PiecewiseLinear(nn.Module):
    """A learned monotone map [0, 1] -> [0, 1] with f(0) = 0 and f(1) = 1 (Zhang et al. 2018).

    The map has COUNTER_SEGMENTS equal pieces whose slopes are |w| normalised to sum 1; w starts at ones,
    so every map starts as the identity.

    Shapes:
        x: any shape, values in [0, 1] -> same shape.
    """

    def __init__(self, segments: int = COUNTER_SEGMENTS) -> None:
        super().__init__()
        self.slopes = nn.Parameter(torch.ones(segments))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.slopes.numel()
        w = self.slopes.abs()
        knots = F.pad(torch.cumsum(w, 0) / w.sum().clamp_min(1e-12), (1, 0))  # f(k / n), k = 0..n
        y = x.clamp(0.0, 1.0) * n
        idx = y.detach().floor().long().clamp(max=n - 1)
        return knots[idx] + (y - idx) * (knots[idx + 1] - knots[idx])


def _iou(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (B, n, 4) [x1, y1, x2, y2] boxes -> (B, n, n); 0 where a union is empty."""
    lo = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    hi = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (hi - lo).clamp_min(0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp_min(0).prod(-1)
    return inter / (area[:, :, None] + area[:, None, :] - inter).clamp_min(1e-12)


class _Counter(nn.Module):
    """Zhang et al.'s counting module over the COUNTER_OBJECTS boxes with the highest attention.

    Padding boxes are never selected, and everything that sums or averages over the selected boxes does
    so over real boxes only, so a sample with fewer boxes than COUNTER_OBJECTS counts the same in any batch.

    Shapes:
        boxes: (B, K, 4) normalised [x1, y1, x2, y2]; logits: (B, K) attention logits; mask: (B, K) bool
        -> (B, COUNTER_OBJECTS + 1): a soft one-hot count times its confidence.
    """

    def __init__(self, act: str) -> None:
        super().__init__()
        if act not in ("zhang", "identity"):
            raise ValueError(f"unknown counter_act {act!r}; expected 'zhang' or 'identity'")
        self.maps = nn.ModuleList(_PiecewiseLinear() for _ in range(8)) if act == "zhang" else None

    def f(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """The k-th map of the paper (f_0 .. f_7)."""
        return x if self.maps is None else self.maps[k](x)

    def forward(self, boxes: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # float32: the 1e-20 under the square root and the many products underflow in half precision.
        boxes, logits = boxes.float(), logits.float()
        n = min(COUNTER_OBJECTS, logits.shape[1])
        top, idx = logits.masked_fill(~mask, torch.finfo(logits.dtype).min).topk(n, dim=1)
        keep = mask.gather(1, idx)
        pair = (keep[:, :, None] & keep[:, None, :]).float()
        a = torch.sigmoid(top) * keep.float()
        distance = 1 - _iou(boxes.gather(1, idx[..., None].expand(-1, -1, 4)))
        relevancy = a[:, :, None] * a[:, None, :]
        score = self.f(0, relevancy) * self.f(1, distance)
        rows = self._row_similarity(self.f(3, relevancy) * self.f(4, distance), a, pair)
        rows = torch.where(keep, rows, torch.ones_like(rows))  # padded rows: numerators are 0 anyway
        score = score / (rows[:, :, None] * rows[:, None, :])
        total = (score * pair).sum((1, 2)) + (self.f(0, a * a) / rows * keep.float()).sum(1)
        count = (total + 1e-20).sqrt().clamp(max=COUNTER_OBJECTS)
        bins = torch.arange(COUNTER_OBJECTS + 1, device=count.device, dtype=count.dtype)
        one_hot = (1 - (count[:, None] - bins).abs()).clamp_min(0)  # linear between floor and ceil bins
        return one_hot * self._confidence(a, distance, keep.float(), pair)[:, None]

    def _row_similarity(self, dedup: torch.Tensor, a: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        """r_i = sum_j sim_ij over real j; sim_ij = prod_k f2(1 - |s_ik - s_jk|) * f2(1 - |a_i - a_j|).

        Padding k contribute f2(1) = 1 to the product, so only the sum over j needs the mask.
        """
        score_diff = (dedup[:, :, None, :] - dedup[:, None, :, :]).abs()
        sim = self.f(2, 1 - score_diff).prod(-1) * self.f(2, 1 - (a[:, :, None] - a[:, None, :]).abs())
        return (sim * pair).sum(2)

    def _confidence(
        self, a: torch.Tensor, distance: torch.Tensor, keep: torch.Tensor, pair: torch.Tensor
    ) -> torch.Tensor:
        """f7(mean_i |f5(a_i) - 1/2| + mean_ij |f6(D_ij) - 1/2|), means over real boxes and pairs."""
        att_conf = ((self.f(5, a) - 0.5).abs() * keep).sum(1) / keep.sum(1).clamp_min(1)
        dist_conf = ((self.f(6, distance) - 0.5).abs() * pair).sum((1, 2)) / pair.sum((1, 2)).clamp_min(1)
        return self.f(7, att_conf + dist_conf)


# --------------------------------------------------------------------------------------------- AoA


class _AoAAttention(nn.Module):
    """Multi-head attention followed by the attention-on-attention gate (aoa-pytorch 0.0.2 layout).

    q' = W_q x, [k; v] = W_kv context, a = MHA(q', k, v) over unmasked keys; out = i * sigmoid(g) with
    [i; g] = W_aoa [a; q']. A query with no unmasked key gets a = 0.

    Shapes:
        x: (B, n, dim), context: (B, m, dim), key_mask: (B, m) bool -> (B, n, dim)
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads = _heads(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.aoa = nn.Linear(2 * dim, 2 * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor, fused: bool) -> torch.Tensor:
        q = self.to_q(x)
        k, v = self.to_kv(context).chunk(2, -1)
        qh, kh, vh = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        has_key = key_mask.any(1)
        # An all-masked row would make a softmax of nothing (NaN in SDPA); let it see every key, then zero it.
        keep = (key_mask | ~has_key[:, None])[:, None, None, :]
        if fused:
            att = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep)
        else:
            scores = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
            att = masked_softmax(scores, keep) @ vh
        att = att.transpose(1, 2).flatten(2) * has_key[:, None, None].to(att.dtype)
        return F.glu(self.aoa(torch.cat([att, q], -1)), -1)


class _AoAStack(nn.Module):
    """AoA layers: first q self-attention layers, then per layer v self-attention and v attending to q.

    Layer l's attention module serves all three of its roles (as the reference). `norm` places a LayerNorm per
    role (see CfrfBranch): "pre" normalises what the attention reads and leaves the residual stream as it is,
    "post" normalises the stream after each residual, "none" has plain residuals (the reference). With
    memory-efficient attention the attention runs as scaled_dot_product_attention and, when training, every role
    is recomputed in backward (checkpoint).

    Shapes:
        q: (B, L, dim), q_mask: (B, L); v: (B, K, dim), v_mask: (B, K) -> q (B, L, dim), v (B, K, dim)
    """

    def __init__(self, dim: int, layers: int, norm: str) -> None:
        super().__init__()
        if norm not in AOA_NORMS:
            raise ValueError(f"unknown AoA norm {norm!r}; expected one of {', '.join(AOA_NORMS)}")
        self.norm = norm

        def norms() -> nn.ModuleList:
            return nn.ModuleList((nn.LayerNorm(dim) if norm != "none" else nn.Identity()) for _ in range(layers))

        self.attn = nn.ModuleList(_AoAAttention(dim) for _ in range(layers))
        self.norm_q, self.norm_v, self.norm_vq = norms(), norms(), norms()
        # Pre-norm: q is read as context by the v <- q role; one more norm per layer for that read.
        self.norm_ctx = norms() if norm == "pre" else None

    def forward(
        self, q: torch.Tensor, q_mask: torch.Tensor, v: torch.Tensor, v_mask: torch.Tensor, efficient: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.norm == "pre"
        for attn, norm in zip(self.attn, self.norm_q, strict=True):
            if pre:
                x = norm(q)
                q = q + self._run(attn, x, x, q_mask, efficient)
            else:
                q = norm(q + self._run(attn, q, q, q_mask, efficient))
        for layer, (attn, norm_v, norm_vq) in enumerate(zip(self.attn, self.norm_v, self.norm_vq, strict=True)):
            if pre:
                assert self.norm_ctx is not None
                x = norm_v(v)
                v = v + self._run(attn, x, x, v_mask, efficient)
                v = v + self._run(attn, norm_vq(v), self.norm_ctx[layer](q), q_mask, efficient)
            else:
                v = norm_v(v + self._run(attn, v, v, v_mask, efficient))
                v = norm_vq(v + self._run(attn, v, q, q_mask, efficient))
        return q, v

    def _run(
        self, attn: _AoAAttention, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor, efficient: bool
    ) -> torch.Tensor:
        if efficient and self.training and torch.is_grad_enabled():
            return checkpoint(attn, x, context, mask, True, use_reentrant=False)
        return attn(x, context, mask, efficient)


# --------------------------------------------------------------------------------------------- BAN


class _Ban(nn.Module):
    """BAN's residual glimpse loop over the question q and the boxes v, with the optional counter.

    All G maps come from the incoming q; glimpse g pools (v, current q) under map g and adds its
    projection to every token of q, plus, with the counter, the projected count of the map's top boxes
    (the map's logits max-pooled over real tokens).

    Shapes:
        q: (B, L, H), q_mask: (B, L); v: (B, K, V), v_mask: (B, K); boxes: (B, K, 4) -> (B, L, H).
        V = `v_dim`: H for the projected box stream, D for raw box features (box_input 'features').
    """

    def __init__(self, hid: int, glimpses: int, counter_act: str | None, v_dim: int | None = None) -> None:
        super().__init__()
        v_dim = hid if v_dim is None else v_dim
        self.attention = _BilinearAttention(hid, v_dim, hid, glimpses, bias=counter_act is not None, rank=BAN_RANK)
        self.pools = nn.ModuleList(_BilinearPool(hid, v_dim, hid) for _ in range(glimpses))
        self.q_prj = nn.ModuleList(_fc(hid, hid, relu=False) for _ in range(glimpses))
        self.counter = _Counter(counter_act) if counter_act is not None else None
        self.c_prj = (
            nn.ModuleList(nn.Sequential(nn.Linear(COUNTER_OBJECTS + 1, hid), nn.ReLU()) for _ in range(glimpses))
            if counter_act is not None
            else None
        )

    def forward(
        self,
        q: torch.Tensor,
        q_mask: torch.Tensor,
        v: torch.Tensor,
        v_mask: torch.Tensor,
        boxes: torch.Tensor,
        chunked: bool,
    ) -> torch.Tensor:
        att, logits = self.attention(q, q_mask, v, v_mask, chunked)
        for g, (pool, q_prj) in enumerate(zip(self.pools, self.q_prj, strict=True)):
            update = q_prj(pool(q, v, att[:, g]))
            if self.counter is not None and self.c_prj is not None:
                per_box = logits[:, g].masked_fill(~q_mask[:, :, None], torch.finfo(logits.dtype).min).amax(1)
                count = self.counter(boxes, per_box, v_mask).to(q.dtype)
                update = update + self.c_prj[g](count)
            q = q + update[:, None, :]
        return q


# -------------------------------------------------------------------------------------------- branch


class CfrfBranch(nn.Module):
    """The fine-grained branch (module docstring); build it from a config with `build(cfg, spec)`.

    Args:
        num_words: question dictionary size (0 = <pad>).
        num_answers: answer vocabulary size A.
        feature_dim: box feature width D.
        num_hid: width H of every hidden representation.
        box_input: "projected" (boxes and spatials projected once to H; AoA and the stat-word fusion refine that
            stream) or "features" (BAN's nets read the raw D-wide box features, as ban-vqa; needs aoa_layers=0).
        gamma: BAN glimpses (>= 1).
        use_counter: add the Zhang counter to every glimpse.
        counter_act: "zhang" or "identity" maps inside the counter (used only with use_counter).
        aoa_layers: AoA layers (>= 0).
        aoa_norm: where the AoA layers put their LayerNorms: "pre" (on what each attention reads), "post"
            (after each residual) or "none" (plain residuals, as the reference).
        activation, dropout: the classifier's activation name and dropout rate.
        omega_q, omega_v: strengths of the entity and the stat-word fusion.
        glove: (num_words, 300) initial word vectors, or None for a random table.
        tfidf: (rows, cols, values, shape) tf-idf matrix for the 600-d words, or None for 300-d words.
        memory_efficient: chunked attention maps, SDPA and checkpointing (same results).
    """

    def __init__(
        self,
        *,
        num_words: int,
        num_answers: int,
        feature_dim: int,
        num_hid: int = 1024,
        box_input: str = "projected",
        gamma: int = 2,
        use_counter: bool = False,
        counter_act: str = "zhang",
        aoa_layers: int = 6,
        aoa_norm: str = "pre",
        activation: str = "swish",
        dropout: float = 0.45,
        omega_q: float = 0.1,
        omega_v: float = 0.01,
        glove: Any = None,
        tfidf: Any = None,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if num_hid < 1 or gamma < 1 or aoa_layers < 0:
            raise ValueError(f"need num_hid >= 1, gamma >= 1, aoa_layers >= 0; got {num_hid}, {gamma}, {aoa_layers}")
        if box_input not in ("projected", "features") or (box_input == "features" and aoa_layers):
            raise ValueError(f"box_input must be 'projected', or 'features' with aoa_layers=0; got {box_input!r}")
        self.memory_efficient = memory_efficient
        self.words = _WordEmbedding(num_words, glove, tfidf)
        self.gru = nn.GRU(self.words.dim, num_hid, batch_first=True)
        # A fusion weighted by 0 adds exactly nothing, so it is not built (no dead parameters, no wasted
        # compute): omega = 0 switches that fusion off.
        self.entity_fusion = _GatedFusion(num_hid, self.words.dim, num_hid, omega_q) if omega_q > 0 else None
        # box_input 'features': BAN's own nets project the raw boxes (ban-vqa), so there is no shared projection.
        projected = box_input == "projected"
        self.box_proj = nn.Sequential(nn.Linear(feature_dim + 6, num_hid), nn.ReLU()) if projected else None
        v_dim = num_hid if projected else feature_dim
        self.stat_fusion = _GatedFusion(v_dim, self.words.dim, num_hid, omega_v) if omega_v > 0 else None
        self.aoa = _AoAStack(num_hid, aoa_layers, aoa_norm)
        self.ban = _Ban(num_hid, gamma, counter_act if use_counter else None, v_dim)
        self.classifier = Classifier(num_hid, 2 * num_hid, num_answers, activation, dropout)

    def forward(self, batch: Batch) -> BranchOutput:
        """Answer logits for a batch.

        Shapes:
            batch.q_tokens, q_mask, entity_mask: (B, L); batch.features: (B, K, D); batch.spatials: (B, K, 6);
            batch.box_mask: (B, K); batch.stat_tokens, stat_mask: (B, S)
            -> BranchOutput.logits (B, A); node_mask None (this branch does not select graph nodes).
            Inside: words (B, L, E), E = 300 or 600; q (B, L, H); boxes v (B, K, H), or (B, K, D) with box_input
            'features'; stat words (B, S, E);
            BAN maps (B, gamma, L, K); counter (B, 11) per glimpse.
        """
        chunked = self.memory_efficient
        q_mask, box_mask = batch.q_mask, batch.box_mask
        words = self.words(batch.q_tokens)
        # Padding is at the end and the GRU runs forward, so real positions never read it; every later
        # step masks the padded positions, so packing the sequences would change nothing.
        # The recurrence runs in float32 with autocast off: half-precision errors compound over the steps, and
        # CUDA autocast would hand cuDNN's RNN a low-precision input; the GRU is a small share of the work.
        with torch.autocast(words.device.type, enabled=False):
            q = self.gru(words.to(self.gru.weight_ih_l0.dtype))[0]  # float32 unless the model was cast
        if self.entity_fusion is not None:
            q = self.entity_fusion(q, q_mask, words, batch.entity_mask & q_mask, chunked)
        v = batch.features if self.box_proj is None else self.box_proj(torch.cat([batch.features, batch.spatials], -1))
        if self.stat_fusion is not None:
            v = self.stat_fusion(v, box_mask, self.words(batch.stat_tokens), batch.stat_mask, chunked)
        q, v = self.aoa(q, q_mask, v, box_mask, chunked)
        q = self.ban(q, q_mask, v, box_mask, batch.spatials[..., :4], chunked)
        pooled = (q * q_mask[..., None].to(q.dtype)).sum(1)  # BAN sums the tokens; only real ones here
        return BranchOutput(logits=self.classifier(pooled))


def build(cfg: RunConfig, spec: DataSpec) -> CfrfBranch:
    """The cfrf branch for a run configuration and its data.

    Raises:
        DataError: data.tfidf is on but the processed data has no tf-idf matrix.
        ValueError: spec.glove / spec.tfidf have the wrong shape (a corrupted processed folder).
    """
    c = cfg.model.cfrf
    if cfg.data.tfidf and spec.tfidf is None:
        raise DataError(
            "data.tfidf is true but the processed data has no tf-idf matrix (tfidf.npz); "
            "run `isubg data prepare` again or set data.tfidf=false"
        )
    return CfrfBranch(
        num_words=spec.num_words,
        num_answers=spec.num_answers,
        feature_dim=spec.feature_dim,
        num_hid=c.num_hid,
        box_input=c.box_input,
        gamma=c.gamma,
        use_counter=c.use_counter,
        counter_act=c.counter_act,
        aoa_layers=c.AOA_layers,
        aoa_norm=c.aoa_norm,
        activation=c.activation,
        dropout=c.dropout,
        omega_q=c.omega_q,
        omega_v=c.omega_v,
        glove=spec.glove,
        tfidf=spec.tfidf if cfg.data.tfidf else None,
        memory_efficient=cfg.memory.memory_efficient_attention,
    )
