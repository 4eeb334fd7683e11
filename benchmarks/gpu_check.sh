#!/usr/bin/env bash
# Every GPU check and benchmark of the CUDA-graph step (run.cuda_graphs) in one call on one H100/H200, so that
# a lent GPU is used at once; each part has its own time limit, 8 minutes in all (6 expected):
#   1. tests/test_gpu.py: fp16's scaler; replayed steps against eager ones in fp32, bf16 and fp16; a replayed
#      run killed and resumed;
#   2. benchmarks/throughput.py at batch 100 and 1000: eager and replayed steps in every precision, each as a
#      fraction of its matmul replay ceiling;
#   3. a real run of recipes/gaussian.toml (3 epochs) in fp32, bf16 and fp16, replayed: fp16's loss curve
#      against fp32's.
# Before the call, here (copies MNIST into .gpu/, which git ignores; the ../shared beside a checkout does not
# travel):
#   bash benchmarks/gpu_check.sh --prepare
# Then through the device tool: command "bash benchmarks/gpu_check.sh", carry [".gpu"], timeout_s 540.
# Everything lands in $OUT (at most 8 files). GPU_CHECK_QUICK=1 shrinks every part (a smoke test on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    # wheels built here: installing them there needs no build back-end (the GPU image's setuptools may be
    # older than the one pyproject.toml asks for); run --prepare again after changing the code
    rm -rf .gpu/whl && mkdir -p .gpu/mnist .gpu/whl && cp ../shared/data/mnist/*.gz .gpu/mnist/ || exit 1
    ${PYTHON:-.venv/bin/python} -m pip wheel -q --no-deps --no-build-isolation -w .gpu/whl . ./plugins/aaekit-builtins ||
        exit 1
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    echo "ready: .gpu ($(du -sh .gpu | cut -f1): MNIST, $(ls .gpu/whl | tr '\n' ' ')); carry .gpu"
    exit 0
fi

OUT=${OUT:-/tmp/aaekit-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
QUICK=${GPU_CHECK_QUICK:-}
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export AAEKIT_DATA_DIR=$PWD/.gpu/mnist AAEKIT_CACHE_DIR=/tmp/aaekit-cache
[ -f .gpu/mnist/train-images-idx3-ubyte.gz ] && ls .gpu/whl/*.whl >/dev/null 2>&1 ||
    { echo "no .gpu/mnist or .gpu/whl: run with --prepare first"; exit 1; }

# aaekit and its built-ins without their dependencies: the GPU image has torch, accelerate, pluggy, click,
# safetensors, rich, scipy and pyarrow, and MNIST from local files never imports datasets.
SITE=/tmp/aaekit-site
$PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu/whl/*.whl || exit 1
export PYTHONPATH=$SITE
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/check.log"; }

log "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
  $PY -c 'import torch, accelerate; print("torch", torch.__version__, "accelerate", accelerate.__version__,
"cuda", torch.cuda.is_available())'; } | tee -a "$OUT/check.log"

log "1. tests/test_gpu.py"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -40 | tee -a "$OUT/check.log"

log "2. throughput, batch 100 and 1000"
for batch in 100 1000; do
    timeout 100 $PY benchmarks/throughput.py ${QUICK:+--quick} --batch $batch --no-cli --no-epochs --no-long \
        --output "$OUT/throughput-b$batch.json" 2>&1 | tail -25 | tee -a "$OUT/check.log"
done

log "3. recipes/gaussian.toml, replayed, fp32 / bf16 / fp16: the loss curves"
epochs=${QUICK:+train.max_steps=40}
RUNS=$(mktemp -d /tmp/aaekit-gpu-runs.XXXX)
for precision in no bf16 fp16; do
    timeout 45 $PY -m aaekit run recipes/gaussian.toml run.mixed_precision=$precision run.cuda_graphs=auto \
        train.pictures=false ${epochs:-train.epochs=3} ${QUICK:+data.limit=2000 train.log_every=10} \
        --output-dir "$RUNS/$precision" 2>&1 | grep -E "cuda graphs|error|Traceback" |
        tee -a "$OUT/check.log"
done
$PY - "$OUT/curves.json" "$RUNS" <<'EOF' 2>&1 | tee -a "$OUT/check.log"
import json, sys
from pathlib import Path

curves = {}
for precision in ("no", "bf16", "fp16"):
    path = Path(sys.argv[2]) / precision / "metrics.jsonl"
    if path.exists():
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        curves[precision] = {
            "step": [r["step"] for r in lines],
            "loss/reconstruction": [r["loss/reconstruction"] for r in lines],
            "samples_per_s": [r["samples_per_s"] for r in lines],
        }
report = {"recipe": "recipes/gaussian.toml", "run.cuda_graphs": "auto", "curves": curves}
if "no" in curves:
    fp32 = curves["no"]["loss/reconstruction"]
    for precision in ("bf16", "fp16"):
        if precision in curves:
            other = curves[precision]["loss/reconstruction"]
            report[f"{precision}_vs_fp32_max_relative_difference"] = max(
                abs(a - b) / abs(b) for a, b in zip(other, fp32)
            )
Path(sys.argv[1]).write_text(json.dumps(report, indent=1) + "\n")
for precision, c in curves.items():
    print(f"{precision:>5}: loss {c['loss/reconstruction'][0]:.4f} -> {c['loss/reconstruction'][-1]:.4f}; "
          f"{sorted(c['samples_per_s'])[len(c['samples_per_s']) // 2]:,.0f} samples/s (median log line)")
print({k: v for k, v in report.items() if k.endswith("difference")})
EOF
log "done"
