"""Loads klongd's HF exports in transformers and writes the logits it computes.

The Rust test `export_loads_in_transformers_with_the_same_logits` (actors/tests/pretrained.rs)
regenerates the same deterministic tiny models (Llama, Llama with tied embeddings, Qwen2,
Qwen3), saves them with `save_hf`, loads them back and compares its logits to this fixture:
that pins both "an export loads in transformers" and "it computes the same there".

Regenerate (needs torch + transformers; CI does not, it reads the committed fixture):

    cargo test -p klong-actors --test pretrained -- --ignored write_exports_for_transformers
    python actors/tests/parity/tiny_export_transformers.py
"""

import json
import pathlib

import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[3]
EXPORTS = ROOT / "target/parity/tiny_export"
OUT = pathlib.Path(__file__).resolve().parent / "tiny_export.json"
VARIANTS = ["llama", "llama_tied", "qwen2", "qwen3"]


def main():
    torch.set_grad_enabled(False)
    probe = json.loads((EXPORTS / "probe.json").read_text())
    out = {
        "generated_by": "actors/tests/parity/tiny_export_transformers.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "probe": probe,
        "variants": {},
    }
    for name in VARIANTS:
        model = AutoModelForCausalLM.from_pretrained(
            EXPORTS / name, torch_dtype=torch.float32, attn_implementation="eager"
        )
        model.eval()
        logits = model(torch.tensor([probe])).logits[0]
        out["variants"][name] = {
            "class": type(model).__name__,
            "logits": [[round(float(x), 6) for x in row] for row in logits],
        }
        print(name, type(model).__name__, tuple(logits.shape))
    OUT.write_text(json.dumps(out) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
