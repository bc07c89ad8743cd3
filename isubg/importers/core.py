"""Reading foreign checkpoints safely, mapping plans, and the import report.

A kind's module turns the foreign state dict into a `Plan`:

- `rules`: one per isubg tensor it fills: the isubg name, the source key(s), and, when the tensor is not copied
  as it is, the name of the reshape and the function doing it (a weight-norm fold, a fused qkv split, a row roll);
- `unused`: source key -> why nothing in isubg takes it (a decoder isubg replaces, a buffer isubg recomputes);
- `new`: isubg tensor-name prefix -> why no foreign tensor fills it (an isubg-only head), so it keeps isubg's
  initial value;
- `sets`: the isubg settings the file implies (its sizes) and `switches`: the settings that make isubg compute what
  the reference computes, each with the reason (docs/checkpoints.md lists them);
- `spec`: the data sizes the file implies (num_words, num_answers, feature_dim), used when no data folder is given.

`apply_plan` copies the tensors into the model and returns an `ImportReport`: every source tensor is mapped,
reshaped or unused (with its reason), every isubg tensor is filled, new (with its reason) or missing, and every
shape disagreement names both sides.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from isubg.errors import DataError

__all__ = [
    "NO_REASON",
    "STATUSES",
    "Entry",
    "ImportReport",
    "Plan",
    "Rule",
    "apply_plan",
    "read_foreign",
    "weight_norm",
]

Transform = Callable[..., torch.Tensor]
STATUSES = ("mapped", "reshaped", "unused", "new", "missing", "mismatched")
NO_REASON = "no destination in isubg and no stated reason"  # the note of a source tensor no plan explains
# Where each kind's program keeps its state dict inside the saved object (else the object is the state dict).
_CONTAINERS = {"ban": ("model_state",), "mghr": ("model_state",), "xvlm": ("model", "state_dict", "module")}


@dataclass(frozen=True)
class Rule:
    """Fill isubg tensor `target` from `sources`: copied as it is (`how` empty) or through `fn(*sources)`.

    `how` names the reshape for the report (e.g. "weight-norm fold"); a rule with no sources creates a constant.
    """

    target: str
    sources: tuple[str, ...]
    how: str = ""
    fn: Transform | None = None


@dataclass
class Plan:
    """What to do with one foreign state dict (see the module docstring)."""

    kind: str
    rules: list[Rule] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)
    new: dict[str, str] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    switches: dict[str, str] = field(default_factory=dict)
    spec: dict[str, int] = field(default_factory=dict)

    def copy(self, target: str, source: str) -> None:
        """Add a plain copy."""
        self.rules.append(Rule(target, (source,)))

    def reshape(self, target: str, sources: tuple[str, ...], how: str, fn: Transform) -> None:
        """Add a reshaped copy."""
        self.rules.append(Rule(target, sources, how, fn))

    def extend(self, other: Plan, source_prefix: str = "", target_prefix: str = "") -> None:
        """Take another plan's rules, reasons and settings, with prefixes added to its source and target names."""
        for rule in other.rules:
            sources = tuple(source_prefix + s for s in rule.sources)
            self.rules.append(Rule(target_prefix + rule.target, sources, rule.how, rule.fn))
        self.unused.update({source_prefix + k: v for k, v in other.unused.items()})
        self.new.update({target_prefix + k: v for k, v in other.new.items()})
        self.sets += [s for s in other.sets if s not in self.sets]
        self.switches.update(other.switches)
        self.spec = {**other.spec, **self.spec}


@dataclass(frozen=True)
class Entry:
    """One line of the report: a source tensor (or group) and what became of it, or an isubg tensor left unfilled."""

    status: str
    source: str
    target: str
    note: str
    source_shape: tuple[int, ...] | None
    target_shape: tuple[int, ...] | None
    nbytes: int


@dataclass
class ImportReport:
    """What an import did with every tensor (see `apply_plan`)."""

    kind: str
    path: Path
    entries: list[Entry] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)
    switches: dict[str, str] = field(default_factory=dict)

    def by_status(self, status: str) -> list[Entry]:
        """The entries of one status (see STATUSES)."""
        return [e for e in self.entries if e.status == status]

    def counts(self) -> dict[str, tuple[int, int]]:
        """status -> (tensors, bytes), every status present, in STATUSES order.

        mapped / reshaped / new / missing / mismatched count isubg tensors (bytes at isubg's size; a fused qkv fills
        three), unused counts source tensors (bytes at their size).
        """
        out = {}
        for status in STATUSES:
            rows = self.by_status(status)
            out[status] = (len(rows), sum(e.nbytes for e in rows))
        return out

    def source_summary(self) -> dict[str, int]:
        """Source tensors in the file: in all, with an isubg destination, unused with a reason, unexplained."""
        used = {
            name
            for e in self.entries
            if e.status in ("mapped", "reshaped", "mismatched")
            for name in e.source.split(" + ")
        }
        used.discard("")
        unused = self.by_status("unused")
        unexplained = sum(e.note == NO_REASON for e in unused)
        return {
            "tensors": len(used) + len(unused),
            "with_destination": len(used),
            "unused_with_reason": len(unused) - unexplained,
            "unexplained": unexplained,
        }

    def problems(self) -> list[str]:
        """What --strict refuses: unfilled isubg tensors, shape disagreements, source tensors without a reason."""
        out = [f"missing: {e.target} {list(e.target_shape or ())} ({e.note})" for e in self.by_status("missing")]
        out += [
            f"shape: {e.source} {list(e.source_shape or ())} -> {e.target} {list(e.target_shape or ())}"
            for e in self.by_status("mismatched")
        ]
        out += [f"unexplained: {e.source} ({e.note})" for e in self.by_status("unused") if e.note == NO_REASON]
        return out

    def details(self) -> list[str]:
        """Grouped lines under the table: reshapes by kind, unused and new tensors by reason, every mismatch."""
        lines = []
        for status in ("reshaped", "unused", "new", "missing"):
            for note, n in Counter(e.note for e in self.by_status(status)).most_common():
                example = next(e for e in self.by_status(status) if e.note == note)
                name = example.source if status in ("reshaped", "unused") else example.target
                lines.append(f"{status} {n}: {note} (e.g. {name})")
        for e in self.by_status("mismatched"):
            lines.append(
                f"mismatched: {e.source} {list(e.source_shape or ())} vs isubg {e.target} {list(e.target_shape or ())}"
            )
        return lines

    def to_json(self) -> dict[str, Any]:
        """Counts, details, switches and the problems --strict refuses, JSON-ready."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "counts": {s: {"tensors": n, "bytes": b} for s, (n, b) in self.counts().items()},
            "source": self.source_summary(),
            "details": self.details(),
            "extras": self.extras,
            "switches": self.switches,
            "problems": self.problems(),
        }


def read_foreign(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict in a foreign checkpoint file, read with `weights_only=True`, and its other top-level entries.

    The state dict is taken from the kind's container key (ban, mghr: 'model_state'; xvlm: 'model') or is the
    object itself; a DataParallel/DDP `module.` prefix is removed.

    Raises:
        DataError: no such file, not a torch file, pickled Python objects (refused: isubg never runs pickled
            code), or no state dict of tensors in it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), str(exc).splitlines()[0])
        raise DataError(
            f"{path} holds pickled Python objects ({detail}); isubg reads checkpoints with weights_only=True and "
            "never runs pickled code. Re-save the weights as plain tensors in the program that wrote it, e.g. "
            "torch.save({'model': model.state_dict()}, 'weights.pth')"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable torch checkpoint ({first})") from None
    state, extras = _unwrap(obj, kind, path)
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state, extras


def _unwrap(obj: Any, kind: str, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict, names of the other top-level entries) of a loaded object."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected a state dict or a dict holding one")
    extras: list[str] = []
    for name in _CONTAINERS.get(kind, ()):
        if isinstance(obj.get(name), Mapping):
            extras = [str(k) for k in obj if k != name]
            obj = obj[name]
            break
    state = dict(obj)
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not state or bad:
        where = f"'{bad[0]}' is a {type(state[bad[0]]).__name__}" if bad else "it is empty"
        containers = " or ".join(repr(c) for c in _CONTAINERS.get(kind, ())) or "a top-level key"
        raise DataError(f"{path}: no {kind} state dict of tensors ({where}); expected it under {containers}")
    return state, extras


def weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The weight a `torch.nn.utils.weight_norm` pair stands for: g * v / ||v||.

    A scalar g (weight_norm(dim=None)) scales the whole tensor by its Frobenius norm; a g of shape (out, 1, ...)
    scales each output row by that row's norm.
    """
    v64 = v.double()
    rows = (-1, *([1] * (v.dim() - 1)))
    norm = v64.norm() if g.dim() == 0 else v64.flatten(1).norm(dim=1).view(rows)
    return (g.double().reshape(rows if g.dim() else ()) * v64 / norm).to(v.dtype)


def apply_plan(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], plan: Plan, path: Path, extras: list[str]
) -> ImportReport:
    """Copy the plan's tensors from `state` into `model` (in place) and report on every tensor on both sides.

    A rule whose sources are absent leaves its target missing; one whose result has another shape than the target
    leaves it at its initial value, reported (once) as mismatched with both names and shapes.

    Raises:
        DataError: a rule's transform rejects its input (its message says why).
    """
    targets = model.state_dict(keep_vars=False)
    report = ImportReport(kind=plan.kind, path=Path(path), extras=extras, switches=dict(plan.switches))
    used: set[str] = set()
    filled: set[str] = set()
    with torch.no_grad():
        for rule in plan.rules:
            if rule.target not in targets or not all(s in state for s in rule.sources):
                continue
            used.update(rule.sources)
            entry = _apply_rule(rule, state, targets[rule.target])
            report.entries.append(entry)
            filled.add(rule.target)  # a mismatched target is reported once, as mismatched
    for key, tensor in state.items():
        if key not in used:
            reason = plan.unused.get(key, NO_REASON)
            report.entries.append(Entry("unused", key, "", reason, tuple(tensor.shape), None, _nbytes(tensor)))
    for name, tensor in targets.items():
        if name in filled:
            continue
        reason = next((why for prefix, why in plan.new.items() if name.startswith(prefix)), None)
        status, note = ("new", reason) if reason else ("missing", _expected_source(plan, name))
        report.entries.append(Entry(status, "", name, note, None, tuple(tensor.shape), _nbytes(tensor)))
    return report


def _apply_rule(rule: Rule, state: Mapping[str, torch.Tensor], target: torch.Tensor) -> Entry:
    """Compute one rule's tensor and copy it into `target` when the shapes agree."""
    sources = [state[s] for s in rule.sources]
    try:
        value = rule.fn(*sources) if rule.fn is not None else sources[0]
    except ValueError as exc:
        raise DataError(f"{' + '.join(rule.sources)} -> {rule.target}: {exc}") from None
    names = " + ".join(rule.sources)
    nbytes = _nbytes(target)
    shown = tuple(sources[0].shape) if len(sources) == 1 else tuple(value.shape)
    if tuple(value.shape) != tuple(target.shape):
        return Entry("mismatched", names, rule.target, rule.how, shown, tuple(target.shape), nbytes)
    target.copy_(value.to(target.dtype))
    status = "reshaped" if rule.how else "mapped"
    return Entry(status, names, rule.target, rule.how, shown, tuple(target.shape), nbytes)


def _expected_source(plan: Plan, name: str) -> str:
    """Why an isubg tensor was left unfilled: the source key(s) its rule wanted, or that no rule targets it."""
    wanted = [r.sources for r in plan.rules if r.target == name]
    return f"the file lacks {' + '.join(wanted[0])}" if wanted else "no source tensor maps to it"


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
