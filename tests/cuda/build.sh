#!/usr/bin/env bash
# Builds, on a machine without a GPU, what tests/cuda/run.sh runs on one: klongd and the CUDA
# tests (actors/tests/cuda.rs), built with `--features cuda` into target/cuda-check/, small
# enough to travel to a GPU machine beside the repository.
#
#   tests/cuda/build.sh        # ~40 min on 2 cores the first time (candle's kernels through nvcc)
#
# The toolkit comes from PyPI. Its nvcc must not be newer than the GPU machine's driver: the
# kernels travel as PTX, which the driver compiles, and a driver refuses PTX of a newer CUDA
# (CUDA_VERSION, default 13.0, is what a 580 driver runs). The libraries the binaries link
# (cuBLAS, cuRAND, NVRTC, the CUDA runtime) come from their wheels; the driver library from a stub made here
# (every `cu*` entry point cudarc declares), as a machine without a GPU has none. The
# binaries load the GPU machine's own libcuda.so.1 and libraries when they start.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

CUDA_VERSION=${CUDA_VERSION:-13.0}
CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} # Hopper (H100, H200)
major=${CUDA_VERSION%%.*}
venv=$PWD/target/cuda-toolkit
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q \
    "nvidia-cuda-nvcc==$CUDA_VERSION.*" "nvidia-nvvm==$CUDA_VERSION.*" \
    "nvidia-cuda-crt==$CUDA_VERSION.*" "nvidia-cuda-runtime==$CUDA_VERSION.*" \
    "nvidia-cuda-cccl==$CUDA_VERSION.*" "nvidia-cuda-nvrtc==$CUDA_VERSION.*" \
    "nvidia-cublas==$CUDA_VERSION.*" "nvidia-curand"
root=$(realpath "$venv"/lib/python3*/site-packages/nvidia/cu"$major")
[ -x "$root/bin/nvcc" ] || { echo "build.sh: no nvcc under $root" >&2; exit 1; }

# Link-time names for the wheels' versioned libraries, and the driver stub, where cudarc's
# build script looks (CUDA_ROOT/lib/stubs).
stubs=$root/lib/stubs
mkdir -p "$stubs"
for lib in cublas cublasLt nvrtc curand cudart; do
    so=$(cd "$root/lib" && ls | grep -E "^lib$lib\.so\.[0-9]+$" | head -n 1)
    [ -n "$so" ] || { echo "build.sh: lib$lib.so.N missing in $root/lib" >&2; exit 1; }
    ln -sf "../$so" "$stubs/lib$lib.so"
done
cudarc=$(cargo metadata --format-version 1 --features cuda | python3 -c '
import json, sys
print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+' "$(dirname "$cudarc")/src/driver/sys/mod.rs" |
    sed 's/.* //' | sort -u | sed 's/.*/void &(void) {}/' >"$stubs/libcuda.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda.c"

export PATH=$root/bin:$PATH CUDA_ROOT=$root CUDA_COMPUTE_CAP CARGO_TARGET_DIR=$PWD/target/cuda
cargo build --release --features cuda --bin klongd
tests=$(cargo test --release --features cuda -p klong-actors --test cuda --no-run \
    --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
[ -n "$tests" ] || { echo "build.sh: the cuda test binary was not built" >&2; exit 1; }

# Stripped and xz-compressed: the kernels' PTX makes each binary ~90 MB, ~15 MB packed.
out=target/cuda-check
rm -rf "$out"
mkdir -p "$out"
for pair in "target/cuda/release/klongd klongd" "$tests cuda-tests"; do
    set -- $pair
    strip -o "$out/$2" "$1"
    xz -T0 -6 "$out/$2"
done
# The guest tools `klongd run` loads (sandboxes/tools/wasm is not in git).
[ -f sandboxes/tools/wasm/coreutils.wasm ] || sandboxes/tools/build.sh
tar -cJf "$out/tools-wasm.tar.xz" -C sandboxes/tools wasm/coreutils.wasm wasm/python.wasm
du -sh "$out"/*
echo "built $out: on a GPU machine, run tests/cuda/run.sh (with $out beside the repository)"
