"""Ahead-of-time compilation of a config's jitted programs for a pod mesh, without the pod.

  XLA_FLAGS=--xla_force_host_platform_device_count=64 JAX_PLATFORMS=cpu \
    python -m qalign_jax.aot --config configs/qalign_grpo_llama3_8b.py --preset llama3_1_8b

Every program is lowered from abstract inputs (`jax.ShapeDtypeStruct`s carrying the shardings
the loop would give them; parameters from `nnx.eval_shape`), so nothing 8B-sized is allocated,
and compiled by XLA's SPMD partitioner for the mesh of `config.mesh.shape` over the visible
devices (fake CPU devices stand in for the chips). A sharding mistake (a batch that the mesh
does not divide, an axis used twice, a constraint that does not fit) fails here, in a minute
on a laptop, instead of on the pod. It proves the programs partition; it does not prove they
fit the chips' memory (CPU compiles report CPU buffers; see `qalign_jax.plan` for memory).

Programs: `sft` loop: the train step. `grpo` loop: the train step, the reference log-probs,
the sampler's prefill, decode-weight preparation, decode and the second-pass `extend`, and the
judge's prefix prefill and question scoring. Shapes follow the loops: rows per micro-batch,
`data.seq_len` (SFT) or the GRPO sequence length from the config's token budgets
(`plan.grpo_lengths`).

`--num_layers N` replaces the preset's depth (the blocks run under `lax.scan`, so the per-layer
program is the same; width, heads, vocab and shardings are unchanged) to save compile time.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from qalign_jax import checkpoint, judge, plan, sampler, sharding, train_state
from qalign_jax.loops import grpo, sft
from qalign_jax.models import llama


def _sds(shape, dtype, sh):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sh)


def _state(config, cfg, mesh, total_steps: int):
    rules = tuple(config.sharding.rules)
    tx, schedule = train_state.make_optimizer(config.optimizer, total_steps)
    graphdef, abstract_params = llama.abstract_model(cfg)
    trained, frozen = train_state.split_trainable(abstract_params)  # LoRA: (adapters, base)
    abstract_state, state_sh = train_state.state_shardings(trained, tx, mesh, rules)
    return graphdef, tx, schedule, abstract_state, state_sh


def _frozen(cfg, mesh, rules):
    """LoRA: (the frozen base's abstract arrays with shardings, its shardings); else (None,
    None), and the step takes no `frozen` argument."""
    frozen = train_state.split_trainable(llama.abstract_model(cfg)[1])[1]
    if frozen is None:
        return None, None
    frozen_sh = sharding.param_shardings(frozen, mesh, rules)
    return checkpoint.with_shardings(frozen, frozen_sh), frozen_sh


def _wanted(compile_, name: str) -> bool:
    """`compile_`: True (compile everything), False (lower only) or a set of program names."""
    return compile_ if isinstance(compile_, bool) else name in compile_


def _timed(out: dict, name: str, lowered, compile_):
    t0 = time.perf_counter()
    compile_ = _wanted(compile_, name)
    out[name] = lowered.compile() if compile_ else lowered
    what = "compiled" if compile_ else "lowered"
    print(f"aot: {name}: {what} in {time.perf_counter() - t0:.1f}s", flush=True)


def compile_sft(config, cfg, mesh, *, compile_: bool = True) -> dict:
    """{'sft_step': compiled} for the SFT loop's shapes on `mesh`."""
    s = config.sft
    rows = s.global_batch_size // s.grad_accum_steps
    sharding.check_batch_divisible(rows, mesh)
    graphdef, tx, schedule, abstract_state, state_sh = _state(config, cfg, mesh, 100)
    frozen, frozen_sh = _frozen(cfg, mesh, config.sharding.rules)
    step = sft.jit_train_step(graphdef, tx, schedule, state_sh, mesh, config.sharding.rules,
                              frozen_sh, train_state.compute_dtype(config.model))  # fmt: skip
    bsh = sft.batch_shardings(mesh)
    shape = (s.grad_accum_steps, rows, config.data.seq_len)
    batch = {
        k: _sds(shape, jnp.float32 if k == "loss_mask" else jnp.int32, bsh[k])
        for k in sft.BATCH_KEYS
    }
    out = {}
    t0 = time.perf_counter()
    lowered = step.lower(abstract_state, batch, *([] if frozen is None else [frozen]))
    print(f"aot: sft_step lowered in {time.perf_counter() - t0:.1f}s", flush=True)
    _timed(out, "sft_step", lowered, compile_)
    return out


def compile_grpo(
    config, cfg, mesh, *, compile_: bool = True, judge_cfg=None, train_only: bool = False
) -> dict:
    """The GRPO loop's programs for its shapes on `mesh`: {name: compiled (or lowered)}.

    `compile_`: True, False (lower only) or the set of names to compile; the sampler's
    prefill, prepare and decode always compile (each one's output shardings are the next one's
    inputs), its second pass (extend, decode2) only when 'sampler_extend' is wanted.
    `judge_cfg`: the judge's architecture (default: the policy's, as with the 8B configs).
    `train_only`: the train step alone (what `plan --compile` needs in minutes at 8B)."""
    g, rules = config.grpo, tuple(config.sharding.rules)
    rows = g.prompts_per_step * g.num_generations
    sharding.check_batch_divisible(rows // g.grad_accum_steps, mesh)
    lengths = plan.grpo_lengths(config)
    seq_len, cache_len = lengths.seq_len, lengths.cache_len
    graphdef, tx, schedule, abstract_state, state_sh = _state(config, cfg, mesh, g.num_steps)
    base_cfg = cfg.replace(lora=None)  # the reference's and the judge's architecture
    out = {}

    # Training: the step and the reference forward.
    frozen, frozen_sh = _frozen(cfg, mesh, rules)
    frozen_args = () if frozen is None else (frozen,)
    step = grpo.jit_grpo_step(graphdef, tx, schedule, state_sh, g, mesh, rules, frozen_sh,
                              train_state.compute_dtype(config.model))  # fmt: skip
    bsh = grpo.batch_shardings(mesh)
    micro = rows // g.grad_accum_steps
    batch = {}
    for k in grpo.BATCH_KEYS:  # spans as wide as the rows: the head on every position (bound)
        shape = (g.grad_accum_steps, micro) + (() if k in grpo.ROW_KEYS else (seq_len,))
        ints = ("tokens", "positions", "span_start", "targets")
        batch[k] = _sds(shape, jnp.int32 if k in ints else jnp.float32, bsh[k])
    _timed(out, "grpo_step", step.lower(abstract_state, batch, *frozen_args), compile_)
    if train_only:
        return out
    row_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    # The reference: the policy's weights, or with LoRA the base alone (adapters off).
    ref_graphdef, ref_params, ref_sh = graphdef, abstract_state.params, state_sh.params
    if frozen is not None:
        ref_graphdef, ref_params, ref_sh = llama.abstract_model(base_cfg)[0], frozen, frozen_sh
    ref_fn = sharding.jit(
        functools.partial(grpo.token_logprobs, graphdef=ref_graphdef,
                          temperature=grpo.logp_temperature(config.grpo)),
        mesh=mesh, rules=rules,
        in_shardings=(ref_sh, row_sh, row_sh, sharding.batch_sharding(mesh, 1), row_sh),
        out_shardings=row_sh, name="token_logprobs",
    )  # fmt: skip
    ids = _sds((rows, seq_len), jnp.int32, row_sh)
    starts = _sds((rows,), jnp.int32, sharding.batch_sharding(mesh, 1))
    _timed(out, "ref_logprobs", ref_fn.lower(ref_params, ids, ids, starts, ids), compile_)

    # Sampling: prefill the prompts, prepare decode weights, decode, extend (second pass).
    params = train_state.full_params(abstract_state.params, frozen)  # the policy: + base (LoRA)
    scfg = sampler.SamplerConfig(
        max_new_tokens=g.draft_max_tokens, max_cache_len=cache_len, stop_ids=(0,),
        batch_buckets=(rows,),  # as grpo's sampler: every rollout batch has B x G rows
    )  # fmt: skip
    batch_rows = sampler.bucket(rows, scfg.batch_buckets, sampler.batch_multiple(mesh))
    width = lengths.prompt_width
    rsh = lambda nd: sharding.batch_sharding(mesh, nd)  # noqa: E731
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = _sds(key.shape, key.dtype, sharding.replicated(mesh))
    prompts = _sds((batch_rows, width), jnp.int32, rsh(2))
    args = (params, prompts, prompts, _sds((batch_rows,), bool, rsh(1)), key)
    static = {"cache_len": cache_len, "max_new_tokens": g.draft_max_tokens, "pad_id": 0}
    kw = dict(mesh=mesh, rules=rules)

    def abstract_out(compiled):  # the next program's inputs: the outputs' shapes and shardings
        return jax.tree.map(
            lambda x, sh: _sds(x.shape, x.dtype, sh), compiled.out_info, compiled.output_shardings
        )

    def run(name, fn, leading, static, args, state_arg=None):
        t0 = time.perf_counter()
        c = sampler.jitted(name, fn, leading, static, args, state_arg=state_arg, **kw)
        c = c.lower(*args).compile()
        out[f"sampler_{name}"] = c
        print(f"aot: sampler_{name}: compiled in {time.perf_counter() - t0:.1f}s", flush=True)
        return abstract_out(c)

    state = run("prefill", sampler.prefill, (graphdef,), static, args)
    weights = run("prepare", sampler.prepare_weights, (graphdef,), kw, (params,))
    state = run("decode", sampler.decode, (cfg,), {"cfg": scfg}, (weights, state), state_arg=1)
    if g.two_pass and _wanted(compile_, "sampler_extend"):
        w2 = lengths.findings_width
        ext = (params, state, _sds((batch_rows, w2), jnp.int32, rsh(2)),
               _sds((batch_rows, w2), jnp.int32, rsh(2)), _sds((batch_rows,), jnp.int32, rsh(1)),
               _sds((batch_rows,), bool, rsh(1)), key)  # fmt: skip
        static2 = {"max_new_tokens": g.revision_max_tokens, "pad_id": 0}
        state = run("extend", sampler.extend, (graphdef,), static2, ext, state_arg=1)
        scfg2 = dataclasses.replace(scfg, max_new_tokens=g.revision_max_tokens)
        run("decode2", sampler.decode, (cfg,), {"cfg": scfg2}, (weights, state), state_arg=1)

    # The judge: judge.batch_size contexts prefilled, a question header per option set (Yes/No,
    # grades) appended to each, then one question chunk over one option set's prefix.
    jcfg = judge_cfg or base_cfg  # judge.from_config loads with model.param_dtype and model.dtype
    jgraphdef, jabstract = llama.abstract_model(jcfg)
    jparams = checkpoint.with_shardings(jabstract, sharding.param_shardings(jabstract, mesh, rules))
    bp, p_len = config.judge.batch_size, config.judge.max_context_tokens
    qc, s_len = config.judge.question_chunk, 48
    repl = sharding.replicated(mesh)
    programs = judge.jit_programs(jgraphdef, mesh, rules)
    t0 = time.perf_counter()
    ids = _sds((bp, p_len), jnp.int32, repl)
    header = _sds((2, bp, 8), jnp.int32, repl)
    out["judge_prefill"] = programs["prefill_fn"].lower(jparams, ids, ids, header, header)
    prefix = jax.tree.map(lambda x: _sds(x.shape, x.dtype, repl), out["judge_prefill"].out_info)
    if _wanted(compile_, "judge_prefill"):  # then the scoring takes the cache as placed
        out["judge_prefill"] = out["judge_prefill"].compile()
        prefix = abstract_out(out["judge_prefill"])
    prefix = prefix[0]  # a chunk reads one option set's prefix
    options = 6
    out["judge_score"] = programs["score_fn"].lower(
        jparams, prefix, _sds((bp * qc, s_len), jnp.int32, repl),
        _sds((bp * qc, s_len), jnp.int32, repl), _sds((bp * qc,), jnp.int32, repl),
        _sds((qc, options), jnp.int32, repl), _sds((qc, options), bool, repl),
    )  # fmt: skip
    if _wanted(compile_, "judge_score"):
        out["judge_score"] = out["judge_score"].compile()
    print(f"aot: judge prefill + score: {time.perf_counter() - t0:.1f}s", flush=True)
    return out


COMPILERS = {"sft": compile_sft, "grpo": compile_grpo}


def main(argv):
    del argv
    config = flags.FLAGS.config
    if config.loop not in COMPILERS:
        raise app.UsageError(f"config.loop={config.loop!r}; aot knows {sorted(COMPILERS)}.")
    cfg = plan.model_config(config, flags.FLAGS.preset, flags.FLAGS.num_layers)
    mesh = sharding.make_mesh(config.mesh.shape)
    print(f"aot: {config.loop} on mesh {dict(mesh.shape)} ({jax.device_count()} "
          f"{jax.devices()[0].platform} devices), {cfg.num_params / 1e9:.2f}B params")  # fmt: skip
    out = COMPILERS[config.loop](config, cfg, mesh, compile_=not flags.FLAGS.lower_only)
    print(f"aot: ok, {len(out)} programs: {', '.join(out)}")


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Experiment config.", lock_config=True
    )
    _PRESET = flags.DEFINE_string(
        "preset", "", "Model preset (llama.PRESETS) instead of the source."
    )
    _LAYERS = flags.DEFINE_integer("num_layers", 0, "Replace the depth (0 = the model's).")
    _LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Lower but do not compile.")
    app.run(main)
