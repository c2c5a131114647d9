#!/usr/bin/env bash
# GPU figures on a machine with PyTorch + CUDA and little else (no Ray, no network):
#   benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options, e.g. --seconds 3]
# 1. benchmarks/gpu_check.py (torch + numpy only): patch encoders at paper sizes in fp32 / bf16 /
#    fp16, CARE at N = 10k and 50k, stage-I steps with CUDA AMP, each checked against CPU fp32;
#    writes OUT_DIR/gpu_check.json (exit status 1 when a check fails).
# 2. `care-scale bench` on the same machine where its dependencies import (decode needs the slide
#    libraries, ONNX Runtime the onnxruntime package); writes OUT_DIR/bench.json, or says why not.
# Without a CUDA device both fall back to the CPU and say so.
set -uo pipefail
out="${1:?usage: benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]}"
shift
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python benchmarks/gpu_check.py "$out" "$@"
status=$?
if python -c "import yaml, tifffile, imagecodecs, fsspec" 2>/dev/null; then
    python -m care_scale bench --backends all --seconds 20 --json > "$out/bench.json" \
        2> "$out/bench.stderr" || { echo "care-scale bench failed: see $out/bench.stderr"; status=1; }
else
    echo "care-scale bench not run: its dependencies (yaml, tifffile, imagecodecs, fsspec) do not" \
         "import here; gpu_check.json holds the torch-only figures" | tee "$out/bench.skipped"
fi
exit $status
