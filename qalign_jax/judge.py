"""The judge: runs a rubric on (prompt, response) pairs with a judge LLM.

Logit mode (the default, and the reason this file exists). For each pair the judge context
(system prompt, the user's prompt, the response) is prefilled *once*. Every rubric question is
then a short suffix ("### Question\n<text> (Yes/No)" + the chat template's assistant
header) that attends to that shared prefix cache without copying it (`llama.Llama.hidden`'s
`prefix` argument), and the judge's answer is read from one logit row: the probabilities of the
question's option tokens ("Yes"/"No", "A".."F") at the answer position. Nothing is generated.
All questions of all pairs in a batch go through one jitted call per question chunk, so the
cost per response is one prefill plus ~(question tokens x questions) of batched compute,
instead of one full-context call per question.

Generate mode (`JudgeConfig.mode='generate'`) is the naive baseline and the path for judges
whose answers must be generated: each question gets its own full context (prefix + suffix),
the judge generates a few tokens, and the first option word found is the answer (one-hot);
an unparseable answer is uniform over the options and counted in `unparsed`.

Both modes score every question, then apply the rubric's applicability DAG: a question is
applicable when each of its `applies_if` conditions is applicable and answered (argmax) as
required. Scores are deterministic in logit mode: the same whatever the batch order, batch
size or padding (up to float rounding, <= 1e-5).

CLI:
  python -m qalign_jax.judge --rubric demo --input responses.jsonl --output report.jsonl
(`--model` any supported model source; default the embedded SmolLM2). Input rows need
`prompt` and `response`; the report has one row per response with every question's verdict.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from qalign_jax import rewards, sampler, sharding
from qalign_jax import rubric as rubric_lib
from qalign_jax.models import llama
from qalign_jax.models.load import LoadedModel

DEFAULT_SYSTEM = (
    "You are a strict, fair evaluator. Read the user's prompt and the assistant's response, "
    "then answer the question about the response with one option only."
)
GRADE_HINT = {"A": "excellent", "B": "good", "C": "adequate", "D": "poor", "F": "failing"}
_CONTEXT, _QUESTION = "@@QALIGN_CONTEXT@@", "@@QALIGN_QUESTION@@"


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    mode: str = "logits"  # 'logits' (shared prefix, answer-token probabilities) | 'generate'
    batch_size: int = 4  # (prompt, response) pairs per prefill
    question_chunk: int = 64  # questions per jitted scoring call (bounds activation memory)
    max_context_tokens: int = 1024  # judge prefix budget (system + prompt + response)
    on_long_context: str = "truncate"  # 'truncate' the response's end | 'error'
    system_prompt: str = DEFAULT_SYSTEM
    generate_max_tokens: int = 6  # generate mode: tokens per answer
    generate_temperature: float = 0.0  # generate mode: 0 = greedy

    def __post_init__(self):
        if self.mode not in ("logits", "generate"):
            raise ValueError(f"judge mode {self.mode!r}; use 'logits' or 'generate'.")
        if self.on_long_context not in ("truncate", "error"):
            raise ValueError(
                f"on_long_context={self.on_long_context!r}; use 'truncate' or 'error'."
            )
        if self.batch_size < 1 or self.question_chunk < 1:
            raise ValueError("judge batch_size and question_chunk must be >= 1.")


@dataclasses.dataclass(frozen=True)
class Answer:
    """The judge's verdict on one question for one response."""

    probs: np.ndarray  # [num options], in the question's option order
    argmax: str
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
    suffix_ids: list[list[int]]  # per question: question text + assistant header
    option_ids: np.ndarray  # [Q, max options] int32, padded with 0 (masked by option_valid)
    option_valid: np.ndarray  # [Q, max options] bool
    stats: dict = dataclasses.field(default_factory=lambda: {"compiles": 0})


def question_text(q: rubric_lib.Question, grades) -> str:
    """The per-question suffix text; kept short because its length sets the judge's cost."""
    if q.kind == "graded":
        letters = list(grades)  # the scale itself is spelled out once, in the system prompt
        return f"### Question\n{q.text} ({letters[0]}-{letters[-1]})"
    return f"### Question\n{q.text} (Yes/No)"


def system_text(system_prompt: str, grades) -> str:
    """The grade scale is explained once, in the shared prefix, not in every question."""
    scale = ", ".join(f"{g} = {GRADE_HINT[g]}" if g in GRADE_HINT else g for g in grades)
    return f"{system_prompt} Grades: {scale}."


def context_text(prompt: str, response: str) -> str:
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
    messages = [
        {"role": "system", "content": system_text(cfg.system_prompt, rubric.grades)},
        {"role": "user", "content": _CONTEXT + _QUESTION},
    ]
    text = tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, rest = text.split(_CONTEXT)
    middle, tail = rest.split(_QUESTION)
    assert middle == "", "the context and question markers must be adjacent"
    questions = rubric.questions
    width = max(len(q.options) for q in questions)
    option_ids = np.zeros((len(questions), width), np.int32)
    option_valid = np.zeros((len(questions), width), bool)
    for i, q in enumerate(questions):
        option_ids[i, : len(q.options)] = option_table[q.id]
        option_valid[i, : len(q.options)] = True
    return Judge(
        model=model, rubric=rubric, cfg=cfg, reward_cfg=reward_cfg,
        head_ids=tok.encode(head),
        suffix_ids=[tok.encode(question_text(q, rubric.grades) + tail) for q in questions],
        option_ids=option_ids, option_valid=option_valid,
    )  # fmt: skip


def _prefix_ids(judge: Judge, prompt: str, response: str) -> tuple[list[int], bool]:
    """Judge prefix tokens for one pair, truncating the response's end to fit the budget."""
    tok = judge.model.tokenizer
    budget = judge.cfg.max_context_tokens
    ids = judge.head_ids + tok.encode(context_text(prompt, response))
    if len(ids) <= budget:
        return ids, False
    if judge.cfg.on_long_context == "error":
        raise ValueError(
            f"judge context is {len(ids)} tokens > max_context_tokens={budget}; raise the "
            "budget or set on_long_context='truncate'."
        )
    fixed = len(judge.head_ids) + len(tok.encode(context_text(prompt, "")))
    response_ids = tok.encode(response)[: max(0, budget - fixed - 4)]
    ids = judge.head_ids + tok.encode(context_text(prompt, tok.decode(response_ids) + " [...]"))
    if len(ids) > budget:
        raise ValueError(
            f"the judge prompt alone is {fixed} tokens > max_context_tokens={budget}; "
            "shorten the prompt or raise the budget."
        )
    return ids, True


def _bucket(n: int, minimum: int = 16) -> int:
    """Round a length up to a power of two, so that shapes (and compiles) repeat."""
    return max(minimum, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef, params, tokens, positions):
    model = nnx.merge(graphdef, params)
    cache = llama.init_cache(model.config, tokens.shape[0], tokens.shape[1])
    _, cache = model.hidden(tokens, positions, cache)
    return cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
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


def _logit_probs(judge: Judge, prefixes: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """[Bp, Q, O] option probabilities and [Bp, Q] option mass for a batch of prefixes."""
    m = judge.model
    p_len = _bucket(max(len(p) for p in prefixes))
    tokens = np.zeros((len(prefixes), p_len), np.int32)
    mask = np.zeros_like(tokens)
    for i, p in enumerate(prefixes):  # left-pad
        tokens[i, p_len - len(p) :] = p
        mask[i, p_len - len(p) :] = 1
    positions = np.where(mask > 0, np.cumsum(mask, 1) - 1, -1).astype(np.int32)
    lengths = mask.sum(1)
    with sharding.use_rules(m.mesh, m.rules):
        prefix = _prefill(m.graphdef, m.params, tokens, positions)
    q_total, qc = len(judge.suffix_ids), min(judge.cfg.question_chunk, len(judge.suffix_ids))
    s_len = -(-max(len(s) for s in judge.suffix_ids) // 8) * 8  # fixed per rubric: round to 8
    probs, mass = [], []
    for start in range(0, q_total, qc):
        idx = list(range(start, min(start + qc, q_total)))
        idx += [idx[-1]] * (qc - len(idx))  # pad the last chunk (same shape, one compile)
        suf = np.zeros((qc, s_len), np.int32)
        valid = np.zeros((qc, s_len), bool)
        for j, q in enumerate(idx):
            suf[j, : len(judge.suffix_ids[q])] = judge.suffix_ids[q]
            valid[j, : len(judge.suffix_ids[q])] = True
        # Suffix positions continue each pair's prefix; right padding gets -1.
        pos = np.where(valid[None], lengths[:, None, None] + np.arange(s_len), -1)
        last = np.array([len(judge.suffix_ids[q]) - 1 for q in idx], np.int32)
        args = (
            np.tile(suf, (len(prefixes), 1)),
            pos.reshape(-1, s_len).astype(np.int32),
            np.tile(last, len(prefixes)),
            judge.option_ids[idx],
            judge.option_valid[idx],
        )
        with sharding.use_rules(m.mesh, m.rules):
            logp, ms = _score_chunk(m.graphdef, m.params, prefix, *args)
        n = min(qc, q_total - start)
        probs.append(np.exp(np.asarray(logp))[:, :n])
        mass.append(np.asarray(ms)[:, :n])
    return np.concatenate(probs, axis=1), np.concatenate(mass, axis=1)


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


def _generate_probs(judge: Judge, prefixes: list[list[int]], rng) -> tuple[np.ndarray, list]:
    """Naive mode: one full-context generation per (pair, question); answers parsed to one-hot."""
    tok = judge.model.tokenizer
    questions = judge.rubric.questions
    width = judge.option_ids.shape[1]
    contexts = [p + s for p in prefixes for s in judge.suffix_ids]
    scfg = sampler.SamplerConfig(
        max_new_tokens=judge.cfg.generate_max_tokens,
        temperature=judge.cfg.generate_temperature,
        stop_ids=tuple(tok.stop_ids),
    )
    texts = []
    step = judge.cfg.question_chunk
    for start in range(0, len(contexts), step):
        rng, key = jax.random.split(rng)
        out = sampler.generate(judge.model, contexts[start : start + step], scfg, key)
        texts += [tok.decode(t) for t in out.tokens]
    probs = np.zeros((len(prefixes), len(questions), width))
    for k, text in enumerate(texts):
        b, q = divmod(k, len(questions))
        n = len(questions[q].options)
        choice = parse_answer(text, questions[q].options)
        if choice is None:
            probs[b, q, :n] = 1.0 / n
        else:
            probs[b, q, choice] = 1.0
    return probs, texts


def applicability(rubric: rubric_lib.Rubric, argmax: dict[str, str]) -> dict[str, bool]:
    """A question applies when each condition applies and was answered as required."""
    result: dict[str, bool] = {}
    for level in rubric.evaluation_order():
        for q in level:
            result[q.id] = all(
                result[c.question] and argmax[c.question] == c.answer for c in q.applies_if
            )
    return result


def score_pairs(judge: Judge, pairs, rng=None) -> list[Verdict]:
    """Judges (prompt, response) pairs; returns one Verdict per pair, in input order."""
    if not pairs:
        return []
    rng = jax.random.key(0) if rng is None else rng
    rubric, cfg = judge.rubric, judge.cfg
    values = np.asarray(list(rubric.grades.values()))
    verdicts = []
    for start in range(0, len(pairs), cfg.batch_size):
        batch = pairs[start : start + cfg.batch_size]
        built = [_prefix_ids(judge, p, r) for p, r in batch]
        prefixes = [ids for ids, _ in built]
        if cfg.mode == "logits":
            probs, mass = _logit_probs(judge, prefixes)
            texts = None
        else:
            rng, key = jax.random.split(rng)
            probs, texts = _generate_probs(judge, prefixes, key)
            mass = np.ones(probs.shape[:2])
        for b, (_, truncated) in enumerate(built):
            answers, argmax, per_q = {}, {}, {}
            for qi, q in enumerate(rubric.questions):
                p = probs[b, qi, : len(q.options)]
                argmax[q.id] = q.options[int(np.argmax(p))]
                per_q[q.id] = p
            applicable = applicability(rubric, argmax)
            for qi, q in enumerate(rubric.questions):
                p = per_q[q.id]
                answers[q.id] = Answer(
                    probs=p, argmax=argmax[q.id],
                    expected=float(p @ values) if q.kind == "graded" else None,
                    applicable=applicable[q.id], option_mass=float(mass[b, qi]),
                    text=None if texts is None else texts[b * len(rubric.questions) + qi],
                )  # fmt: skip
            scores = rewards.score_response(rubric, per_q, applicable, judge.reward_cfg)
            verdicts.append(Verdict(answers, scores, truncated))
    return verdicts


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
                "probs": [round(float(x), 4) for x in a.probs],
                "expected": a.expected,
                "applicable": a.applicable,
                "option_mass": round(a.option_mass, 4),
                **({"text": a.text} if a.text is not None else {}),
            }
            for qid, a in verdict.answers.items()
        },
    }


def summary_table(judge: Judge, verdicts: list[Verdict]) -> str:
    """Mean score per principle and dimension (N/A left out), as aligned text."""
    lines = [f"{'principle / dimension':<40} {'mean':>7} {'n':>4}"]
    for p in judge.rubric.principles:
        vals = [
            v.scores.principles[p.id] for v in verdicts if v.scores.principles[p.id] is not None
        ]
        lines.append(f"{p.name:<40} {np.mean(vals) if vals else float('nan'):>7.3f} {len(vals):>4}")
        for d in p.dimensions:
            dv = [
                v.scores.dimensions[d.id] for v in verdicts if v.scores.dimensions[d.id] is not None
            ]
            lines.append(f"  {d.name:<38} {np.mean(dv) if dv else float('nan'):>7.3f} {len(dv):>4}")
    rewards_ = [v.scores.reward for v in verdicts]
    lines.append(f"{'reward':<40} {np.mean(rewards_):>7.3f} {len(rewards_):>4}")
    return "\n".join(lines)


def main(argv):
    from absl import flags

    from qalign_jax.models import load

    f = flags.FLAGS
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    rubric_path = (
        f.rubric
        if f.rubric.endswith((".yaml", ".yml", ".json"))
        else rubric_lib.builtin_rubric_path(f.rubric)
    )
    rubric = rubric_lib.load_rubric(rubric_path)
    model = load.load_model(f.model, mesh=sharding.make_mesh((1, -1, 1)), dtype=f.dtype,
                            tokenizer_source=f.tokenizer or None)  # fmt: skip
    judge = build_judge(model, rubric, JudgeConfig(mode=f.mode, batch_size=f.batch_size))
    rows = [json.loads(line) for line in open(f.input) if line.strip()]
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise ValueError(
                f"{f.input}:{n}: each line needs string fields 'prompt' and 'response'."
            )
    pairs = [(r["prompt"], r["response"]) for r in rows]
    t0 = time.time()
    verdicts = score_pairs(judge, pairs, jax.random.key(f.seed))
    elapsed = time.time() - t0
    with open(f.output, "w") as out:
        for (p, r), v in zip(pairs, verdicts):
            out.write(json.dumps(report_row(judge, p, r, v)) + "\n")
    n_q = len(rubric.questions) * len(pairs)
    print(summary_table(judge, verdicts))
    print(f"{len(pairs)} responses x {len(rubric.questions)} questions in {elapsed:.1f}s "
          f"({n_q / elapsed:.1f} questions/s, mode {f.mode}) -> {f.output}")  # fmt: skip
    logging.info("done")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("rubric", "demo", "Built-in rubric name (demo, default) or a rubric file.")
    flags.DEFINE_string(
        "input", None, "JSONL with 'prompt' and 'response' per line.", required=True
    )
    flags.DEFINE_string("output", None, "Per-response, per-question JSONL report.", required=True)
    flags.DEFINE_string("model", "embedded", "Judge model source (see models/load.py).")
    flags.DEFINE_string("tokenizer", "", "Tokenizer source for random-weight judges.")
    flags.DEFINE_string("mode", "logits", "'logits' (shared prefix) or 'generate' (naive).")
    flags.DEFINE_string("dtype", "float32", "Compute dtype.")
    flags.DEFINE_integer("batch_size", 4, "Responses per prefill.")
    flags.DEFINE_integer("seed", 0, "Seed (generate mode with temperature > 0).")
    app.run(main)
