"""Read an X-VLM settings YAML (model.xvlm.xvlm_config, e.g. X-VLM's configs/VQA_480.yaml) into model.xvlm.*.

No torch here: `apply_xvlm_settings(cfg)` returns the effective RunConfig, so data code can use the same image_res
the model is built with. `isubg.models.xvlm.build` calls it.

Keys of the YAML and what they set (X-VLM key -> isubg setting):

- `image_res` -> model.xvlm.image_res.
- `use_clip_vit: True` / `use_swin: True` -> model.xvlm.vision `vit` / `swin` (X-VLM checks `use_clip_vit`
  first), only when data.image_root is set: without images the branch keeps region features, and the report says so.
- `vision_config` (a JSON file) -> the image encoder's sizes, read only when vision is swin/vit: Swin `embed_dim`,
  `depths`, `num_heads`, `window_size`; CLIP-ViT `vision_width`, `patch_size`, `num_hidden_layers`,
  `num_attention_heads`, `intermediate_size`, `hidden_act`, `attention_dropout`.
- `patch_size` -> the ViT patch size when the vision JSON has none; for Swin only checked (X-VLM requires 32).
- `text_config` (a JSON file) -> hidden_size, `num_attention_heads` -> num_heads, intermediate_size,
  `fusion_layer` -> num_text_layers, `num_hidden_layers - fusion_layer` -> num_cross_layers.
- `text_encoder` -> model.xvlm.text_encoder (the local BERT tokenizer folder).
- `max_tokens` -> model.xvlm.max_tokens.

Known keys with no model.xvlm counterpart (data files, answer list, decoder, optimiser, schedule, `k_test`, ...)
are listed in the report with the isubg setting to use instead; any other key is reported as unknown and
warned about. Nothing is dropped silently.

Precedence: a model.xvlm setting still at its schema default takes the file's value; a setting with any other
value is the user's and wins (the report lists it as kept, with the file's value). Deciding by value rather than by
which layer set it keeps a saved config reproducible: the same values and file give the same model, however the
config was written. Consequently `vision: regions` (the default) cannot veto the file's Swin when data.image_root
is set; unset data.image_root to keep region features.

Paths inside the file (`vision_config`, `text_config`, `text_encoder`) are relative to X-VLM's repository root,
where its scripts run: they are looked up next to the YAML, in the YAML folder's parent (configs/.. = the X-VLM
root) and in the working directory, first match wins. A path that is needed and found nowhere is a ConfigError
listing the places tried.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from isubg.config import RunConfig, XvlmConfig
from isubg.errors import ConfigError
from isubg.yamlio import YamlError, load_yaml_file

__all__ = ["XvlmSettings", "apply_xvlm_settings", "image_input", "read_xvlm_yaml"]

_KEY = "model.xvlm.xvlm_config"
# Keys this module turns into model.xvlm settings (see the table above).
_MAPPED = (
    "image_res",
    "use_swin",
    "use_clip_vit",
    "vision_config",
    "patch_size",
    "text_config",
    "text_encoder",
    "max_tokens",
)
# Known X-VLM keys with no model.xvlm counterpart, and what to use instead.
_NOT_APPLIED = {
    "train_file": "X-VLM's question files; isubg reads the processed folder in data.root",
    "val_file": "X-VLM's question files; isubg reads the processed folder in data.root",
    "test_file": "X-VLM's question files; isubg reads the processed folder in data.root",
    "answer_list": "the answer list comes from the processed folder (answers.json)",
    "vqa_root": "image folder: set data.image_root",
    "vg_root": "Visual Genome images for VG-QA training data, which isubg does not read",
    "use_roberta": "the text layers are BERT; a RoBERTa text_config only gives sizes",
    "num_dec_layers": "the answer decoder is replaced by a classification head over the full answer list",
    "k_test": "the classification head scores every answer, so there is no test-time top-k ranking; "
    "model.xvlm.topk (the training candidate loss) is set on its own",
    "batch_size_train": "set train.batch_size",
    "batch_size_test": "set eval.batch_size",
    "optimizer": "set train.xvlm_lr and optim.xvlm_weight_decay",
    "schedular": "set train.epochs and train.schedule",
    "start_eval": "isubg validates after every epoch",
    "max_words": "questions are cut by data.question_len and max_tokens",
    "embed_dim": "X-VLM's contrastive projection (pre-training and retrieval), unused for VQA",
    "temp": "X-VLM's contrastive temperature (pre-training and retrieval), unused for VQA",
    "load_bertL_by_sep": "X-VLM-large loading option; set model.xvlm.checkpoint for weights",
}
_SWIN_SIZES = ("embed_dim", "depths", "num_heads", "window_size")
_VIT_SIZES = (
    "vision_width",
    "patch_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "attention_dropout",
)


@dataclass
class XvlmSettings:
    """What `apply_xvlm_settings` did with an X-VLM settings file.

    Attributes:
        path: the YAML file.
        applied: model.xvlm setting -> value taken from the file (the setting was at its default).
        kept: (setting, value kept, file's value) where an explicit setting won over a different file value.
        not_applied: known X-VLM key -> why it sets nothing here.
        unknown: keys this reader does not know.
        notes: checks and fallbacks worth a look (mismatched sizes, images asked for but no image root...).
        vision_sizes: image-encoder sizes from `vision_config`, in X-VLM's key names (see module docstring);
            empty with region features or without a vision_config.
    """

    path: Path
    applied: dict[str, Any] = field(default_factory=dict)
    kept: list[tuple[str, Any, Any]] = field(default_factory=list)
    not_applied: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vision_sizes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One paragraph: applied settings, kept explicit settings, keys not applied, unknown keys, notes."""
        parts = [f"X-VLM settings {self.path}"]
        if self.applied:
            parts.append("applied " + ", ".join(f"{k}={_show(v)}" for k, v in self.applied.items()))
        if self.kept:
            parts.append("kept explicit " + ", ".join(f"{k}={_show(v)} (file {_show(f)})" for k, v, f in self.kept))
        if self.vision_sizes:
            parts.append("image encoder " + ", ".join(f"{k}={_show(v)}" for k, v in self.vision_sizes.items()))
        if self.not_applied:
            parts.append("not applied: " + "; ".join(f"{k} ({why})" for k, why in self.not_applied.items()))
        if self.unknown:
            parts.append("unknown keys: " + ", ".join(self.unknown))
        parts += self.notes
        return "; ".join(parts)


def _show(value: Any) -> str:
    return str(value) if isinstance(value, (Path, int, float, bool)) else repr(value)


def read_xvlm_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of an X-VLM settings YAML.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, repeats a key or is not a mapping; names the path.
    """
    try:
        return load_yaml_file(Path(path))
    except YamlError as exc:
        raise ConfigError(f"{_KEY}={path}: cannot read the X-VLM settings file: {exc}") from None


def _find(value: Any, yaml_path: Path, key: str, want_dir: bool = False) -> Path:
    """A path written in the YAML, looked up as the module docstring says.

    Raises:
        ConfigError: not a string, or found nowhere (the places tried are listed).
    """
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"{_KEY}={yaml_path}: '{key}' must be a path, got {value!r}")
    raw = Path(value).expanduser()
    bases = [yaml_path.parent, yaml_path.parent.parent, Path.cwd()]
    tries = [raw] if raw.is_absolute() else list(dict.fromkeys(base / raw for base in bases))
    for candidate in tries:
        if candidate.is_dir() if want_dir else candidate.is_file():
            return candidate
    kind = "folder" if want_dir else "file"
    raise ConfigError(
        f"{_KEY}={yaml_path}: {key}: '{value}' names no {kind}; tried {', '.join(str(t) for t in tries)} "
        f"(paths in X-VLM settings are relative to the X-VLM repository root). Fix the path in the file"
        + (f", or set model.xvlm.{key} to override it" if key == "text_encoder" else "")
    )


def _read_json(path: Path, yaml_path: Path, key: str) -> dict[str, Any]:
    """A JSON object file named by `key` of the YAML. Raises ConfigError naming both files."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{_KEY}={yaml_path}: {key} {path} is not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{_KEY}={yaml_path}: {key} {path} holds {type(data).__name__}, expected a JSON object")
    return data


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    return value


def _text_sizes(data: dict[str, Any], where: str, notes: list[str]) -> dict[str, int]:
    """model.xvlm sizes from X-VLM's BERT text_config (config_bert.json)."""
    sizes: dict[str, int] = {}
    for src, dst in (("hidden_size", "hidden_size"), ("num_attention_heads", "num_heads")):
        if src in data:
            sizes[dst] = _int(data[src], f"{where} {src}")
    if "intermediate_size" in data:
        sizes["intermediate_size"] = _int(data["intermediate_size"], f"{where} intermediate_size")
    if "fusion_layer" in data and "num_hidden_layers" in data:
        fusion, total = _int(data["fusion_layer"], f"{where} fusion_layer"), _int(data["num_hidden_layers"], where)
        if not 0 <= fusion < total:
            raise ConfigError(f"{where}: fusion_layer {fusion} must lie in [0, num_hidden_layers={total})")
        sizes["num_text_layers"], sizes["num_cross_layers"] = fusion, total - fusion
    else:
        notes.append(f"{where} has no fusion_layer/num_hidden_layers pair; layer counts not taken from it")
    return sizes


def _propose(setting: str, value: Any, xcfg: XvlmConfig, updates: dict[str, Any], report: XvlmSettings) -> None:
    """Take the file's value for a setting at its default; else keep the explicit one (reported if different)."""
    current = getattr(xcfg, setting)
    if current == XvlmConfig.model_fields[setting].default:
        updates[setting] = value
        report.applied[setting] = value
    elif current != value:
        report.kept.append((setting, current, value))


def _vision_choice(raw: dict[str, Any], cfg: RunConfig, report: XvlmSettings) -> str | None:
    """The vision encoder the file asks for ('vit', 'swin' or None), noting when it cannot be used."""
    wanted = "vit" if raw.get("use_clip_vit") else "swin" if raw.get("use_swin") else None
    if wanted is None:
        if "use_swin" in raw or "use_clip_vit" in raw:
            report.notes.append("neither use_swin nor use_clip_vit is true; model.xvlm.vision unchanged")
        return None
    if cfg.data.image_root is None and cfg.model.xvlm.vision == "regions":
        flag = "use_clip_vit" if wanted == "vit" else "use_swin"
        report.notes.append(f"{flag}: True asks for image input but data.image_root is unset: region features kept")
        return None
    return wanted


def _checked_size(key: str, value: Any, where: str) -> Any:
    """A vision JSON value of the expected type: a positive int, a list of them, an activation name or a rate."""
    if key in ("depths", "num_heads"):
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, int) and v > 0 for v in value)
        expected = "a non-empty list of positive integers"
    elif key == "hidden_act":
        ok, expected = isinstance(value, str), "an activation name"
    elif key == "attention_dropout":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
        expected = "a rate in [0, 1)"
    else:
        ok, expected = isinstance(value, int) and not isinstance(value, bool) and value > 0, "a positive integer"
    if not ok:
        raise ConfigError(f"{where}: {key} must be {expected}, got {value!r}")
    return value


def _vision_sizes(raw: dict[str, Any], kind: str, image_res: int, path: Path, report: XvlmSettings) -> None:
    """Fill report.vision_sizes from the vision_config JSON for the `kind` encoder, noting X-VLM's checks."""
    patch = raw.get("patch_size")
    if kind == "swin" and patch is not None and patch != 32:
        report.notes.append(f"patch_size {patch!r}: X-VLM's Swin requires 32 (4 x 2^3); Swin patches of 4 are used")
    if "vision_config" not in raw:
        if kind == "vit" and patch is not None:
            report.vision_sizes["patch_size"] = _int(patch, f"{_KEY}={path}: patch_size")
        return
    where = f"{_KEY}={path}: vision_config"
    json_path = _find(raw["vision_config"], path, "vision_config")
    data = _read_json(json_path, path, "vision_config")
    json_kind = "swin" if "depths" in data else "vit" if "num_hidden_layers" in data else None
    if json_kind != kind:
        report.notes.append(f"vision_config {json_path} is not a {kind} config; X-VLM's base {kind} sizes used")
        return
    names = _SWIN_SIZES if kind == "swin" else _VIT_SIZES
    report.vision_sizes.update({k: _checked_size(k, data[k], f"{where} {json_path}") for k in names if k in data})
    stages = {len(report.vision_sizes.get(k, [0] * 4)) for k in ("depths", "num_heads")}  # Swin-B has 4 stages
    if kind == "swin" and len(stages) > 1:
        raise ConfigError(f"{where} {json_path}: depths and num_heads must have one entry per Swin stage")
    if kind == "vit" and "patch_size" not in data and patch is not None:
        report.vision_sizes["patch_size"] = _int(patch, f"{_KEY}={path}: patch_size")
    elif kind == "vit" and patch is not None and patch != data.get("patch_size"):
        report.notes.append(f"patch_size {patch!r} differs from {json_path}'s {data['patch_size']} (used)")
    if "image_res" in data and data["image_res"] != image_res:
        report.notes.append(f"{json_path} is for image_res {data['image_res']}; the encoder is built at {image_res}")
    if kind == "swin" and "vision_width" in data and "embed_dim" in data and "depths" in data:
        width = _int(data["embed_dim"], where) * 2 ** (len(data["depths"]) - 1)
        if data["vision_width"] != width:
            report.notes.append(f"{json_path}: vision_width {data['vision_width']} != embed_dim x 2^(stages-1)={width}")
    if "ckpt" in data:
        report.notes.append(f"the image encoder weights {data['ckpt']} are not loaded (random init)")
    extra = sorted(set(data) - set(names) - {"image_res", "vision_width", "ckpt"})
    if extra:
        report.notes.append(f"{json_path} keys not used: {', '.join(extra)}")


def _sort_keys(raw: dict[str, Any], report: XvlmSettings) -> None:
    for key in raw:
        if key in _NOT_APPLIED:
            report.not_applied[key] = _NOT_APPLIED[key]
        elif key not in _MAPPED:
            report.unknown.append(str(key))
    if raw.get("use_roberta"):
        report.notes.append("use_roberta: True, but the text layers and tokenizer are BERT's")


def _text_settings(
    raw: dict[str, Any], xcfg: XvlmConfig, path: Path, updates: dict[str, Any], report: XvlmSettings
) -> None:
    """text_encoder and the text_config sizes. Files are only looked up for settings still at their default, so
    setting them explicitly is the way around a missing file."""
    if "text_encoder" in raw:
        if xcfg.text_encoder is None:
            folder = _find(raw["text_encoder"], path, "text_encoder", want_dir=True)
            _propose("text_encoder", folder, xcfg, updates, report)
        else:
            report.kept.append(("text_encoder", xcfg.text_encoder, raw["text_encoder"]))
    if "text_config" not in raw:
        return
    names = ("hidden_size", "num_heads", "intermediate_size", "num_text_layers", "num_cross_layers")
    if all(getattr(xcfg, n) != XvlmConfig.model_fields[n].default for n in names):
        report.notes.append("text_config not read: every size it gives is set explicitly")
        return
    text_json = _find(raw["text_config"], path, "text_config")
    sizes = _text_sizes(_read_json(text_json, path, "text_config"), f"{_KEY}={path}: {text_json}", report.notes)
    for name in names:
        if name in sizes:
            _propose(name, sizes[name], xcfg, updates, report)


def apply_xvlm_settings(cfg: RunConfig) -> tuple[RunConfig, XvlmSettings | None]:
    """The run config with model.xvlm.xvlm_config's settings applied (precedence in the module docstring).

    Returns:
        (effective config, report); (cfg unchanged, None) when model.xvlm.xvlm_config is unset. Unknown keys are
        also issued as a UserWarning.

    Raises:
        ConfigError: the YAML or a JSON it names cannot be read, a needed path is found nowhere, a value has the
            wrong type, or the resulting settings are invalid (e.g. hidden_size not a multiple of num_heads).
    """
    xcfg = cfg.model.xvlm
    if xcfg.xvlm_config is None:
        return cfg, None
    path = Path(xcfg.xvlm_config)
    raw = read_xvlm_yaml(path)
    report = XvlmSettings(path=path)
    _sort_keys(raw, report)
    updates: dict[str, Any] = {}
    for key in ("image_res", "max_tokens"):
        if key in raw:
            _propose(key, _int(raw[key], f"{_KEY}={path}: {key}"), xcfg, updates, report)
    wanted = _vision_choice(raw, cfg, report)
    if wanted is not None:
        _propose("vision", wanted, xcfg, updates, report)
    _text_settings(raw, xcfg, path, updates, report)
    vision = updates.get("vision", xcfg.vision)
    if vision != "regions":
        _vision_sizes(raw, vision, updates.get("image_res", xcfg.image_res), path, report)
    if report.unknown:
        warnings.warn(f"{path}: unknown X-VLM settings keys: {', '.join(report.unknown)}", UserWarning, stacklevel=2)
    return _validated(cfg, updates, path), report


def _validated(cfg: RunConfig, updates: dict[str, Any], path: Path) -> RunConfig:
    """`cfg` with model.xvlm updated and validated again (cross-field rules included)."""
    data = cfg.model_dump()
    data["model"]["xvlm"].update(updates)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{_KEY}={path}: the settings it gives are not valid here: {problems}") from None


def image_input(cfg: RunConfig) -> tuple[Path | None, int]:
    """What a VQADataset needs for the X-VLM branch's pixels: `(image_root, image_res)` after the settings file.

    image_root is None when no branch reads images (xvlm not in model.branches, or vision 'regions'), so the data
    loader skips decoding them. Raises ConfigError as `apply_xvlm_settings`.
    """
    effective, _ = apply_xvlm_settings(cfg)
    x = effective.model.xvlm
    uses_images = "xvlm" in effective.model.branches and x.vision != "regions"
    return (effective.data.image_root if uses_images else None), x.image_res
