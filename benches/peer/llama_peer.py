#!/usr/bin/env python3
"""The PyTorch + transformers side of `klongd bench model`.

Builds the reference tiny Llama R (4 layers, d_model 256, 8 heads, 4 kv heads, ffn 768,
vocab 512, float32) as `transformers.LlamaForCausalLM`, and measures, on the CPU with a fixed
thread count:

* training tokens/s at batch x seq (forward + cross-entropy + backward + torch AdamW step);
* greedy decode tokens/s with the KV cache through `generate` at batch 1 and batch 8, from a
  short random prompt, exactly `--new-tokens` new tokens (min_new_tokens = max_new_tokens).

It prints ONE JSON line on stdout (`{"ok": true, ...}`), or `{"ok": false, "error": ...}` with
exit status 1 when something fails (torch missing, ...): the caller never gets a made-up number.
Everything else goes to stderr.
"""

import argparse
import json
import os
import statistics
import sys
import time
import traceback


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=8, help="training batch (rows)")
    p.add_argument("--seq", type=int, default=512, help="training sequence length")
    p.add_argument("--prompt", type=int, default=16, help="decode prompt length")
    p.add_argument("--new-tokens", type=int, default=256, help="decode: new tokens per row")
    p.add_argument("--decode-batches", default="1,8", help="decode batch sizes, comma separated")
    p.add_argument("--decode-runs", type=int, default=7, help="timed generate calls per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument(
        "--attn",
        default="sdpa",
        help="attention implementations, comma separated (sdpa, eager); the first is the main one",
    )
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    return p.parse_args()


def log(msg):
    print(f"[llama_peer] {msg}", file=sys.stderr, flush=True)


def build_model(attn, seed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=True,
        attn_implementation=attn,
        dtype=torch.float32,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    return model


def time_train(model, args):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, 512, (args.batch, args.seq + 1), generator=g)
    ids, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    # The same hyperparameters as klongd's AdamWParams::default() (PyTorch's defaults) with
    # klongd's bench learning rate and decay.
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay
    )
    model.train()
    losses = []
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(dt)
        log(f"train step {i}: {dt * 1e3:.0f} ms, loss {losses[-1]:.4f}")
    total = sum(times)
    return {
        "tok_s": args.steps * args.batch * args.seq / total,
        "step_ms_mean": 1e3 * total / len(times),
        "step_ms_min": 1e3 * min(times),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def time_decode(model, batch, args):
    import torch

    model.eval()
    g = torch.Generator().manual_seed(args.seed + 2 + batch)
    prompt = torch.randint(0, 512, (batch, args.prompt), generator=g)
    mask = torch.ones_like(prompt)
    kwargs = dict(
        attention_mask=mask,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    with torch.inference_mode():
        # Warm-up: allocator, kernels, generation config validation.
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kwargs)
        rates = []
        for _ in range(args.decode_runs):
            t0 = time.perf_counter()
            out = model.generate(
                prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kwargs
            )
            dt = time.perf_counter() - t0
            new = out.shape[1] - args.prompt
            if new != args.new_tokens:
                raise RuntimeError(f"generate made {new} new tokens, not {args.new_tokens}")
            rates.append(batch * new / dt)
            log(f"decode batch {batch}: {dt * 1e3:.0f} ms, {rates[-1]:.1f} tok/s")
    return {"tok_s": statistics.median(rates), "runs_tok_s": rates}


def main():
    args = parse_args()
    try:
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        out = {
            "ok": True,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "new_tokens": args.new_tokens,
            "results": {},
        }
        for attn in [a.strip() for a in args.attn.split(",") if a.strip()]:
            log(f"attention implementation {attn}")
            res = {}
            if not args.skip_train:
                res["train"] = time_train(build_model(attn, args.seed), args)
            if not args.skip_decode:
                model = build_model(attn, args.seed)
                for b in [int(x) for x in args.decode_batches.split(",") if x.strip()]:
                    res[f"decode_b{b}"] = time_decode(model, b, args)
            out["results"][attn] = res
        print(json.dumps(out), flush=True)
        return 0
    except BaseException as e:  # noqa: BLE001 - any failure must become a JSON error line
        traceback.print_exc(file=sys.stderr)
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
