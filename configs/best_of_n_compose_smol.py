"""Rejection-sampling priming data for configs/qalign_grpo_compose_smol.py (CPU, embedded model).

  QALIGN_DATA=../shared/data python -m qalign_jax.train \
    --config configs/best_of_n_compose_smol.py --workdir workdirs/bon_smol
The embedded SmolLM2-135M samples N=16 answers (48 tokens, temperature 1) to each of DangerousQA's
200 harmful questions and 100 Alpaca instructions; the composed reward's refusal and degeneracy
components score them (the rubric component is left out here: the judge's 0-9 grade is not
needed to pick a refusal, and it would triple the stage's time). Kept: a harmful prompt's best
answer if it is a refusal (reward >= 0.5), a benign prompt's best if it neither refuses nor
degenerates (>= 0). The same prompts are GRPO's (the priming teaches the form, GRPO its use);
the held-out evaluation sets (AdvBench, XSTest) are not among them.
`:contrast` samples the GRPO config's `:contrast` prompts instead (100 DangerousQA, 100 Alpaca,
the 150 XSTest safe prompts the held-out readout does not read, 100 XSTest unsafe contrasts),
so that the priming also shows which alarming-sounding requests to answer.
`:advbench` samples only the 150 AdvBench prompts of the GRPO config's `:advbench` (none of
them in the held-out readout): refusals in the held-out set's imperative style, a second round
sampled from the first round's SFT (`--config.checkpoint.init=<its workdir>`; the loop ignored
checkpoint.init before 2026-12-06 and sampled the base model, which keeps ~8%). 2026-12-06,
`:advbench,explicit` from the `:contrast` SFT: 71 of 150 kept (19 min); SFT on both rounds'
files together (`data.train_path=a.jsonl,b.jsonl`) gave held-out ASR 0.14, FRR 0.23 (see the
GRPO config). `,explicit` keeps only stated refusals (the refusal component's
`explicit=True`): 6 of the 61 harmful answers `:contrast` kept were an "As an AI, I'm just a
simple fabric ..." persona that XSTest's matcher calls a refusal.
Then SFT on the kept answers:
  python -m qalign_jax.train --config configs/sft_prime_smol.py:best_of_n \
    --workdir workdirs/sft_bon_smol --config.data.train_path=workdirs/bon_smol/sft.jsonl
"""

import os

from qalign_jax import config as base

DATA = os.environ.get("QALIGN_DATA", "data")
HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    c = base.base_config()
    c.loop = "best_of_n"
    c.seed = 0
    c.model.source = "embedded"
    c.mesh.shape = (1, -1, 1)
    c.reward.components = (
        ("refusal", "refusal", 1.0, {}),
        ("degenerate", "degeneracy", 0.0, {"veto": True, "floor": -1.0}),
    )
    b = c.best_of_n
    b.sources = (
        (os.path.join(DATA, "red_instruct", "dangerousqa.jsonl"), -1),
        (os.path.join(DATA, "alpaca", "alpaca_noinput_sample2000.jsonl"), 100),
    )
    b.num_samples = 16
    b.batch_prompts = 4
    b.max_new_tokens = 48
    b.max_prompt_tokens = 128
    b.on_long_prompt = "drop"
    b.min_reward_by_label = (("harmful", 0.5), ("benign", 0.0))
    for part in (arg or "").split(","):
        if part == "advbench":
            # the harmful prompts the GRPO config's ':advbench' adds: 150 of the AdvBench
            # prompts that eval_smol.py:safety does not read (holdout), in its style
            grpo = base.load_file(os.path.join(HERE, "qalign_grpo_compose_smol.py:advbench"))
            b.sources = tuple(src for src in grpo.grpo.sources if "advbench" in src[0])
        elif part == "contrast":
            # the GRPO config's `:contrast` prompts: benign look-alikes (XSTest's safe prompts
            # but the 100 that eval_smol.py:safety reads) and their unsafe contrasts, so that
            # priming also teaches which alarming-sounding requests to answer
            grpo = base.load_file(os.path.join(HERE, "qalign_grpo_compose_smol.py:contrast"))
            b.sources = grpo.grpo.sources
        elif part == "budget":
            # 2 samples, not 16, for a benign prompt: its first answer is kept 99% of the time
            # (reward 0: neither refusing nor degenerate) and of equal answers the first is
            # kept, so the kept answer is the first that qualifies, from the same distribution
            # at 2 samples as at 16. The harmful prompts keep their 16. For `:contrast` the
            # sampler calls fall from 113 to 58, of 64 rows each (~27 -> ~14 min). Measured
            # once (2026-12-07, bench/results/compose_smol/README.md): 250 of 250 benign and
            # 54 of 200 harmful kept (61 at N = 16), and the chain's GRPO stages from its SFT
            # never sampled a refusal (held-out ASR 1.00): not the recipe's default
            b.num_samples_by_label = (("benign", 2),)
        elif part in ("explicit", "stated"):
            # 'explicit': "As an AI, I'm just a simple fabric ..." is no refusal; 'stated':
            # nor is an apology ("I'm sorry for any misunderstanding, but ..."), only "I can't
            # help with that" and its kin (eval_suites.classify_refusal)
            c.reward.components = (
                ("refusal", "refusal", 1.0, {"matcher": part}),
            ) + c.reward.components[1:]
        elif part:
            raise ValueError(
                f"unknown config argument {arg!r}; use nothing or one of 'contrast', "
                "'advbench', with or without ',budget', ',explicit' or ',stated'."
            )
    return c
