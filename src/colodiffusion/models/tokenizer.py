"""An offline CLIP tokenizer for the tiny preset.

Real SD checkpoints ship their CLIP BPE vocabulary; the tiny preset has none and must not download
one. We train a byte-level BPE with CLIP's exact pre-tokenization and `</w>` end-of-word suffix on
the dataset's captions, so the result is a genuine `CLIPTokenizer` that diffusers pipelines load.
`coverage` measures how well any tokenizer knows a dataset's caption words (a word it splits into
letters is one the model will learn slowly, if at all).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Iterable

from tokenizers import pre_tokenizers, trainers
from transformers import CLIPTokenizer

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 1024, max_length: int = 24) -> CLIPTokenizer:
    """Train a CLIP-compatible BPE vocabulary on `texts`, identical in every process for the same texts."""
    base = CLIPTokenizer(vocab={s: i for i, s in enumerate(SPECIALS)}, merges=[])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # Every byte must also exist as a word-final symbol, as in CLIP's vocabulary, so any text encodes.
    # Registered up front: the trainer would otherwise number them in its hash-map order, which
    # differs per process, and break ties between equally frequent merges by those numbers.
    word_final = [ch + "</w>" for ch in alphabet]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(word_final),
        special_tokens=SPECIALS + word_final,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend = base.backend_tokenizer
    backend.train_from_iterator(list(texts), trainer=trainer)
    vocab = backend.get_vocab()
    merges = [
        tuple(m) if isinstance(m, (list, tuple)) else tuple(m.split(" "))
        for m in json.loads(backend.to_str())["model"]["merges"]
    ]
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    return tok


MAX_PIECES = 3
"""A caption word split into more pieces than this is one the text encoder barely knows."""


def coverage(tokenizer, captions: Iterable[str], max_pieces: int = MAX_PIECES) -> tuple[int, Counter, dict[str, int]]:
    """(caption words counted, Counter of the words split into more than `max_pieces` tokens, pieces
    per such word). Words are runs of letters, lower-cased as CLIP's tokenizer does."""
    words = Counter(w for text in captions for w in re.findall(r"[^\W\d_]+", text.lower()))
    pieces = {w: len(tokenizer.tokenize(w)) for w in words}
    split = Counter({w: n for w, n in words.items() if pieces[w] > max_pieces})
    return sum(words.values()), split, {w: pieces[w] for w in split}
