"""Hugging Face directories in and out (models/hf.py, models/load.py).

The reference is `transformers` itself (a test-only dependency, with torch): a directory we
export must load there with no missing or unexpected weights and give our logits; a directory
transformers writes must load here. Re-importing our own export must give the parameters back
bit for bit, tensor by tensor onto the target shardings, from one file or from index + shards.
Every loading error must say what is wrong and what to do.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from qalign_jax import sharding
from qalign_jax.models import hf, llama, load

TINY = llama.get_preset("tiny")
VARIANTS = {
    "tied": TINY,
    "untied_llama3_rope": TINY.replace(
        tie_word_embeddings=False,
        rope_theta=500_000.0,
        rope_scaling=llama.RopeScaling(factor=8.0, original_max_position_embeddings=64),
    ),
}
# 8 query and 4 kv heads: every head axis divides a tensor axis of 4, so nothing is replicated.
SHARDED = TINY.replace(num_heads=8, num_kv_heads=4, tie_word_embeddings=False)
PROMPTS = ["What is the capital of France?", "def f(x):\n    return x  # 12345", "naïve café 🙂"]


def is_var(x):
    return isinstance(x, nnx.Variable)


@functools.cache
def random_params(cfg, seed=0):
    """Random parameters made in numpy: no compile per config, and norms that are not all ones,
    so that a swapped or misnamed norm changes the logits."""
    _, abstract = llama.abstract_model(cfg)
    rng = np.random.default_rng(seed)

    def one(path, var):
        shape = var.get_value().shape
        if "norm" in jax.tree_util.keystr(path):
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            value = 0.05 * rng.standard_normal(shape)
        return var.replace(jnp.asarray(value, var.get_value().dtype))

    return jax.tree_util.tree_map_with_path(one, abstract, is_leaf=is_var)


def tokens_for(cfg, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 11)).astype(np.int32)


def our_logits(cfg, params, tokens):
    graphdef, _ = llama.abstract_model(cfg)
    positions = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (tokens.shape[0], 1))
    logits, _ = jax.jit(llama.forward, static_argnums=0)(graphdef, params, tokens, positions)
    return np.asarray(logits)


def transformers_model(model_dir, **kwargs):
    """`AutoModelForCausalLM.from_pretrained`, asserting every weight came from the files."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, output_loading_info=True, **kwargs
    )
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


def transformers_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()


def assert_params_identical(got, want):
    got_flat = jax.tree_util.tree_flatten_with_path(got, is_leaf=is_var)[0]
    want_flat = jax.tree_util.tree_flatten_with_path(want, is_leaf=is_var)[0]
    assert [p for p, _ in got_flat] == [p for p, _ in want_flat]
    for (path, a), (_, b) in zip(got_flat, want_flat):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def hf_tensors(model_dir):
    """name -> numpy copy of every tensor of an HF directory (read with our reader)."""
    index = hf.safetensors_index(model_dir)
    return {name: np.array(hf.open_safetensors(*index[name])) for name in index}


@pytest.fixture(scope="module")
def sharded_export(tmp_path_factory):
    """SHARDED exported into several shard files plus model.safetensors.index.json."""
    out = str(tmp_path_factory.mktemp("sharded_export"))
    params = random_params(SHARDED, seed=3)
    hf.export_hf(out, SHARDED, params, max_shard_bytes=64 << 10)
    return out, params


# ---------------------------------------------------------------------------------------------
# Export -> transformers.


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_loads_in_transformers_with_same_logits(name, tmp_path):
    cfg = VARIANTS[name]
    params = random_params(cfg, seed=1)
    hf.export_hf(str(tmp_path), cfg, params)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]

    model = transformers_model(str(tmp_path))
    assert model.config.tie_word_embeddings == cfg.tie_word_embeddings
    rope = model.config.rope_parameters
    assert rope["rope_theta"] == cfg.rope_theta
    if cfg.rope_scaling is not None:  # short prompts barely feel the scaling: check the config
        assert rope["rope_type"] == "llama3"
        assert rope["factor"] == cfg.rope_scaling.factor
        assert rope["original_max_position_embeddings"] == 64
    tokens = tokens_for(cfg)
    ours = our_logits(cfg, params, tokens)
    ref = transformers_logits(model, tokens)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.1  # not trivially zero

    # And back: what transformers writes, we load bit for bit.
    model.save_pretrained(str(tmp_path / "resaved"))
    again = load.load_model(str(tmp_path / "resaved"))
    assert again.cfg == cfg
    assert_params_identical(again.params, params)


@pytest.mark.torch
@pytest.mark.slow
def test_export_with_tokenizer_is_a_complete_hf_directory(tmp_path):
    """config + safetensors + tokenizer: transformers runs it and tokenizes as we do."""
    transformers = pytest.importorskip("transformers")
    from qalign_jax.models import tokenizer as tokenizer_lib

    tok = tokenizer_lib.tokenizer_from_gguf(tokenizer_lib.find_embedded_gguf())
    cfg = TINY.replace(vocab_size=tok.vocab_size)  # the tiny preset's 512 ids are too few
    assert cfg.vocab_size == 49152
    params = random_params(cfg, seed=2)
    out = str(tmp_path)
    hf.export_hf(out, cfg, params, tok)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):  # fmt: skip
        assert os.path.isfile(os.path.join(out, f)), f

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in PROMPTS:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text
    chat = [{"role": "user", "content": PROMPTS[0]}]
    hf_chat = hf_tok.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert list(hf_chat) == tok.apply_chat_template(chat)

    model = transformers_model(out)
    assert 2 in np.atleast_1d(model.generation_config.eos_token_id)  # <|im_end|> stops
    ids = np.asarray([tok.apply_chat_template(chat)], np.int32)
    np.testing.assert_allclose(
        our_logits(cfg, params, ids), transformers_logits(model, ids), atol=1e-4, rtol=0
    )

    loaded = load.load_model(out)
    assert loaded.tokenizer.stop_ids == tok.stop_ids
    assert loaded.tokenizer.encode(PROMPTS[1]) == tok.encode(PROMPTS[1])
    assert_params_identical(loaded.params, params)


# ---------------------------------------------------------------------------------------------
# Re-import: bit-identical, straight onto the target shardings.


@pytest.mark.parametrize(
    "name,mesh_shape",
    [("tied", (1, 8, 1)), ("untied_llama3_rope", (2, 2, 2)), ("sharded", (1, 2, 4))],
)
def test_reimport_is_bit_identical_on_target_shardings(name, mesh_shape, tmp_path):
    cfg = SHARDED if name == "sharded" else VARIANTS[name]
    params = random_params(cfg, seed=4)
    hf.export_hf(str(tmp_path), cfg, params)
    mesh = sharding.make_mesh(mesh_shape)
    loaded = load.load_model(str(tmp_path), mesh=mesh)
    assert loaded.cfg == cfg
    assert_params_identical(loaded.params, params)

    _, abstract = llama.abstract_model(cfg)
    want = sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    for got, target in zip(
        jax.tree.leaves(loaded.params, is_leaf=is_var), jax.tree.leaves(want, is_leaf=is_var)
    ):
        assert got.get_value().sharding == target.get_value(), (got, target)
    if name == "sharded":  # really split 8 ways: embed over fsdp=2, heads over tensor=4
        q = loaded.params["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
        assert q.addressable_shards[0].data.size * 8 == q.size


def test_loading_reads_only_each_devices_slice(tmp_path, monkeypatch):
    """Each device's callback slices a memory-mapped view: no tensor is read whole per device."""
    cfg = SHARDED
    hf.export_hf(str(tmp_path), cfg, random_params(cfg, seed=5))

    class Tracked(np.ndarray):
        """Records the fraction of the tensor each indexing takes, and that it is a view."""

        def __getitem__(self, index):
            out = super().__getitem__(index)
            reads.append((self.hf_name, out.size / self.size, self.base is not None))
            return out

        def __array_finalize__(self, obj):
            self.hf_name = getattr(obj, "hf_name", None)

    def open_tracked(path, entry):
        w = open_safetensors(path, entry)
        assert isinstance(w, np.memmap)
        w = w.view(Tracked)
        w.hf_name = next(n for n, (p, e) in index.items() if e is entry)
        return w

    reads = []
    index = hf.safetensors_index(str(tmp_path))
    open_safetensors = hf.open_safetensors
    monkeypatch.setattr(hf, "safetensors_index", lambda _: index)
    monkeypatch.setattr(hf, "open_safetensors", open_tracked)
    load.load_model(str(tmp_path), mesh=sharding.make_mesh((1, 2, 4)))

    assert {name for name, _, _ in reads} == set(index)
    assert all(is_view for _, _, is_view in reads)  # the layout change copied nothing
    for name, fraction, _ in reads:
        expected = 1.0 if name.endswith("norm.weight") else 1 / 8  # norms are replicated
        assert fraction == pytest.approx(expected), (name, fraction)


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (index + shards) and bfloat16.


def test_sharded_export_writes_index_and_reloads(sharded_export):
    out, params = sharded_export
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and "model.safetensors" not in files
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == files
    assert sorted(index["weight_map"]) == sorted(hf.expected_hf_names(SHARDED))
    for name in files:  # each shard holds exactly what the index says, within the size limit
        in_file = set(hf.read_safetensors_index(os.path.join(out, name)))
        assert in_file == {t for t, f in index["weight_map"].items() if f == name}
    tensors = hf_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())

    loaded = load.load_model(out, mesh=sharding.make_mesh((1, 2, 4)))
    assert_params_identical(loaded.params, params)


@pytest.mark.torch
def test_sharded_export_loads_in_transformers(sharded_export):
    out, params = sharded_export
    model = transformers_model(out)
    tokens = tokens_for(SHARDED)
    np.testing.assert_allclose(
        our_logits(SHARDED, params, tokens), transformers_logits(model, tokens), atol=1e-4, rtol=0
    )


def test_bfloat16_export_and_reimport(tmp_path):
    cfg = VARIANTS["untied_llama3_rope"]
    params = random_params(cfg, seed=6)
    hf.export_hf(str(tmp_path), cfg, params, dtype="bfloat16")
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    for _, entry in hf.safetensors_index(str(tmp_path)).values():
        assert entry["dtype"] == "BF16"

    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params)
    as_bf16 = load.load_model(str(tmp_path), param_dtype="bfloat16")
    assert as_bf16.cfg == cfg.replace(param_dtype="bfloat16")
    assert_params_identical(as_bf16.params, rounded)
    as_f32 = load.load_model(str(tmp_path))  # bf16 values upcast exactly
    assert_params_identical(as_f32.params, jax.tree.map(lambda x: x.astype(np.float32), rounded))


@pytest.mark.torch
def test_bfloat16_export_loads_in_transformers_as_bfloat16(tmp_path):
    import torch

    cfg = TINY
    params = random_params(cfg, seed=7)
    hf.export_hf(str(tmp_path), cfg, params, dtype="bfloat16")
    model = transformers_model(str(tmp_path))
    assert model.dtype == torch.bfloat16
    q = model.model.layers[1].self_attn.q_proj.weight
    assert q.dtype == torch.bfloat16
    want = dict(hf.to_hf_state_dict(cfg, params))["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(
        q.detach().float().numpy(), want.astype(ml_dtypes.bfloat16).astype(np.float32)
    )


# ---------------------------------------------------------------------------------------------
# Errors that say what to fix.


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny_export"))
    hf.export_hf(out, TINY, random_params(TINY, seed=8))
    return out


@pytest.fixture
def exported(tiny_export, tmp_path):
    """A fresh copy of a tiny tied model's export, to damage; returns (dir, HF tensors)."""
    out = str(tmp_path / "model")
    shutil.copytree(tiny_export, out)
    return out, hf_tensors(out)


def rewrite(model_dir, tensors):
    hf.write_safetensors(os.path.join(model_dir, "model.safetensors"), tensors)


def test_error_missing_directory(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="existing Hugging Face directory"):
        load.load_model(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.read_hf_config(missing)


def test_error_no_config_json(exported):
    out, _ = exported
    os.remove(os.path.join(out, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*\*\.safetensors"):
        load.load_model(out)


def test_error_no_safetensors_mentions_pickles(exported):
    out, _ = exported
    os.remove(os.path.join(out, "model.safetensors"))
    open(os.path.join(out, "pytorch_model.bin"), "wb").close()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*\.bin.*convert"):
        load.load_model(out)


@pytest.mark.parametrize(
    "change,match",
    [
        (
            {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
            r"'gpt2' model.*Llama-family.*only",
        ),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "only 'silu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ],
    ids=["gpt2", "bias", "gelu", "yarn"],
)
def test_error_unsupported_config(exported, change, match):
    out, _ = exported
    path = os.path.join(out, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **change}, f)
    with pytest.raises(ValueError, match=match):
        load.load_model(out)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("model.layers.1.mlp.gate_proj.weight", (64, 128)),  # transposed
        ("model.layers.0.self_attn.q_proj.weight", (32, 128)),  # right size, wrong shape
        ("model.layers.0.self_attn.k_proj.weight", (30, 64)),  # not a whole number of heads
        ("model.embed_tokens.weight", (500, 64)),
    ],
    ids=["transposed", "reshaped", "partial_head", "vocab"],
)
def test_error_tensor_shape_mismatch(exported, name, shape):
    out, tensors = exported
    expected = tensors[name].shape
    rewrite(out, {**tensors, name: np.zeros(shape, np.float32)})
    with pytest.raises(
        ValueError,
        match=rf"tensor {name} has shape \({shape[0]}, {shape[1]}\), but the config needs "
        rf"\({expected[0]}, {expected[1]}\).*config does not match",
    ):
        load.load_model(out)


def test_error_missing_tensor_is_named(exported):
    out, tensors = exported
    del tensors["model.layers.1.mlp.up_proj.weight"]
    rewrite(out, tensors)
    with pytest.raises(
        ValueError, match=r"Missing 1: \['model\.layers\.1\.mlp\.up_proj\.weight'\]; unexpected 0"
    ):
        load.load_model(out)


def test_error_unexpected_tensor_is_named(exported):
    out, tensors = exported
    extra = "model.layers.2.self_attn.q_proj.weight"  # a third layer; the config says two
    rewrite(out, {**tensors, extra: tensors["model.layers.1.self_attn.q_proj.weight"]})
    with pytest.raises(ValueError, match=rf"Missing 0: \[\]; unexpected 1: \['{extra}'\]"):
        load.load_model(out)


def test_tied_model_ignores_an_extra_lm_head(exported):
    """Exporters of tied models often write lm_head too: it is the embedding, not an error."""
    out, tensors = exported
    rewrite(out, {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]})
    assert load.load_model(out).cfg.tie_word_embeddings


def test_error_index_lists_a_missing_shard(sharded_export, tmp_path):
    src, _ = sharded_export
    out = str(tmp_path / "copy")
    shutil.copytree(src, out)
    os.remove(os.path.join(out, sorted(f for f in os.listdir(out) if f.startswith("model-"))[1]))
    with pytest.raises(FileNotFoundError, match="listed in the index but missing"):
        load.load_model(out)
