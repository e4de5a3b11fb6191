"""The chunked training loss (`model.logits_chunk`): step time and compiled memory vs the plain one.

  .venv/bin/python bench/logits_chunk.py                       # SmolLM2-135M shapes, 32 x 128
  .venv/bin/python bench/logits_chunk.py --preset llama3_2_1b --rows 8 --seq 512 --layers 2

The gradient of the summed log-likelihood (what SFT, GRPO and DPO differentiate), jitted once
per chunk size, random weights. Chunk sizes are timed in alternation (`--reps` rounds) in one
process so that load on the machine hits them alike; the compiled program's temporaries
(`memory_analysis().temp_size_in_bytes`) are what the chunking is for. Prints a table with the
time and memory ratio against chunk 0 (the [rows, T, vocab] float32 logits in one piece).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from qalign_jax.models import llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2_135m")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=0, help="0: the preset's")
    ap.add_argument("--chunks", default="0,32,64,128")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    cfg = llama.get_preset(args.preset)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.rows, args.seq)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(args.seq), tokens.shape).astype(jnp.int32)
    params = llama.init_params(cfg, 0)
    fns, temps = {}, {}
    for chunk in [int(c) for c in args.chunks.split(",")]:
        graphdef, _ = llama.abstract_model(cfg.replace(logits_chunk=chunk))

        def loss(p, graphdef=graphdef):
            return jnp.sum(llama.token_stats(graphdef, p, tokens, positions, tokens)["logp"])

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
        jax.block_until_ready(compiled(params))  # warm
        fns[chunk] = compiled
    times = {c: [] for c in fns}
    for _ in range(args.reps):
        for chunk, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params))
            times[chunk].append(time.perf_counter() - t0)
    base_t, base_m = np.median(times[0]), temps[0]
    print(f"{args.preset} ({cfg.num_layers} layers), {args.rows} x {args.seq} tokens, "
          f"vocab {cfg.vocab_size}; grad of the summed log-likelihood, median of {args.reps}")  # fmt: skip
    print("| logits_chunk | s/step | vs 0 | temp MB | vs 0 |")
    print("|---|---|---|---|---|")
    for chunk in fns:
        t = np.median(times[chunk])
        print(f"| {chunk} | {t:.3f} | {t / base_t:.2f}x | {temps[chunk] / 1e6:.0f} | "
              f"{temps[chunk] / base_m:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
