"""Sampler: token-exact against the full (uncached) forward, stop rules, continuation, sharding.

A tiny random model whose weights are scaled up so that its distributions are peaked and its
greedy outputs vary (plain N(0, 0.02) weights repeat one token forever).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalign_jax import sampler, sharding
from qalign_jax.models import llama

CFG = llama.get_preset("tiny")
GREEDY = sampler.SamplerConfig(max_new_tokens=8, temperature=0.0)
SAMPLED = sampler.SamplerConfig(max_new_tokens=8, temperature=1.0)


@pytest.fixture(scope="module")
def model():
    graphdef, _ = llama.abstract_model(CFG)
    params = jax.tree.map(lambda x: 3.0 * x, llama.init_params(CFG, seed=0))
    return types.SimpleNamespace(cfg=CFG, graphdef=graphdef, params=params)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in (5, 11, 2)]


_forward = jax.jit(llama.forward, static_argnums=0)


def reference_log_probs(model, seqs, width=64):
    """log_softmax of the uncached forward at every position of each sequence: [len, V] each.

    One jitted call over the right-padded batch (causal: position t sees only tokens <= t).
    """
    tokens = np.zeros((len(seqs), width), np.int32)
    positions = np.full((len(seqs), width), -1, np.int32)
    for i, seq in enumerate(seqs):
        tokens[i, : len(seq)] = seq
        positions[i, : len(seq)] = np.arange(len(seq))
    logits, _ = _forward(model.graphdef, model.params, tokens, positions)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return [logp[i, : len(seq)] for i, seq in enumerate(seqs)]


def check_against_full_forward(model, prompts, result, greedy):
    refs = reference_log_probs(model, [p + t for p, t in zip(prompts, result.tokens)])
    for prompt, tokens, logprobs, ref in zip(prompts, result.tokens, result.logprobs, refs):
        at = ref[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]  # predicts each new token
        if greedy:
            assert tokens == np.argmax(at, axis=-1).tolist()
        np.testing.assert_allclose(logprobs, at[np.arange(len(tokens)), tokens], atol=1e-5)


def test_greedy_equals_argmax_of_full_forward(model, prompts):
    result = sampler.generate(model, prompts, GREEDY, jax.random.key(0))
    assert [len(t) for t in result.tokens] == [8, 8, 8]
    assert result.finish_reasons == ["length"] * 3
    assert len({tuple(t) for t in result.tokens}) == 3  # the rows do differ
    check_against_full_forward(model, prompts, result, greedy=True)


def test_sampled_logprobs_equal_full_forward_and_seed_is_deterministic(model, prompts):
    a = sampler.generate(model, prompts, SAMPLED, jax.random.key(1))
    check_against_full_forward(model, prompts, a, greedy=False)
    b = sampler.generate(model, prompts, SAMPLED, jax.random.key(1))
    assert a.tokens == b.tokens
    np.testing.assert_array_equal(np.concatenate(a.logprobs), np.concatenate(b.logprobs))
    c = sampler.generate(model, prompts, SAMPLED, jax.random.key(2))
    assert c.tokens != a.tokens


def test_eos_and_stop_sequences_stop_rows_independently(model, prompts):
    free = sampler.generate(model, prompts, GREEDY, jax.random.key(0)).tokens
    eos = free[0][3]  # row 0 first emits it at step 3 or earlier
    seq = tuple(free[1][2:4])  # row 1 emits it ending at step 3 or earlier
    cfg = sampler.SamplerConfig(max_new_tokens=8, temperature=0.0, stop_ids=(eos,),
                                stop_sequences=(seq, (CFG.vocab_size - 1,) * 7))  # fmt: skip
    out = sampler.generate(model, prompts, cfg, jax.random.key(0))
    for row, tokens in enumerate(out.tokens):
        # A row's tokens are its free-running greedy tokens up to the first stop.
        assert tokens == free[row][: len(tokens)]
        ends_eos = tokens[-1] == eos
        ends_seq = tuple(tokens[-len(seq) :]) == seq
        expected = "eos" if ends_eos else "stop_sequence" if ends_seq else "length"
        assert out.finish_reasons[row] == expected
        earlier = [t for t in tokens[:-1]]
        assert eos not in earlier
        assert all(tuple(earlier[i : i + 2]) != seq for i in range(len(earlier) - 1))
    assert out.finish_reasons[0] == "eos" and len(out.tokens[0]) <= 4
    assert out.finish_reasons[1] in ("eos", "stop_sequence") and len(out.tokens[1]) <= 4
    assert len(out.lengths) == 3


def test_continuation_equals_sampling_the_concatenated_prompt(model, prompts):
    cfg = sampler.SamplerConfig(max_new_tokens=6, temperature=0.0, max_cache_len=64)
    suffixes = [[7, 8, 9], [10], [11, 12, 13, 14, 15]]
    for temperature, key in ((0.0, 3), (1.0, 4)):
        cfg = sampler.SamplerConfig(max_new_tokens=6, temperature=temperature, max_cache_len=64)
        draft = sampler.generate(model, prompts, cfg, jax.random.key(0))
        keep = [6, 4, 0]  # keep all, drop the last two, drop the whole draft
        kept = [d[:k] for d, k in zip(draft.tokens, keep)]
        revised = sampler.continue_generation(
            model, draft, suffixes, cfg, jax.random.key(key), keep=keep
        )
        concatenated = [p + k + s for p, k, s in zip(prompts, kept, suffixes)]
        fresh = sampler.generate(model, concatenated, cfg, jax.random.key(key))
        assert revised.tokens == fresh.tokens
        for a, b in zip(revised.logprobs, fresh.logprobs):
            np.testing.assert_allclose(a, b, atol=1e-5)
        check_against_full_forward(model, concatenated, revised, greedy=temperature == 0)


def test_sharded_equals_unsharded(model, prompts):
    mesh = sharding.make_mesh((2, 2, 2))
    rules = sharding.DEFAULT_RULES
    shardings = sharding.param_shardings(model.params, mesh, rules)
    params = jax.device_put(model.params, shardings)
    sharded = types.SimpleNamespace(cfg=CFG, graphdef=model.graphdef, params=params, mesh=mesh,
                                    rules=rules)  # fmt: skip
    a = sampler.generate(model, prompts, SAMPLED, jax.random.key(5))
    b = sampler.generate(sharded, prompts, SAMPLED, jax.random.key(5))
    assert a.tokens == b.tokens
    for x, y in zip(a.logprobs, b.logprobs):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert b.state.cache.k.sharding.spec[1] == ("data", "fsdp")  # rows over data x fsdp
    assert b.weights.qkv[0].sharding.spec[0] == "tensor"  # kv heads over tensor


def test_compile_count_is_constant_within_a_bucket(model):
    rng = np.random.default_rng(1)
    cfg = sampler.SamplerConfig(max_new_tokens=3, temperature=0.0)
    sampler.generate(model, [rng.integers(3, 500, 9).tolist()] * 5, cfg, jax.random.key(0))
    before = sampler.num_compiles()
    for batch, length in ((6, 12), (8, 16), (5, 10)):  # batch bucket 8, prompt bucket 16
        prompts = [rng.integers(3, 500, length).tolist() for _ in range(batch)]
        sampler.generate(model, prompts, cfg, jax.random.key(batch))
    assert sampler.num_compiles() == before
    sampler.generate(model, [[5] * 17], cfg, jax.random.key(0))  # new buckets compile
    assert sampler.num_compiles() > before


# ---- the sampling functions, statistically -----------------------------------------------------

N_DRAWS = 40_000


def draw(method, logits, cfg):
    """N_DRAWS samples of one row of logits through SAMPLERS[method]; frequencies [V]."""
    u = jax.random.uniform(jax.random.key(0), (N_DRAWS,))
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N_DRAWS, len(logits)))
    tokens = jax.jit(lambda r, u: sampler.SAMPLERS[method](r, u, cfg))(rows, u)
    return np.bincount(np.asarray(tokens), minlength=len(logits)) / N_DRAWS


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


LOGITS = np.log(np.array([0.3, 0.02, 0.25, 0.0, 0.15, 0.1, 0.08, 0.05, 0.05]) + 1e-12)


def test_temperature_matches_its_distribution():
    for t in (1.0, 0.5):
        cfg = sampler.SamplerConfig(temperature=t)
        assert cfg.method == "temperature"
        expected = softmax(LOGITS / t)
        np.testing.assert_allclose(draw("temperature", LOGITS, cfg), expected, atol=0.01)


def test_top_k_and_top_p_never_emit_excluded_tokens_and_match_distributions():
    cases = [  # (config, kept token ids)
        (sampler.SamplerConfig(top_k=3), [0, 2, 4]),
        (sampler.SamplerConfig(top_p=0.6), [0, 2, 4]),  # 0.3 + 0.25 < 0.6 <= 0.7
        (sampler.SamplerConfig(top_p=0.55), [0, 2]),  # reached exactly by two tokens
        # top-p after top-k sees the renormalized 4: 0.375, 0.3125 | 0.1875 (as transformers)
        (sampler.SamplerConfig(top_k=4, top_p=0.6), [0, 2]),
        (sampler.SamplerConfig(top_k=2, top_p=0.9), [0, 2]),
    ]
    for cfg, kept in cases:
        freq = draw(cfg.method, LOGITS, cfg)
        excluded = np.setdiff1d(np.arange(len(LOGITS)), kept)
        assert freq[excluded].sum() == 0, (cfg.method, freq)
        expected = np.zeros(len(LOGITS))
        expected[kept] = softmax(LOGITS[kept])
        np.testing.assert_allclose(freq, expected, atol=0.012, err_msg=cfg.method)


def test_top_p_mask_equals_the_sorted_reference():
    logits = np.asarray(jax.random.normal(jax.random.key(3), (16, 1000))) * 3
    for top_p in (0.1, 0.5, 0.9, 0.99):
        mask = np.asarray(sampler.top_p_mask(jnp.asarray(logits), top_p))
        for row, m in zip(logits, mask):
            p = softmax(row.astype(np.float64))
            order = np.argsort(-p)
            before = np.cumsum(p[order]) - p[order]
            expected = np.zeros(len(p), bool)
            expected[order[before < top_p]] = True
            # Only a token whose cumulative mass is within float32 rounding of top_p may differ.
            flipped = np.flatnonzero(m != expected)
            rank = np.argsort(order)[flipped]
            assert np.all(np.abs(np.cumsum(p[order])[rank] - top_p) < 1e-5), (top_p, flipped)
            assert m[order[0]]


def test_top_k_in_the_loop_only_emits_top_k_tokens(model, prompts):
    cfg = sampler.SamplerConfig(max_new_tokens=6, top_k=2)
    out = sampler.generate(model, prompts, cfg, jax.random.key(9))
    refs = reference_log_probs(model, [p + t for p, t in zip(prompts, out.tokens)])
    for prompt, tokens, ref in zip(prompts, out.tokens, refs):
        for j, token in enumerate(tokens):
            assert token in np.argsort(-ref[len(prompt) - 1 + j])[:2]


# ---- clear errors ------------------------------------------------------------------------------


def test_errors_say_what_to_fix(model):
    with pytest.raises(ValueError, match="max_new_tokens=0; it must be >= 1"):
        sampler.SamplerConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="stop_sequences\\[1\\] is empty"):
        sampler.SamplerConfig(stop_sequences=((5,), ()))
    with pytest.raises(ValueError, match="top_p"):
        sampler.SamplerConfig(top_p=0.0)
    with pytest.raises(ValueError, match="no prompts"):
        sampler.generate(model, [], GREEDY, jax.random.key(0))
    with pytest.raises(ValueError, match="prompts\\[1\\] is empty"):
        sampler.generate(model, [[1, 2], []], GREEDY, jax.random.key(0))
    with pytest.raises(ValueError, match="outside \\[0, 512\\)"):
        sampler.generate(model, [[1, 512]], GREEDY, jax.random.key(0))
    fake_tokenizer = types.SimpleNamespace(encode=lambda text: [ord(c) for c in text])
    assert sampler.encode_stop_sequences(fake_tokenizer, ["ab"]) == ((97, 98),)
    with pytest.raises(ValueError, match="'' tokenizes to nothing"):
        sampler.encode_stop_sequences(fake_tokenizer, ["ab", ""])


def test_prompt_longer_than_the_context_window(model):
    long_prompt = list(range(3, 3 + CFG.max_position_embeddings - 4))  # 508 tokens
    with pytest.raises(ValueError, match="exceeds the context window of 512.*truncate='left'"):
        sampler.generate(model, [long_prompt], GREEDY, jax.random.key(0))
    cfg = sampler.SamplerConfig(max_new_tokens=8, temperature=0.0, truncate="left")
    out = sampler.generate(model, [long_prompt], cfg, jax.random.key(0))
    short = sampler.generate(model, [long_prompt[-(512 - 8) :]], GREEDY, jax.random.key(0))
    assert out.tokens == short.tokens and out.prompt_lengths[0] == 504


def test_continuation_without_room_says_how_much(model, prompts):
    draft = sampler.generate(model, prompts, GREEDY, jax.random.key(0))
    with pytest.raises(ValueError, match="max_cache_len >= 48"):
        sampler.continue_generation(model, draft, [[1]] * 3, GREEDY, jax.random.key(0))
    with pytest.raises(ValueError, match="keep"):
        sampler.continue_generation(model, draft, [[1]] * 3, GREEDY, jax.random.key(0),
                                    keep=[9, 0, 0])  # fmt: skip
