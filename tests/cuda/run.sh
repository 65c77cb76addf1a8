#!/usr/bin/env bash
# Runs the CUDA checks on a GPU machine over what tests/cuda/build.sh built
# (target/cuda-check/): the model tests of actors/tests/cuda.rs, then `klongd run` of a
# small SFT config on cuda:0 in bf16 over f32 masters (tests/cuda/sft_gpu.ron), stopped after
# 4 steps and resumed. Logs go to $OUT (the device tool's folder), else target/cuda-check/out.
# Exits non-zero if any check fails. At most ~8 minutes (its timeouts), inside one device call.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin=$PWD/target/cuda-check
out=${OUT:-$bin/out}
mkdir -p "$out"
[ -f "$bin/cuda-tests.xz" ] || { echo "run.sh: run tests/cuda/build.sh first" >&2; exit 2; }
# Unpacked with Python's lzma (the GPU machine may have no xz), outside the folder that
# travels.
exe=$(mktemp -d)
trap 'rm -rf "$exe"' EXIT
for b in klongd cuda-tests; do
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$bin/$b.xz" "$exe/$b" && chmod +x "$exe/$b" || { echo "run.sh: cannot unpack $b" >&2; exit 2; }
done
if [ ! -f sandboxes/tools/wasm/coreutils.wasm ]; then
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$bin/tools-wasm.tar.xz" sandboxes/tools || { echo "run.sh: no guest tools" >&2; exit 2; }
fi

# The libraries the binaries link: the machine's CUDA wheels (PyTorch's), then its system.
libs=$(python3 -c '
import glob, os, site
dirs = set()
for base in site.getsitepackages():
    for name in ("libcublas.so.*", "libcublasLt.so.*", "libcurand.so.*", "libnvrtc.so.*", "libcudart.so.*"):
        dirs.update(os.path.dirname(f) for f in glob.glob(os.path.join(base, "nvidia", "**", name), recursive=True))
print(":".join(sorted(dirs)))' 2>/dev/null || true)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
ldd "$exe/cuda-tests" | grep -E "cuda|cublas|curand|nvrtc" | tee "$out/ldd.txt"

failed=()
(cd actors && timeout 240 "$exe/cuda-tests" --test-threads 1 --nocapture) 2>&1 |
    tee "$out/tests.log" || failed+=(tests)

run_dir=$(mktemp -d)/run
sed "s#RUN_DIR#$run_dir#" tests/cuda/sft_gpu.ron >"$out/sft_gpu.ron"
timeout 120 "$exe/klongd" run "$out/sft_gpu.ron" --max-steps 4 >"$out/run1.log" 2>&1 ||
    failed+=(run-stopped)
timeout 120 "$exe/klongd" run "$out/sft_gpu.ron" >"$out/run2.log" 2>&1 || failed+=(run-resumed)
cp "$run_dir/metrics.jsonl" "$out/" 2>/dev/null || failed+=(metrics)
grep -h "training device\|stage finished\|resuming" "$out"/run*.log | cut -c1-300
python3 - "$out/metrics.jsonl" <<'PY' || failed+=(loss)
import json, sys
m = [json.loads(l) for l in open(sys.argv[1])]
first, last = m[0]["loss"], m[-1]["loss"]
print(f"klongd run on cuda:0, bf16: {len(m)} steps, loss {first:.3f} -> {last:.3f}")
sys.exit(0 if len(m) >= 8 and last < 0.8 * first else 1)
PY

if [ ${#failed[@]} -ne 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all CUDA checks passed"
