"""Hugging Face Llama directories in and out: config.json, safetensors, the name table.

Owns the one map between our parameter tree and Hugging Face's tensor names and layouts
(`hf_tensor_map`), used by every importer (the GGUF importer renames its tensors to HF names
first) and by the exporter.

Loading never holds a whole model on the host or on one device: each parameter is built with
`jax.make_array_from_callback` on its target sharding, and the callback reads just that
device's slice from a memory-mapped safetensors file (layout changes are numpy views, so only
the slice's bytes are read). The safetensors format is small enough to read and write here
directly (8-byte header length, JSON header, raw little-endian bytes), which also gives
bfloat16 without torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from qalign_jax import files, sharding
from qalign_jax.models import llama, lora

# ---------------------------------------------------------------------------------------------
# The name table.

Transform = Callable[[np.ndarray], np.ndarray]


def _same(w):
    return w


def _transpose(w):
    return w.T


def hf_tensor_map(
    cfg: llama.LlamaConfig,
) -> dict[tuple[str, ...], tuple[str, Transform, Transform]]:
    """Our parameter path -> (HF name, HF->ours view transform, ours->HF view transform).

    HF names of stacked block parameters contain `{i}`, the layer index. Every transform is a
    transpose and/or a split/merge of axes, so on a numpy memmap it is a view (no copy).
    """
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def in_proj(heads):  # HF [heads*H, D] <-> ours [D, heads, H]
        return (lambda w: w.T.reshape(d, heads, h), lambda w: w.reshape(d, heads * h).T)

    o_proj = (lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T)  # [D, N*H]
    T = (_transpose, _transpose)
    same = (_same, _same)
    blocks = {  # path under `layers` -> (name under `model.layers.{i}`, to ours, to HF)
        ("input_layernorm", "weight"): ("input_layernorm.weight", *same),
        ("post_attention_layernorm", "weight"): ("post_attention_layernorm.weight", *same),
        ("self_attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", *in_proj(n)),
        ("self_attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", *in_proj(k)),
        ("self_attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", *in_proj(k)),
        ("self_attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", *o_proj),
        ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", *T),
        ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", *T),
        ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", *T),
    }
    table = {
        ("embed_tokens", "embedding"): ("model.embed_tokens.weight", *same),
        ("norm", "weight"): ("model.norm.weight", *same),
    }
    for path, (name, to_ours, to_hf) in blocks.items():
        table[("layers", *path)] = ("model.layers.{i}." + name, to_ours, to_hf)
    if not cfg.tie_word_embeddings:
        table[("lm_head", "kernel")] = ("lm_head.weight", *T)
    return table


# PEFT's names for LlamaForCausalLM adapters: `base_model.model.` + the module's name.
PEFT_PREFIX = "base_model.model.model.layers.{i}."
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_tensor_map(
    cfg: llama.LlamaConfig,
) -> dict[tuple[str, ...], tuple[str, Transform, Transform]]:
    """`hf_tensor_map` for the LoRA adapters of `cfg` in PEFT's layout: ours A [*in, r] is
    PEFT's `lora_A.weight` [r, in] and ours B [r, *out] its `lora_B.weight` [out, r] (PEFT
    computes x A^T B^T; in/out flatten in HF's order, e.g. q_proj's out is (heads, head_dim))."""
    if cfg.lora is None:
        raise ValueError("this model has no LoRA adapters (model.lora.rank = 0).")
    d, f, r = cfg.hidden_size, cfg.intermediate_size, cfg.lora.rank
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {  # target -> (module, in axes, out axes), as the kernels of llama.py
        "q_proj": ("self_attn", (d,), (n, h)), "k_proj": ("self_attn", (d,), (k, h)),
        "v_proj": ("self_attn", (d,), (k, h)), "o_proj": ("self_attn", (n, h), (d,)),
        "gate_proj": ("mlp", (d,), (f,)), "up_proj": ("mlp", (d,), (f,)),
        "down_proj": ("mlp", (f,), (d,)),
    }  # fmt: skip
    table = {}
    for target in cfg.lora.targets:
        module, ins, outs = shapes[target]
        name = f"{PEFT_PREFIX}{module}.{target}."
        table[("layers", module, target, "lora_a")] = (
            name + "lora_A.weight",
            lambda w, ins=ins: w.T.reshape(*ins, r),
            lambda w: w.reshape(-1, r).T,
        )
        table[("layers", module, target, "lora_b")] = (
            name + "lora_B.weight",
            lambda w, outs=outs: w.T.reshape(r, *outs),
            lambda w: w.reshape(r, -1).T,
        )
    return table


def expected_hf_names(cfg: llama.LlamaConfig) -> list[str]:
    names = []
    for hf_name, _, _ in hf_tensor_map(cfg).values():
        if "{i}" in hf_name:
            names += [hf_name.format(i=i) for i in range(cfg.num_layers)]
        else:
            names.append(hf_name)
    return names


# ---------------------------------------------------------------------------------------------
# Placing parameters from any tensor source.


def _path_of(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def check_tensor_names(cfg: llama.LlamaConfig, available: set[str], source: str) -> None:
    """Missing or unexpected tensors are an error that names them (a few of each)."""
    expected = set(expected_hf_names(cfg))
    missing = sorted(expected - available)
    unexpected = sorted(available - expected)
    # A tied model's exporter may still write lm_head; the tie wins (it is the same tensor).
    if cfg.tie_word_embeddings:
        unexpected = [u for u in unexpected if u != "lm_head.weight"]
    # Rotary caches that old converters saved are not parameters.
    unexpected = [u for u in unexpected if not u.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(
            f"{source}: tensor names do not match a Llama with {cfg.num_layers} layers "
            f"(tie_word_embeddings={cfg.tie_word_embeddings}). Missing {len(missing)}: "
            f"{missing[:5]}; unexpected {len(unexpected)}: {unexpected[:5]}. Is the config "
            "right for these weights, and are all shards present?"
        )


def place_params(
    cfg: llama.LlamaConfig,
    get_tensor: Callable[[str], np.ndarray],
    shardings: nnx.State,
    source: str,
    *,
    cache_leaf: bool = False,
    table=None,
    abstract=None,
) -> nnx.State:
    """Builds every parameter on its sharding from HF-named tensors.

    Args:
      cfg: the model config (shapes and dtypes).
      get_tensor: HF name -> array in HF layout (a memmap view ideally; read lazily).
      shardings: `sharding.param_shardings(...)` for `cfg`'s abstract params.
      source: for error messages.
      cache_leaf: keep the current parameter's per-layer tensors in host memory while its
        device shards are built (for sources whose reads are expensive, e.g. dequantization).
      table, abstract: another name table and parameter subset (LoRA adapters: PEFT's).

    Returns:
      The parameter State, each leaf a global jax.Array on its sharding, in `param_dtype`.
    """
    table = table or hf_tensor_map(cfg)
    abstract = abstract if abstract is not None else llama.abstract_model(cfg)[1]
    dtype = np.dtype(getattr(ml_dtypes, cfg.param_dtype, None) or cfg.param_dtype)

    def build(key_path, var, sh):
        path = _path_of(key_path)
        hf_name, to_ours, to_hf = table[path]
        shape = var.get_value().shape
        stacked = "{i}" in hf_name
        # Check the shape in HF layout, before the reshapes of `to_ours`: a tensor of the wrong
        # shape but the right size would otherwise reshape silently into garbage.
        ours_shape = shape[1:] if stacked else shape
        hf_shape = tuple(jax.eval_shape(to_hf, jax.ShapeDtypeStruct(ours_shape, dtype)).shape)
        cache: dict[str, np.ndarray] = {}

        def read(name):
            if name in cache:
                return cache[name]
            w = get_tensor(name)
            if tuple(w.shape) != hf_shape:
                raise ValueError(
                    f"{source}: tensor {name} has shape {tuple(w.shape)}, but the config needs "
                    f"{hf_shape} (HF layout) for parameter {'.'.join(path)} {tuple(shape)}; the "
                    "config does not match these weights."
                )
            w = to_ours(w)
            if cache_leaf:
                cache[name] = w = np.asarray(w)
            return w

        def callback(index):
            if not stacked:
                return np.asarray(read(hf_name)[index], dtype=dtype)
            layers = range(cfg.num_layers)[index[0]]
            parts = [read(hf_name.format(i=i))[index[1:]] for i in layers]
            return np.stack([np.asarray(p, dtype=dtype) for p in parts])

        return var.replace(jax.make_array_from_callback(shape, sh.get_value(), callback))

    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    sh_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    built = [build(kp, var, sh) for (kp, var), sh in zip(leaves, sh_leaves)]
    return jax.tree_util.tree_unflatten(treedef, built)


def to_hf_state_dict(
    cfg: llama.LlamaConfig, params: nnx.State, table=None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy array in HF layout), one tensor at a time (gathered to host);
    `table`: another name table (`peft_tensor_map` for adapters)."""
    table = table or hf_tensor_map(cfg)
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    for key_path, var in flat:
        hf_name, _, to_hf = table[_path_of(key_path)]
        if "{i}" in hf_name:
            for i in range(cfg.num_layers):
                yield (
                    hf_name.format(i=i),
                    np.ascontiguousarray(to_hf(sharding.to_host(var.get_value()[i]))),
                )
        else:
            yield hf_name, np.ascontiguousarray(to_hf(sharding.to_host(var.get_value())))


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf: dict, source: str = "config.json") -> llama.LlamaConfig:
    """LlamaConfig from a Hugging Face config dict; anything we cannot run is an error."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ValueError(
            f"{source} describes a {model_type!r} model ({hf.get('architectures')}); qalign_jax "
            "loads Llama-family models (model_type 'llama', LlamaForCausalLM) only."
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported (Llama has no biases).")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' is supported.")
    # transformers 5 nests rope settings in `rope_parameters`; older files use top-level keys.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or (
        rope if rope.get("rope_type", "default") != "default" else None
    )
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ValueError(
                f"{source}: rope scaling type {kind!r} is not supported; supported: 'llama3' "
                "(Llama-3.1 frequency scaling) or none."
            )
        rope_scaling = llama.RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    heads = int(hf["num_attention_heads"])
    return llama.LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
    )


def config_to_hf(cfg: llama.LlamaConfig, *, bos_id=None, eos_id=None) -> dict:
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": cfg.param_dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_position_embeddings,
        )
        out["rope_scaling"] = dict(rope)
    out["rope_parameters"] = rope
    return out


# ---------------------------------------------------------------------------------------------
# safetensors, read by memory map and written directly.

_ST_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors_index(path: str) -> dict[str, tuple[str, dict]]:
    """name -> (file, header entry) for one safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {n}).")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name: (path, dict(entry, offset=8 + n)) for name, entry in header.items()}


def open_safetensors(path: str, entry: dict) -> np.ndarray:
    """A read-only memmap of one tensor (bytes are read only when sliced)."""
    if entry["dtype"] not in _ST_DTYPES:
        raise ValueError(f"{path}: dtype {entry['dtype']} is not supported ({sorted(_ST_DTYPES)}).")
    begin, end = entry["data_offsets"]
    dtype = _ST_DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{path}: byte range of a tensor does not match its shape {shape}.")
    if not shape or math.prod(shape) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=entry["offset"] + begin, shape=shape)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"cannot write {name}: dtype {t.dtype} has no safetensors name.")
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}  # fmt: skip
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())


# ---------------------------------------------------------------------------------------------
# Directories.


def read_hf_config(model_dir: str) -> llama.LlamaConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir} does not exist.")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{model_dir} has no config.json; a Hugging Face model directory needs config.json "
            "and *.safetensors (a GGUF model is a single .gguf file path instead)."
        )
    with open(path) as f:
        return config_from_hf(json.load(f), source=path)


def safetensors_index(model_dir: str) -> dict[str, tuple[str, dict]]:
    """Every tensor of a directory: one file, or the shards in model.safetensors.index.json."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(
            f"{model_dir} has no *.safetensors weights (PyTorch .bin files are not loaded: "
            "they are pickles; convert them to safetensors first)."
        )
    out = {}
    for name in names:
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is listed in the index but missing: incomplete copy?")
        out.update(read_safetensors_index(path))
    return out


def load_hf_params(model_dir: str, cfg: llama.LlamaConfig, shardings: nnx.State) -> nnx.State:
    """Parameters of an HF directory, each read slice by slice onto its sharding."""
    index = safetensors_index(model_dir)
    check_tensor_names(cfg, set(index), model_dir)
    return place_params(cfg, lambda name: open_safetensors(*index[name]), shardings, model_dir)


def export_hf(
    out_dir: str,
    cfg: llama.LlamaConfig,
    params: nnx.State,
    tokenizer=None,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Writes config.json, safetensors shards (+ index), and the tokenizer if given.

    Only process 0 writes; every process must call this (gathering a sharded tensor is a
    collective). Tensors stream one at a time, so host memory holds at most one shard file.
    A gs:// `out_dir` is written to a local temporary directory first, then copied up (the
    local disk needs room for the export).
    """
    if files.is_url(out_dir):
        with tempfile.TemporaryDirectory(prefix="hf_export_") as tmp:
            export_hf(tmp, cfg, params, tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes)
            if jax.process_index() == 0:
                files.copy_dir(tmp, out_dir)
        return
    out_dtype = np.dtype(
        getattr(ml_dtypes, dtype or cfg.param_dtype, None) or dtype or cfg.param_dtype
    )
    write = jax.process_index() == 0
    if write:
        os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    weight_map, size, total = {}, 0, 0
    shard_names = []

    def flush():
        name = f"model-{len(shard_names) + 1:05d}.safetensors"
        if write:
            write_safetensors(os.path.join(out_dir, name), shards[-1])
        shard_names.append(name)
        for t in shards[-1]:
            weight_map[t] = name
        shards[-1] = {}

    for name, arr in to_hf_state_dict(cfg, params):
        arr = arr.astype(out_dtype)
        if size and size + arr.nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
        total += arr.nbytes
    flush()
    if not write:
        return
    if len(shard_names) == 1:
        os.replace(
            os.path.join(out_dir, shard_names[0]), os.path.join(out_dir, "model.safetensors")
        )
    else:
        count = len(shard_names)
        renames = {
            f: re.sub(r"\.safetensors$", f"-of-{count:05d}.safetensors", f) for f in shard_names
        }
        for old, new in renames.items():
            os.replace(os.path.join(out_dir, old), os.path.join(out_dir, new))
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            weight_map = {k: renames[v] for k, v in weight_map.items()}
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    bos = getattr(tokenizer, "bos_id", None)
    eos = list(tokenizer.stop_ids) if tokenizer is not None else None
    hf_cfg = config_to_hf(cfg.replace(param_dtype=str(out_dtype)), bos_id=bos, eos_id=eos)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=1)
    if tokenizer is not None:
        tokenizer.save(out_dir)  # also writes generation_config.json (stop ids, pad id)


# ---------------------------------------------------------------------------------------------
# PEFT adapter directories (LoRA).


def export_peft(out_dir: str, cfg: llama.LlamaConfig, adapters: nnx.State, base_model: str = ""):
    """Writes the LoRA `adapters` of `cfg` as a PEFT adapter directory (`adapter_config.json` +
    `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads onto the base
    `LlamaForCausalLM`. Only process 0 writes; every process must call it."""
    spec = cfg.lora
    tensors = dict(to_hf_state_dict(cfg, adapters, peft_tensor_map(cfg)))
    if jax.process_index() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(spec.targets), "fan_in_fan_out": False, "use_rslora": False,
        "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
    }  # fmt: skip
    with open(os.path.join(out_dir, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    write_safetensors(os.path.join(out_dir, PEFT_WEIGHTS), tensors)


def read_peft_config(adapter_dir: str):
    """The `lora.LoraConfig` of a PEFT adapter directory (LoRA on our target names only)."""
    with open(os.path.join(adapter_dir, PEFT_CONFIG)) as f:
        c = json.load(f)
    targets = c.get("target_modules") or ()
    targets = [targets] if isinstance(targets, str) else targets
    unsupported = {k: c.get(k) for k in ("use_rslora", "use_dora", "fan_in_fan_out") if c.get(k)}
    if c.get("peft_type") != "LORA" or unsupported or c.get("bias", "none") != "none":
        raise ValueError(
            f"{adapter_dir}: only plain LoRA adapters load (peft_type LORA, bias none, no "
            f"rslora/dora/fan_in_fan_out); got {c.get('peft_type')} {unsupported}."
        )
    return lora.LoraConfig(int(c["r"]), float(c["lora_alpha"]), tuple(targets))


def load_peft_adapters(adapter_dir: str, cfg: llama.LlamaConfig, shardings: nnx.State):
    """The adapters of a PEFT directory for `cfg` (its `lora` as `read_peft_config` gives),
    each built on its sharding in `shardings` (the adapters' part of `param_shardings`)."""
    if cfg.lora is None or cfg.lora != read_peft_config(adapter_dir):
        raise ValueError(
            f"{adapter_dir}: its LoRA settings {read_peft_config(adapter_dir)} differ from the "
            f"model's {cfg.lora}; build the config with `read_peft_config`."
        )
    index = read_safetensors_index(os.path.join(adapter_dir, PEFT_WEIGHTS))
    table = peft_tensor_map(cfg)
    expected = {n.format(i=i) for n, _, _ in table.values() for i in range(cfg.num_layers)}
    if set(index) != expected:
        raise ValueError(
            f"{adapter_dir}: adapter tensors do not match; missing "
            f"{sorted(expected - set(index))[:3]}, unexpected {sorted(set(index) - expected)[:3]}."
        )
    abstract = lora.split(llama.abstract_model(cfg)[1])[0]
    return place_params(
        cfg, lambda name: open_safetensors(*index[name]), shardings, adapter_dir, table=table,
        abstract=abstract,
    )  # fmt: skip
