"""Foreign checkpoints into isubg: X-VLM, ban-vqa and MGHR weights mapped onto the isubg model.

`isubg import-checkpoint KIND FILE -o OUT.pt` (isubg.cli.import_checkpoint) reads a foreign file safely
(`core.read_foreign`), asks the kind's module for a `core.Plan` (which isubg tensor each source tensor fills, how it
is reshaped, why the rest stays unused, and the isubg settings the file implies), builds the isubg model, applies
the plan (`core.apply_plan`) and writes an isubg checkpoint that `isubg train --init-from` and `isubg eval` read
(`convert.import_checkpoint`). docs/checkpoints.md lists every mapping and every parity switch.

Modules: `core` (reading, plans, the report), `ban`, `xvlm` and `mghr` (one plan each), `convert` (the whole
import). KINDS names the kinds in the order the CLI lists them.
"""

from __future__ import annotations

__all__ = ["KINDS"]

KINDS = ("xvlm", "ban", "mghr")
