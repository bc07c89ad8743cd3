"""Read and write the YAML isubg's configs and presets are made of, with errors a user can act on.

Two deliberate departures from PyYAML's defaults:
- `1e-4` is a float. PyYAML follows YAML 1.1, where a float needs a dot, so `lr: 1e-4` would
  arrive as the string "1e-4"; every ML config writes learning rates that way.
- A key written twice in one mapping is an error. PyYAML silently keeps the last one, which hides
  exactly the kind of edit mistake a config review should catch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["YamlError", "dump_yaml", "load_yaml_file", "parse_yaml_value"]


class YamlError(ValueError):
    """A YAML text could not be read; the message names the file, line and column."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and duplicate-key detection."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice (first on line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# Exponent floats without a dot (1e-4, 5E+2), which YAML 1.1 leaves as strings.
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _describe(err: yaml.YAMLError, source: str) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return f"{where}: not valid YAML: {detail}"


def load_yaml_file(path: Path) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping.

    Args:
        path: the file to read.

    Returns:
        The mapping; an empty file (or one holding only comments) gives `{}`.

    Raises:
        YamlError: the file is missing or unreadable, is not valid YAML, repeats a key, or its
            top level is not a mapping. The message names the file (and line/column when known).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise YamlError(f"{path}: cannot read it ({exc})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise YamlError(_describe(exc, str(path))) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise YamlError(
            f"{path}: the top level must be a mapping of sections (data:, model:, train:, ...), "
            f"found a {type(data).__name__}"
        )
    return data


def parse_yaml_value(text: str, source: str) -> Any:
    """Parse one value typed on the command line as YAML (`3e-4` -> float, `[a, b]` -> list).

    An empty string parses to None, which means "unset" for optional settings.

    Raises:
        YamlError: the text is not a valid YAML value; the message starts with `source`.
    """
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise YamlError(_describe(exc, source)) from None


def dump_yaml(data: dict[str, Any], header: str = "") -> str:
    """Render a mapping as block-style YAML in insertion order, after an optional comment header."""
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    return "\n".join([*lines, body]) if lines else body
