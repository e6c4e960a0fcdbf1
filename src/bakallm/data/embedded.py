"""The corpus and tokenizer shipped inside the package, so that `bakallm train` and `bakallm bench`
run on a fresh machine with no network and no data folder (src/bakallm/data/books/PROVENANCE.md).

Nine public-domain novels (2.6 MB) to train on, one more (The Time Machine) held out to benchmark
on, and a byte-level BPE tokenizer of 8,192 tokens trained on the nine: small enough that a tiny
model spends its parameters on more than its embeddings.
"""

from __future__ import annotations

from pathlib import Path

BOOKS_FOLDER = Path(__file__).with_name("books")
TRAIN_CORPUS = "bakallm-books"
HELD_OUT_CORPUS = "bakallm-books-held-out"
TOKENIZER = "bakallm-books-8k"
TOKENIZER_VOCAB_SIZE = 8192

_CORPORA = {TRAIN_CORPUS: BOOKS_FOLDER / "train", HELD_OUT_CORPUS: BOOKS_FOLDER / "held-out"}
_TOKENIZERS = {TOKENIZER: BOOKS_FOLDER / "tokenizer.json"}


def corpus_folder(name: str) -> Path | None:
    """The folder of an embedded corpus, or None when `name` names none."""
    return _CORPORA.get(name)


def tokenizer_file(name: str) -> Path | None:
    """The tokenizer.json of an embedded tokenizer, or None when `name` names none."""
    return _TOKENIZERS.get(name)


def train_tokenizer(files: list[Path], vocab_size: int = TOKENIZER_VOCAB_SIZE):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenization, no special tokens) trained on `files`:
    how the shipped tokenizer.json was made, from the training part only."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train([str(file) for file in files], trainer)
    return tokenizer
