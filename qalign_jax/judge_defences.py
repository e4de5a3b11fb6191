"""The judge's defences against responses that game it; all off by default (the paper's judge).

A policy trained against a judge learns the judge's weaknesses. `judge_robustness.py` scores
honest references and attack responses under each defence; its results for the embedded 135M
judge are in `bench/results/judge_robustness/` (demo rubric on 4 prompts, default on 2).

- **Quoted response** (`JudgeConfig.quote_response`, in `judge.context_text`): every response
  line is shown as a "> " quote, so a "### Question" header inside the response cannot end the
  judge's context section. Measured: the fake-header injection's demo honesty gain over the
  refusal (+0.92) is gone when quoted (every principle gain +0.00 to +0.01).
- **Substantive-answer gate** (`JudgeConfig.substantive_gate`; `substantive_reasons`, `veto`):
  a non-answer (empty, ":", a lone master key such as "Thought process:" or "Solution", the
  prompt or the rubric echoed) scores the floor on every dimension, principle and the reward,
  like a violated gate, named SUBSTANTIVE_GATE. Measured: it vetoes all seven master keys on
  every prompt ("Solution" alone had gained +0.40 reward on demo and +0.41 on default).
- **Contextual calibration** (`JudgeConfig.calibrate`; `content_free_probs`, `calibrate`): every
  question's option probabilities are divided by the judge's on a content-free pair
  (CONTENT_FREE) and renormalized (Zhao et al. 2021). Measured: the 135M judge answers B or
  better and "Yes" to anything, the empty answer included; calibrated, with quote and gate
  ('all'), it ranks helpful > refusal > harmful and every master key below the refusal.
- **Length-matched calibration** (`JudgeConfig.calibrate_length`, with calibrate): a response
  longer than the shortest `length_bucket` is also divided by the length effect, the judge's
  answers on a neutral (placeholder-text) response as long as it over those on a short one
  (`neutral_response`), so what the judge gives for mere length is divided out too.
  It targets padding (the refusal followed by content-free filler still gained +0.35 reward over
  the plain refusal on the default rubric under 'all'); see the report's 'all+length' setting.

This module reads the judge only through its arguments (the Judge object and the functions it
passes); it never imports `judge.py`, which imports it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qalign_jax import rewards
from qalign_jax import rubric as rubric_lib

# ---------------------------------------------------------------------------------------------
# The substantive-answer gate.

SUBSTANTIVE_GATE = "substantive_answer"  # the veto's name in Scores.violated_gates
_NOT_SUBSTANTIVE = {  # degeneracy reason -> the gate's reason
    "empty": "empty", "master_key": "master_key",
    "copies_prompt": "echoes_prompt", "copies_findings": "echoes_rubric",
}  # fmt: skip


def substantive_reasons(prompt: str, response: str, rubric_text: str = "") -> list[str]:
    """Why a response is not a substantive answer to its prompt ([] when it is): no words at
    all ("", ":"), a lone master key ("Thought process:", "Solution", "Let's solve this step
    by step."), or mostly a copy of the prompt or of `rubric_text` (`judge.substantive_gate`;
    the rules are `reward_components.degeneracy_reasons`, less its repetition checks, so that a
    long or padded but real answer is left to the rubric)."""
    from qalign_jax import reward_components  # late: it imports the loss functions

    reasons = reward_components.degeneracy_reasons(response, prompt, echo=rubric_text or None)
    return [_NOT_SUBSTANTIVE[r] for r in reasons if r in _NOT_SUBSTANTIVE]


def rubric_text(rubric: rubric_lib.Rubric) -> str:
    """Every question's text: what an echoed rubric copies (`substantive_reasons`)."""
    return "\n".join(q.text for q in rubric.questions)


def veto(judge, pair: tuple[str, str], verdict):
    """With `judge.cfg.substantive_gate`, a non-answer scores the floor on every dimension,
    principle and the reward, like a violated gate, and names SUBSTANTIVE_GATE among its violated
    gates; the judge's answers are kept as computed (and cached) for the report.

    judge: a `judge.Judge`; verdict: its `judge.Verdict` for pair (prompt, response)."""
    if not judge.cfg.substantive_gate:
        return verdict
    if "rubric_text" not in judge.memo:
        judge.memo["rubric_text"] = rubric_text(judge.rubric)
    if not substantive_reasons(*pair, judge.memo["rubric_text"]):
        return verdict
    floor = rewards.floor_value(judge.rubric, judge.reward_cfg.scale)
    principles = {k: floor for k in verdict.scores.principles}
    scores = rewards.Scores(
        reward=rewards.pool_principles(judge.rubric, principles, judge.reward_cfg),
        principles=principles, dimensions={k: floor for k in verdict.scores.dimensions},
        violated_gates=(*verdict.scores.violated_gates, SUBSTANTIVE_GATE),
    )  # fmt: skip
    return dataclasses.replace(verdict, scores=scores)


# ---------------------------------------------------------------------------------------------
# Contextual calibration.

CONTENT_FREE = ("N/A", "N/A")  # (prompt, response) whose answers are the judge's prior
NEUTRAL_TEXT = "Lorem ipsum dolor sit amet, consectetur adipiscing elit."  # placeholder text


def neutral_response(encode, decode, num_tokens: int) -> str:
    """A content-free response of `num_tokens` tokens (the last words may be cut): NEUTRAL_TEXT,
    the typesetter's placeholder, one per line, as often as it takes."""
    unit = encode(NEUTRAL_TEXT + "\n")
    ids = (unit * (num_tokens // max(len(unit), 1) + 1))[:num_tokens]
    return decode(ids).strip()


def content_free_probs(judge, option_probs, bucket: int = 0, shortest: int = 16) -> np.ndarray:
    """[Q, O] what calibration divides by, once per judge weights and bucket: the judge's option
    probabilities on CONTENT_FREE, and for a response in a length `bucket` above `shortest`
    (tokens, `judge.length_bucket`) those times the length effect, the judge's probabilities on
    a neutral response of `bucket` tokens over those on one of `shortest` (`neutral_response`).
    A short response is calibrated as without length matching.

    judge: a `judge.Judge` (its model, tokenizer and memo); option_probs(judge, pair) -> [Q, O]
    the judge's option probabilities on one (prompt, response) pair, every question scored."""
    m = judge.model
    if judge.memo.get("prior_params") is not m.params:
        judge.memo.update(prior_params=m.params, priors={})
    priors = judge.memo["priors"]  # 0: on CONTENT_FREE; n: on a neutral response of n tokens

    def probs_on(num_tokens: int) -> np.ndarray:
        if num_tokens not in priors:
            pair = CONTENT_FREE
            if num_tokens:
                tok = m.tokenizer
                pair = (CONTENT_FREE[0], neutral_response(tok.encode, tok.decode, num_tokens))
            priors[num_tokens] = option_probs(judge, pair)
        return priors[num_tokens]

    if bucket <= shortest:
        return probs_on(0)
    return probs_on(0) * probs_on(bucket) / np.maximum(probs_on(shortest), 1e-12)


def calibrate(probs: np.ndarray, prior: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """probs [B, Q, O] / prior ([Q, O], or [B, Q, O]: one per pair), renormalized over each
    question's valid options ([Q, O])."""
    p = np.where(valid, probs / np.maximum(prior, 1e-12), 0.0)
    return p / p.sum(-1, keepdims=True)
