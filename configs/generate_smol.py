"""Generation demo: the embedded SmolLM2-135M-Instruct answers a few chat prompts on CPU.

Run (about a minute on a 2-core CPU, most of it loading and compiling):
  python -m qalign_jax.train --config configs/generate_smol.py --workdir workdirs/demo
Expected: each answer printed and written to workdirs/demo/generations.jsonl; the France
question is answered with "Paris". `:smoke` swaps in a tiny random model (seconds; gibberish).
"""

from qalign_jax import config as base


def get_config(arg=None):
    c = base.base_config()
    c.loop = "generate"
    c.model.source = "embedded"
    c.generate.prompts = (
        "What is the capital of France?",
        "Give me three tips for staying focused while studying.",
        "How do I make a cup of green tea?",
        "Write a haiku about the ocean.",
    )
    c.generate.max_new_tokens = 64
    c.generate.temperature = 0.0
    if arg == "smoke":
        c.model.source = "random:tiny"
        c.model.tokenizer = "embedded"  # random weights sized to the real tokenizer
        c.generate.prompts = c.generate.prompts[:2]
        c.generate.max_new_tokens = 8
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':smoke' or nothing.")
    return c
