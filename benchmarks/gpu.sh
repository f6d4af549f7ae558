#!/usr/bin/env bash
# One script for a GPU machine, sized to fit in 5 minutes of GPU time: the tap-overhead and weighting-cost
# benchmarks on CUDA, then one demo training on CUDA with bf16 autocast and torch.compile. It ends with a JSON
# summary on its last line. Record the card, the numbers and the date in benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu.sh            (from the repository root; creates .venv-gpu with a CUDA build of torch)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/auxloss-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ ! -x .venv-gpu/bin/python ]; then
  $PY -m venv .venv-gpu
  # A CUDA build of torch (the default wheel on PyPI for Linux x86_64); the library needs torch >= 2.4.
  .venv-gpu/bin/pip install -q "torch>=2.4" && .venv-gpu/bin/pip install -q -e ".[experiment]"
fi
P=.venv-gpu/bin/python
$P -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  | tee "$OUT/card.txt"
timeout 60 $P benchmarks/tap_overhead.py --device cuda --rounds 10 --iters 20 --batch 256 --width 32 \
  | tail -1 > "$OUT/tap_overhead.json"
timeout 120 $P benchmarks/weighting_cost.py --device cuda | tail -1 > "$OUT/weighting_cost.json"
start=$(date +%s)
timeout 150 .venv-gpu/bin/auxloss run examples/shapes-gpu.yaml --out "$OUT/demo" --workers 1 --force \
  > "$OUT/demo.log" 2>&1 || echo "demo failed or timed out: see $OUT/demo.log"
end=$(date +%s)
$P - "$OUT" "$((end - start))" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
summary = {"card": (out / "card.txt").read_text().strip(), "demo_seconds": int(sys.argv[2])}
for name in ("tap_overhead", "weighting_cost"):
    try:
        summary[name] = json.loads((out / f"{name}.json").read_text())
    except Exception as exc:  # noqa: BLE001
        summary[name] = f"unavailable: {exc}"
res = out / "demo" / "results.json"
if res.exists():
    r = json.loads(res.read_text())
    summary["demo"] = {"variants": {v["name"]: v["mean"] for v in r["variants"]},
                       "verdicts": {c["variant"]: c["verdict"] for c in r["comparisons"]}}
print(json.dumps(summary))
PYEOF
