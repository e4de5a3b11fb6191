"""The `generate` loop: chat answers from any supported model, written to the workdir.

This is the default job of the README's demo command and the quickest check that a model (or a
trained stage: `checkpoint.init` = its workdir or Hugging Face export) loads and talks. It reads
top to bottom: mesh, model, prompts, sampling in batches, results.
"""

from __future__ import annotations

import os
import time

import jax
from absl import logging

from qalign_jax import data, files, sampler, sharding
from qalign_jax.models import load


def read_prompts(config) -> list[str]:
    """`config.generate.prompts_file` (JSONL in the shared schema) or `config.generate.prompts`."""
    path = config.generate.prompts_file
    if not path:
        return list(config.generate.prompts)
    prompts = [r.prompt for r in data.read_prompt_set(path)]
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts


def sampler_config(gen_cfg, tokenizer) -> sampler.SamplerConfig:
    return sampler.SamplerConfig(
        max_new_tokens=gen_cfg.max_new_tokens,
        temperature=gen_cfg.temperature,
        top_k=gen_cfg.top_k,
        top_p=gen_cfg.top_p,
        stop_ids=tuple(tokenizer.stop_ids),
    )


def chat_completions(model: load.LoadedModel, conversations, sampler_cfg, rng, batch_size=8):
    """Answers each conversation (a list of {'role', 'content'} messages) with the model.

    Returns one dict per conversation: the answer text, its finish reason and token count.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError(
            f"model {model.source!r} has no tokenizer; set config.model.tokenizer (e.g. "
            "'embedded') for random-weight models."
        )
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    results = []
    for start in range(0, len(prompts), batch_size):
        rng, step_rng = jax.random.split(rng)
        out = sampler.generate(model, prompts[start : start + batch_size], sampler_cfg, step_rng)
        for ids, reason in zip(out.tokens, out.finish_reasons):
            results.append(
                {"answer": tok.decode(ids), "finish_reason": reason, "num_tokens": len(ids)}
            )
    return results


def run(config, workdir: str) -> None:
    mesh = sharding.make_mesh(config.mesh.shape)
    t0 = time.time()
    # a trained stage's weights when checkpoint.init is set, read in place of model.source's
    origin = config.checkpoint.init or config.model.source
    model = load.from_config(config, mesh, source=config.checkpoint.init or None)
    logging.info("loaded %s (%.1fM params) in %.1fs", origin,
                 load.num_params(model.params) / 1e6, time.time() - t0)  # fmt: skip
    system = config.generate.system_prompt
    conversations = [
        ([{"role": "system", "content": system}] if system else [])
        + [{"role": "user", "content": p}]
        for p in read_prompts(config)
    ]
    t0 = time.time()
    results = chat_completions(
        model,
        conversations,
        sampler_config(config.generate, model.tokenizer),
        jax.random.key(config.seed),
        batch_size=config.generate.batch_size,
    )
    elapsed = time.time() - t0
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "generations.jsonl")
    files.write_jsonl(
        path, ({"prompt": c[-1]["content"], **res} for c, res in zip(conversations, results))
    )
    for conv, res in zip(conversations, results):
        print(f"\n>>> {conv[-1]['content']}\n{res['answer']}  [{res['finish_reason']}]")
    tokens = sum(r["num_tokens"] for r in results)
    print(f"\n{len(results)} answers, {tokens} tokens in {elapsed:.1f}s -> {path}")
