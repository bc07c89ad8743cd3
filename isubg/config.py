"""The one configuration schema: every isubg setting with its type, hard bounds, advice and help text.

Hard bounds are validation errors. The tuning guide's advice ranges are not: a value outside them
is legal and yields a `ConfigWarning`, which every command shows. Fields keep the tuning guide's
names (`lr`, `AOA_layers`, `use_mgat`, ...) so that `--set lr=3e-4`, `--set train.lr=3e-4` and the
`--lr` flag all reach the same place.

Field metadata lives in `json_schema_extra`:
    advice: {"min": lo, "max": hi} | {"choices": [...]} | {"note": "..."} (+ optional "note")
    guide:  True for names the tuning guide defines (they get a bare-name shortcut and a CLI flag)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from isubg.branches import BRANCHES as _REGISTRY
from isubg.branches import branch_names
from isubg.errors import ConfigError

__all__ = [
    "BRANCHES",
    "ConfigError",
    "ConfigWarning",
    "ParamSpec",
    "RunConfig",
    "checkpoint_interval",
    "config_diff",
    "config_warnings",
    "default_config",
    "format_advice",
    "format_value",
    "get_value",
    "guide_params",
    "param_specs",
]

BRANCHES: tuple[str, ...] = branch_names()  # isubg.branches is the one place a branch is declared
BranchName = Literal[BRANCHES]  # type: ignore[valid-type]  # the registered names, for the schema


@dataclass(frozen=True)
class ConfigWarning:
    """A legal value the tuning guide advises against, or a setting that has no effect here."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# --------------------------------------------------------------------------------------------------
# Field helpers


def _reject_bool(value: Any) -> Any:
    # bool is a subclass of int, so pydantic would read `batch_size: true` as 1; that is a typo.
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


Int = Annotated[int, BeforeValidator(_reject_bool)]
Float = Annotated[float, BeforeValidator(_reject_bool)]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|min|m|h)\s*$", re.IGNORECASE)
_SECONDS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def checkpoint_interval(value: int | str | None) -> tuple[int | None, float | None]:
    """train.checkpoint_every as (optimizer updates, seconds), at most one of them set; (None, None): off.

    Raises:
        ValueError: not a positive number of updates, a duration like '15min', 'off' or None.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None, None
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        updates = int(value)
        if updates < 1:
            raise ValueError(f"checkpoint_every must be at least 1 update, got {updates}")
        return updates, None
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(
            f"checkpoint_every: expected a number of updates (500), a duration ('30s', '15min', '2h') or 'off', "
            f"got {value!r}"
        )
    return None, float(match.group(1)) * _SECONDS[match.group(2).lower()]


def _p(
    default: Any,
    description: str,
    *,
    advice: dict[str, Any] | None = None,
    guide: bool = False,
    **bounds: Any,
) -> Any:
    """A schema field carrying its help text, the guide's advice and whether the guide names it."""
    extra: dict[str, Any] = {"guide": guide}
    if advice is not None:
        extra["advice"] = advice
    return Field(default, description=description, json_schema_extra=extra, **bounds)


def _range(low: float, high: float, note: str | None = None) -> dict[str, Any]:
    return {"min": low, "max": high, **({"note": note} if note else {})}


def _choices(*values: Any) -> dict[str, Any]:
    return {"choices": list(values)}


def _note(text: str) -> dict[str, Any]:
    return {"note": text}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


# --------------------------------------------------------------------------------------------------
# Sections


class DataConfig(_Section):
    """Where the data comes from and how questions and images are cut to size."""

    dataset: Annotated[Literal["GQA", "VQA"], BeforeValidator(_upper)] = _p(
        "GQA", "Dataset: GQA or VQA (VQA v2); case-insensitive.", guide=True
    )
    root: Path | None = _p(
        None, "Processed data folder written by `isubg data prepare`; unset: the embedded demo dataset."
    )
    demo_size: Literal["tiny", "small", "medium"] = _p(
        "small", "Size of the embedded demo dataset used when data.root is unset (tiny, small, medium)."
    )
    features: Path | list[Path] | None = _p(
        None,
        "HDF5 box-feature file, or a list of files (shards: one id map over all, each image in one file; YAML list "
        "or --set data.features=[a.h5,b.h5]); unset: the file(s) named in the processed folder's manifest.",
    )
    image_root: Path | None = _p(
        None, "Image folder for the X-VLM Swin/ViT encoder (model.xvlm.vision); unset: region features only."
    )
    train_split: str = _p("train", "Split trained on.", min_length=1)
    val_split: str = _p("val", "Split validated on after each epoch.", min_length=1)
    question_len: Int = _p(12, "Maximum question length in tokens.", advice=_range(8, 20), guide=True, ge=1)
    max_boxes: Int = _p(
        50,
        "Maximum boxes per image (adaptive features have 10-100); extra boxes are dropped.",
        advice=_range(30, 100),
        guide=True,
        ge=1,
    )
    num_stat_word: Int = _p(
        30, "Number of statistical (image label) words per image.", advice=_range(20, 50), guide=True, ge=1
    )
    tfidf: bool = _p(True, "Concatenate a tf-idf weighted word embedding.", advice=_note("keep true"), guide=True)
    scene_graphs: Literal["auto", "gt", "detected"] = _p(
        "auto",
        "Where scene graphs and stat words come from. 'auto': the ground-truth graph where the image has one "
        "(GQA splits prepared with a scene-graph file), else the graph built from the detector boxes; stat words "
        "from the detector labels. 'gt': graphs and stat words from the ground-truth graphs (a split without "
        "them is an error). 'detected': both from the detector, as at test time (GQA testdev/test have no public "
        "scene graphs).",
    )
    num_workers: Int = _p(2, "DataLoader worker processes (0 loads in the main process).", ge=0)
    in_memory: bool = _p(False, "Read the whole feature file into RAM instead of lazily from disk.")
    train_limit: Int | None = _p(
        None, "Train on the first N questions of the train split only (quick runs); unset: all.", ge=1
    )
    val_limit: Int | None = _p(
        None, "Validate on the first N questions of the validation split only; unset: all.", ge=1
    )

    @field_validator("features")
    @classmethod
    def _features_name_a_file(cls, value: Path | list[Path] | None) -> Path | list[Path] | None:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list names no features file; leave data.features unset to use the manifest's")
        return value


class CfrfConfig(_Section):
    """The fine-grained branch: BAN bilinear attention, the Zhang counter and AoA layers."""

    gamma: Int = _p(2, "BAN glimpses.", advice=_range(1, 4), guide=True, ge=1)
    use_counter: bool = _p(
        False, "Zhang et al. counting module on the attended boxes.", advice=_note("task-dependent"), guide=True
    )
    counter_act: Literal["zhang", "identity"] = _p(
        "zhang",
        "Counter activation: 'zhang' (learned monotone piecewise-linear maps) or 'identity' (no learned maps).",
        advice=_choices("zhang"),
        guide=True,
    )
    AOA_layers: Int = _p(6, "Attention-on-attention layers.", advice=_range(4, 8), guide=True, ge=0)
    aoa_norm: Literal["pre", "post", "none"] = _p(
        "pre",
        "Where the AoA layers normalise: 'pre' (LayerNorm on what each attention reads; the residual streams keep "
        "their scale, so strong boxes stay strong), 'post' (LayerNorm after each residual: every box vector is "
        "rescaled to one size) or 'none' (plain residuals, as the reference).",
    )
    num_hid: Int = _p(1024, "Joint representation width (any value works).", advice=_range(512, 2048), guide=True, ge=1)
    box_input: Literal["projected", "features"] = _p(
        "projected",
        "What BAN's box side reads: 'projected' (the boxes' features and spatials projected once to num_hid; the AoA "
        "layers and the stat-word fusion refine that stream) or 'features' (the raw box features, as ban-vqa: each "
        "attention and pooling net projects them itself; needs AOA_layers=0; what `isubg import-checkpoint ban` sets).",
    )
    activation: Literal["relu", "swish", "gelu", "tanh"] = _p(
        "swish", "Classifier activation.", advice=_choices("relu", "swish"), guide=True
    )
    dropout: Float = _p(0.45, "Classifier dropout rate.", advice=_range(0.3, 0.6), guide=True, ge=0.0, lt=1.0)
    omega_q: Float = _p(
        0.1,
        "Weight of question-instruction (entity) fusion; 0 switches it off.",
        advice=_range(0.05, 0.2),
        guide=True,
        ge=0.0,
    )
    omega_v: Float = _p(
        0.01,
        "Weight of image-semantics (stat-word/box) fusion; 0 switches it off.",
        advice=_range(0.005, 0.05),
        guide=True,
        ge=0.0,
    )


class IsubgConfig(_Section):
    """The ISubGVQA scene-graph branch: instruction-conditioned GAT layers and a node-subset sampler."""

    general_hidden_dim: Int = _p(300, "Hidden width of the graph branch.", advice=_range(256, 512), guide=True, ge=1)
    mgat_layers: Int = _p(4, "Graph attention layers (one instruction each).", advice=_range(2, 6), guide=True, ge=1)
    sampler_type: Literal["imle", "gumbel"] = _p(
        "imle", "Node-subset sampler: 'imle' or 'gumbel'.", advice=_choices("imle", "gumbel"), guide=True
    )
    sample_k: Int = _p(2, "Nodes kept per graph (all when a graph has fewer).", advice=_range(1, 5), guide=True, ge=1)
    nb_samples: Int = _p(1, "Samples drawn per step and averaged.", advice=_range(1, 3), guide=True, ge=1)
    alpha: Float = _p(1.0, "IMLE target interpolation.", advice=_range(0.5, 2.0), guide=True, gt=0.0)
    beta: Float = _p(10.0, "IMLE target step size.", advice=_range(5.0, 20.0), guide=True, gt=0.0)
    tau: Float = _p(1.0, "Sampler noise temperature.", advice=_range(0.5, 2.0), guide=True, gt=0.0)
    use_instruction: bool = _p(True, "Condition graph layers on question instructions (0/1).", guide=True)
    use_masking: bool = _p(True, "Apply the sampled node mask (0/1).", guide=True)
    use_mgat: bool = _p(False, "Masked GAT layers (1) instead of plain GATv2 layers (0).", guide=True)
    share_word_embeddings: bool = _p(
        True,
        "Scene-graph tokens also embed through the question's word table (the mean over the token's words), so "
        "'cup' in a question and a 'cup' node start alike, as in ISubGVQA's GloVe-initialised graph vocabulary.",
    )


class XvlmConfig(_Section):
    """The X-VLM cross-modal transformer branch and where its weights and settings come from."""

    checkpoint: Path | None = _p(
        None, "X-VLM checkpoint to initialise from (guide: --checkpoint); unset: random init.", guide=True
    )
    xvlm_config: Path | None = _p(
        None, "X-VLM settings YAML such as configs/VQA_480.yaml (the guide's --config).", guide=True
    )
    text_encoder: Path | None = _p(
        None, "Local BERT folder (config, vocab, weights) for the text layers; unset: built from the sizes below."
    )
    vision: Literal["regions", "swin", "vit"] = _p(
        "regions", "Visual tokens: projected region features, or a Swin/ViT encoder over data.image_root."
    )
    image_res: Int = _p(480, "Image resolution for the Swin/ViT encoder.", ge=32)
    vit_layout: Literal["vit", "clip"] = _p(
        "vit",
        "Layout of the ViT image encoder (vision: vit): 'vit' (transformers' ViT) or 'clip' (X-VLM's CLIP-ViT: a "
        "LayerNorm on the patch and position embeddings before the first layer, quick-GELU, LayerNorm eps 1e-5); "
        "`isubg import-checkpoint xvlm` sets 'clip' for CLIP-ViT checkpoints.",
    )
    hidden_size: Int = _p(768, "Transformer width.", ge=8)
    num_heads: Int = _p(12, "Attention heads (must divide hidden_size).", ge=1)
    num_text_layers: Int = _p(6, "Text-only BERT layers.", ge=0)
    num_cross_layers: Int = _p(6, "BERT layers with cross-attention to the visual tokens.", ge=1)
    intermediate_size: Int = _p(3072, "Feed-forward width of each transformer layer.", ge=1)
    max_tokens: Int = _p(40, "Maximum question tokens for the X-VLM tokenizer.", ge=1)
    cross_width: Int | None = _p(
        None,
        "Width of the visual tokens the cross-attention keys/values read: unset = hidden_size (visual tokens are "
        "projected to the text width); a number (X-VLM: 1024 for Swin-B, 768 for ViT-B) = X-VLM's layout, where "
        "keys/values read the vision encoder's tokens as they are (no projection with swin/vit when it equals the "
        "encoder width; region tokens are projected to it). Set by `isubg import-checkpoint xvlm`.",
        ge=1,
    )
    topk: Int = _p(
        6,
        "Top-K of the X-VLM candidate loss (training only): a soft cross-entropy over the K highest-scoring answers "
        "plus the gold ones, added to the branch's loss.",
        advice=_range(3, 10),
        guide=True,
        ge=1,
    )


class FusionConfig(_Section):
    """Per-answer weighting of the branches' answer distributions."""

    fusion_ratio: Float = _p(0.1, "Weight of the fused-answer loss.", advice=_range(0.05, 0.2), guide=True, ge=0.0)
    holdout: Float = _p(
        0.0,
        "Share of training questions (chosen by a hash of the question id) that the branches never learn from and "
        "the fusion weights learn from alone, so they weigh each branch by how it answers unseen questions; 0 = "
        "the reference (fusion weights learn from every question, favouring the branch that fits training best).",
        ge=0.0,
        lt=1.0,
    )


class ModelConfig(_Section):
    """Which branches run, and each branch's settings."""

    branches: list[BranchName] = _p(
        list(BRANCHES), f"Branches to build and train: any non-empty subset of {', '.join(BRANCHES)}."
    )
    cfrf: CfrfConfig = Field(default_factory=CfrfConfig)
    isubg: IsubgConfig = Field(default_factory=IsubgConfig)
    xvlm: XvlmConfig = Field(default_factory=XvlmConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)

    @field_validator("branches")
    @classmethod
    def _branches_nonempty_unique(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one branch is needed (cfrf, isubg, xvlm)")
        if len(set(value)) != len(value):
            raise ValueError(f"a branch is listed twice: {value}")
        return value


class TrainConfig(_Section):
    """The training run: length, learning rates, micro-batch, seed and where results go."""

    epochs: Int = _p(20, "Training epochs.", advice=_range(10, 50), guide=True, ge=1)
    lr: Float = _p(
        2.8e-4, "Main learning rate (Adamax; every non-X-VLM parameter).", advice=_range(1e-4, 5e-4), guide=True, gt=0.0
    )
    xvlm_lr: Float = _p(5e-5, "X-VLM branch learning rate (AdamW).", advice=_range(1e-5, 1e-4), guide=True, gt=0.0)
    fusion_lr: Float | None = _p(
        None,
        "Learning rate of the per-answer fusion weights (a parameter group of the main Adamax, on its schedule); "
        "unset: train.lr, as the reference. The weights must follow the branches as they improve; at the main "
        "rate they lag by epochs.",
        gt=0.0,
    )
    batch_size: Int = _p(32, "Micro-batch size.", advice=_range(16, 64, "by GPU memory"), guide=True, ge=1)
    update_freq: Int = _p(4, "Optimizer step every N accumulated micro-batches.", advice=_range(2, 8), guide=True, ge=1)
    seed: Int = _p(1204, "Random seed; the same seed reproduces a run.", guide=True, ge=0)
    output: Path | None = _p(None, "Run directory; unset: runs/<date>-<time>-<preset>.", guide=True)
    init_from: Path | None = _p(
        None,
        "Start a new run from the model weights of this isubg checkpoint (e.g. one written by `isubg import-checkpoint`"
        "); optimizers, schedule and position start fresh; every weight must fit. Unset: random initialisation.",
    )
    schedule: Literal["ban", "constant"] = _p(
        "ban",
        "Learning-rate schedule of the main (Adamax) optimizer: BAN warm-up/step decay scaled to epochs, or constant.",
    )
    patience: Int | None = _p(
        None, "Early stopping: stop after this many epochs without a better validation accuracy; unset: never.", ge=1
    )
    device: str = _p(
        "auto", "Device: auto (CUDA if present, else CPU), cpu, cuda or cuda:N.", pattern=r"^(auto|cpu|cuda(:\d+)?)$"
    )
    log_every: Int = _p(10, "Optimizer steps between metric lines in metrics.jsonl.", ge=1)
    checkpoint_every: Int | str | None = _p(
        "15min",
        "Mid-epoch checkpoints: overwrite checkpoints/last.pt with the exact resumable state every N optimizer "
        "updates (a number) or every so much training time ('30s', '15min', '2h'); 'off' or null: at epoch ends "
        "and on SIGINT/SIGTERM only. A kill -9 or a lost node then costs at most this much work.",
    )
    loggers: list[Literal["jsonl", "tensorboard"]] = _p(
        ["jsonl"],
        "Where metrics go: jsonl (metrics.jsonl, which isubg report and resume read; always on) and optionally "
        "tensorboard (scalars under <run>/tensorboard; needs the tensorboard package: pip install "
        "'isubg[tensorboard]').",
    )
    tf32: bool = _p(
        True,
        "On CUDA (Ampere and newer), float32 matrix products and convolutions use TF32 tensor cores: 10-bit "
        "mantissa products, float32 accumulation, several times faster; false: full float32. CPU runs ignore it.",
    )

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _checkpoint_every(cls, value: Any) -> Any:
        if value is False:  # YAML reads a bare `off` as false
            return None
        checkpoint_interval(_reject_bool(value))  # raises ValueError with the accepted forms
        return None if isinstance(value, str) and value.strip().lower() == "off" else value

    @field_validator("loggers")
    @classmethod
    def _jsonl_logger_kept(cls, value: list[str]) -> list[str]:
        if "jsonl" not in value:
            raise ValueError("'jsonl' must stay in train.loggers: isubg report, resume and tune read metrics.jsonl")
        if len(set(value)) != len(value):
            raise ValueError(f"a logger is listed twice: {value}")
        return value


class OptimConfig(_Section):
    """Gradient handling shared by both optimizers."""

    clip_norm: Float = _p(0.25, "Global gradient-norm clip.", advice=_range(0.1, 0.5), guide=True, gt=0.0)
    gradient_accumulation_steps: Int = _p(
        1,
        "Micro-batches per update on top of update_freq; dynamic batch sizing may raise it.",
        advice=_range(1, 8),
        guide=True,
        ge=1,
    )
    xvlm_weight_decay: Float = _p(0.01, "AdamW weight decay of the X-VLM branch.", ge=0.0)


class MemoryConfig(_Section):
    """Device memory: budgets, precision and memory-saving kernels."""

    dynamic_batch_size: bool = _p(
        False,
        "Fit the micro-batch to memory, keeping the effective batch.",
        advice=_note("on when memory is short"),
        guide=True,
    )
    max_memory_usage: Float = _p(
        0.8, "Fraction of device memory the run may use.", advice=_range(0.7, 0.9), guide=True, gt=0.0, le=1.0
    )
    mixed_precision: bool = _p(
        False, "Autocast: bf16 where supported, else fp16 with a grad scaler.", advice=_note("usually on"), guide=True
    )
    memory_efficient_attention: bool = _p(
        False, "Memory-efficient attention kernels and chunking.", advice=_note("on when memory is short"), guide=True
    )


class EvalConfig(_Section):
    """Evaluation of a trained run."""

    split: str = _p("val", "Split to evaluate (val, testdev, ...).", min_length=1)
    batch_size: Int | None = _p(None, "Evaluation batch size; unset: twice train.batch_size.", ge=1)


class TuneConfig(_Section):
    """Hyperparameter studies (Optuna)."""

    study: str | None = _p(None, "Study name; unset: derived from the plan and preset.")
    storage: str | None = _p(None, "Optuna storage URL; unset: a journal file in the output folder.")
    trials: Int | None = _p(
        None,
        "Trials: search plans, trials in the study; staged, per step; grids, at most this many of the plan's "
        "configurations. Unset: the plan's own number (grids: all).",
        ge=1,
    )
    seeds: Int = _p(1, "Seeds per configuration; configurations are ranked by the mean.", ge=1)
    pruner: Literal["median", "hyperband", "none"] = _p("median", "Pruner that stops hopeless trials early.")
    stale_after: Float = _p(
        900.0,
        "Seconds without a heartbeat after which a running trial's worker counts as dead: the trial is marked "
        "failed and queued again (a dead worker on this machine is noticed at once).",
        gt=0.0,
    )


class RunConfig(_Section):
    """Everything one isubg run needs. Build it with `isubg.resolve.resolve_config`."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step: batch_size x gradient_accumulation_steps x update_freq."""
        return self.train.batch_size * self.optim.gradient_accumulation_steps * self.train.update_freq

    @model_validator(mode="after")
    def _cross_field(self) -> RunConfig:
        x = self.model.xvlm
        if "xvlm" in self.model.branches and x.hidden_size % x.num_heads:
            raise ValueError(
                f"model.xvlm.hidden_size ({x.hidden_size}) must be a multiple of model.xvlm.num_heads ({x.num_heads})"
            )
        if "xvlm" in self.model.branches and x.vision != "regions" and self.data.image_root is None:
            raise ValueError(
                f"model.xvlm.vision={x.vision!r} encodes images, so data.image_root must name the image folder "
                "(or use vision: regions)"
            )
        if "cfrf" in self.model.branches and self.model.cfrf.box_input == "features" and self.model.cfrf.AOA_layers:
            raise ValueError(
                "model.cfrf.box_input='features' feeds BAN the raw box features, which the AoA layers (width num_hid) "
                "cannot read; set AOA_layers=0 or box_input='projected'"
            )
        return self


def config_diff(a: RunConfig, b: RunConfig) -> list[tuple[str, Any, Any]]:
    """(path, value in a, value in b) for every parameter that differs, in schema order."""
    return [(p, get_value(a, p), get_value(b, p)) for p in param_specs() if get_value(a, p) != get_value(b, p)]


def default_config() -> RunConfig:
    """The schema defaults: the tuning guide's defaults and the `default` preset."""
    return RunConfig()


# --------------------------------------------------------------------------------------------------
# Introspection: every leaf parameter with its metadata


@dataclass(frozen=True)
class ParamSpec:
    """One leaf setting of the schema."""

    path: str  # dotted, e.g. "model.cfrf.AOA_layers"
    name: str  # the leaf name, e.g. "AOA_layers"
    section: str  # the dotted section, e.g. "model.cfrf"
    info: FieldInfo
    guide: bool

    @property
    def description(self) -> str:
        return self.info.description or ""

    @property
    def default(self) -> Any:
        return self.info.get_default(call_default_factory=True)

    @property
    def advice(self) -> dict[str, Any] | None:
        extra = self.info.json_schema_extra
        return extra.get("advice") if isinstance(extra, dict) else None  # type: ignore[return-value]

    def allowed(self) -> str:
        """What values the schema accepts, in words (for error messages and docs)."""
        return _allowed(self.info)


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, _Section)


def _walk(model: type[BaseModel], prefix: str) -> Iterator[ParamSpec]:
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if _is_section(info.annotation):
            yield from _walk(info.annotation, path)
        else:
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            yield ParamSpec(path=path, name=name, section=prefix, info=info, guide=bool(extra.get("guide")))


@cache
def param_specs() -> dict[str, ParamSpec]:
    """Every leaf parameter of `RunConfig`, keyed by dotted path, in schema order."""
    return {spec.path: spec for spec in _walk(RunConfig, "")}


@cache
def guide_params() -> dict[str, str]:
    """The tuning guide's names mapped to their dotted paths (`lr` -> `train.lr`)."""
    out: dict[str, str] = {}
    for spec in param_specs().values():
        if spec.guide:
            if spec.name in out:  # pragma: no cover - guarded by a test; bare names must be unique
                raise AssertionError(f"guide name {spec.name} appears twice in the schema")
            out[spec.name] = spec.path
    return out


@cache
def section_paths() -> tuple[str, ...]:
    """Every section's dotted path ("data", "model", "model.cfrf", ...), in schema order."""
    seen: dict[str, None] = {}
    for spec in param_specs().values():
        parts = spec.section.split(".")
        for i in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:i]), None)
    return tuple(seen)


def _type_words(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _type_words(get_args(annotation)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin is list:
        item = get_args(annotation)[0]
        if item is Path:
            return "a list of paths"
        return "a list drawn from " + _type_words(item).removeprefix("one of ")
    args = [a for a in get_args(annotation) if a is not type(None)]
    if args and len(args) < len(get_args(annotation)):  # Optional[...]
        return " or ".join(_type_words(a) for a in args) + " or null"
    if len(args) > 1:  # a union: Int | str
        return " or ".join(_type_words(a) for a in args)
    names = {bool: "true/false (also yes/no, 1/0)", int: "an integer", float: "a number", str: "text", Path: "a path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _allowed(info: FieldInfo) -> str:
    words = _type_words(info.annotation)
    bounds = []
    for meta in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(meta, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{sign} {format_value(getattr(meta, attr))}")
        if isinstance(meta, annotated_types.MinLen):
            words = "non-empty " + words
    return words + (" " + " and ".join(bounds) if bounds else "")


# --------------------------------------------------------------------------------------------------
# Warnings: legal values the guide advises against, and settings that do nothing in this config


def format_value(value: Any) -> str:
    """A value as a user writes it in YAML (true, 0.00028, cfrf, isubg, -)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return f"{value:.1f}"  # 8.0, not 8: the parameter is a float
        # 5e-05 -> 5e-5: the way learning rates are written in papers and YAML files.
        return f"{value:g}".replace("e-0", "e-").replace("e+0", "e+")
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def format_advice(advice: dict[str, Any] | None) -> str:
    """The guide's advice in words ("10-50", "relu | swish", "keep true")."""
    if not advice:
        return ""
    if "min" in advice:
        low, high = advice["min"], advice["max"]
        sep = " .. " if isinstance(low, float) or isinstance(high, float) else "-"
        text = f"{format_value(low)}{sep}{format_value(high)}"
        return f"{text} ({advice['note']})" if "note" in advice else text
    if "choices" in advice:
        return " | ".join(format_value(c) for c in advice["choices"])
    return str(advice.get("note", ""))


def _outside_advice(value: Any, advice: dict[str, Any] | None) -> bool:
    if not advice or value is None:
        return False
    if "min" in advice:
        return not advice["min"] <= value <= advice["max"]
    if "choices" in advice:
        return value not in advice["choices"]
    return False


def get_value(cfg: BaseModel, path: str) -> Any:
    """The value at a dotted path of a config (`get_value(cfg, "train.lr")`)."""
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _no_effect_rules(cfg: RunConfig) -> list[tuple[str, str]]:
    """(path, reason) pairs for settings that cannot act in this configuration."""
    branches = cfg.model.branches
    rules: list[tuple[str, str]] = []
    for branch in BRANCHES:
        if branch not in branches:
            rules.extend(
                (path, f"the {branch} branch is not in model.branches")
                for path in param_specs()
                if path.startswith(f"model.{branch}.")
            )
    for spec in _REGISTRY.values():  # an optimizer of its own acts only when its branch is built
        if spec.name not in branches and spec.optimizer == "adamw":
            reason = f"the {spec.name} branch is not in model.branches"
            rules += [(p, reason) for p in (spec.lr_field, spec.weight_decay_field) if p is not None]
    if cfg.train.device == "cpu":
        rules.append(("train.tf32", "train.device is cpu (TF32 is a CUDA tensor-core mode)"))
    if not cfg.model.cfrf.use_counter:
        rules.append(("model.cfrf.counter_act", "use_counter is off"))
    if cfg.model.cfrf.AOA_layers == 0:
        rules.append(("model.cfrf.aoa_norm", "AOA_layers is 0"))
    if cfg.model.isubg.sampler_type != "imle":
        reason = f"sampler_type is {cfg.model.isubg.sampler_type!r}; alpha and beta only act with 'imle'"
        rules += [("model.isubg.alpha", reason), ("model.isubg.beta", reason)]
    if len(branches) == 1:
        fusion = ("model.fusion.fusion_ratio", "model.fusion.holdout", "train.fusion_lr")
        rules += [(path, "fusion needs at least two branches") for path in fusion]
    elif cfg.model.fusion.fusion_ratio == 0:
        reason = "fusion_ratio is 0, so the fusion weights never learn"
        rules += [(path, reason) for path in ("model.fusion.holdout", "train.fusion_lr")]
    # An X-VLM settings file can switch vision to swin/vit at build time, but only when data.image_root is set.
    x = cfg.model.xvlm
    if x.vision == "regions" and (x.xvlm_config is None or cfg.data.image_root is None):
        rules.append(("model.xvlm.image_res", "model.xvlm.vision is 'regions' (region features, no image pixels)"))
    if x.vision != "vit" and (x.xvlm_config is None or cfg.data.image_root is None):
        rules.append(("model.xvlm.vit_layout", "model.xvlm.vision is not 'vit'"))
    return rules


def config_warnings(cfg: RunConfig) -> list[ConfigWarning]:
    """Every advice-range departure and every changed setting that has no effect, in schema order."""
    specs = param_specs()
    found: dict[str, list[str]] = {}
    for path, spec in specs.items():
        value = get_value(cfg, path)
        if _outside_advice(value, spec.advice):
            found.setdefault(path, []).append(
                f"{format_value(value)} is outside the tuning guide's advice ({format_advice(spec.advice)})"
            )
    for path, reason in _no_effect_rules(cfg):
        if get_value(cfg, path) != specs[path].default:
            found.setdefault(path, []).append(
                f"set to {format_value(get_value(cfg, path))} but has no effect: {reason}"
            )
    return [ConfigWarning(path, msg) for path in specs if path in found for msg in found[path]]
