#!/usr/bin/env bash
# The GPU checks, as run on a lent GPU machine that has torch (CUDA), onnx and a CPU-only
# onnxruntime but no onnxruntime-gpu and no network (see README, "GPU check").
#
#   tools/gpu_check.sh torch   training on cuda through the CLI (single process and torchrun/NCCL),
#                              then export --quantize: the user's path, no onnxruntime-gpu needed
#   tools/gpu_check.sh ort     onnxruntime-gpu from the parts stashed in $STASH (a tar.xz of its
#                              `onnxruntime` package, carried in pieces because one call may carry
#                              at most 64 MiB), then tools/cuda_check.py and `pipeline bench` on CUDA
#
# Logs and JSON go to $OUT (the device tool brings that folder back) or ./gpu-out.
set -uo pipefail

OUT=${OUT:-gpu-out}
STASH=${STASH:-/tmp/ortgpu}
SITE=/tmp/site
RUN=models/gpu-digits
mkdir -p "$OUT" "$SITE"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD"

step() {  # step NAME COMMAND...: run, keep its output in $OUT/NAME.log, report its exit status
    local name=$1; shift
    echo "=== $name: $*"
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc"
}

metrics() {  # metrics RUN: what the run's metrics.json says about where and how fast it trained
    python3 -c "import json, sys; m = json.load(open(sys.argv[1] + '/metrics.json')); print({k: m[k] for k in ('device', 'world_size', 'test_accuracy', 'epochs_run', 'seconds_per_epoch', 'images_per_second') if k in m})" "$1"
}

torch_checks() {
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu/onnxsim-*.whl || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import sys, torch, onnx, onnxruntime as o; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| onnx', onnx.__version__, '| onnxruntime', o.__version__)"
    step train_cuda python3 -m pipeline train --device cuda --force --out "$RUN"
    metrics "$RUN"
    step train_cpu16 python3 -m pipeline train --device cpu --force --out models/gpu-digits-cpu
    metrics models/gpu-digits-cpu
    step ddp_nccl torchrun --standalone --nproc_per_node 1 -m pipeline train --device cuda --epochs 5 --force --out models/gpu-ddp
    metrics models/gpu-ddp
    step export python3 -m pipeline export --run "$RUN" --quantize --fp16
    cp "$RUN/manifest.json" "$OUT/manifest.json"
}

ort_checks() {
    python3 - "$STASH" <<'EOF' || exit 1
import hashlib, io, sys, tarfile
from pathlib import Path
stash = Path(sys.argv[1])
data = b"".join((stash / f"part{i}").read_bytes() for i in range(1, 5))
expected = Path(".gpu/SHA256").read_text().split()[0] if Path(".gpu/SHA256").exists() else (stash / "SHA256").read_text().split()[0]
assert hashlib.sha256(data).hexdigest() == expected, "onnxruntime-gpu parts do not add up to the archive"
tarfile.open(fileobj=io.BytesIO(data), mode="r:xz").extractall("/tmp/site", filter="data")
print(f"onnxruntime-gpu unpacked: {len(data) / 2**20:.1f} MiB, sha256 ok")
EOF
    # onnxruntime-gpu dlopens the CUDA 13 libraries (cublas, cudnn, curand, cufft) that torch's wheels bring
    LD_LIBRARY_PATH=$(python3 -c "import glob, os, site; print(':'.join(sorted({os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(s + '/nvidia/**/lib*.so*', recursive=True)})))")
    export LD_LIBRARY_PATH
    python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())"
    step cuda_check python3 tools/cuda_check.py --json
    step bench_cuda python3 -m pipeline bench --run "$RUN" --provider cuda --provider cpu --batch-sizes 1,256,4096 --io-binding --out "$OUT/bench"
}

case ${1:-} in
    torch) torch_checks ;;
    ort) ort_checks ;;
    *) echo "usage: $0 torch|ort" >&2; exit 2 ;;
esac
