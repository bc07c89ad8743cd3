#!/usr/bin/env bash
# The GPU checks, in one go, on a CUDA machine (about 5-8 minutes on an H200):
#   1. the CUDA-marked tests (autocast precisions, grad scaler, resume, allocator peak);
#   2. memory: estimate vs measured peak per preset (isubg profile-memory --measure), with the savings of
#      mixed precision and memory-efficient attention;
#   3. a simulated 8 GiB card: the 8gb preset fits, and high-performance is shrunk by dynamic batch sizing
#      instead of crashing;
#   4. a short mixed-precision training run's throughput.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (results: OUT_DIR/*.json and a printed table)
set -uo pipefail
OUT="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT"
export ISUBG_CACHE_DIR="$OUT/cache"
status=0
say() { printf '\n== %s\n' "$*"; }

say "devices"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
isubg gpu

say "CUDA tests"
python -m pytest -q -m gpu tests/ 2>&1 | tail -n 25 || status=1

say "demo data"
isubg data demo --size small >/dev/null
DEMO="$ISUBG_CACHE_DIR/demo/small-seed0"

say "memory: estimate vs measured peak"
for preset in default 8gb 24gb memory-optimized high-performance; do
  for variant in "" "--set mixed_precision=false --set memory_efficient_attention=false"; do
    tag="$preset${variant:+-fp32-plain}"
    # shellcheck disable=SC2086
    isubg profile-memory --preset "$preset" $variant --gpu-memory 80GB --measure --json \
      >"$OUT/memory-$tag.json" 2>"$OUT/memory-$tag.err" || { echo "profile-memory $tag failed"; status=1; }
  done
done
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'preset':34} {'estimate GiB':>12} {'measured GiB':>12} {'error %':>8}")
for path in sorted(out.glob("memory-*.json")):
    try:
        r = json.loads(path.read_text())
    except json.JSONDecodeError:
        print(f"{path.stem:34} unreadable"); continue
    est, meas = r.get("estimate_bytes"), r.get("measured_bytes")
    err = f"{100 * (est - meas) / meas:8.1f}" if est and meas else "       -"
    fmt = lambda b: f"{b / 2**30:12.2f}" if b else f"{'-':>12}"
    print(f"{path.stem.removeprefix('memory-'):34} {fmt(est)} {fmt(meas)} {err}")
PY

say "simulated 8 GiB card (allocator cap)"
TOTAL=$(python -c "import torch; print(torch.cuda.get_device_properties(0).total_memory)")
FRACTION=$(python -c "print(min(1.0, round(8 * 2**30 / $TOTAL, 4)))")
for preset in 8gb high-performance; do
  isubg train --preset "$preset" --data "$DEMO" --epochs 1 --max-steps 6 \
    --set memory.max_memory_usage="$FRACTION" --set memory.dynamic_batch_size=true \
    --set data.train_limit=2000 --set data.val_limit=64 --set train.log_every=1 \
    --output "$OUT/run-8gib-$preset" >"$OUT/run-8gib-$preset.log" 2>&1
  rc=$?
  echo "$preset under an 8 GiB cap: exit $rc; $(grep -c '"event": "oom"' "$OUT/run-8gib-$preset/metrics.jsonl" 2>/dev/null || echo 0) OOM recoveries"
  [ $rc -eq 0 ] || status=1
done

say "mixed-precision training throughput (demo data, default preset)"
isubg train --preset default --data "$DEMO" --epochs 1 --max-steps 20 --mixed-precision \
  --set data.train_limit=4000 --set data.val_limit=64 --set train.log_every=1 --output "$OUT/run-amp" \
  >"$OUT/run-amp.log" 2>&1 || status=1
python - "$OUT/run-amp/metrics.jsonl" <<'PY'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1])]
rates = [r["samples_per_s"] for r in records if r["event"] == "step"][5:]
start = records[0]
print(f"precision {start['precision']} ({start['precision_reason']}); median {statistics.median(rates):.1f} samples/s; "
      f"peak {max(r['memory_mib'] for r in records if r['event'] == 'step'):.0f} MiB")
PY
exit $status
