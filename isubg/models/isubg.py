"""The ISubGVQA branch: answer a question from the scene graph through instruction-conditioned GATv2 layers and
a sampled node subset that is the answer's explanation.

Pipeline (d = model.isubg.general_hidden_dim, T = mgat_layers, B questions, N nodes, E edges):

1. Question encoder: word embedding (num_words x d, or the 300-d GloVe rows + a 300 -> d projection when
   the processed folder has GloVe) and a bidirectional GRU over the PACKED question, so padding never
   enters (the reference passed a float padding mask that a transformer adds to its logits, i.e. no
   masking). Gives question states (B, L, d) and a question vector u (B, d).
2. Instruction decoder (use_instruction): T learned step queries, each shifted by the decoder's
   recurrent state, attend over the question states (padding masked); a GRU cell turns each attended
   context into the next state, which is that step's instruction (T, B, d). Per sample, no mixing across
   the batch (the reference reshaped a (T, B, .) tensor with `view`, mixing samples).
3. Scene-graph encoder: node = name embedding + mean of the (non-pad) attribute embeddings + an MLP of
   the box, LayerNorm at width d (any d; the reference hard-coded 300). Edge = relation embedding plus a
   learned offset on added reverse edges (`edge_reverse`; the reference negated the wrong edges). With
   share_word_embeddings every token embedding also adds the question encoder's mean word vector of the
   token's words (spec.graph_words), the role the reference's GloVe initialisation of its graph vocabulary
   plays: "cup" in the question and a "cup" node start from the same vector, and stay tied in training.
4. T GATv2Conv layers (4 heads, edge features, self-loops added). Layer t gates node states with
   instruction t of their own question, LayerNorm(x * instr_t[batch]) (skipped when use_instruction is
   off; the reference crashed there). Heads are concatenated, projected back to d, then residual +
   LayerNorm.
5. Node sampler (sampler.py): scores from a linear layer on node states gated by the question vector,
   standardised per graph (times a learned gain; see NodeScorer); exactly sample_k nodes per graph
   (imle or gumbel; nb_samples averaged; deterministic in eval).
   - use_mgat = 1 (masked GAT): the mask is sampled from the encoded graph BEFORE the layers, and in every
     layer unselected nodes send no messages (their source features are multiplied by the mask; the GATv2
     source projection has no bias, so a zeroed source contributes a zero message; its edge still takes
     a share of the attention softmax, which keeps a gradient on its mask entry).
   - use_mgat = 0 (plain GATv2): the mask is sampled from the final node states and used only at pooling.
   - use_masking = 0: the mask is still sampled (it is still the explanation) but touches no computation.
     The scorer then gets no gradient and stays at its initial weights: run it with use_masking = 1 when
     the explanation matters.
6. Attention pooling: question-conditioned scores, per-graph softmax (torch_geometric.utils.softmax); with
   masking the node states are multiplied by the mask and the attention is renormalised over the mask,
   so unselected nodes take no attention yet still get a gradient for the sampler.
7. Classifier over [pooled graph, u]: Classifier(2d, 2d, A, "gelu", 0.1). The branch has no activation or
   dropout setting of its own; GELU and 0.1 are fixed (GELU as in the reference's head).

memory.memory_efficient_attention: in training, each GAT layer runs under torch.utils.checkpoint, so the
(E, heads, d) attention intermediates are recomputed in backward instead of stored. Same function.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint
from torch_geometric.nn import GATv2Conv
from torch_geometric.utils import softmax as graph_softmax

from isubg.batch import Batch, DataSpec
from isubg.config import IsubgConfig, RunConfig
from isubg.models.common import BranchOutput, Classifier, masked_mean, masked_softmax
from isubg.models.sampler import NodeSampler, graph_sizes

__all__ = ["ISubGBranch", "build", "selected_nodes"]

GAT_HEADS = 4  # attention heads per GAT layer, the reference's count; the branch has no setting for it
GLOVE_DIM = 300
CLASSIFIER_ACT = "gelu"
CLASSIFIER_DROPOUT = 0.1
_SCORE_EPS = 1e-5  # as LayerNorm's: bounds the gain of the per-graph score standardisation


class QuestionEncoder(nn.Module):
    """Word embedding + bidirectional GRU over the packed question.

    Args:
        num_words: dictionary size (0 = pad).
        dim: output width d.
        glove: (num_words, 300) rows to start the embedding from, or None.
        with_states: also return per-token states (only the instruction decoder reads them; without it
            their projection would be a parameter without gradient).

    Shapes:
        tokens: (B, L) int64, 0 = pad; mask: (B, L) bool -> states (B, L, d) (zero on padding) or None, u (B, d).
    """

    def __init__(self, num_words: int, dim: int, glove: torch.Tensor | None, with_states: bool = True) -> None:
        super().__init__()
        if glove is not None:
            self.embed = nn.Embedding.from_pretrained(glove.float(), freeze=False, padding_idx=0)
            self.embed_proj: nn.Module = nn.Linear(GLOVE_DIM, dim)
        else:
            self.embed = nn.Embedding(num_words, dim, padding_idx=0)
            self.embed_proj = nn.Identity()
        self.gru = nn.GRU(dim, dim, batch_first=True, bidirectional=True)
        self.state_proj = nn.Linear(2 * dim, dim) if with_states else None
        self.question_proj = nn.Linear(2 * dim, dim)

    def phrase_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Each row's mean word vector at width d, zero for a row without words.

        Averaged before the (linear) projection, which gives the same result at a fraction of the cost.

        Shapes:
            ids: (T, W) int64, 0 = no word -> (T, d).
        """
        present = ids != 0
        mean = masked_mean(self.embed(ids), present, dim=1)
        return self.embed_proj(mean) * present.any(dim=1, keepdim=True).to(mean.dtype)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        words = self.embed_proj(self.embed(tokens)).float()
        # An all-padding question still needs one step; its token 0 embeds to zeros.
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False)
        # float32 with autocast off, as the cfrf GRU (see there): errors compound over a recurrence.
        with torch.autocast(words.device.type, enabled=False):
            out, last = self.gru(packed)
        u = self.question_proj(torch.cat([last[0], last[1]], dim=-1))
        if self.state_proj is None:
            return None, u
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return self.state_proj(out) * mask.unsqueeze(-1).to(out.dtype), u


class InstructionDecoder(nn.Module):
    """One instruction per reasoning step from learned step queries attending over the question.

    Shapes:
        states: (B, L, d); mask: (B, L) bool; u: (B, d) -> (T, B, d).
    """

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(steps, dim) / math.sqrt(dim))
        self.state_to_query = nn.Linear(dim, dim)
        self.cell = nn.GRUCell(dim, dim)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / math.sqrt(states.shape[-1])
        hidden, steps = u, []
        for query in self.queries:
            q = self.state_to_query(hidden) + query  # (B, d): where this step looks depends on the last
            weights = masked_softmax(torch.einsum("bld,bd->bl", states, q) * scale, mask)
            context = torch.einsum("bl,bld->bd", weights, states)
            with torch.autocast(context.device.type, enabled=False):  # a recurrence: float32 (QuestionEncoder)
                hidden = self.cell(context.float(), hidden.float())
            steps.append(hidden)
        return torch.stack(steps)


class SceneGraphEncoder(nn.Module):
    """Node and edge embeddings from the graph tokens, boxes and reverse-edge flags.

    A token's embedding is its own row plus, when `shared` is given, a row of that table: the question
    encoder's word vectors averaged over the token's words, so graph and question words share meaning.

    Shapes:
        x: (N, 1 + attrs) int64 (0 = pad); box: (N, 4); edge_attr: (E,) int64; edge_reverse: (E,) bool;
        shared: (num_tokens, d) or None -> nodes (N, d), edges (E, d).
    """

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(num_tokens, dim, padding_idx=0)
        self.box = nn.Sequential(nn.Linear(4, dim), nn.GELU(), nn.Linear(dim, dim))
        self.node_norm = nn.LayerNorm(dim)
        # A reverse edge reuses its relation's token; this offset tells the two directions apart.
        self.reverse_offset = nn.Parameter(torch.randn(dim) / math.sqrt(dim))

    def forward(
        self,
        x: torch.Tensor,
        box: torch.Tensor,
        edge_attr: torch.Tensor,
        edge_reverse: torch.Tensor,
        shared: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def embed(ids: torch.Tensor) -> torch.Tensor:
            own = self.tokens(ids)
            return own if shared is None else own + shared.to(own.dtype)[ids]

        embedded = embed(x)
        attributes = masked_mean(embedded[:, 1:], x[:, 1:] != 0, dim=1)
        nodes = self.node_norm(embedded[:, 0] + attributes + self.box(box.to(embedded.dtype)))
        reverse = edge_reverse.reshape(-1, 1).to(embedded.dtype)
        edges = embed(edge_attr.reshape(-1)) + reverse * self.reverse_offset
        return nodes, edges


class InstructedGATLayer(nn.Module):
    """GATv2Conv conditioned on an instruction, optionally with masked source nodes; residual + LayerNorm.

    h' = LayerNorm(h + GELU(Linear(GATv2((g * mask, g)))), g = LayerNorm(h * instr) (or LayerNorm(h)).

    Shapes:
        h: (N, d); edge_index: (2, E); edges: (E, d); instr: (N, d) or None (no conditioning);
        source_mask: (N,) or None (every node sends) -> (N, d).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        # bias=False: lin_l(x * m) = m * lin_l(x), so a masked-out source sends exactly a zero message.
        self.conv = GATv2Conv(dim, dim, heads=GAT_HEADS, edge_dim=dim, add_self_loops=True, bias=False)
        self.proj = nn.Sequential(nn.Linear(GAT_HEADS * dim, dim), nn.GELU())
        self.gate_norm = nn.LayerNorm(dim)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        h: torch.Tensor,
        edge_index: torch.Tensor,
        edges: torch.Tensor,
        instr: torch.Tensor | None,
        source_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # Instructions are GRU states, mostly well inside (-1, 1): without re-normalising, the gated
        # features (hence attention logits and messages) would be a fraction of the residual's scale.
        gated = self.gate_norm(h if instr is None else h * instr)
        source = gated if source_mask is None else gated * source_mask.unsqueeze(-1)
        out = self.conv((source, gated), edge_index, edge_attr=edges)
        return self.norm(h + self.proj(out))


class NodeScorer(nn.Module):
    """Question-conditioned node scores for the sampler, standardised per graph and scaled by a learned gain.

    raw = Linear(GELU(W_n h * W_q u[graph])); theta = gain * (raw - mean_graph) / sqrt(var_graph + eps).
    Freshly initialised weights give raw scores about 50 times smaller than the sampler's noise, which made
    the perturbed top-k pure noise whatever tau, alpha or beta were. Standardising puts the scores on a
    known unit scale, so tau is the noise-to-score ratio from the first step; the gain (starting at 1)
    lets training make the sampler more or less confident. A one-node graph gets theta = 0 (it has no choice).

    Shapes:
        h: (N, d); u: (B, d); index: (N,) -> (N,).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.node = nn.Linear(dim, dim)
        self.question = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 1)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, h: torch.Tensor, u: torch.Tensor, index: torch.Tensor, num_graphs: int) -> torch.Tensor:
        # The statistics in float32: in bf16 the standardised scores tie, and the sampler's top-k breaks ties
        # arbitrarily.
        raw = self.out(nn.functional.gelu(self.node(h) * self.question(u)[index])).squeeze(-1).float()
        counts = graph_sizes(index, num_graphs).clamp_min(1).to(raw.dtype)
        mean = raw.new_zeros(num_graphs).index_add_(0, index, raw) / counts
        centred = raw - mean[index]
        var = raw.new_zeros(num_graphs).index_add_(0, index, centred.square()) / counts
        return self.gain * centred * torch.rsqrt(var[index] + _SCORE_EPS)


class AttentionPooling(nn.Module):
    """Question-conditioned attention over each graph's nodes, optionally renormalised over a node mask.

    Shapes:
        h: (N, d); u: (B, d); index: (N,); weight_mask: (N,) or None -> (B, d).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Sequential(nn.Linear(dim, dim), nn.GELU())

    def forward(
        self, h: torch.Tensor, u: torch.Tensor, index: torch.Tensor, num_graphs: int, weight_mask: torch.Tensor | None
    ) -> torch.Tensor:
        logits = (self.key(h) * self.query(u)[index]).sum(-1) / math.sqrt(h.shape[-1])
        weights = graph_softmax(logits, index, num_nodes=num_graphs)
        if weight_mask is not None:
            # Multiplying (not -inf masking) keeps a gradient on unselected nodes' mask entries: I-MLE
            # needs dL/dz for them too, or the sampler could only ever learn to drop nodes.
            weights = weights * weight_mask
            total = weights.new_zeros(num_graphs).index_add_(0, index, weights)
            weights = weights / total[index].clamp_min(torch.finfo(weights.dtype).tiny)
        values = self.value(h) * weights.unsqueeze(-1)
        return values.new_zeros(num_graphs, values.shape[-1]).index_add_(0, index, values)


class ISubGBranch(nn.Module):
    """The ISubGVQA branch (module docstring): scene graph + question -> answer logits and a node mask.

    Args:
        spec: data sizes (num_words, num_graph_tokens, num_answers) and optional GloVe rows.
        settings: model.isubg.
        memory_efficient: checkpoint each GAT layer in training (memory.memory_efficient_attention).
    """

    def __init__(self, spec: DataSpec, settings: IsubgConfig, memory_efficient: bool = False) -> None:
        super().__init__()
        d = settings.general_hidden_dim
        glove = None if spec.glove is None else torch.as_tensor(spec.glove)
        self.use_masking = settings.use_masking
        self.use_mgat = settings.use_mgat
        self.memory_efficient = memory_efficient
        self.question = QuestionEncoder(spec.num_words, d, glove, with_states=settings.use_instruction)
        self.decoder = InstructionDecoder(d, settings.mgat_layers) if settings.use_instruction else None
        self.graph = SceneGraphEncoder(spec.num_graph_tokens, d)
        words = spec.graph_words if settings.share_word_embeddings else None
        # Derived from the data folder's vocabularies (checked by checksum on load), so not saved with the weights.
        self.register_buffer(
            "graph_words", None if words is None else torch.as_tensor(words, dtype=torch.long), persistent=False
        )
        self.layers = nn.ModuleList(InstructedGATLayer(d) for _ in range(settings.mgat_layers))
        self.scorer = NodeScorer(d)
        s = settings
        self.sampler = NodeSampler(s.sampler_type, s.sample_k, s.nb_samples, s.alpha, s.beta, s.tau)
        self.pool = AttentionPooling(d)
        self.classifier = Classifier(2 * d, 2 * d, spec.num_answers, CLASSIFIER_ACT, CLASSIFIER_DROPOUT)

    def forward(self, batch: Batch) -> BranchOutput:
        """Answer logits and the selected-node mask.

        Shapes:
            batch.q_tokens, batch.q_mask: (B, L); batch.graphs: x (N, 1 + attrs), box (N, 4),
            edge_index (2, E), edge_attr (E,), edge_reverse (E,), batch (N,)
            -> BranchOutput(logits (B, A), node_mask (N,) float in [0, 1]: exactly sample_k (or all) ones
            per graph in eval; in training the mean of nb_samples such k-hot masks).
        """
        graphs, num_graphs = batch.graphs, batch.q_tokens.shape[0]
        index = graphs.batch
        states, u = self.question(batch.q_tokens, batch.q_mask)
        instr = None if self.decoder is None or states is None else self.decoder(states, batch.q_mask, u)
        shared = None if self.graph_words is None else self.question.phrase_vectors(self.graph_words)
        h, edges = self.graph(graphs.x, graphs.box, graphs.edge_attr, graphs.edge_reverse, shared)
        mask = self._sample(h, u, index, num_graphs) if self.use_mgat else None
        layer_mask = mask if self.use_masking else None
        for t, layer in enumerate(self.layers):
            step = None if instr is None else instr[t][index]
            h = self._run_layer(layer, h, graphs.edge_index, edges, step, layer_mask)
        if mask is None:
            mask = self._sample(h, u, index, num_graphs)
        pool_mask = mask if self.use_masking else None
        if pool_mask is not None:
            h = h * pool_mask.unsqueeze(-1)
        pooled = self.pool(h, u, index, num_graphs, pool_mask)
        return BranchOutput(logits=self.classifier(torch.cat([pooled, u], dim=-1)), node_mask=mask)

    def _sample(self, h: torch.Tensor, u: torch.Tensor, index: torch.Tensor, num_graphs: int) -> torch.Tensor:
        """The sampled node mask (N,); without masking it is only an explanation, so no graph is kept for it."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.use_masking):
            return self.sampler(self.scorer(h, u, index, num_graphs), index, num_graphs)

    def _run_layer(
        self,
        layer: InstructedGATLayer,
        h: torch.Tensor,
        edge_index: torch.Tensor,
        edges: torch.Tensor,
        instr: torch.Tensor | None,
        source_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.memory_efficient and self.training and torch.is_grad_enabled():
            # Recompute the layer in backward; RNG state is preserved, so it is the same function.
            return checkpoint(layer, h, edge_index, edges, instr, source_mask, use_reentrant=False)
        return layer(h, edge_index, edges, instr, source_mask)


def selected_nodes(output: BranchOutput, batch: Batch, threshold: float = 0.5) -> list[list[int]]:
    """Per question, the local indices (within its own scene graph) of the selected nodes.

    A node counts as selected when its mask value is at least `threshold`; in eval the mask is exactly
    0/1, so this is the sampled subset. In training with nb_samples > 1 the mask is the share of samples
    that chose the node, and 0.5 keeps the nodes most samples chose.

    Raises:
        ValueError: the output has no node mask.
    """
    if output.node_mask is None:
        raise ValueError("this output has no node mask (only the isubg branch produces one)")
    graphs = batch.graphs
    chosen = (output.node_mask.detach() >= threshold).cpu()
    ptr = graphs.ptr.cpu().tolist()
    return [[i - ptr[g] for i in range(ptr[g], ptr[g + 1]) if bool(chosen[i])] for g in range(len(ptr) - 1)]


def build(cfg: RunConfig, spec: DataSpec) -> ISubGBranch:
    """The isubg branch for `cfg.model.isubg` and `cfg.memory.memory_efficient_attention`."""
    return ISubGBranch(spec, cfg.model.isubg, memory_efficient=cfg.memory.memory_efficient_attention)
