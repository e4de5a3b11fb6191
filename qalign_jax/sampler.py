"""The sampler: jitted prefill, one `jax.lax.while_loop` decode, per-token logprobs.

Rollouts dominate GRPO's cost and QA-LIGN doubles them (draft, then `<Think>` + revision), so
this file owns the fastest correct path from prompts to tokens:

  prefill  (one jitted call)  left-padded prompts -> KV cache + next-token logits
  decode   (one jitted call)  `while_loop` until every row is done or `max_new_tokens`
  extend   (one jitted call)  append text (e.g. `<Think>` + a critique) to a finished state and
                              prefill only the new tokens: the shared prefix is paid for once

Invariants:
- Prompts are left-padded, so every row writes cache slot `index` at the same step; position
  -1 marks padding and is invisible (`llama.attention_mask`). Rows finish independently.
- The cache holds the KV of every token the rows have seen, including every generated token
  (the one that finished a row too). Slot `state.start + j` holds row b's generated token j.
  So a continuation is exact: masking slots (position -1) drops tokens, appending extends.
- `logprobs` are log-softmax of the logits divided by the temperature (the raw logits when
  greedy), before top-k/top-p filtering, at the sampled tokens: the distribution GRPO's loss
  scores them under (`llama.token_stats(temperature=)`); GRPO logs their gap to its training
  forward, and its ratio uses the latter.
- Finish reasons: 'eos' (a token in `stop_ids`), 'stop_sequence' (the row's last generated
  tokens equal one of `stop_sequences`), 'length' (`max_new_tokens`). Generated tokens include
  the stop token/sequence.
- Shapes are bucketed (batch, prompt length; the cache length follows): one jitted function
  per bucket (`jitted`), so the compile count (`compile_stats`) stays constant across calls
  within one bucket.

One forward: prefill and `extend` run the model's own `Llama.hidden` with its `KVCache`; decode
runs `models/decode.py`, the same block in a feature-major layout that XLA:CPU runs fastest,
pinned to the model by a parity test over every model variant (`tests/test_llama.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from qalign_jax import sharding
from qalign_jax.models import decode as decode_lib
from qalign_jax.models import llama
from qalign_jax.models.decode import DecodeWeights, prepare_weights

FINISH_REASONS = ("", "eos", "stop_sequence", "length")  # index = `SamplerState.finish` code
_EOS, _STOP, _LENGTH = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to sample. Hashable: it is a static argument of the jitted functions.

    The method follows from the numbers (see `SamplerConfig.method`): temperature 0 is greedy;
    top_k > 0 and/or top_p < 1 filter before sampling at `temperature`.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_ids: tuple[int, ...] = ()  # a row ends when it samples one of these ('eos')
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id tuples ('stop_sequence')
    pad_id: int = 0  # fills padding and finished rows (never attended to)
    prompt_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    # Cache slots per row; 0 = prompt bucket + max_new_tokens. A two-pass rollout (draft, then
    # `extend` + revision) sets it to cover both passes.
    max_cache_len: int = 0
    # A prompt that does not fit the context window (prompt + max_new_tokens >
    # max_position_embeddings): 'error', or 'left' to drop its oldest tokens.
    truncate: str = "error"

    def __post_init__(self):
        as_tuple = lambda xs: tuple(int(x) for x in xs)  # lists from configs -> hashable tuples
        object.__setattr__(self, "stop_ids", as_tuple(self.stop_ids))
        object.__setattr__(self, "stop_sequences", tuple(as_tuple(s) for s in self.stop_sequences))
        object.__setattr__(self, "prompt_buckets", as_tuple(self.prompt_buckets))
        object.__setattr__(self, "batch_buckets", as_tuple(self.batch_buckets))
        if self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens}; it must be >= 1 (to score a text without "
                "generating, run the model's forward instead)."
            )
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; use 0 (greedy) or a positive value.")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; use 0 (off) or a positive count.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; it must be in (0, 1] (1 = off).")
        for i, seq in enumerate(self.stop_sequences):
            if not seq:
                raise ValueError(
                    f"stop_sequences[{i}] is empty: a stop string that tokenizes to nothing can "
                    "never match; remove it (see `encode_stop_sequences`)."
                )
        for name in ("prompt_buckets", "batch_buckets"):
            b = getattr(self, name)
            if not b or any(x < 1 for x in b) or list(b) != sorted(b):
                raise ValueError(f"{name}={b}; give increasing positive sizes.")
        if self.truncate not in ("error", "left"):
            raise ValueError(f"truncate={self.truncate!r}; use 'error' or 'left'.")

    @property
    def method(self) -> str:
        """The key of `SAMPLERS` these numbers select."""
        if self.temperature == 0:
            return "greedy"
        if self.top_k and self.top_p < 1:
            return "top_k_top_p"
        if self.top_k:
            return "top_k"
        if self.top_p < 1:
            return "top_p"
        return "temperature"


class SamplerState(NamedTuple):
    """Everything decode carries, as one pytree (donated to each jitted call).

    B rows (the batch bucket), N = max_new_tokens, S cache slots, V vocab.
    """

    cache: llama.KVCache  # k, v [L, B, S, K, H]; positions [B, S]; index []
    logits: jax.Array  # [B, V] float32 next-token logits of each row
    positions: jax.Array  # [B] int32 position of each row's next token
    tokens: jax.Array  # [B, N] int32 tokens generated by this decode (pad after the end)
    logprobs: jax.Array  # [B, N] float32 log p(token) at the temperature (0 after the end)
    lengths: jax.Array  # [B] int32 tokens generated by this decode
    done: jax.Array  # [B] bool
    finish: jax.Array  # [B] int32 code into FINISH_REASONS (0 while running, and padding rows)
    start: jax.Array  # [] int32 cache slot of this decode's first generated token
    step: jax.Array  # [] int32 decode steps taken
    rng: jax.Array  # key; step s samples with fold_in(rng, s)


def state_logical_axes() -> SamplerState:
    """Logical axes of every state field (see `sharding.py`): rows over `batch`."""
    return SamplerState(
        cache=llama.CACHE_LOGICAL_AXES,
        logits=("batch", "vocab"),
        positions=("batch",),
        tokens=("batch", None),
        logprobs=("batch", None),
        lengths=("batch",),
        done=("batch",),
        finish=("batch",),
        start=(),
        step=(),
        rng=(),
    )


# ----------------------------------------------------------------------------------------------
# Sampling: small pure functions (logits [B, V] float32, uniforms [B], cfg) -> tokens [B] int32.
# One uniform per row and an inverse-CDF search: exact, and on CPU 5-10x cheaper per step than
# Gumbel-max (`jax.random.categorical` draws B x V random numbers; 31 ms at B=32, V=49152).


def _sample_categorical(logits, u):
    """Inverse-CDF draw from softmax(logits) per row; -inf entries are never drawn.

    Two levels (blocks of 128, then within the chosen block) keep it O(V) with tiny cumsums.
    A zero-probability entry cannot be chosen: the search picks the first cumulative sum that
    exceeds the target, and that step has a positive increment; rounding past the end is
    clamped to the last entry with positive probability.
    """
    b, v = logits.shape
    block = 128
    nb = -(-v // block)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.pad(p, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
    block_mass = jnp.sum(p, axis=-1)  # [B, nb]
    cum = jnp.cumsum(block_mass, axis=-1)
    target = u * cum[:, -1]
    last_block = nb - 1 - jnp.argmax((block_mass > 0)[:, ::-1], axis=-1)
    bi = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), last_block)  # [B]
    within = jnp.take_along_axis(p, bi[:, None, None], axis=1)[:, 0]  # [B, block]
    before = jnp.take_along_axis(cum - block_mass, bi[:, None], axis=1)[:, 0]
    wcum = jnp.cumsum(within, axis=-1)
    last_in = block - 1 - jnp.argmax((within > 0)[:, ::-1], axis=-1)
    j = jnp.minimum(jnp.sum(wcum <= (target - before)[:, None], axis=-1), last_in)
    return (bi * block + j).astype(jnp.int32)


def sample_greedy(logits, u, cfg):
    del u, cfg
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample_temperature(logits, u, cfg):
    return _sample_categorical(logits / cfg.temperature, u)


def _top_k_candidates(logits, cfg):
    """The k largest logits (descending) and their token ids, each [B, k]."""
    k = min(cfg.top_k, logits.shape[-1])
    return jax.lax.top_k(logits, k)


def sample_top_k(logits, u, cfg):
    values, ids = _top_k_candidates(logits, cfg)
    j = _sample_categorical(values / cfg.temperature, u)
    return jnp.take_along_axis(ids, j[:, None], axis=-1)[:, 0]


def _nucleus_of_sorted(values, top_p):
    """Mask of the smallest prefix of descending `values` whose probability reaches top_p."""
    p = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(p, axis=-1) - p
    return mass_before < top_p


def sample_top_k_top_p(logits, u, cfg):
    values, ids = _top_k_candidates(logits, cfg)
    values = values / cfg.temperature
    values = jnp.where(_nucleus_of_sorted(values, cfg.top_p), values, -jnp.inf)
    j = _sample_categorical(values, u)
    return jnp.take_along_axis(ids, j[:, None], axis=-1)[:, 0]


def top_p_mask(logits, top_p):
    """[B, V] bool nucleus of softmax(logits) without sorting V (a sort of 49k costs ~4 ms/row).

    Keeps {p >= t} for the largest threshold t whose kept mass still reaches top_p: the sorted
    prefix up to and including the token that crosses top_p (ties at t are all kept). t is
    found by bisection on the float bits (monotone for p >= 0): 31 masked sums over V.
    """
    p = jax.nn.softmax(logits, axis=-1)
    bits = jax.lax.bitcast_convert_type(p, jnp.int32)
    lo = jnp.zeros(p.shape[:-1], jnp.int32)  # mass(bits >= lo) >= top_p always holds
    hi = jnp.full(p.shape[:-1], 0x7F800000, jnp.int32)  # +inf: mass 0 < top_p

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(bits >= mid[:, None], p, 0.0), axis=-1) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, body, (lo, hi))
    return bits >= lo[:, None]


def sample_top_p(logits, u, cfg):
    logits = logits / cfg.temperature
    return _sample_categorical(jnp.where(top_p_mask(logits, cfg.top_p), logits, -jnp.inf), u)


SAMPLERS = {
    "greedy": sample_greedy,
    "temperature": sample_temperature,
    "top_k": sample_top_k,
    "top_p": sample_top_p,
    "top_k_top_p": sample_top_k_top_p,
}


# ----------------------------------------------------------------------------------------------
# The pure jitted pieces.


def _fresh_state(cache, logits, positions, active, rng, max_new_tokens, pad_id) -> SamplerState:
    b = logits.shape[0]
    return SamplerState(
        cache=cache,
        logits=logits,
        positions=positions.astype(jnp.int32),
        tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
        lengths=jnp.zeros((b,), jnp.int32),
        done=~active,
        finish=jnp.zeros((b,), jnp.int32),
        start=cache.index,
        step=jnp.zeros((), jnp.int32),
        rng=rng,
    )


def _prefill_chunk(model, cache, tokens, positions):
    """Writes a left-padded chunk into the cache; logits after each row's last chunk token."""
    hidden, cache = model.hidden(tokens, positions, cache)
    logits = model.logits(hidden[:, -1])  # left padding: the last column is a real token
    next_positions = jnp.max(positions, axis=1) + 1
    return logits, next_positions, cache


def prefill(graphdef, params, tokens, positions, active, rng, *, cache_len, max_new_tokens, pad_id):
    """Prompts -> a state ready to decode (for `max_new_tokens`; `pad_id` fills the outputs).

    Args:
      tokens, positions: [B, T] left-padded prompts; positions -1 on padding
        (`llama.positions_from_mask`).
      active: [B] bool, False for rows that only pad the batch to its bucket.
      rng: the key decode samples with. cache_len: S >= T + max_new_tokens.
    """
    model = nnx.merge(graphdef, params)
    cache = llama.init_cache(model.config, tokens.shape[0], cache_len)
    logits, next_positions, cache = _prefill_chunk(model, cache, tokens, positions)
    return _fresh_state(cache, logits, next_positions, active, rng, max_new_tokens, pad_id)


def extend(
    graphdef, params, state: SamplerState, tokens, positions, keep, active, rng, *,
    max_new_tokens, pad_id,
):  # fmt: skip
    """Continues a decoded state: drop generated tokens past `keep`, append `tokens`.

    Only the appended tokens are prefilled; the prompt and the kept draft stay in the cache.

    Args:
      tokens, positions: [B, T2] left-padded appended text; positions continue each row's kept
        sequence (row b's first appended token has position prompt_b + keep_b).
      keep: [B] int32 generated tokens of the previous decode to keep (<= its lengths); the
        rest (e.g. a trailing EOS) are masked out of the cache (position -1).
    """
    model = nnx.merge(graphdef, params)
    cache = state.cache
    slot = jnp.arange(cache.positions.shape[1])[None]
    dropped = (slot >= state.start + keep[:, None]) & (slot < state.start + state.lengths[:, None])
    cache = cache._replace(positions=jnp.where(dropped, -1, cache.positions))
    logits, next_positions, cache = _prefill_chunk(model, cache, tokens, positions)
    return _fresh_state(cache, logits, next_positions, active, rng, max_new_tokens, pad_id)


def decode(model_cfg: llama.LlamaConfig, weights: DecodeWeights, state: SamplerState, *, cfg):
    """Samples until every row is done or `cfg.max_new_tokens` steps: one `while_loop`.

    Each step samples from `state.logits`, records the token and its logprob, checks the stop
    conditions, and feeds the token through `decode.decode_step` (so the cache holds it).
    Nothing leaves the device inside the loop.
    """
    n = cfg.max_new_tokens
    stop_ids = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)
    sample = SAMPLERS[cfg.method]

    def cond(carry):
        s = carry[0]
        return (s.step < n) & ~jnp.all(s.done)

    def body(carry):
        s, cache = carry
        b = s.logits.shape[0]
        u = jax.random.uniform(jax.random.fold_in(s.rng, s.step), (b,), jnp.float32)
        token = sample(s.logits, u, cfg)
        scaled = s.logits / cfg.temperature if cfg.temperature > 0 else s.logits
        logprob = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
        logprob = logprob - jax.nn.logsumexp(scaled, axis=-1)
        running = ~s.done
        token = jnp.where(running, token, cfg.pad_id)
        tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
        logprobs = jax.lax.dynamic_update_slice(
            s.logprobs, jnp.where(running, logprob, 0.0)[:, None], (0, s.step)
        )
        eos = running & jnp.any(token[:, None] == stop_ids[None], axis=-1)
        stop = jnp.zeros_like(eos)
        for seq in cfg.stop_sequences:  # the last len(seq) tokens of running rows
            m = len(seq)
            tail = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(s.step + 1 - m, 0), m, axis=1)
            hit = jnp.all(tail == jnp.asarray(seq, jnp.int32)[None], axis=-1)
            stop = stop | (running & hit & (s.step + 1 >= m))
        at_length = running & (s.step + 1 >= n)
        finish = jnp.where(
            eos, _EOS, jnp.where(stop, _STOP, jnp.where(at_length, _LENGTH, s.finish))
        )
        feed_positions = jnp.where(running, s.positions, -1)
        logits, cache = decode_lib.decode_step(model_cfg, weights, token, feed_positions, cache)
        s = s._replace(
            logits=logits,
            positions=s.positions + running,
            tokens=tokens,
            logprobs=logprobs,
            lengths=s.lengths + running,
            done=s.done | eos | stop | at_length,
            finish=finish,
            step=s.step + 1,
        )
        return s, cache

    carry = (state._replace(cache=None), decode_lib.to_decode_cache(state.cache))
    s, cache = jax.lax.while_loop(cond, body, carry)
    return s._replace(cache=decode_lib.from_decode_cache(cache))


# ----------------------------------------------------------------------------------------------
# Compilation: `sharding.jit`, one jitted function per function, static config, mesh, rules and
# argument shapes (what a bucket fixes): the shardings of a state depend on its shapes (a
# dimension the mesh does not divide is replicated), so they are derived once per bucket. A
# repeat call in a bucket reuses the function and jax's compiled program; compiles are counted
# by `sharding.compile_stats`.

PROGRAMS = ("sampler_prefill", "sampler_extend", "sampler_decode", "sampler_prepare")
_JITTED: dict = {}


def compile_stats() -> dict:
    """The sampler's compiles so far: {'count', 'seconds', '<program>': count}."""
    return sharding.compile_stats(PROGRAMS)


def num_compiles() -> int:
    return int(compile_stats()["count"])


def _is_axes(x) -> bool:
    """A tuple of logical axis names (None = unsharded dim): a leaf of an axes tree."""
    return (
        isinstance(x, tuple)
        and not hasattr(x, "_fields")
        and all(isinstance(a, (str, type(None))) for a in x)
    )


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (x.shape, x.dtype, getattr(x, "sharding", None) if isinstance(x, jax.Array) else None)
        for x in leaves
    )


def jitted(name: str, fn, leading: tuple, static: dict, args: tuple, *, mesh, rules,
           state_arg=None):  # fmt: skip
    """`fn(*leading, *args, **static)` jitted for these argument shapes (cached per bucket).

    `leading` and `static` are hashable static arguments (graphdef, configs). `args` may be
    `jax.ShapeDtypeStruct`s with shardings (`qalign_jax.aot` lowers the sampler for a pod
    mesh this way). `state_arg`: index of a `SamplerState` argument that is donated (decode,
    extend). With a mesh, the output state's rows are over `batch`, explicit in and out.
    """
    key = (name, mesh, rules, leading, tuple(sorted(static.items())), _signature(args))
    fn_jit = _JITTED.get(key)
    if fn_jit is None:
        bound = functools.partial(fn, *leading, **static)
        in_shardings = out_shardings = None
        if mesh is not None and name != "prepare":  # prepare lays out its own output
            in_shardings = [None] * len(args)  # params/weights: the shardings they carry
            state_sh = jax.tree.map(
                lambda axes, x: NamedSharding(
                    mesh, sharding.logical_to_spec(axes, rules, mesh, x.shape)
                ),
                state_logical_axes(),
                jax.eval_shape(bound, *args),
                is_leaf=_is_axes,
            )
            out_shardings = state_sh
            if state_arg is not None:
                in_shardings[state_arg] = state_sh
            in_shardings = tuple(in_shardings)
        fn_jit = sharding.jit(
            bound, mesh=mesh, rules=rules, in_shardings=in_shardings,
            out_shardings=out_shardings, name=f"sampler_{name}",
            donate_argnums=() if state_arg is None else (state_arg,),
        )  # fmt: skip
        _JITTED[key] = fn_jit
    return fn_jit


def _call(name: str, fn, leading: tuple, static: dict, args: tuple, *, mesh, rules, state_arg=None):
    return jitted(name, fn, leading, static, args, mesh=mesh, rules=rules, state_arg=state_arg)(
        *args
    )


# ----------------------------------------------------------------------------------------------
# The host-level API.


@dataclasses.dataclass
class Result:
    """What `generate` returns, per real (non-padding) row.

    tokens: generated ids, up to and including the stop token or sequence.
    logprobs: float32 [len] log p(token) at the sampling temperature (1 if greedy), unfiltered.
    finish_reasons: 'eos' | 'stop_sequence' | 'length'.
    state, weights: the device state and decode weights, for `continue_generation` (which
      consumes `state`).
    timings: seconds for 'prefill', 'prepare' (decode weights; 0 when reused) and 'decode'.
    """

    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    lengths: np.ndarray
    finish_reasons: list[str]
    state: SamplerState
    weights: DecodeWeights
    prompt_lengths: np.ndarray
    timings: dict


def encode_stop_sequences(tokenizer, texts: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Stop strings -> token-id tuples for `SamplerConfig.stop_sequences`.

    Matching is on tokens: a string only stops generation when the model emits this exact
    tokenization of it (BPE context can tokenize the same text differently).
    """
    out = []
    for text in texts:
        ids = tuple(tokenizer.encode(text))
        if not ids:
            raise ValueError(
                f"stop sequence {text!r} tokenizes to nothing, so it could never match; "
                "remove it or give a non-empty string."
            )
        out.append(ids)
    return tuple(out)


def bucket(n: int, buckets: Sequence[int], multiple: int = 1) -> int:
    """The smallest bucket >= n (past the largest: a multiple of it), then a multiple of
    `multiple` (the batch is split over data x fsdp devices)."""
    size = next((b for b in buckets if b >= n), None)
    if size is None:
        size = -(-n // buckets[-1]) * buckets[-1]
    return -(-size // multiple) * multiple


def _mesh_and_rules(model, mesh, rules):
    mesh = mesh if mesh is not None else getattr(model, "mesh", None)
    rules = rules if rules is not None else getattr(model, "rules", None)
    rules = sharding.DEFAULT_RULES if rules is None else rules
    # Hashable (it keys the compile cache): config files may give lists.
    as_axes = lambda a: tuple(a) if isinstance(a, (list, tuple)) else a
    return mesh, tuple((name, as_axes(axes)) for name, axes in rules)


def batch_multiple(mesh) -> int:
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def _check_token_lists(rows, name: str, vocab_size: int) -> list[list[int]]:
    if not isinstance(rows, (list, tuple)) or len(rows) == 0:
        raise ValueError(f"no {name}: pass a non-empty list of token-id lists.")
    out = []
    for i, row in enumerate(rows):
        row = [int(t) for t in row]
        if not row:
            raise ValueError(
                f"{name}[{i}] is empty; each needs at least one token (e.g. apply the chat "
                "template, which starts with a role marker)."
            )
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name}[{i}] holds token ids {bad[:5]} outside [0, {vocab_size}).")
        out.append(row)
    return out


def _left_pad(rows, batch: int, width: int, pad_id: int):
    tokens = np.full((batch, width), pad_id, np.int32)
    mask = np.zeros((batch, width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return tokens, mask


def _place(x, mesh):
    """A host batch onto the device(s): rows over data x fsdp when a mesh is given."""
    if mesh is None:
        return jnp.asarray(x)
    return sharding.put_global(x, sharding.batch_sharding(mesh, np.ndim(x)))


def _finish(state: SamplerState, weights, num_rows: int, prompt_lengths, timings) -> Result:
    tokens, logprobs, lengths, finish = sharding.to_host(  # all-gathered across processes
        (state.tokens, state.logprobs, state.lengths, state.finish)
    )
    return Result(
        tokens=[tokens[i, : lengths[i]].tolist() for i in range(num_rows)],
        logprobs=[logprobs[i, : lengths[i]] for i in range(num_rows)],
        lengths=lengths[:num_rows].copy(),
        finish_reasons=[FINISH_REASONS[int(c)] for c in finish[:num_rows]],
        state=state,
        weights=weights,
        prompt_lengths=np.asarray(prompt_lengths),
        timings=timings,
    )


def _decode(model, weights, state, cfg, mesh, rules, timings):
    if weights is None:
        t0 = time.perf_counter()
        static = {"mesh": mesh, "rules": rules}
        weights = _call("prepare", prepare_weights, (model.graphdef,), static, (model.params,),
                        mesh=mesh, rules=rules)  # fmt: skip
        jax.block_until_ready(weights)
        timings["prepare"] = time.perf_counter() - t0
    else:
        timings["prepare"] = 0.0
    t0 = time.perf_counter()
    state = _call("decode", decode, (model.cfg,), {"cfg": cfg}, (weights, state),
                  mesh=mesh, rules=rules, state_arg=1)  # fmt: skip
    jax.block_until_ready(state.tokens)
    timings["decode"] = time.perf_counter() - t0
    return weights, state


def generate(
    model, prompts: Sequence[Sequence[int]], cfg: SamplerConfig, rng, *,
    weights: DecodeWeights | None = None, mesh: Mesh | None = None, rules=None,
) -> Result:  # fmt: skip
    """Samples a continuation of each prompt.

    Args:
      model: a `load.LoadedModel` (anything with cfg, graphdef, params; mesh and rules are used
        when present).
      prompts: token-id lists of any lengths (left-padded to a bucket here).
      cfg: the `SamplerConfig`.
      rng: a jax key.
      weights: `DecodeWeights` from an earlier call on the same params (skips the transpose).

    Returns:
      A `Result` for the len(prompts) rows.
    """
    mesh, rules = _mesh_and_rules(model, mesh, rules)
    mcfg = model.cfg
    prompts = _check_token_lists(prompts, "prompts", mcfg.vocab_size)
    budget = mcfg.max_position_embeddings - cfg.max_new_tokens
    if budget < 1:
        raise ValueError(
            f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the context "
            f"window of {mcfg.max_position_embeddings} tokens; lower max_new_tokens."
        )
    for i, p in enumerate(prompts):
        if len(p) > budget:
            if cfg.truncate != "left":
                raise ValueError(
                    f"prompts[{i}] has {len(p)} tokens; with max_new_tokens={cfg.max_new_tokens} "
                    f"it exceeds the context window of {mcfg.max_position_embeddings}. Shorten "
                    "it, lower max_new_tokens, or set SamplerConfig(truncate='left') to keep "
                    f"its last {budget} tokens."
                )
            prompts[i] = p[-budget:]
    batch = bucket(len(prompts), cfg.batch_buckets, batch_multiple(mesh))
    width = bucket(max(len(p) for p in prompts), cfg.prompt_buckets)
    cache_len = cfg.max_cache_len or width + cfg.max_new_tokens
    if cache_len < width + cfg.max_new_tokens:
        raise ValueError(
            f"max_cache_len={cfg.max_cache_len} < prompt bucket {width} + max_new_tokens "
            f"{cfg.max_new_tokens}; raise it (or set 0 to size it automatically)."
        )
    tokens, mask = _left_pad(prompts, batch, width, cfg.pad_id)
    positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, -1).astype(np.int32)
    active = np.arange(batch) < len(prompts)
    timings = {}
    t0 = time.perf_counter()
    args = (model.params, _place(tokens, mesh), _place(positions, mesh), _place(active, mesh), rng)
    static = {"cache_len": cache_len, "max_new_tokens": cfg.max_new_tokens, "pad_id": cfg.pad_id}
    state = _call("prefill", prefill, (model.graphdef,), static, args, mesh=mesh, rules=rules)
    jax.block_until_ready(state.logits)
    timings["prefill"] = time.perf_counter() - t0
    weights, state = _decode(model, weights, state, cfg, mesh, rules, timings)
    return _finish(state, weights, len(prompts), [len(p) for p in prompts], timings)


def continue_generation(
    model, previous: Result, suffixes: Sequence[Sequence[int]], cfg: SamplerConfig, rng, *,
    keep: Sequence[int] | None = None, mesh: Mesh | None = None, rules=None,
) -> Result:  # fmt: skip
    """Appends text to each row of a finished `generate` and samples again (QA-LIGN's revision).

    Row b continues prompt_b + generated_b[:keep_b] + suffixes[b]; only the suffix is
    prefilled. Consumes `previous.state` (its cache is donated). The cache must have room:
    set `SamplerConfig.max_cache_len` in the first call to cover both passes.

    Args:
      keep: generated tokens to keep per row (default all; e.g. lengths - 1 drops a final EOS).
    """
    mesh, rules = _mesh_and_rules(model, mesh, rules)
    n = len(previous.tokens)
    suffixes = _check_token_lists(suffixes, "suffixes", model.cfg.vocab_size)
    if len(suffixes) != n:
        raise ValueError(f"{len(suffixes)} suffixes for {n} rows; give one per row.")
    lengths = previous.lengths
    keep = lengths.copy() if keep is None else np.asarray(keep, np.int64)
    if keep.shape != (n,) or np.any(keep < 0) or np.any(keep > lengths):
        raise ValueError(
            f"keep={keep.tolist()} must give 0 <= keep[b] <= lengths[b]={lengths.tolist()}."
        )
    state = previous.state
    batch, cache_len = state.cache.positions.shape
    width = bucket(max(len(s) for s in suffixes), cfg.prompt_buckets)
    index = int(state.cache.index)
    if index + width + cfg.max_new_tokens > cache_len:
        raise ValueError(
            f"the cache has {cache_len} slots; {index} are used and this continuation needs "
            f"{width} (suffix bucket) + {cfg.max_new_tokens} (max_new_tokens). Set "
            f"SamplerConfig.max_cache_len >= {index + width + cfg.max_new_tokens} in the first "
            "call."
        )
    start = previous.prompt_lengths + keep  # each row's next position
    if (
        int(start.max()) + max(len(s) for s in suffixes) + cfg.max_new_tokens
        > model.cfg.max_position_embeddings
    ):
        raise ValueError(
            "the continuation would run past the context window of "
            f"{model.cfg.max_position_embeddings} tokens; shorten the suffixes or max_new_tokens."
        )
    tokens, mask = _left_pad(suffixes, batch, width, cfg.pad_id)
    offsets = np.zeros(batch, np.int64)
    offsets[:n] = start
    positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1 + offsets[:, None], -1)
    keep_all = np.zeros(batch, np.int32)
    keep_all[:n] = keep
    active = np.arange(batch) < n
    timings = {}
    t0 = time.perf_counter()
    args = (model.params, state, _place(tokens, mesh), _place(positions.astype(np.int32), mesh),
            _place(keep_all, mesh), _place(active, mesh), rng)  # fmt: skip
    static = {"max_new_tokens": cfg.max_new_tokens, "pad_id": cfg.pad_id}
    state = _call("extend", extend, (model.graphdef,), static, args,
                  mesh=mesh, rules=rules, state_arg=1)  # fmt: skip
    jax.block_until_ready(state.logits)
    timings["prefill"] = time.perf_counter() - t0
    weights, state = _decode(model, previous.weights, state, cfg, mesh, rules, timings)
    prompt_lengths = start + np.asarray([len(s) for s in suffixes])
    return _finish(state, weights, n, prompt_lengths, timings)


__all__ = [
    "SamplerConfig", "SamplerState", "DecodeWeights", "Result", "SAMPLERS", "FINISH_REASONS",
    "prefill", "extend", "decode", "prepare_weights", "generate", "continue_generation",
    "encode_stop_sequences", "compile_stats", "num_compiles", "top_p_mask", "bucket",
    "batch_multiple", "jitted",
]  # fmt: skip
