"""LoRA: adapters inside the model (one forward for training, prefill and decode), training of
the adapters only with a frozen base shared by reference and judge, checkpoints and export."""

import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalign_jax import sampler, sharding
from qalign_jax.models import decode, llama, lora

TINY = llama.get_preset("tiny")
LORA = lora.LoraConfig(rank=4, alpha=8.0)
_forward = jax.jit(llama.forward, static_argnums=0)


def padded_batch(vocab, seed=0):
    """Two rows of 12, the second left-padded by 3: tokens, mask, positions."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(2, 12)).astype(np.int32)
    mask = np.ones((2, 12), np.int32)
    mask[1, :3] = 0
    return tokens, mask, np.asarray(llama.positions_from_mask(jnp.asarray(mask)))


def lora_model(cfg=TINY, lora_cfg=LORA, seed=0, b_scale=0.0):
    """(lora cfg, graphdef, adapters, base): a plain model's weights and fresh adapters; with
    `b_scale` > 0 the B factors are random too (a trained-looking adapter)."""
    base = llama.init_params(cfg, seed)
    lcfg = cfg.replace(lora=lora_cfg)
    graphdef, _ = llama.abstract_model(lcfg)
    adapters = llama.init_adapters(lcfg, seed + 1)
    if b_scale:
        keys = iter(jax.random.split(jax.random.key(seed + 2), 64))
        adapters = jax.tree.map_with_path(
            lambda path, x: b_scale * jax.random.normal(next(keys), x.shape)
            if "lora_b" in jax.tree_util.keystr(path) else x,
            adapters,
        )  # fmt: skip
    return lcfg, graphdef, adapters, base


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="rank=0"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="choose among"):
        lora.LoraConfig(rank=2, targets=("qproj",))
    section = types.SimpleNamespace(rank=0, alpha=16.0, targets="q_proj,v_proj")
    assert lora.from_config(section) is None
    section.rank = 8
    got = lora.from_config(section)
    assert got.targets == ("q_proj", "v_proj") and got.scale == 2.0


def test_adapters_shapes_axes_and_count():
    """A [*in, r] and B [r, *out] per targeted projection, stacked over layers; the rank axis is
    unsharded and the others follow the base kernel's axes; the base keeps the plain paths."""
    lcfg = TINY.replace(lora=lora.LoraConfig(rank=4, targets=("q_proj", "o_proj", "down_proj")))
    _, abstract = llama.abstract_model(lcfg)
    adapters, base = lora.split(abstract)
    attn = adapters["layers"]["self_attn"]
    assert attn["q_proj"]["lora_a"].get_value().shape == (2, 64, 4)
    assert attn["q_proj"]["lora_b"].get_value().shape == (2, 4, 4, 16)
    assert attn["o_proj"]["lora_a"].get_value().shape == (2, 4, 16, 4)  # in = (N, H)
    assert attn["o_proj"]["lora_b"].get_metadata()["logical_axes"] == ("layers", None, "embed")
    assert "k_proj" not in attn and "gate_proj" not in adapters["layers"]["mlp"]
    # tiny: L=2, D=64, N*H=64, F=128: q 4*(64+64), o 4*(64+64), down 4*(128+64), per layer
    assert lcfg.num_lora_params == 2 * 4 * (128 + 128 + 192) == 3584
    assert sum(x.size for x in jax.tree.leaves(adapters)) == lcfg.num_lora_params
    plain = llama.abstract_model(TINY)[1]
    assert jax.tree.structure(base) == jax.tree.structure(plain)
    assert llama.get_preset("llama3_1_8b").replace(lora=lora.LoraConfig(16)).num_lora_params == (
        41_943_040
    )  # 32 layers x 16 x (4096+4096 + 2*(4096+1024) + 4096+4096 + 3*(4096+14336))


def test_zero_b_equals_the_base_model_exactly():
    lcfg, graphdef, adapters, base = lora_model()
    tokens, _, positions = padded_batch(TINY.vocab_size)
    plain, _ = _forward(llama.abstract_model(TINY)[0], base, tokens, positions)
    adapted, _ = _forward(graphdef, lora.combine(adapters, base), tokens, positions)
    assert np.abs(np.asarray(adapters["layers"]["self_attn"]["q_proj"]["lora_a"][...])).max() > 0
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))


def test_merged_weights_equal_the_unmerged_forward():
    """W + (alpha / r) A @ B in the plain model == the adapters applied in the forward."""
    lcfg, graphdef, adapters, base = lora_model(b_scale=0.5)
    params = lora.combine(adapters, base)
    tokens, mask, positions = padded_batch(TINY.vocab_size)
    adapted, _ = _forward(graphdef, params, tokens, positions)
    merged = jax.jit(llama.merge_adapters, static_argnums=0)(graphdef, params)
    plain, _ = _forward(llama.abstract_model(TINY)[0], merged, tokens, positions)
    base_logits, _ = _forward(llama.abstract_model(TINY)[0], base, tokens, positions)
    real = mask > 0
    assert np.abs(np.asarray(adapted) - np.asarray(base_logits))[real].max() > 1e-2  # it acts
    np.testing.assert_allclose(np.asarray(plain)[real], np.asarray(adapted)[real], atol=2e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_and_decode_with_adapters_equal_the_training_forward(dtype):
    """The one forward with adapters: prefill (the model with its cache) and the decode step
    (adapters folded into the decode layout) against the training forward.

    bf16 tolerance: decode rounds W + scale * A @ B to bf16 once, the training forward rounds
    W and the low-rank path separately; on this model both are ~5e-3 from the float32 forward
    (measured: 0.0050 and 0.0069 at B ~ N(0, 0.05)), so they may differ by their sum.
    """
    cfg = TINY.replace(tie_word_embeddings=False, dtype=dtype)
    lcfg, graphdef, adapters, base = lora_model(cfg, b_scale=0.05)
    params = lora.combine(adapters, base)
    tokens, mask, positions = padded_batch(cfg.vocab_size)
    full = np.asarray(_forward(graphdef, params, tokens, positions)[0])
    atol = {"float32": 1e-5, "bfloat16": 1.5e-2}[dtype]
    cache = llama.init_cache(lcfg, batch_size=2, max_len=16)
    pre, cache = _forward(graphdef, params, tokens[:, :8], positions[:, :8], cache)
    real = mask[:, :8] > 0
    np.testing.assert_allclose(np.asarray(pre)[real], full[:, :8][real], atol=atol, rtol=0)
    weights = jax.jit(decode.prepare_weights, static_argnums=0)(graphdef, params)
    dcache = decode.to_decode_cache(cache)
    for t in range(8, 12):
        logits, dcache = jax.jit(decode.decode_step, static_argnums=0)(
            lcfg, weights, tokens[:, t], positions[:, t], dcache
        )
        np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=atol, rtol=0)


def test_sampler_with_adapters_matches_the_model_forward():
    """Greedy sampling of a LoRA policy: every token is the argmax of the training forward and
    its logprob matches; and the adapters change what is sampled."""
    lcfg, graphdef, adapters, base = lora_model(b_scale=2.0)
    scale = jax.tree.map(lambda x: 3.0 * x, base)  # peaked distributions (see test_sampler)
    params = lora.combine(adapters, scale)
    policy = types.SimpleNamespace(cfg=lcfg, graphdef=graphdef, params=params)
    plain = types.SimpleNamespace(cfg=TINY, graphdef=llama.abstract_model(TINY)[0], params=scale)
    prompts = [[5, 9, 200, 31], [7, 8]]
    greedy = sampler.SamplerConfig(max_new_tokens=6, temperature=0.0)
    out = sampler.generate(policy, prompts, greedy, jax.random.key(0))
    for prompt, toks, logp in zip(prompts, out.tokens, out.logprobs):
        seq = np.asarray([prompt + toks], np.int32)
        logits, _ = _forward(graphdef, params, seq, np.arange(seq.shape[1])[None])
        ref = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))[len(prompt) - 1 : -1]
        assert toks == np.argmax(ref, axis=-1).tolist()
        np.testing.assert_allclose(logp, ref[np.arange(len(toks)), toks], atol=1e-4)
    base_out = sampler.generate(plain, prompts, greedy, jax.random.key(0))
    assert base_out.tokens != out.tokens


def test_adapters_shard_like_their_base_matrices():
    mesh = sharding.make_mesh((1, 2, 4))
    lcfg = TINY.replace(lora=LORA)
    _, abstract = llama.abstract_model(lcfg)
    sh = sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    q = sh["layers"]["self_attn"]["q_proj"]
    kernel_spec = q["kernel"].get_value().spec
    assert q["lora_a"].get_value().spec[:2] == kernel_spec[:2]  # layers, embed
    assert q["lora_a"].get_value().spec[2] is None  # the rank axis
    assert q["lora_b"].get_value().spec[2:] == kernel_spec[2:]  # heads, head_dim


# ---------------------------------------------------------------------------------------------
# Training: adapters only, on a frozen base.


def test_steps_move_only_the_adapters_and_the_base_survives():
    """The SFT step with LoRA: the state holds adapters and their Adam moments only; B moves
    off zero at the first step, A from the second, and the frozen base is bit-identical and still alive
    (not donated: the reference and the judge read the same arrays)."""
    from qalign_jax import config as base_config
    from qalign_jax import train_state
    from qalign_jax.loops import sft
    from tests.test_sft import random_batch

    mesh = sharding.make_mesh((1, 2, 4))
    rules = sharding.DEFAULT_RULES
    lcfg, graphdef, _, _ = lora_model()
    _, abstract = llama.abstract_model(lcfg)
    trained_abs, frozen_abs = train_state.split_trainable(abstract)
    assert all(
        isinstance(v, lora.LoraParam) for v in jax.tree.leaves(
            trained_abs, is_leaf=lambda x: isinstance(x, lora.nnx.Variable))
    )  # fmt: skip
    opt = base_config.base_config().optimizer
    opt.warmup_ratio = 0.0
    tx, schedule = train_state.make_optimizer(opt, total_steps=10)
    _, state_sh = train_state.state_shardings(trained_abs, tx, mesh, rules)
    frozen_sh = sharding.param_shardings(frozen_abs, mesh, rules)
    frozen = jax.device_put(llama.init_params(TINY, 0), frozen_sh)
    before = jax.device_get(frozen)
    adapters = llama.init_adapters(lcfg, 1, state_sh.params)
    a0 = jax.device_get(adapters)
    state = train_state.jit_init_state(tx, state_sh)(adapters)
    opt_leaves = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert opt_leaves == 2 * lcfg.num_lora_params + 2  # mu, nu and two counters
    step = sft.jit_train_step(graphdef, tx, schedule, state_sh, mesh, rules, frozen_sh)
    batch = random_batch(0, accum=2, rows=8, seq_len=16, vocab=TINY.vocab_size)
    a_q = a0["layers"]["self_attn"]["q_proj"]["lora_a"][...]
    for i in range(2):
        state, m = step(state, train_state.put_batch(batch, sft.batch_shardings(mesh)), frozen)
        assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
        q = jax.device_get(state.params)["layers"]["self_attn"]["q_proj"]
        assert np.abs(q["lora_b"][...]).max() > 0  # B left zero at the first step
        # dL/dA = x^T (dL/dy) B^T is zero while B is: A moves from the second step on.
        assert np.allclose(q["lora_a"][...], a_q) == (i == 0)
    for x, y in zip(jax.tree.leaves(jax.device_get(frozen)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(x, y)


def sft_lora_config(num_steps=4):
    from tests.test_sft import load_config

    config = load_config("smoke")
    config.model.lora.rank = 4
    config.model.lora.alpha = 8.0
    config.sft.num_steps = num_steps
    config.sft.eval_every = 0
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    return config


def test_sft_with_lora_resumes_exactly_and_exports_merged_weights(tmp_path):
    """4 LoRA SFT steps straight vs resumed from the checkpoint at step 2: the same
    metrics and the same exported (merged) weights; the checkpoint holds the adapters only
    (and says so), and the export equals the LoRA forward of the saved adapters."""
    from qalign_jax import checkpoint, metrics
    from qalign_jax.loops import sft
    from qalign_jax.models import load

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    sft.run(sft_lora_config(4), straight)
    # As if killed after the checkpoint at step 2: its state, none of the rest.
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "ckpt", "4"))
    shutil.rmtree(os.path.join(resumed, "hf"))
    sft.run(sft_lora_config(4), resumed)
    rows = [r for r in metrics.read_metrics(straight) if "train/loss" in r]
    again = [r for r in metrics.read_metrics(resumed) if "train/loss" in r]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    drop = ("time", "time/step_s", "train/tokens_per_s")
    for a, b in zip(rows, again, strict=True):
        assert {k: v for k, v in a.items() if k not in drop} == {
            k: v for k, v in b.items() if k not in drop
        }
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    start = metrics.read_metrics(straight)[0]
    assert start["run/num_trained_params"] < start["run/num_params"] / 10
    assert os.path.isfile(os.path.join(straight, "adapter", "adapter_model.safetensors"))
    export = os.path.join("hf", "model.safetensors")
    with (
        open(os.path.join(straight, export), "rb") as f,
        open(os.path.join(resumed, export), "rb") as g,
    ):
        assert f.read() == g.read()

    # The checkpoint: adapters only, with the LoRA settings and the base's source in meta.
    base = load.load_model("random:tiny", tokenizer_source="embedded", seed=0)
    lcfg = base.cfg.replace(lora=LORA)
    graphdef, abstract = llama.abstract_model(lcfg)
    adapters_abs, _ = lora.split(abstract)
    mesh = base.mesh
    abstract_sh = checkpoint.with_shardings(
        adapters_abs, sharding.param_shardings(adapters_abs, mesh, sharding.DEFAULT_RULES)
    )
    adapters, step = checkpoint.restore_params(straight, abstract_sh)
    assert step == 4
    meta = checkpoint.read_meta(straight)
    assert meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": list(lora.TARGETS),
                            "base": "random:tiny"}  # fmt: skip
    with pytest.raises(ValueError, match="LoRA adapters only"):  # not a full model
        checkpoint.restore_params(straight, checkpoint.with_shardings(
            llama.abstract_model(base.cfg)[1], jax.tree.map(lambda x: x.sharding, base.params)
        ))  # fmt: skip

    exported = load.load_model(os.path.join(straight, "hf"), mesh=mesh)
    tokens, mask, positions = padded_batch(base.cfg.vocab_size)
    ours, _ = _forward(graphdef, lora.combine(adapters, base.params), tokens, positions)
    theirs, _ = _forward(exported.graphdef, exported.params, tokens, positions)
    plain, _ = _forward(base.graphdef, base.params, tokens, positions)
    real = mask > 0
    assert np.abs(np.asarray(ours) - np.asarray(plain))[real].max() > 1e-3  # it trained
    np.testing.assert_allclose(np.asarray(theirs)[real], np.asarray(ours)[real], atol=2e-5)


def grpo_lora_config():
    from tests.test_grpo import smoke_config

    config = smoke_config()
    config.model.lora.rank = 4
    config.model.lora.alpha = 8.0
    config.grpo.num_steps = 2
    config.grpo.kl_beta = 0.04
    config.grpo.rollouts_every = 0
    config.optimizer.lr = 1e-2  # move the adapters visibly in two steps
    return config


def test_grpo_with_lora_trains_adapters_and_resumes_exactly(tmp_path):
    """Two GRPO steps with LoRA on the smoke config: at step 1 the policy is the reference
    (B = 0), so KL is exactly 0 and the ratio exactly 1; the run resumed from its step-1
    checkpoint exports the same merged weights as the straight run."""
    from qalign_jax import metrics
    from qalign_jax.loops import grpo

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    grpo.run(grpo_lora_config(), straight)
    rows = [r for r in metrics.read_metrics(straight) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train/kl"] == 0.0 and rows[0]["train/ratio_mean"] == 1.0
    assert rows[1]["train/kl"] > 0.0  # the adapters moved the policy off its base
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "ckpt", "2"))
    shutil.rmtree(os.path.join(resumed, "hf"))
    grpo.run(grpo_lora_config(), resumed)
    again = [r for r in metrics.read_metrics(resumed) if "train/loss" in r]
    assert again[-1]["train/loss"] == rows[-1]["train/loss"]
    export = os.path.join("hf", "model.safetensors")
    with open(os.path.join(straight, export), "rb") as f:
        with open(os.path.join(resumed, export), "rb") as g:
            assert f.read() == g.read()


def test_dpo_with_lora_starts_at_the_reference_and_learns(tmp_path):
    """DPO's smoke run with LoRA: fresh adapters (B = 0) make the policy exactly the reference,
    so the first loss is log 2; the adapters alone then lower it."""
    import math

    from qalign_jax import metrics, train
    from tests.test_dpo import smoke_config

    config = smoke_config()
    config.model.lora.rank = 4
    config.model.lora.alpha = 8.0
    config.optimizer.lr = 1e-2
    train.run(config, str(tmp_path / "run"))
    rows = [r for r in metrics.read_metrics(str(tmp_path / "run")) if "train/loss" in r]
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


# ---------------------------------------------------------------------------------------------
# PEFT adapter directories.


def test_peft_export_loads_in_transformers_with_the_same_logits(tmp_path):
    """Our adapters as a PEFT directory on the exported base: `peft.PeftModel` over
    `transformers.LlamaForCausalLM` gives our LoRA forward's logits; reading the directory
    back gives the same adapters."""
    torch = pytest.importorskip("torch", reason="torch is a test-only dependency")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip(
        "peft", reason="peft is not installed (test-only: pip install --no-deps peft)"
    )
    from qalign_jax.models import hf

    cfg = TINY.replace(tie_word_embeddings=False)
    lcfg, graphdef, adapters, base = lora_model(
        cfg, lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "up_proj")),
        b_scale=0.5,
    )  # fmt: skip
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    hf.export_hf(base_dir, cfg, base)
    hf.export_peft(adapter_dir, lcfg, adapters, base_model=base_dir)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        assert '"r": 4' in f.read()

    tokens, mask, positions = padded_batch(cfg.vocab_size)
    ours = np.asarray(_forward(graphdef, lora.combine(adapters, base), tokens, positions)[0])
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        theirs = model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(np.maximum(positions, 0).astype(np.int64)),
        ).logits.numpy()
    real = mask > 0
    plain = np.asarray(_forward(llama.abstract_model(cfg)[0], base, tokens, positions)[0])
    assert np.abs(ours - plain)[real].max() > 1e-2  # the adapters act
    np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4, rtol=0)

    assert hf.read_peft_config(adapter_dir) == lcfg.lora
    _, abstract = llama.abstract_model(lcfg)
    mesh = sharding.make_mesh((1, 8, 1))
    shardings = sharding.param_shardings(lora.split(abstract)[0], mesh, sharding.DEFAULT_RULES)
    back = hf.load_peft_adapters(adapter_dir, lcfg, shardings)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# The planner.


def test_plan_counts_adapters_and_no_frozen_copies():
    """LoRA rows by hand, and the plan against XLA's memory analysis of the LoRA SFT step:
    arguments = frozen base + adapters + Adam + batch (within 1%); temporaries = the adapters'
    gradients + activations (within 10%, as tests/test_plan.py; measured 9%: the low-rank paths
    add [tokens, r] intermediates the fit does not know)."""
    import jax.numpy as jnp

    from qalign_jax import checkpoint, plan, train_state
    from qalign_jax.loops import sft
    from tests.test_plan import HELD_OUT, sft_config

    config = sft_config(16, 192, (1, 8, 1))
    cfg = HELD_OUT.replace(lora=lora.LoraConfig(rank=8))
    p = plan.plan(config, cfg, num_devices=8)
    assert p.rows["optimizer (Adam mu, nu)"] == 2 * p.rows["LoRA adapters (f32)"]
    assert p.rows["LoRA adapters (f32)"] < cfg.num_lora_params * 4  # sharded like W, over fsdp
    assert (
        p.rows["params"]
        == plan.param_elements_per_device(
            HELD_OUT, plan.resolve_mesh((1, 8, 1), 8), sharding.DEFAULT_RULES
        )
        * 4
    )  # the base, once

    mesh = sharding.make_mesh((1, 8, 1))
    rules = sharding.DEFAULT_RULES
    tx, schedule = train_state.make_optimizer(config.optimizer, 100)
    graphdef, abstract = llama.abstract_model(cfg)
    trained, frozen = train_state.split_trainable(abstract)
    abstract_state, state_sh = train_state.state_shardings(trained, tx, mesh, rules)
    frozen_sh = sharding.param_shardings(frozen, mesh, rules)
    abstract_frozen = checkpoint.with_shardings(frozen, frozen_sh)
    step = sft.jit_train_step(graphdef, tx, schedule, state_sh, mesh, rules, frozen_sh)
    bsh = sft.batch_shardings(mesh)
    batch = {
        k: jax.ShapeDtypeStruct((1, 16, 192), jnp.float32 if k == "loss_mask" else jnp.int32,
                                sharding=bsh[k])
        for k in sft.BATCH_KEYS
    }  # fmt: skip
    ma = step.lower(abstract_state, batch, abstract_frozen).compile().memory_analysis()
    args = p.rows["params"] + p.rows["LoRA adapters (f32)"] + p.rows["optimizer (Adam mu, nu)"]
    args += p.rows["batch"]
    temp = p.rows["gradients + step temporaries (f32)"] + p.rows["activations (remat none)"]
    assert args == pytest.approx(ma.argument_size_in_bytes, rel=0.01)
    assert temp == pytest.approx(ma.temp_size_in_bytes, rel=0.10)


def test_8b_lora_config_fits_one_80gb_gpu():
    """configs/qalign_grpo_llama3_8b_lora.py on one H100 (the docstring's numbers)."""
    import importlib.util

    from qalign_jax import plan

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                        "qalign_grpo_llama3_8b_lora.py")  # fmt: skip
    spec = importlib.util.spec_from_file_location("cfg8b_lora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    m = config.model
    cfg = llama.get_preset("llama3_1_8b").replace(
        param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, logits_chunk=m.logits_chunk,
        lora=lora.from_config(m.lora),
    )  # fmt: skip
    p = plan.plan(config, cfg, num_devices=1, accelerator="h100")
    assert p.fits and p.peak / 1e9 == pytest.approx(55.71, abs=0.01)
    assert not any(k.startswith(("frozen", "judge copy")) for k in p.rows)  # one base copy
    assert p.rows["optimizer (Adam mu, nu)"] == 2 * 4 * cfg.num_lora_params
    full = plan.plan(config, cfg.replace(lora=None, param_dtype="float32"), 1, "h100")
    assert not full.fits
    with pytest.raises(ValueError, match="unknown config argument"):
        module.get_config("fast")


def test_aot_compiles_the_lora_grpo_programs():
    """`qalign_jax.aot` with model.lora: the step takes the frozen base beside the adapter
    state, the reference and judge run the base architecture, the sampler the adapted one."""
    from qalign_jax import aot, plan
    from tests.test_grpo import smoke_config

    config = smoke_config()
    config.model.lora.rank = 4
    cfg = plan.model_config(config, "tiny")
    assert cfg.lora == lora.LoraConfig(4)
    mesh = sharding.make_mesh(config.mesh.shape)
    out = aot.compile_grpo(config, cfg, mesh, compile_={"grpo_step", "ref_logprobs"})
    state_in = out["grpo_step"].input_shardings[0][0]
    leaves = jax.tree.leaves(state_in.params, is_leaf=lambda x: hasattr(x, "spec"))
    assert len(leaves) == 2 * len(lora.TARGETS)  # A and B per target: adapters only
    assert {"sampler_prefill", "sampler_decode", "judge_prefill", "judge_score"} <= set(out)


def peft_dir_for_smoke(path, rank=4):
    """A PEFT adapter directory with nonzero B for the smoke configs' model (random:tiny sized
    to the embedded tokenizer): adapters that change the policy."""
    from qalign_jax.models import hf

    cfg = TINY.replace(vocab_size=49152)
    lcfg, _, adapters, _ = lora_model(cfg, lora.LoraConfig(rank=rank, alpha=8.0), b_scale=0.05)
    hf.export_peft(str(path), lcfg, adapters)
    return str(path)


def test_lora_init_starts_from_a_peft_directory_and_is_the_reference(tmp_path):
    """model.lora.init: GRPO and DPO start from a PEFT directory's adapters, and the KL
    reference is the policy at the start (base + those adapters): KL exactly 0 and DPO's loss
    exactly log 2 at the first step, though the adapters are not zero. Mismatched settings are
    an error that says what to set."""
    import math

    from qalign_jax import metrics, train
    from qalign_jax.loops import grpo
    from tests.test_dpo import smoke_config as dpo_smoke

    adapter_dir = peft_dir_for_smoke(tmp_path / "adapter")
    config = grpo_lora_config()
    config.model.lora.init = adapter_dir
    config.grpo.num_steps = 1
    grpo.run(config, str(tmp_path / "grpo"))
    (row,) = [r for r in metrics.read_metrics(str(tmp_path / "grpo")) if "train/loss" in r]
    assert row["train/kl"] == 0.0 and row["train/ratio_mean"] == 1.0

    config = dpo_smoke()
    config.model.lora.rank, config.model.lora.alpha = 4, 8.0
    config.model.lora.init = adapter_dir
    config.dpo.num_steps = 1
    train.run(config, str(tmp_path / "dpo"))
    (row,) = [r for r in metrics.read_metrics(str(tmp_path / "dpo")) if "train/loss" in r]
    assert row["train/loss"] == pytest.approx(math.log(2), abs=1e-6)

    config.model.lora.rank = 8
    with pytest.raises(ValueError, match="set model.lora.rank/alpha/targets to match"):
        train.run(config, str(tmp_path / "dpo8"))
