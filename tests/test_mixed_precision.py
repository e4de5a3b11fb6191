"""Mixed precision in the train steps: every matmul in the compute dtype, the weights cast once
per step (`train_state.compute_copy`), and the float32-output einsum's bfloat16 backward."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalign_jax import config as base
from qalign_jax import plan, sharding, train_state
from qalign_jax.loops import grpo, sft
from qalign_jax.models import llama
from tests.test_sft import TINY, assert_trees_close, load_config, random_batch

MIXED = TINY.replace(param_dtype="float32", dtype="bfloat16")


def sub_jaxprs(eqn):
    for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(sub, "eqns"):
                yield sub
            elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                yield sub.jaxpr


def walk(jaxpr, scans: int = 0):
    """(equation, how many scans enclose it) for every equation, nested ones included."""
    for eqn in jaxpr.eqns:
        yield eqn, scans
        for sub in sub_jaxprs(eqn):
            yield from walk(sub, scans + (eqn.primitive.name == "scan"))


def step_jaxpr(loop: str, compute_dtype, cfg=MIXED):
    """The jaxpr of one SFT or GRPO step of `cfg` (2 micro-batches), on one device."""
    graphdef, abstract = llama.abstract_model(cfg)
    tx, schedule = train_state.make_optimizer(base.base_config().optimizer, total_steps=10)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state, state_sh = train_state.state_shardings(abstract, tx, mesh, sharding.DEFAULT_RULES)
    kw = dict(graphdef=graphdef, tx=tx, schedule=schedule, param_sh=state_sh.params,
              compute_dtype=compute_dtype)  # fmt: skip
    if loop == "sft":
        step, keys = functools.partial(sft.train_step, **kw), sft.BATCH_KEYS
    else:
        g = load_config(None, "qalign_grpo_smol.py").grpo
        step, keys = functools.partial(grpo.grpo_step, grpo_cfg=g, **kw), grpo.BATCH_KEYS
    ints = ("tokens", "positions", "span_start", "targets")
    batch = {
        k: jax.ShapeDtypeStruct((2, 4) + (() if k in ("span_start", "advantages") else (32,)),
                                jnp.int32 if k in ints else jnp.float32)
        for k in keys
    }  # fmt: skip
    with sharding.use_rules(mesh, sharding.DEFAULT_RULES):
        return jax.make_jaxpr(step)(state, batch), abstract


@pytest.mark.parametrize("loop", ["sft", "grpo"])
def test_every_matmul_of_the_step_runs_in_the_compute_dtype(loop):
    """With bfloat16 compute every dot_general of forward and backward takes bfloat16
    operands: the float32-output einsums (logits, attention scores) cast their cotangent."""
    jaxpr, _ = step_jaxpr(loop, "bfloat16")
    dots = collections.Counter(
        tuple(str(v.aval.dtype) for v in eqn.invars)
        for eqn, _ in walk(jaxpr.jaxpr)
        if eqn.primitive.name == "dot_general"
    )
    assert sum(dots.values()) >= 20  # every projection, attention and the head, both ways
    assert set(dots) == {("bfloat16", "bfloat16")}, dots


def weight_casts_in_loops(jaxpr, abstract) -> int:
    """float32 -> bfloat16 casts of weight-shaped arrays (one layer's slice of a stacked block
    weight, or an unstacked weight) inside a scan: casts repeated per micro-batch and layer."""
    shapes = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        stacked = any(getattr(k, "key", None) == "layers" for k in path)
        if leaf.ndim >= 2:
            shapes.add(tuple(leaf.shape[1:] if stacked else leaf.shape))
    return sum(
        1
        for eqn, scans in walk(jaxpr.jaxpr)
        if eqn.primitive.name == "convert_element_type" and scans > 0
        and eqn.invars[0].aval.dtype == jnp.float32
        and eqn.outvars[0].aval.dtype == jnp.bfloat16
        and tuple(eqn.invars[0].aval.shape) in shapes
    )  # fmt: skip


def test_compute_copy_casts_the_weights_once_per_step():
    untied = MIXED.replace(tie_word_embeddings=False)
    per_use, abstract = step_jaxpr("sft", None, untied)
    once, _ = step_jaxpr("sft", "bfloat16", untied)
    # Per use: q, k, v, o, gate, up, down inside the layer scan, and the head.
    assert weight_casts_in_loops(per_use, abstract) >= 8
    assert weight_casts_in_loops(once, abstract) == 0
    # Tied: the head is the embedding table, kept as stored (its gradient sums in float32).
    tied, abstract = step_jaxpr("sft", "bfloat16", MIXED)
    assert weight_casts_in_loops(tied, abstract) == 1


def test_compute_copy_gives_the_same_update():
    """One SFT step of 2 micro-batches, float32 weights and bfloat16 compute: casting once per
    step and casting at each use give the same metrics and weights."""
    graphdef, abstract = llama.abstract_model(MIXED)
    tx, schedule = train_state.make_optimizer(base.base_config().optimizer, total_steps=10)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, state_sh = train_state.state_shardings(abstract, tx, mesh, sharding.DEFAULT_RULES)
    params = jax.device_get(llama.init_params(MIXED, seed=0))
    batch = random_batch(0, accum=2, rows=4, seq_len=32, vocab=MIXED.vocab_size)
    out = {}
    for dtype in (None, "bfloat16"):
        state = train_state.init_state(jax.device_put(params, state_sh.params), tx)
        step = sft.jit_train_step(graphdef, tx, schedule, state_sh, mesh, sharding.DEFAULT_RULES,
                                  compute_dtype=dtype)  # fmt: skip
        state, m = step(state, train_state.put_batch(batch, sft.batch_shardings(mesh)))
        out[dtype] = jax.device_get((state.params, m))
    (p0, m0), (p1, m1) = out[None], out["bfloat16"]
    assert m0["loss"] == pytest.approx(m1["loss"], rel=1e-6)
    assert m0["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-3)
    assert_trees_close(p0, p1, atol=1e-6)


def test_compute_copy_leaves_embedding_and_narrow_leaves():
    params = {"embed_tokens": {"embedding": jnp.ones((4, 2))},
              "layers": {"q": jnp.ones((2, 2)), "n": jnp.ones((2,), jnp.bfloat16),
                         "i": jnp.ones((2,), jnp.int32)}}  # fmt: skip
    out = train_state.compute_copy(params, "bfloat16")
    assert out["embed_tokens"]["embedding"].dtype == jnp.float32
    assert out["layers"]["q"].dtype == jnp.bfloat16
    assert out["layers"]["i"].dtype == jnp.int32
    assert train_state.compute_copy(params, None) is params
    assert train_state.compute_copy(None, "bfloat16") is None


def test_einsum_f32_gradients():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(7, 5)).astype(np.float32)

    def loss(einsum, a, b):
        return jnp.sum(jnp.sin(einsum("TD,VD->TV", a, b)))

    plain = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    want = jax.grad(functools.partial(loss, plain), argnums=(0, 1))(a, b)
    got = jax.grad(functools.partial(loss, llama.einsum_f32), argnums=(0, 1))(a, b)
    for w, g in zip(want, got):  # float32 operands: the same computation
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    assert llama.einsum_f32("TD,VD->TV", a16, b16).dtype == jnp.float32
    got16 = jax.grad(functools.partial(loss, llama.einsum_f32), argnums=(0, 1))(a16, b16)
    for w, g in zip(want, got16):  # bfloat16 gradients of bfloat16 operands, near float32's
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0.05, atol=0.05)


def test_plan_counts_the_compute_copy():
    config = load_config(None, "sft_prime_llama3_8b.py")
    cfg = llama.get_preset("llama3_1_8b").replace(param_dtype="float32", dtype="bfloat16")
    p = plan.plan(config, cfg, num_devices=32)
    assert p.rows["compute copy of the weights"] == p.rows["params"] / 2
    config.model.compute_copy = False
    assert "compute copy of the weights" not in plan.plan(config, cfg, num_devices=32).rows
    config.model.compute_copy = True
    same = plan.plan(config, cfg.replace(param_dtype="bfloat16"), num_devices=32)
    assert "compute copy of the weights" not in same.rows


def test_adam_first_moment_dtype():
    opt = base.base_config().optimizer
    params = {"w": jnp.ones((4, 3)), "norm": jnp.ones((3,))}
    opt.mu_dtype = "bfloat16"
    tx, _ = train_state.make_optimizer(opt, total_steps=10)
    state = tx.init(params)
    adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if
                hasattr(s, "mu"))  # fmt: skip
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))

    config = load_config(None, "sft_prime_llama3_8b.py")
    cfg = llama.get_preset("llama3_1_8b").replace(param_dtype="float32", dtype="bfloat16")
    full = plan.plan(config, cfg, num_devices=32).rows["optimizer (Adam mu, nu)"]
    config.optimizer.mu_dtype = "bfloat16"
    assert plan.plan(config, cfg, num_devices=32).rows["optimizer (Adam mu, nu)"] == 0.75 * full

    opt.mu_dtype = "int8"
    with pytest.raises(ValueError, match="optimizer.mu_dtype='int8'"):
        train_state.make_optimizer(opt, total_steps=10)
