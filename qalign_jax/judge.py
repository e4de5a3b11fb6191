"""The judge: runs a rubric on (prompt, response) pairs with a judge LLM.

Logit mode (the default, and the reason this file exists). For each pair the judge context
(system prompt, the user's prompt, the response) is prefilled *once*, and a question header
that names the answer options ("### Question (Yes/No)", "### Question (A-F)") is appended to
a copy of that cache per option set. Every rubric question is then a short suffix (its text
+ the chat template's assistant header) that attends to its option set's shared prefix
without copying it (`llama.Llama.hidden`'s `prefix` argument), and the judge's answer is read
from one logit row: the probabilities of the question's option tokens ("Yes"/"No",
"A".."F") at the answer position. Nothing is generated. All questions of all pairs in a
batch go through one jitted call per question chunk, so the cost per response is one prefill
plus ~(question tokens x questions) of batched compute, instead of one full-context call per
question. Cost control: everything shared, the option hint included, lives in the prefix,
since suffix tokens set the cost; questions are sorted by length and chunked so that padding
stays small (`_chunks`); and with `skip_inapplicable` (default) the rubric is scored level by
level of its applicability DAG, so a question whose conditions failed for every pair in the
batch is never computed.

The chat head common to every pair (system prompt with the grade scale, the chat template's
opening) is prefilled once per judge weights (`_prefill_head`) and every pair's context extends
that one-row cache (`share_system_prefix`, default; the same keys at the same positions as
prefilling it per pair, scores equal within fp32 rounding).

Reuse (`judge_cache.py`): a (prompt, response) repeated in one `score_pairs` call is judged
once (GRPO groups repeat short refusals); with `cache_entries` verdicts are remembered across
calls, and with `cache_dir` (local or gs://) across runs, keyed by the judge weights, rubric,
template and answer-shaping config. Scores are pooled from the stored answers on every read.
`judge.cache_stats` counts hits, duplicates, misses and the seconds saved.

Generate mode (`JudgeConfig.mode='generate'`) is the naive baseline and the path for judges
whose answers must be generated: each question gets its own full context (prefix + suffix),
the judge generates a few tokens, and the first option word found is the answer (one-hot);
an unparseable answer is uniform over the options and counted in `unparsed`.

Both modes apply the rubric's applicability DAG: a question is applicable when each of its
`applies_if` conditions is applicable and answered (argmax) as required. With
skip_inapplicable an inapplicable question's Answer always has `probs=None`, computed or not,
so that reports do not depend on which other pairs shared the batch. Scores are
deterministic in logit mode: the same whatever the batch order, batch size or padding (up to
float rounding, <= 1e-5).

Defences (off by default; `judge_defences.py` says what each does and what
`judge_robustness.py` measured): `quote_response` shows the response as a "> " quote so that a
"### Question" line inside it cannot end the judge's context section; `substantive_gate` vetoes
a non-answer (empty, ":", a lone master key, the prompt or rubric echoed) to the floor after
judging, like a violated gate; `calibrate` divides every answer's option probabilities by the
judge's on a content-free pair ("N/A", "N/A"), so a judge that says "Yes" or "A" to anything no
longer does so by default; `calibrate_length` also divides a longer response by the judge's
length effect (placeholder text of its length bucket over a short one), against padding.

CLI (`judge_cli.py`):
  python -m qalign_jax.judge --rubric demo --input responses.jsonl --output report.jsonl
  python -m qalign_jax.judge robustness --rubric demo --model embedded --output DIR
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qalign_jax import judge_cache, judge_defences, rewards, sampler, sharding
from qalign_jax import rubric as rubric_lib
from qalign_jax.data import length_bucket
from qalign_jax.models import llama
from qalign_jax.models.load import LoadedModel

DEFAULT_SYSTEM = (
    "You are a strict, fair evaluator. Read the user's prompt and the assistant's response, "
    "then answer the question about the response with one option only."
)
GRADE_HINT = {"A": "excellent", "B": "good", "C": "adequate", "D": "poor", "F": "failing"}
_CONTEXT, _QUESTION = "@@QALIGN_CONTEXT@@", "@@QALIGN_QUESTION@@"
# The training guard (`rollouts.rollout_metrics`) counts non-answers with the gate's rules.
substantive_reasons = judge_defences.substantive_reasons


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    mode: str = "logits"  # 'logits' (shared prefix, answer-token probabilities) | 'generate'
    batch_size: int = 4  # (prompt, response) pairs per prefill
    question_chunk: int = 64  # questions per jitted scoring call (bounds activation memory)
    skip_inapplicable: bool = True  # score level by level; never compute an N/A question
    max_context_tokens: int = 1024  # judge prefix budget (system + prompt + response)
    on_long_context: str = "truncate"  # 'truncate' the response's end | 'error'
    system_prompt: str = DEFAULT_SYSTEM
    generate_max_tokens: int = 6  # generate mode: tokens per answer
    generate_temperature: float = 0.0  # generate mode: 0 = greedy
    share_system_prefix: bool = True  # logit mode: prefill the chat head (system) once per judge
    cache_entries: int = 0  # verdicts remembered across calls (`judge_cache`); 0 = off
    cache_dir: str = ""  # also replay/store verdicts here (local or gs://); '' = memory only
    # Defences (`judge_robustness.py` measures them; the defaults are the paper's setting):
    quote_response: bool = False  # show the response as a '> ' quote: no header inside it can
    #   end the context section (a fake "### Question" stays quoted text)
    substantive_gate: bool = False  # veto non-answers (empty, ':', "Thought process:", the
    #   prompt or rubric echoed: `judge_defences.substantive_reasons`) to the floor
    calibrate: bool = False  # logit mode: divide each question's option probabilities by the
    #   judge's on a content-free pair ("N/A", "N/A") and renormalize (contextual calibration,
    #   Zhao et al. 2021): removes the judge's standing preference for "Yes" or "A"
    calibrate_length: bool = False  # with calibrate: a response longer than the shortest
    #   `length_bucket` is also divided by the judge's length effect, its answers on placeholder
    #   text of the response's bucket over those on a short one (`judge_defences`)
    option_order: str = "forward"  # 'reversed': grades F..A and No/Yes in the headers and the
    #   system prompt (the robustness report's position-bias probe; the options stay the same)

    def __post_init__(self):
        if self.mode not in ("logits", "generate"):
            raise ValueError(f"judge mode {self.mode!r}; use 'logits' or 'generate'.")
        if self.on_long_context not in ("truncate", "error"):
            raise ValueError(
                f"on_long_context={self.on_long_context!r}; use 'truncate' or 'error'."
            )
        if self.option_order not in ("forward", "reversed"):
            raise ValueError(f"option_order={self.option_order!r}; use 'forward' or 'reversed'.")
        if self.calibrate and self.mode != "logits":
            raise ValueError("judge calibrate needs mode='logits' (option probabilities).")
        if self.calibrate_length and not self.calibrate:
            raise ValueError(
                "judge calibrate_length changes what calibrate divides by; set calibrate=True too."
            )
        if self.batch_size < 1 or self.question_chunk < 1:
            raise ValueError("judge batch_size and question_chunk must be >= 1.")
        if self.cache_dir and self.cache_entries < 1:
            raise ValueError(
                f"judge cache_dir={self.cache_dir!r} needs cache_entries >= 1 (the in-memory "
                "index the directory is loaded into); set judge.cache_entries, e.g. 100000."
            )


@dataclasses.dataclass(frozen=True)
class Answer:
    """The judge's verdict on one question for one response."""

    probs: np.ndarray | None  # [num options], in the question's option order; None if skipped
    argmax: str | None  # None if skipped
    expected: float | None  # graded: expected grade value; gates/conditions: None
    applicable: bool
    option_mass: float  # logit mode: judge probability on the valid options (diagnostic)
    text: str | None = None  # generate mode: what the judge wrote


@dataclasses.dataclass(frozen=True)
class Verdict:
    answers: dict[str, Answer]
    scores: rewards.Scores
    truncated: bool


@dataclasses.dataclass
class Judge:
    """A rubric prepared for one judge model: tokenized questions and option token ids."""

    model: LoadedModel
    rubric: rubric_lib.Rubric
    cfg: JudgeConfig
    reward_cfg: rewards.RewardConfig
    head_ids: list[int]  # tokens before the context (chat header, system prompt)
    header_ids: list[list[int]]  # per option set: "### Question (Yes/No)\n", ends the prefix
    option_set: np.ndarray  # [Q] int32, each question's option set (its prefix)
    suffix_ids: list[list[int]]  # per question: question text + assistant header
    option_ids: np.ndarray  # [Q, max options] int32, padded with 0 (masked by option_valid)
    option_valid: np.ndarray  # [Q, max options] bool
    prefill_fn: object  # `_prefill` jitted for this judge model (`sharding.jit`)
    score_fn: object  # `_score_chunk` jitted for this judge model
    prefill_head_fn: object  # `_prefill_head` jitted for this judge model
    cache: judge_cache.VerdictCache
    cache_stats: judge_cache.CacheStats = dataclasses.field(default_factory=judge_cache.CacheStats)
    stats: dict = dataclasses.field(default_factory=dict)
    memo: dict = dataclasses.field(default_factory=dict)  # by params identity: head cache, ns


def from_config(config, policy: LoadedModel) -> Judge:
    """The judge of an experiment config (`config.judge`, `config.reward`).

    `config.judge.source == ''` reuses the policy's weights (one model in memory); otherwise
    the judge model is loaded on the policy's mesh.
    """
    from qalign_jax.models import load  # late: load imports the heavy model readers

    jc = config.judge
    model = policy
    if jc.source:
        model = load.load_model(
            jc.source, mesh=policy.mesh, rules=config.sharding.rules,
            param_dtype=config.model.param_dtype, dtype=config.model.dtype, seed=config.seed,
            tokenizer_source=jc.tokenizer or None,
        )  # fmt: skip
    reward_cfg = rewards.RewardConfig.from_section(config.reward)
    return build_judge(model, rubric_lib.resolve_rubric(jc.rubric), config_of(jc), reward_cfg)


def config_of(jc) -> JudgeConfig:
    """The JudgeConfig of an experiment config's `judge` section."""
    return JudgeConfig(
        mode=jc.mode, batch_size=jc.batch_size, question_chunk=jc.question_chunk,
        max_context_tokens=jc.max_context_tokens, on_long_context=jc.on_long_context,
        skip_inapplicable=jc.skip_inapplicable, cache_entries=jc.cache_entries,
        cache_dir=jc.cache_dir, quote_response=jc.quote_response,
        substantive_gate=jc.substantive_gate, calibrate=jc.calibrate,
        calibrate_length=jc.calibrate_length,
    )  # fmt: skip


def question_header(options: tuple[str, ...], graded: bool, reverse: bool = False) -> str:
    """Ends the shared prefix of an option set's questions: the answer hint is paid once per
    pair, not once per question (the grade scale itself is spelled out in the system prompt).
    reverse lists the options last to first ("F-A", "No/Yes")."""
    options = options[::-1] if reverse else options
    hint = f"{options[0]}-{options[-1]}" if graded else "/".join(options)
    return f"### Question ({hint})\n"


def system_text(system_prompt: str, grades, reverse: bool = False) -> str:
    """The grade scale is explained once, in the shared prefix, not in every question."""
    grades = list(grades)[::-1] if reverse else grades
    scale = ", ".join(f"{g} = {GRADE_HINT[g]}" if g in GRADE_HINT else g for g in grades)
    return f"{system_prompt} Grades: {scale}."


EMPTY_QUOTE = "[empty response]"


def context_text(prompt: str, response: str, quote: bool = False) -> str:
    """The shared prefix's body; a question header (`question_header`) follows it.

    quote (`JudgeConfig.quote_response`) prefixes every response line with "> ", so a line of
    the response can never start a "### ..." section of the judge's own template, and shows an
    empty response as EMPTY_QUOTE instead of a blank the judge reads past.
    """
    if quote:
        lines = response.split("\n") if response.strip() else [EMPTY_QUOTE]
        body = "\n".join(f"> {line}".rstrip() for line in lines)
        return f"### User prompt\n{prompt}\n\n### Assistant response (quoted)\n{body}\n\n"
    return f"### User prompt\n{prompt}\n\n### Assistant response\n{response}\n\n"


def build_judge(
    model: LoadedModel,
    rubric: rubric_lib.Rubric,
    cfg: JudgeConfig | None = None,
    reward_cfg: rewards.RewardConfig | None = None,
) -> Judge:
    """Checks the rubric against the judge's tokenizer and pre-tokenizes every question."""
    cfg = cfg or JudgeConfig()
    reward_cfg = reward_cfg or rewards.RewardConfig()
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"judge model {model.source!r} has no tokenizer.")
    option_table = rubric_lib.check_options_tokenize(rubric, tok.encode, source=rubric.name)
    reverse = cfg.option_order == "reversed"
    messages = [
        {"role": "system", "content": system_text(cfg.system_prompt, rubric.grades, reverse)},
        {"role": "user", "content": _CONTEXT + _QUESTION},
    ]
    text = tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, rest = text.split(_CONTEXT)
    middle, tail = rest.split(_QUESTION)
    assert middle == "", "the context and question markers must be adjacent"
    questions = rubric.questions
    sets = list(dict.fromkeys(q.options for q in questions))  # in order of first use
    headers = [question_header(o, o == tuple(rubric.grades), reverse) for o in sets]
    width = max(len(q.options) for q in questions)
    option_ids = np.zeros((len(questions), width), np.int32)
    option_valid = np.zeros((len(questions), width), bool)
    for i, q in enumerate(questions):
        option_ids[i, : len(q.options)] = option_table[q.id]
        option_valid[i, : len(q.options)] = True
    return Judge(
        model=model, rubric=rubric, cfg=cfg, reward_cfg=reward_cfg,
        head_ids=tok.encode(head), header_ids=[tok.encode(h) for h in headers],
        option_set=np.array([sets.index(q.options) for q in questions], np.int32),
        suffix_ids=[tok.encode(q.text + tail) for q in questions],
        option_ids=option_ids, option_valid=option_valid,
        cache=judge_cache.VerdictCache(cfg.cache_entries, cfg.cache_dir),
        **jit_programs(model.graphdef, model.mesh, model.rules),
    )  # fmt: skip


def jit_programs(graphdef, mesh, rules) -> dict:
    """The judge's programs for one judge model, jitted on its mesh and rules."""
    return {
        "prefill_fn": sharding.jit(functools.partial(_prefill, graphdef), mesh=mesh, rules=rules,
                                   name="judge_prefill"),
        "score_fn": sharding.jit(functools.partial(_score_chunk, graphdef), mesh=mesh,
                                 rules=rules, name="judge_score"),
        "prefill_head_fn": sharding.jit(functools.partial(_prefill_head, graphdef), mesh=mesh,
                                        rules=rules, name="judge_prefill_head"),
    }  # fmt: skip


def _context_ids(judge: Judge, prompt: str, response: str) -> tuple[list[int], bool]:
    """One pair's judge context (head, prompt, response) tokens, the response's end truncated
    to leave room in the budget for the question header that follows."""
    tok, quote = judge.model.tokenizer, judge.cfg.quote_response
    budget = judge.cfg.max_context_tokens - max(map(len, judge.header_ids))
    ids = judge.head_ids + tok.encode(context_text(prompt, response, quote))
    if len(ids) <= budget:
        return ids, False
    if judge.cfg.on_long_context == "error":
        raise ValueError(
            f"judge context is {len(ids)} tokens > {budget} (max_context_tokens="
            f"{judge.cfg.max_context_tokens} less the question header); raise "
            "max_context_tokens or set on_long_context='truncate'."
        )
    fixed = len(judge.head_ids) + len(tok.encode(context_text(prompt, "", quote)))
    keep = max(0, budget - fixed - 4)
    response_ids = tok.encode(response)
    for _ in range(8):  # quoting adds "> " per line: shrink by the overflow until it fits
        text = context_text(prompt, tok.decode(response_ids[:keep]) + " [...]", quote)
        ids = judge.head_ids + tok.encode(text)
        if len(ids) <= budget or keep == 0:
            break
        keep = max(0, keep - (len(ids) - budget))
    if len(ids) > budget:
        raise ValueError(
            f"the judge prompt alone is {fixed} tokens > {budget} (max_context_tokens="
            f"{judge.cfg.max_context_tokens} less the question header); shorten the prompt or "
            "raise max_context_tokens."
        )
    return ids, True


def _prefill_head(graphdef, params, tokens):
    """The chat head common to every pair (system prompt, grade scale; tokens [Bp, C], the same
    row Bp times) -> a cache of Bp rows that every pair's context extends (`_prefill`).

    The head is prefilled at the batch's row count rather than once: a one-row prefill is
    partitioned differently over a data-parallel mesh (partial sums across devices), so its keys
    would differ from the per-pair path by float32 rounding that depends on the process layout.
    """
    model = nnx.merge(graphdef, params)
    cache = llama.init_cache(model.config, tokens.shape[0], tokens.shape[1])
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return model.hidden(tokens, positions, cache)[1]


def _prefill(graphdef, params, tokens, positions, header_tokens, header_positions, head=None):
    """Each pair's context once ([Bp, P]), then each option set's header after it (header
    arrays [G, Bp, H]) -> one prefix cache of Bp rows per option set.

    head: None (the contexts hold the whole chat head) or the `_prefill_head` cache of Bp rows
    and C slots that every row starts from (the contexts hold the rest, positions from C on)."""
    model = nnx.merge(graphdef, params)
    bp, c = tokens.shape[0], 0 if head is None else head.positions.shape[1]
    cache = llama.init_cache(model.config, bp, c + tokens.shape[1] + header_tokens.shape[2])
    if head is not None:  # every row starts with the same head slots
        cache = llama.KVCache(
            k=cache.k.at[:, :, :c].set(head.k.astype(cache.k.dtype)),
            v=cache.v.at[:, :, :c].set(head.v.astype(cache.v.dtype)),
            positions=cache.positions.at[:, :c].set(head.positions),
            index=jnp.asarray(c, jnp.int32),
        )
    _, cache = model.hidden(tokens, positions, cache)
    return tuple(
        model.hidden(h_tokens, h_positions, cache)[1]
        for h_tokens, h_positions in zip(header_tokens, header_positions)
    )


def _score_chunk(graphdef, params, prefix, tokens, positions, last, option_ids, option_valid):
    """Option log-probabilities for every (pair, question) of a chunk.

    prefix: KVCache of Bp pairs. tokens/positions: [Bp * Qc, S] suffixes (row r belongs to pair
    r // Qc). last: [Bp * Qc] index of each suffix's final token. option_ids/valid: [Qc, O].
    Returns (option log-probs [Bp, Qc, O] renormalized over valid options, option mass [Bp, Qc]).
    """
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden(tokens, positions, prefix=prefix)  # [Bp*Qc, S, D]
    h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [Bp*Qc, 1, D]
    logp = jax.nn.log_softmax(model.logits(h_last)[:, 0], axis=-1)  # [Bp*Qc, V]
    bp = prefix.positions.shape[0]
    logp = logp.reshape(bp, -1, logp.shape[-1])  # [Bp, Qc, V]
    opt = jnp.take_along_axis(logp, jnp.broadcast_to(option_ids, (bp, *option_ids.shape)), axis=-1)
    opt = jnp.where(option_valid, opt, -jnp.inf)
    mass = jax.nn.logsumexp(opt, axis=-1)
    return opt - mass[..., None], jnp.exp(mass)


def _left_pad(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """[len(rows), width] tokens, right-aligned, and the [len(rows), width] mask of real ones."""
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return tokens, mask


def _head_cache(judge: Judge, rows: int):
    """The chat head's cache of `rows` identical rows (`_prefill_head`), prefilled once per judge
    weights and batch row count (a judge sees a few row counts: its batch size and the last
    batch's)."""
    m = judge.model
    if judge.memo.get("head_params") is not m.params:
        judge.memo.update(head_params=m.params, heads={})
    heads = judge.memo["heads"]
    if rows not in heads:
        heads[rows] = judge.prefill_head_fn(m.params, np.tile(np.int32(judge.head_ids), (rows, 1)))
    return heads[rows]


def _prefill_batch(judge: Judge, contexts: list[list[int]], share_head: bool | None = None):
    """Prefills a batch's judge prefixes, every pair's context followed by each option set's
    header -> (per option set: a prefix cache of Bp rows; [G, Bp] prefix lengths).

    With share_head (default `cfg.share_system_prefix`) the chat head common to every context
    (`head_ids`: system prompt, grade scale) comes from `_head_cache` and only the rest of each
    context is prefilled; the caches hold the same keys at the same positions either way."""
    m, sets = judge.model, len(judge.header_ids)
    share_head = judge.cfg.share_system_prefix if share_head is None else share_head
    head, start = None, 0
    if share_head:
        head, start = _head_cache(judge, len(contexts)), len(judge.head_ids)
        assert all(c[:start] == judge.head_ids for c in contexts), "contexts start with the head"
        contexts = [c[start:] for c in contexts]
    tokens, mask = _left_pad(contexts, length_bucket(max(map(len, contexts))))
    positions = np.where(mask > 0, start + np.cumsum(mask, 1) - 1, -1)
    h_tokens, h_mask = _left_pad([h for h in judge.header_ids for _ in contexts],
                                 max(map(len, judge.header_ids)))  # fmt: skip
    lengths = np.tile(start + mask.sum(1), sets)  # each header continues its pair's context
    h_positions = np.where(h_mask > 0, lengths[:, None] + np.cumsum(h_mask, 1) - 1, -1)
    caches = judge.prefill_fn(
        m.params, tokens, positions.astype(np.int32),
        h_tokens.reshape(sets, len(contexts), -1),
        h_positions.reshape(sets, len(contexts), -1).astype(np.int32), head,
    )  # fmt: skip
    return caches, (lengths + h_mask.sum(1)).reshape(sets, len(contexts))


def _chunks(lengths: list[int], cap: int, overhead: int = 64) -> list[tuple[list[int], int, int]]:
    """Splits questions into scoring chunks: [(question positions, rows, width)].

    Questions go in length order into consecutive chunks of at most `cap` questions; rows
    round up to `length_bucket` sizes and widths (the chunk's longest suffix) to 4, so shapes, and
    compiles, repeat. The split minimizes the computed tokens (rows x width) plus `overhead`
    tokens per call (dynamic programming over the sorted lengths). On the default rubric this
    computes 1.16x the real suffix tokens (fixed 64-row chunks with widths rounded to 8
    computed 1.38x). On CPU throughput is flat from 16 to 64 rows of 32 tokens and 20% lower
    at 8 rows or at width 48; packing several questions per row with a block mask was slower
    (its wider rows cost back what the padding saved).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]

    def shape(i, j):  # chunk order[i:j]
        return min(cap, length_bucket(j - i, minimum=8)), -(-sizes[j - 1] // 4) * 4

    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(max(0, j - cap), j):
            rows, width = shape(i, j)
            cost = best[i] + rows * width + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], len(order)
    while j:
        i = cut[j]
        chunks.append((order[i:j], *shape(i, j)))
        j = i
    return chunks[::-1]


def _logit_probs(judge: Judge, prefixes, lengths, qidx: list[int]):
    """[Bp, len(qidx), O] option probabilities and [Bp, len(qidx)] option mass.

    prefixes/lengths: per option set, the prefix cache of the Bp pairs and their [Bp] lengths
    (`_prefill_batch`). Each chunk holds questions of one option set and reads its prefix.
    """
    m, suffix_ids = judge.model, judge.suffix_ids
    bp = lengths.shape[1]
    probs = np.zeros((bp, len(qidx), judge.option_ids.shape[1]), np.float32)
    mass = np.zeros((bp, len(qidx)), np.float32)
    plan = []
    for g in range(len(judge.header_ids)):
        in_set = [i for i, q in enumerate(qidx) if judge.option_set[q] == g]
        lens = [len(suffix_ids[qidx[i]]) for i in in_set]
        plan += [
            (g, [in_set[i] for i in c], r, w) for c, r, w in _chunks(lens, judge.cfg.question_chunk)
        ]
    for g, chunk, rows, s_len in plan:
        qs = [qidx[i] for i in chunk]
        qs += [qs[-1]] * (rows - len(qs))  # pad with a repeat: same shape, result dropped
        suf = np.zeros((rows, s_len), np.int32)
        valid = np.zeros((rows, s_len), bool)
        for j, q in enumerate(qs):
            suf[j, : len(suffix_ids[q])] = suffix_ids[q]
            valid[j, : len(suffix_ids[q])] = True
        # Suffix positions continue each pair's prefix; right padding gets -1.
        pos = np.where(valid[None], lengths[g, :, None, None] + np.arange(s_len), -1)
        last = np.array([len(suffix_ids[q]) - 1 for q in qs], np.int32)
        args = (
            np.tile(suf, (bp, 1)),
            pos.reshape(-1, s_len).astype(np.int32),
            np.tile(last, bp),
            judge.option_ids[qs],
            judge.option_valid[qs],
        )
        logp, ms = sharding.to_host(judge.score_fn(m.params, prefixes[g], *args))
        probs[:, chunk] = np.exp(logp)[:, : len(chunk)]
        mass[:, chunk] = ms[:, : len(chunk)]
    return probs, mass


_OPTION_PATTERNS: dict[tuple[str, ...], re.Pattern] = {}


def parse_answer(text: str, options: tuple[str, ...]) -> int | None:
    """Index of the first option that appears as a word in `text` (case-insensitive for words)."""
    if options not in _OPTION_PATTERNS:
        alternatives = "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))
        flags = re.IGNORECASE if all(len(o) > 1 for o in options) else 0
        _OPTION_PATTERNS[options] = re.compile(rf"(?<![A-Za-z])({alternatives})(?![A-Za-z])", flags)
    m = _OPTION_PATTERNS[options].search(text)
    if m is None:
        return None
    found = m.group(1).lower()
    return next(i for i, o in enumerate(options) if o.lower() == found)


def _generate_probs(judge: Judge, contexts: list[list[int]], qidx: list[int], rng):
    """Naive mode: one full-context generation per (pair, question); answers parsed to one-hot.

    Returns ([Bp, len(qidx), O] probabilities, texts[b][i])."""
    tok = judge.model.tokenizer
    questions = [judge.rubric.questions[q] for q in qidx]
    full = [
        c + judge.header_ids[judge.option_set[q]] + judge.suffix_ids[q]
        for c in contexts
        for q in qidx
    ]
    scfg = sampler.SamplerConfig(
        max_new_tokens=judge.cfg.generate_max_tokens,
        temperature=judge.cfg.generate_temperature,
        stop_ids=tuple(tok.stop_ids),
    )
    texts = []
    step = judge.cfg.question_chunk
    for start in range(0, len(full), step):
        rng, key = jax.random.split(rng)
        out = sampler.generate(judge.model, full[start : start + step], scfg, key)
        texts += [tok.decode(t) for t in out.tokens]
    probs = np.zeros((len(contexts), len(qidx), judge.option_ids.shape[1]))
    for k, text in enumerate(texts):
        b, i = divmod(k, len(qidx))
        n = len(questions[i].options)
        choice = parse_answer(text, questions[i].options)
        if choice is None:
            probs[b, i, :n] = 1.0 / n
        else:
            probs[b, i, choice] = 1.0
    return probs, [texts[b * len(qidx) : (b + 1) * len(qidx)] for b in range(len(contexts))]


def _calibration_prior(judge: Judge, buckets) -> np.ndarray:
    """What `cfg.calibrate` divides by: [Q, O] the judge's answers on the content-free pair, or
    with `cfg.calibrate_length` [B, Q, O] per pair, by its response's length bucket
    (`judge_defences.content_free_probs`)."""
    if not judge.cfg.calibrate_length:
        return judge_defences.content_free_probs(judge, _pair_option_probs)
    return np.stack(
        [judge_defences.content_free_probs(judge, _pair_option_probs, b) for b in buckets]
    )


def _pair_option_probs(judge: Judge, pair: tuple[str, str]) -> np.ndarray:
    """[Q, O] every question's option probabilities on one pair, all questions scored (logit
    mode; what calibration divides by: `judge_defences.content_free_probs`)."""
    ids, _ = _context_ids(judge, *pair)
    prefixes, lengths = _prefill_batch(judge, [ids])
    probs, _ = _logit_probs(judge, prefixes, lengths, list(range(len(judge.suffix_ids))))
    return probs[0]


def _applies(q: rubric_lib.Question, applicable: dict, argmax: dict) -> bool:
    return all(applicable[c.question] and argmax[c.question] == c.answer for c in q.applies_if)


def applicability(rubric: rubric_lib.Rubric, argmax: dict[str, str]) -> dict[str, bool]:
    """A question applies when each condition applies and was answered as required."""
    result: dict[str, bool] = {}
    for level in rubric.evaluation_order():
        for q in level:
            result[q.id] = _applies(q, result, argmax)
    return result


def _judge_batch(judge: Judge, contexts: list[list[int]], rng, buckets=None) -> list[dict]:
    """Scores one batch (each pair's context tokens) level by level of the applicability DAG.
    buckets: with `cfg.calibrate_length`, each pair's response length bucket.

    Returns per pair: question id -> (probs, option mass, text) for every scored question, and
    the applicability of every question. With skip_inapplicable, a level's question is scored
    only if it applies for at least one pair of the batch.
    """
    rubric, cfg = judge.rubric, judge.cfg
    index = {q.id: i for i, q in enumerate(rubric.questions)}
    if cfg.mode == "logits":
        prefixes, lengths = _prefill_batch(judge, contexts)
    per_pair = [{"scored": {}, "argmax": {}, "applicable": {}} for _ in contexts]
    for level in rubric.evaluation_order():
        for q in level:
            for st in per_pair:
                st["applicable"][q.id] = _applies(q, st["applicable"], st["argmax"])
        todo = [
            index[q.id]
            for q in level
            if not cfg.skip_inapplicable or any(st["applicable"][q.id] for st in per_pair)
        ]
        if not todo:
            continue
        judge.stats["questions_scored"] = judge.stats.get("questions_scored", 0) + len(todo) * len(
            contexts
        )
        if cfg.mode == "logits":
            probs, mass = _logit_probs(judge, prefixes, lengths, todo)
            if cfg.calibrate:
                prior = _calibration_prior(judge, buckets)[..., todo, :]
                probs = judge_defences.calibrate(probs, prior, judge.option_valid[todo])
            texts = [[None] * len(todo)] * len(contexts)
        else:
            rng, key = jax.random.split(rng)
            probs, texts = _generate_probs(judge, contexts, todo, key)
            mass = np.ones(probs.shape[:2])
        for b, st in enumerate(per_pair):
            for i, qi in enumerate(todo):
                q = rubric.questions[qi]
                p = probs[b, i, : len(q.options)]
                st["scored"][q.id] = (p, float(mass[b, i]), texts[b][i])
                st["argmax"][q.id] = q.options[int(np.argmax(p))]
    return per_pair


def score_pairs(judge: Judge, pairs, rng=None) -> list[Verdict]:
    """Judges (prompt, response) pairs; returns one Verdict per pair, in input order.

    A pair repeated in `pairs` is computed once; with `cfg.cache_entries` pairs judged by an
    earlier call (or found in `cfg.cache_dir`) are replayed (`judge_cache`). Counts and saved
    seconds accumulate in `judge.cache_stats`.
    """
    if not pairs:
        return []
    rng = jax.random.key(0) if rng is None else rng
    cache, stats = judge.cache, judge.cache_stats
    if judge.cfg.mode == "generate" and judge.cfg.generate_temperature > 0:  # samples: no reuse
        records = _score_unique(judge, pairs, rng)
        stats.misses += len(pairs)
        stats.computed_s += sum(r["seconds"] for r in records)
        return [
            judge_defences.veto(judge, pair, _verdict(judge, r)) for pair, r in zip(pairs, records)
        ]
    if cache.enabled:
        cache.use(_namespace(judge))
    keys = [judge_cache.pair_key(p, r) for p, r in pairs]
    records, todo = {}, {}
    for key, pair in zip(keys, pairs):
        if key in records or key in todo:
            stats.duplicates += 1
            continue
        found = cache.get(key)
        if found is None:
            todo[key] = pair
        else:
            records[key] = found
            stats.hits += 1
    computed = _score_unique(judge, list(todo.values()), rng)
    records.update(zip(todo, computed))
    cache.put(list(zip(todo, computed)))
    stats.misses += len(todo)
    stats.computed_s += sum(r["seconds"] for r in computed)
    first = set()
    for key in keys:
        if key in first or key not in todo:
            stats.saved_s += records[key]["seconds"]
        first.add(key)
    return [
        judge_defences.veto(judge, pair, _verdict(judge, records[key]))
        for key, pair in zip(keys, pairs)
    ]


_KEYED_DEFAULTS = {
    "quote_response": False, "calibrate": False, "calibrate_length": False,
    "option_order": "forward",
}  # fmt: skip


def _namespace(judge: Judge) -> str:
    """The cache namespace of this judge (`judge_cache.namespace`), memoized per weights."""
    m, cfg = judge.model, judge.cfg
    if judge.memo.get("ns_params") is not m.params:
        answer_cfg = {
            k: getattr(cfg, k)
            for k in ("mode", "max_context_tokens", "on_long_context", "skip_inapplicable",
                      "system_prompt", "generate_max_tokens", "generate_temperature")
        }  # fmt: skip
        # The defences that change answers are keyed when on (default namespaces stay as they
        # were); substantive_gate vetoes scores after the cache (`judge_defences.veto`) and is
        # not keyed.
        answer_cfg.update({k: getattr(cfg, k) for k, off in _KEYED_DEFAULTS.items()
                           if getattr(cfg, k) != off})  # fmt: skip
        template = [judge.head_ids, judge.header_ids, judge.suffix_ids,
                    context_text("\x00prompt", "\x00response", cfg.quote_response)]  # fmt: skip
        ns = judge_cache.namespace(
            judge_cache.weights_fingerprint(m.params), judge.rubric, template, answer_cfg
        )
        judge.memo.update(ns_params=m.params, ns=ns)
    return judge.memo["ns"]


def _score_unique(judge: Judge, pairs, rng) -> list[dict]:
    """Computes each pair's record (`judge_cache.make_record`), in input order."""
    cfg = judge.cfg
    built = [_context_ids(judge, p, r) for p, r in pairs]
    buckets = [0] * len(pairs)
    if cfg.calibrate_length:  # the response's tokens, at most the context budget
        tok, cap = judge.model.tokenizer, cfg.max_context_tokens
        buckets = [length_bucket(min(len(tok.encode(r)), cap)) for _, r in pairs]
    # Batches of similar lengths pad their prefixes less (logit scores do not depend on it).
    order = sorted(range(len(pairs)), key=lambda i: len(built[i][0]))
    records = [None] * len(pairs)
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start : start + cfg.batch_size]
        rng, key = jax.random.split(rng)
        t0 = time.perf_counter()
        per_pair = _judge_batch(
            judge, [built[i][0] for i in batch], key, [buckets[i] for i in batch]
        )
        seconds = (time.perf_counter() - t0) / len(batch)
        for i, st in zip(batch, per_pair):
            answers = {}
            for q in judge.rubric.questions:
                applicable = st["applicable"][q.id]
                p, mass, text = st["scored"].get(q.id, (None, 0.0, None))
                if not applicable and cfg.skip_inapplicable:
                    p, mass, text = None, 0.0, None  # batch-independent reports
                answers[q.id] = (p, mass, text, applicable)
            records[i] = judge_cache.make_record(answers, built[i][1], seconds)
    return records


def _verdict(judge: Judge, record: dict) -> Verdict:
    """A fresh Verdict from a record: answers as computed, scores pooled under reward_cfg."""
    values = np.asarray(list(judge.rubric.grades.values()))
    answers, per_q = {}, {}
    for q in judge.rubric.questions:
        a = record["answers"][q.id]
        p = judge_cache.record_probs(a)
        if p is not None:
            per_q[q.id] = p
        answers[q.id] = Answer(
            probs=p, argmax=None if p is None else q.options[int(np.argmax(p))],
            expected=float(p @ values) if q.kind == "graded" and p is not None else None,
            applicable=a["applicable"], option_mass=a["mass"], text=a["text"],
        )  # fmt: skip
    applicable = {qid: a.applicable for qid, a in answers.items()}
    scores = rewards.score_response(judge.rubric, per_q, applicable, judge.reward_cfg)
    return Verdict(answers, scores, record["truncated"])


def report_row(judge: Judge, prompt: str, response: str, verdict: Verdict) -> dict:
    """One JSON-ready row: scores, then every question's verdict."""
    return {
        "prompt": prompt,
        "response": response,
        "reward": verdict.scores.reward,
        "principles": verdict.scores.principles,
        "dimensions": verdict.scores.dimensions,
        "violated_gates": list(verdict.scores.violated_gates),
        "truncated": verdict.truncated,
        "questions": {
            qid: {
                "answer": a.argmax,
                "probs": None if a.probs is None else [round(float(x), 4) for x in a.probs],
                "expected": a.expected,
                "applicable": a.applicable,
                "option_mass": round(a.option_mass, 4),
                **({"text": a.text} if a.text is not None else {}),
            }
            for qid, a in verdict.answers.items()
        },
    }


if __name__ == "__main__":  # the CLI lives in judge_cli.py; `python -m qalign_jax.judge` runs it
    from qalign_jax import judge_cli

    judge_cli.run()
