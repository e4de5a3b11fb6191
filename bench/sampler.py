"""Sampler throughput: the JAX sampler against PyTorch `generate` on the same weights and prompts.

CPU (default), about 6-9 minutes on 2 cores:
  .venv/bin/python bench/sampler.py                       # -> bench/results/sampler.json
  .venv/bin/python bench/sampler.py --batches 8 --new-tokens 32 --reps 1   # a quick look

GPU (`--gpu-8b`): decode tokens/s for the llama3_1_8b shape with random bf16 weights at batch 1
and 64, and the fraction of the HBM roofline (weight + KV bytes read per step / bandwidth):
  python bench/sampler.py --gpu-8b                        # -> bench/results/sampler_gpu.json
  python bench/sampler.py --gpu-8b --preset tiny --batches 1,8   # dry run of that mode on CPU

The CPU setting is the realistic rollout one: the embedded SmolLM2-135M (fp32), distinct chat
prompts left-padded to 64 tokens, exactly 128 new tokens per row (no stop tokens here; PyTorch
gets `min_new_tokens=128`), sampling at temperature 1. PyTorch runs with 2 threads. Both sides
are timed in the same process, one after the other, so a busy machine slows both; the load
average is recorded. Machine limits (matmul FLOP/s, memory bandwidth) are measured here too.

Expected result and its explanation: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from qalign_jax import plan, sampler
from qalign_jax.models import hf, llama, load

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.", "How do vaccines work?", "What is 17 times 23?",
    "Give three tips for better sleep.", "Who wrote Pride and Prejudice?",
    "What causes the seasons on Earth?", "Describe a cat to someone who has never seen one.",
    "How does a bicycle stay upright?", "What is the difference between weather and climate?",
    "Suggest a name for a bakery.", "Why is the sky blue?", "How do I boil an egg?",
    "What is a prime number?", "Summarize the plot of Romeo and Juliet.",
    "What are the planets of the solar system?", "How do bees make honey?",
    "Translate 'good morning' into Spanish.", "What is machine learning?",
    "Give me a short motivational quote.", "How tall is Mount Everest?",
    "What is the boiling point of water?", "Name three famous painters.",
    "How does the internet work?", "What should I pack for a beach trip?",
    "Why do leaves change color in autumn?", "What is the Pythagorean theorem?",
    "How can I save money on groceries?", "What is an atom made of?",
    "Write one sentence about friendship.", "How do airplanes fly?",
]  # fmt: skip


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine_limits() -> dict:
    """Matmul FLOP/s and weight-streaming bandwidth (a matrix-vector product), best of a few."""
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    t = best_time(lambda: a @ a, 5)
    flops = 2 * 2048**3 / t
    w = np.random.default_rng(1).standard_normal((8192, 8192), dtype=np.float32)  # 256 MiB
    x = np.ones(8192, np.float32)
    t = best_time(lambda: w @ x, 5)
    copy_src = np.ones(64 << 20, np.float32)
    copy_dst = np.empty_like(copy_src)
    t_copy = best_time(lambda: np.copyto(copy_dst, copy_src), 5)
    return {
        "matmul_flops": flops,
        "matvec_bytes_per_s": w.nbytes / t,
        "copy_bytes_per_s": 2 * copy_src.nbytes / t_copy,
    }


def merge_limits(a: dict, b: dict) -> dict:
    """The best of two measurements: contention only ever lowers them."""
    return {k: max(a[k], b[k]) for k in a}


def chat_prompts(tokenizer, n: int, width: int) -> list[list[int]]:
    prompts = []
    for q in (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}])
        if len(ids) > width:
            raise ValueError(f"chat prompt for {q!r} has {len(ids)} tokens > {width}.")
        prompts.append(ids)
    return prompts


def torch_model_from(cfg, params):
    import torch
    import transformers

    hf_cfg = {
        k: v for k, v in hf.config_to_hf(cfg).items() if k not in ("architectures", "torch_dtype")
    }
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    state = {k: torch.from_numpy(v) for k, v in hf.to_hf_state_dict(cfg, params)}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model


def torch_runner(model, prompts, width, new_tokens, pad_id):
    """A function that times one PyTorch `generate` (and, separately, its prefill)."""
    import torch

    b = len(prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    kw = dict(attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
              pad_token_id=pad_id, eos_token_id=None)  # fmt: skip
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm up

    def run() -> dict:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            total = time.perf_counter() - t0
            t0 = time.perf_counter()
            model(ids, attention_mask=mask, use_cache=True)
            prefill = time.perf_counter() - t0
        assert out.shape == (b, width + new_tokens), out.shape
        return {
            "total_s": total,
            "prefill_s": prefill,
            "tokens_per_s": b * new_tokens / total,
            "decode_tokens_per_s": b * new_tokens / max(total - prefill, 1e-9),
        }

    return run


def jax_runner(model, prompts, new_tokens):
    """(first-call stats incl. compile, a function that times one `sampler.generate`)."""
    cfg = sampler.SamplerConfig(max_new_tokens=new_tokens, temperature=1.0, stop_ids=())
    before = sampler.compile_stats()
    t0 = time.perf_counter()
    sampler.generate(model, prompts, cfg, jax.random.key(0))
    first = {
        "first_call_s": time.perf_counter() - t0,
        "compile_s": sampler.compile_stats()["seconds"] - before.get("seconds", 0.0),
        "compiles": sampler.compile_stats()["count"] - before.get("count", 0),
    }
    compiles = sampler.compile_stats()["count"]
    seed = [0]

    def run() -> dict:
        seed[0] += 1
        t0 = time.perf_counter()
        r = sampler.generate(model, prompts, cfg, jax.random.key(seed[0]))
        total = time.perf_counter() - t0
        assert sampler.compile_stats()["count"] == compiles, "a repeat call recompiled"
        assert all(len(t) == new_tokens for t in r.tokens)
        assert set(r.finish_reasons) == {"length"}
        b = len(prompts)
        return {
            "total_s": total,
            "prefill_s": r.timings["prefill"],
            "prepare_s": r.timings["prepare"],
            "decode_s": r.timings["decode"],
            "tokens_per_s": b * new_tokens / total,
            "decode_tokens_per_s": b * new_tokens / r.timings["decode"],
            "mean_logprob": float(np.mean(np.concatenate(r.logprobs))),
        }

    return first, run


def best_of(runs: list[dict]) -> dict:
    """The fastest run, plus each run's throughput (the spread shows the machine's noise)."""
    best = dict(min(runs, key=lambda r: r["total_s"]))
    best["all_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    return best


def decode_limits(cfg: llama.LlamaConfig, batch: int, cache_len: int, limits: dict) -> dict:
    """The fastest decode step this machine allows: weights (+ KV) streamed once, FLOPs at peak."""
    bytes_per = np.dtype(cfg.dtype).itemsize
    weight_bytes = cfg.num_params * bytes_per
    kv_bytes = 2 * cfg.num_layers * batch * cache_len * cfg.num_kv_heads * cfg.head_dim * bytes_per
    flops = 2 * batch * (cfg.num_params - cfg.vocab_size * cfg.hidden_size)  # no embedding lookup
    flops += 2 * batch * cfg.vocab_size * cfg.hidden_size  # the (tied) head
    step_s = max(
        (weight_bytes + kv_bytes) / limits["matvec_bytes_per_s"], flops / limits["matmul_flops"]
    )
    return {"limit_tokens_per_s": batch / step_s, "bytes_per_step": weight_bytes + kv_bytes,
            "flops_per_step": flops}  # fmt: skip


def wait_for_quiet(max_wait_s: float, threshold: float = 1.0) -> None:
    """Waits (up to max_wait_s) until the 1-minute load average drops below `threshold`:
    other processes on a 2-core machine distort both sides, PyTorch's threads the most."""
    t0 = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - t0 < max_wait_s:
        time.sleep(5)


def run_cpu(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    wait_for_quiet(args.wait_quiet)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    limits = machine_limits()
    print(f"machine: matmul {limits['matmul_flops'] / 1e9:.0f} GFLOP/s, matvec "
          f"{limits['matvec_bytes_per_s'] / 1e9:.1f} GB/s, copy "
          f"{limits['copy_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)  # fmt: skip
    model = load.load_model("embedded", dtype="float32")
    cfg = model.cfg
    tmodel = torch_model_from(cfg, model.params)
    measured = []
    for b in args.batches:
        prompts = chat_prompts(model.tokenizer, b, args.prompt_len)
        first, run_jax = jax_runner(model, prompts, args.new_tokens)
        run_torch = torch_runner(tmodel, prompts, args.prompt_len, args.new_tokens,
                                 model.tokenizer.pad_id)  # fmt: skip
        jax_runs, torch_runs = [], []
        for _ in range(args.reps):  # interleaved, so that a busy spell hits both sides
            jax_runs.append(run_jax())
            torch_runs.append(run_torch())
        measured.append((b, {**best_of(jax_runs), **first}, best_of(torch_runs), os.getloadavg()))
        limits = merge_limits(limits, machine_limits())
        print(f"  batch={b} done: jax {measured[-1][1]['tokens_per_s']:.1f} tok/s, torch "
              f"{measured[-1][2]['tokens_per_s']:.1f} tok/s", flush=True)  # fmt: skip
    results = []
    for b, jx, th, load_average in measured:
        lim = decode_limits(cfg, b, args.prompt_len + args.new_tokens, limits)
        row = {
            "batch": b, "jax": jx, "torch": th, **lim,
            "speedup": jx["tokens_per_s"] / th["tokens_per_s"],
            "decode_speedup": jx["decode_tokens_per_s"] / th["decode_tokens_per_s"],
            "fraction_of_limit": jx["decode_tokens_per_s"] / lim["limit_tokens_per_s"],
            "load_average": load_average,
        }  # fmt: skip
        results.append(row)
        print(
            f"batch={b:<3d} prefill {jx['prefill_s']:.2f}s (torch {th['prefill_s']:.2f}s)  "
            f"decode {jx['decode_tokens_per_s']:.1f} tok/s (torch {th['decode_tokens_per_s']:.1f})  "
            f"prepare {jx['prepare_s']:.2f}s  compile {jx['compile_s']:.1f}s  "
            f"end-to-end {jx['tokens_per_s']:.1f} vs torch {th['tokens_per_s']:.1f} tok/s  "
            f"limit {lim['limit_tokens_per_s']:.0f} tok/s ({row['fraction_of_limit']:.0%})  "
            f"speedup {row['speedup']:.2f}x",
            flush=True,
        )
    print(f"machine (best seen): matmul {limits['matmul_flops'] / 1e9:.0f} GFLOP/s, matvec "
          f"{limits['matvec_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)  # fmt: skip
    return {
        "mode": "cpu", "model": "embedded SmolLM2-135M fp32", "device": str(jax.devices()[0]),
        "threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "reps": args.reps, "machine": limits, "results": results,
        "load_average_end": os.getloadavg(),
        "targets": {"batch8_speedup": 2.0, "batch32_speedup": 1.5},
    }  # fmt: skip


def hbm_bandwidths(size: int = 1 << 28) -> dict[str, float]:
    """Device memory bandwidth, bytes read + written per second, two ways over `size` float32
    (1 GiB): an elementwise kernel (x * 1.0001) and a device-to-device copy (`x.copy()`, the
    runtime's memcpy); plus the chip's nominal figure where `plan.CHIPS` knows it (else 0)."""
    x = jnp.ones((size,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0001)
    f(x).block_until_ready()
    out = {"elementwise": 2 * x.nbytes / best_time(lambda: f(x).block_until_ready(), 10)}
    x.copy().block_until_ready()
    out["copy"] = 2 * x.nbytes / best_time(lambda: x.copy().block_until_ready(), 10)
    kind = jax.devices()[0].device_kind.lower()
    chip = next((c for c in plan.CHIPS if c.split("-")[0] in kind), "")
    out["nominal"] = plan.CHIPS[chip][1] if chip else 0.0
    return out


def run_gpu(args) -> dict:
    import types

    cfg = llama.get_preset(args.preset).replace(param_dtype="bfloat16", dtype="bfloat16")
    graphdef, _ = llama.abstract_model(cfg)
    t0 = time.perf_counter()
    params = llama.init_params(cfg, seed=0)
    jax.block_until_ready(params)
    print(f"{args.preset}: {cfg.num_params / 1e9:.2f}B random bf16 params in "
          f"{time.perf_counter() - t0:.0f}s on {jax.devices()[0]}", flush=True)  # fmt: skip
    model = types.SimpleNamespace(cfg=cfg, graphdef=graphdef, params=params)
    bws = hbm_bandwidths()
    bw = bws["elementwise"]
    print("memory bandwidth (GB/s): " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in bws.items()),
          flush=True)  # fmt: skip
    rng = np.random.default_rng(0)
    weights = None
    results = []
    for b in args.batches:
        prompts = [rng.integers(3, cfg.vocab_size, args.prompt_len).tolist() for _ in range(b)]
        scfg = sampler.SamplerConfig(max_new_tokens=args.new_tokens, temperature=1.0)
        first = sampler.generate(model, prompts, scfg, jax.random.key(0), weights=weights)
        weights = first.weights  # the bf16 decode copy, made once
        runs = [sampler.generate(model, prompts, scfg, jax.random.key(1 + i), weights=weights)
                for i in range(args.reps)]  # fmt: skip
        r = min(runs, key=lambda r: r.timings["decode"])
        steps = args.new_tokens
        step_s = r.timings["decode"] / steps
        cache_len = args.prompt_len + args.new_tokens
        itemsize = 2
        embed_bytes = cfg.vocab_size * cfg.hidden_size * itemsize  # gathered, not streamed
        weight_bytes = cfg.num_params * itemsize - (0 if cfg.tie_word_embeddings else embed_bytes)
        kv_bytes = 2 * cfg.num_layers * b * cache_len * cfg.num_kv_heads * cfg.head_dim * itemsize
        roofline_s = (weight_bytes + kv_bytes) / bw
        row = {
            "batch": b, "decode_tokens_per_s": b / step_s, "step_ms": step_s * 1e3,
            "prefill_s": r.timings["prefill"], "prepare_s": first.timings["prepare"],
            "roofline_step_ms": roofline_s * 1e3, "fraction_of_roofline": roofline_s / step_s,
            "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
            "fraction_of_roofline_by": {  # the same against each bandwidth figure
                k: (weight_bytes + kv_bytes) / v / step_s for k, v in bws.items() if v
            },
        }  # fmt: skip
        results.append(row)
        print(f"batch={b:<3d} decode {row['decode_tokens_per_s']:.1f} tok/s, step "
              f"{row['step_ms']:.2f} ms, roofline {row['roofline_step_ms']:.2f} ms "
              f"({row['fraction_of_roofline']:.0%} of HBM roofline; against "
              + ", ".join(f"{k} {v:.0%}" for k, v in row["fraction_of_roofline_by"].items())
              + ")", flush=True)  # fmt: skip
    return {
        "mode": "gpu", "preset": args.preset, "device": str(jax.devices()[0]),
        "bandwidth_bytes_per_s": bw, "bandwidths": bws, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "results": results, "compiles": sampler.compile_stats(),
        "target": {"batch1_fraction_of_roofline": 0.7},
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-8b", action="store_true", help="the accelerator benchmark")
    parser.add_argument("--preset", default="llama3_1_8b", help="model shape for --gpu-8b")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2, help="timed calls per side (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON result path")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="wait up to this many seconds for a load average below 1")  # fmt: skip
    args = parser.parse_args()
    default_batches = "1,64" if args.gpu_8b else "1,8,32"
    args.batches = [int(b) for b in (args.batches or default_batches).split(",")]
    result = run_gpu(args) if args.gpu_8b else run_cpu(args)
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        "sampler_gpu.json" if args.gpu_8b else "sampler.json",
    )  # fmt: skip
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
