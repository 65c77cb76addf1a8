"""Writes `smollm2.json`, the fixture of `actors/tests/gguf_parity.rs`: what transformers does with
SmolLM2-135M-Instruct (Q4_1 GGUF) -- token ids, logits, chat-template ids, greedy tokens -- so that
the Rust loader (`klong_actors::policy::gguf`) and model can be held to the same numbers.

How to run (from the repository root; CPU only, about a minute):

    bash tests/fetch-models.sh          # target/models/SmolLM2-135M-Instruct.Q4_1.gguf
    python -m venv /tmp/parity-venv     # or any environment with these packages:
    /tmp/parity-venv/bin/pip install torch transformers gguf accelerate
    /tmp/parity-venv/bin/python actors/tests/parity/smollm2_transformers.py
    cargo test -p klong-actors --test gguf_parity

(accelerate: transformers refuses `gguf_file=` without it.) PyPI's Linux torch wheels are CUDA
builds; they run on a CPU but still load the CUDA libraries at import. Where torch was installed
without its dependencies (`pip install --no-deps`), `pip install --no-deps --target DIR` the
`nvidia-*` / `cuda-toolkit` wheels its metadata names (`pip show torch`) and run with
LD_LIBRARY_PATH set to their `lib/` folders (`DIR/nvidia/*/lib`, `DIR/nvidia/cu13/lib`).
The fixture in the repository was written that way with the versions it records.

The script only reads the GGUF (copied into a temporary folder, since transformers loads a GGUF
from a folder plus a file name) and writes the fixture next to itself; the Rust test never runs
Python. Versions of torch, transformers and gguf go into the fixture.
"""

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile

import gguf
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PATH = os.path.join(ROOT, "target", "models", GGUF_NAME)
OUT = os.path.join(HERE, "smollm2.json")

# A prompt with words, digits, punctuation, code, whitespace runs and non-ASCII text.
PLAIN_PROMPT = (
    "The capital of France is Paris. In 2024, 3.14159 x 2 = 6.28318;\n"
    "def square(x):\n    return x ** 2  # café, naïve, 東京\n\nThe answer is"
)

# Strings whose ids pin the tokenizer down: pre-tokenizer splits, byte-level spelling, special
# tokens in running text, whitespace and newlines.
TOKENIZER_PROBES = [
    "Hello world!",
    " leading space and  double  spaces   ",
    "line one\nline two\r\n\n\ttab",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "numbers 1 12 123 1234 12345 3.14 1e-5 0x1F",
    "it's we'll they've I'M DON'T",
    "unicode: café Ünïcödé 東京 日本語 😀👍🏽 ∑∫√",
    "<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"a.txt\"}}\n</tool_call>",
    "",
    "   ",
]

TOP_K = 20
# A fixed set of ids whose logits are stored at every position, spread over the vocabulary.
FIXED_IDS = [(i * 49152) // 64 + 7 for i in range(64)]
GEN_TOKENS = 16

# A Hermes / Qwen2.5-style tool-use template (the layout of Qwen2.5's own template): tools listed in
# the system turn with `tojson`, calls as `<tool_call>` blocks, tool results in a user turn.
TOOL_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'tool' %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# OpenAI-style tools; key order as OpenAI writes it (not sorted), and a non-ASCII description, so
# that `tojson` parity covers key order and `ensure_ascii=False`.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a text file (UTF-8) from the episode directory — e.g. “notes.md”.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Relative path."},
                    "max_bytes": {"type": "integer", "description": "Cap on bytes read.", "default": 4096},
                },
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a shell command.",
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string"}},
                "required": ["command"],
            },
        },
    },
]

# The conversation, in the crate's `ChatMessage` shape (tool calls as {name, arguments}).
CALL = {"name": "read_file", "arguments": {"path": "a.txt"}}
MESSAGES = [
    {"role": "system", "content": "You are a careful coding agent. Use tools when useful."},
    {"role": "user", "content": "What does a.txt say? Answer in one sentence."},
    {
        "role": "assistant",
        "content": "<tool_call>" + json.dumps(CALL) + "</tool_call>",
        "tool_calls": [CALL],
    },
    {"role": "tool", "name": "read_file", "content": "The meeting moved to Thursday at 10:00."},
]


def to_transformers(message):
    """The crate's message as transformers' templates expect it (`ChatMessage::to_template_value`)."""
    m = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        m["tool_calls"] = [
            {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in message["tool_calls"]
        ]
    if "name" in message:
        m["name"] = message["name"]
    return m


def chat_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding by default
        out = out["input_ids"]
    return [int(i) for i in out]


def main():
    if not os.path.exists(GGUF_PATH):
        sys.exit(f"{GGUF_PATH} is missing: run tests/fetch-models.sh")
    with open(GGUF_PATH, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(GGUF_PATH, os.path.join(tmp, GGUF_NAME))
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()

    # (a) plain prompt: ids, and logits at every position (top-k, a fixed id set, logsumexp).
    prompt_ids = tokenizer(PLAIN_PROMPT)["input_ids"]
    logits = model(torch.tensor([prompt_ids])).logits[0].float()
    positions = []
    for row in logits:
        top = torch.topk(row, TOP_K)
        positions.append(
            {
                "top_ids": [int(i) for i in top.indices],
                "top_logits": [float(v) for v in top.values],
                "fixed_logits": [float(row[i]) for i in FIXED_IDS],
                "logsumexp": float(torch.logsumexp(row, 0)),
            }
        )
    probes = [{"text": t, "ids": tokenizer(t)["input_ids"]} for t in TOKENIZER_PROBES]

    # (b) chat templates: the model's own, and the tool-use one with tools.
    hf_messages = [to_transformers(m) for m in MESSAGES]
    own_text = tokenizer.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    own_ids = chat_ids(tokenizer, hf_messages)
    tool_text = tokenizer.apply_chat_template(
        hf_messages, tools=TOOLS, chat_template=TOOL_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    tool_ids = chat_ids(tokenizer, hf_messages, tools=TOOLS, chat_template=TOOL_TEMPLATE)

    # (c) greedy decoding from the own-template chat prompt, with the smallest top-1/top-2 logit
    # gap seen (a tie-break the Rust side could legitimately resolve differently would show here).
    ids = torch.tensor([own_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=GEN_TOKENS,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    generated = [int(t) for t in out.sequences[0, len(own_ids):]]
    gaps = []
    for s in out.scores:
        top2 = torch.topk(s[0].float(), 2).values
        gaps.append(float(top2[0] - top2[1]))

    fixture = {
        "about": "Written by actors/tests/parity/smollm2_transformers.py; read by actors/tests/gguf_parity.rs.",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        },
        "gguf": {"file": GGUF_NAME, "sha256": sha},
        "special": {
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": len(tokenizer),
        },
        "plain": {
            "text": PLAIN_PROMPT,
            "ids": prompt_ids,
            "top_k": TOP_K,
            "fixed_ids": FIXED_IDS,
            "positions": positions,
        },
        "tokenizer_probes": probes,
        "chat": {
            "messages": MESSAGES,
            "own_template": {"text": own_text, "ids": own_ids},
            "tool_template": {"template": TOOL_TEMPLATE, "tools": TOOLS, "text": tool_text, "ids": tool_ids},
        },
        "greedy": {"prompt": "chat.own_template.ids", "tokens": generated, "min_top2_gap": min(gaps)},
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes); {len(prompt_ids)} prompt tokens, "
          f"greedy {generated}, min top-2 gap {min(gaps):.4f}")
    assert all(math.isfinite(p["logsumexp"]) for p in positions)


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
