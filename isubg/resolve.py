"""Turn a preset, a config file, `--set` overrides and guide-named flags into one validated RunConfig.

This is the only place configuration is assembled. Layers apply in this order, later winning:

    preset YAML (with its `extends` chain) -> --config FILE (with its chain) -> --set a.b=v -> flags

Keys are checked against the schema before validation so that a typo is reported with the file
it came from and the closest real key. The merged mapping is then validated once; validation
errors name the key, the value, the layer that set it and what is allowed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from isubg.config import (
    ConfigError,
    ConfigWarning,
    RunConfig,
    config_warnings,
    guide_params,
    param_specs,
    section_paths,
)
from isubg.presets import PresetLayer, preset_layers
from isubg.yamlio import YamlError, dump_yaml, parse_yaml_value

__all__ = [
    "Resolved",
    "canonical_key",
    "dump_config",
    "nest_paths",
    "override_config",
    "parse_set",
    "resolve_config",
]


@dataclass
class Resolved:
    """A validated config plus what the user should see about it."""

    config: RunConfig
    preset: str
    warnings: list[ConfigWarning]
    sources: dict[str, str] = field(default_factory=dict)  # dotted path -> layer that set it last


# --------------------------------------------------------------------------------------------------
# Keys: canonical dotted paths, guide-name shortcuts and suggestions for typos


def _suggest(key: str) -> str:
    """' Did you mean ...?' for the closest known key (path, section or guide name), or ''."""
    candidates = {path: path for path in (*param_specs(), *section_paths())}
    candidates.update(guide_params())  # a bare guide name suggests its full path
    lowered = {name.lower(): target for name, target in candidates.items()}
    probes = (key, key.rsplit(".", 1)[-1])
    for probe in probes:  # same name in another case: aoa_layers -> AOA_layers
        if probe.lower() in lowered:
            return f" Did you mean '{lowered[probe.lower()]}'?"
    for probe in probes:
        match = difflib.get_close_matches(probe, list(candidates), n=1, cutoff=0.75)
        if match:
            return f" Did you mean '{candidates[match[0]]}'?"
    return ""


def _canonical(key: str, label: str) -> str:
    """Map a user's key (dotted path, section, or bare guide name) to a dotted schema path."""
    if key in param_specs() or key in section_paths():
        return key
    if key in guide_params():
        return guide_params()[key]
    leaf = key.rsplit(".", 1)[-1]
    if leaf in guide_params() and guide_params()[leaf] != key:
        raise ConfigError(
            f"{label}: unknown key '{key}'. '{leaf}' lives at '{guide_params()[leaf]}' (or write just '{leaf}')."
        )
    raise ConfigError(
        f"{label}: unknown key '{key}'.{_suggest(key)} Run `isubg preset show default` to list every parameter."
    )


def canonical_key(key: str, label: str) -> str:
    """The dotted path of one leaf parameter named by path or bare guide name (`lr` -> `train.lr`).

    Raises:
        ConfigError: unknown key (with the closest real one), or a section rather than a parameter.
    """
    path = _canonical(key, label)
    if path in section_paths():
        raise ConfigError(f"{label}: '{key}' is a section, not a parameter; name one of its settings")
    return path


def _flatten(data: Mapping[str, Any], label: str, prefix: str = "") -> dict[str, Any]:
    """Nested YAML mapping -> {dotted path: value}, checking every key against the schema."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{label}: keys must be text, found {key!r} under '{prefix or 'top level'}'")
        path = _canonical(f"{prefix}.{key}" if prefix else key, label)
        if path in section_paths():
            if not isinstance(value, Mapping):
                raise ConfigError(f"{label}: '{path}' is a section and needs a mapping of its settings, got {value!r}")
            out.update(_flatten(value, label, path))
        else:
            out[path] = value
    return out


def nest_paths(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{dotted path: value} -> the nested mapping a YAML config file holds (the inverse of flattening)."""
    root: dict[str, Any] = {}
    for path, value in flat.items():
        node = root
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return root


# --------------------------------------------------------------------------------------------------
# Overrides from the command line


def parse_set(items: Iterable[str]) -> PresetLayer:
    """`--set a.b=value` strings -> one layer. Values are YAML (`3e-4`, `false`, `[cfrf, xvlm]`).

    Raises:
        ConfigError: an item has no `=`, an empty key, or a value that is not valid YAML.
    """
    data: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set train.lr=3e-4")
        try:
            data[key] = parse_yaml_value(raw.strip(), f"--set {key}")
        except YamlError as exc:
            raise ConfigError(str(exc)) from None
    return PresetLayer("--set", data)


# --------------------------------------------------------------------------------------------------
# Validation errors in the user's terms


def _translate(exc: ValidationError, flat: Mapping[str, Any], sources: Mapping[str, str]) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # a cross-field rule of RunConfig
            lines.append(msg)
            continue
        spec = param_specs().get(loc)
        where = sources.get(loc, "default")
        value = flat.get(loc, err.get("input"))
        allowed = f" Allowed: {spec.allowed()}." if spec else ""
        lines.append(f"{loc} = {value!r} (from {where}): {msg}.{allowed}")
    return ConfigError("Invalid configuration:\n  " + "\n  ".join(lines))


# --------------------------------------------------------------------------------------------------
# The one entry point


def resolve_config(
    preset: str | Path | None = "default",
    config_file: str | Path | None = None,
    sets: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> Resolved:
    """Assemble and validate a run configuration.

    Args:
        preset: a shipped preset name or a YAML path; None means `default`.
        config_file: a user YAML file layered over the preset (its own `extends` chain first).
        sets: `a.b=value` overrides (dotted paths or bare guide names such as `lr=3e-4`).
        flags: guide-named flag values (`{"lr": 3e-4}`); None values mean "not given".

    Returns:
        The validated config, the preset name, its warnings and per-key provenance.

    Raises:
        ConfigError: any unknown key, bad value, unreadable file or broken cross-field rule.
    """
    preset = preset or "default"
    layers = list(preset_layers(preset))
    if config_file is not None:
        layers += preset_layers(Path(config_file))
    layers.append(parse_set(sets))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = [k for k in given if k not in guide_params()]
    if unknown:
        raise ConfigError(f"unknown guide parameter(s): {', '.join(unknown)}")
    layers += [PresetLayer(f"--{name}", {name: value}) for name, value in given.items()]

    flat: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer in layers:
        for path, value in _flatten(layer.data, layer.label).items():
            flat[path] = value
            sources[path] = layer.label
    try:
        config = RunConfig.model_validate(nest_paths(flat))
    except ValidationError as exc:
        raise _translate(exc, flat, sources) from None
    return Resolved(config=config, preset=str(preset), warnings=config_warnings(config), sources=sources)


def override_config(config: RunConfig, values: Mapping[str, Any], label: str) -> RunConfig:
    """`config` with some leaves replaced (`{"train.lr": 3e-4}` or `{"lr": 3e-4}`), validated again.

    Raises:
        ConfigError: an unknown key, or a value (or combination) the schema rejects; named after `label`.
    """
    flat = _flatten(config.model_dump(mode="json"), "config")
    sources = dict.fromkeys(flat, "base config")
    for key, value in values.items():
        path = canonical_key(key, label)
        flat[path], sources[path] = value, label
    try:
        return RunConfig.model_validate(nest_paths(flat))
    except ValidationError as exc:
        raise _translate(exc, flat, sources) from None


def dump_config(config: RunConfig, header: str = "") -> str:
    """The full config as YAML that `--config` accepts back unchanged."""
    return dump_yaml(config.model_dump(mode="json"), header=header)
