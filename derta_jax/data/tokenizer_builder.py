"""Build a small byte-level BPE tokenizer (tests, the tiny config, the synthetic world).

A real tokenizer is 128k entries and several MB; tests and the synthetic reproduction need
one that trains in a second on a few hundred sentences and still behaves like the real ones:
byte-level BPE (any text encodes, offsets work), a BOS that the tokenizer adds itself (as
Llama-3's does), an EOS and a pad token, and a chat template. DeRTa needs the refusal word
to be ONE token; BPE only learns a word when it is frequent, so every `required_words`
entry that did not come out as a single token is added to the vocabulary as a (non-special)
added token, and `build_bpe_tokenizer` checks the result.

    tok = build_bpe_tokenizer(texts, vocab_size=512)   # "Sorry" is one token
    save_tokenizer(tok, "DIR")                         # refuses to overwrite unless asked
    tok = load_tokenizer("DIR")                        # AutoTokenizer, never remote code
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Each message is `<|role|>\n{content}<|eos|>\n`; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512,
                        required_words: Sequence[str] = ("Sorry",)) -> Any:
    """Trains byte-level BPE on `texts`; returns a PreTrainedTokenizerFast with BOS/EOS/pad."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    missing = [w for w in required_words if len(backend.encode(w).ids) != 1]
    backend.add_tokens([AddedToken(w, normalized=False) for w in missing])
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), chat_template=CHAT_TEMPLATE)
    for word in required_words:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"required word {word!r} encodes to {ids}, not one token")
    return tokenizer


def save_tokenizer(tokenizer: Any, directory: str, overwrite: bool = False) -> None:
    """save_pretrained into `directory`; refuses a non-empty directory unless `overwrite`."""
    from derta_jax.paths import prepare_output_dir

    prepare_output_dir(directory, overwrite)
    tokenizer.save_pretrained(directory)


def load_tokenizer(directory: str) -> Any:
    """A fast tokenizer from a directory of tokenizer files; never runs remote code."""
    from transformers import AutoTokenizer

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"{directory}: not a fast tokenizer (no tokenizer.json); masking "
                         f"by character offsets needs one")
    return tokenizer
