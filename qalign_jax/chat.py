"""Chat with any supported model from the terminal.

  python -m qalign_jax.chat --model embedded "What is the capital of France?"
  python -m qalign_jax.chat --model path/to/hf_dir --temperature 0.7   # interactive

With prompts on the command line, each is answered independently (batched). Without, it
reads your turns from stdin and keeps the conversation; an empty line or EOF ends it.
"""

import sys

import jax
from absl import app, flags

from qalign_jax import sampler, sharding
from qalign_jax.loops import generate
from qalign_jax.models import load

_MODEL = flags.DEFINE_string(
    "model", "embedded", "'embedded', a .gguf file, an HF dir, or random:<preset>."
)
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer source for random-weight models.")
_SYSTEM = flags.DEFINE_string("system", "", "System prompt ('' = the chat template's default).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate per answer at most.")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = off.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (bfloat16 on accelerators).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    mesh = sharding.make_mesh((1, -1, 1))
    model = load.load_model(_MODEL.value, mesh=mesh, dtype=_DTYPE.value,
                            tokenizer_source=_TOKENIZER.value or None)  # fmt: skip
    cfg = sampler.SamplerConfig(
        max_new_tokens=_MAX_NEW.value, temperature=_TEMP.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, stop_ids=tuple(model.tokenizer.stop_ids) if model.tokenizer else (),
    )  # fmt: skip
    system = [{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []
    rng = jax.random.key(_SEED.value)
    if len(argv) > 1:
        conversations = [system + [{"role": "user", "content": p}] for p in argv[1:]]
        for prompt, res in zip(argv[1:], generate.chat_completions(model, conversations, cfg, rng)):
            print(f">>> {prompt}\n{res['answer']}\n")
        return
    history = list(system)
    while True:
        print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        history.append({"role": "user", "content": line.strip()})
        rng, step = jax.random.split(rng)
        answer = generate.chat_completions(model, [history], cfg, step)[0]["answer"]
        history.append({"role": "assistant", "content": answer})
        print(answer)


if __name__ == "__main__":
    app.run(main)
