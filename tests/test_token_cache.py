import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import tokenizers

from bakallm.data import token_cache
from bakallm.data.corpora import load_corpus
from bakallm.data.token_cache import TokenizedCorpus, default_cache_dir, tokenize_corpus
from bakallm.data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer
from bakallm.errors import UserError


@dataclass
class CountingTokenizer(Tokenizer):
    """Byte tokenizer that counts encode_batch calls and can fail on a chosen call, like an interrupted run."""

    fail_on_call: int | None = None
    calls: list[int] = field(default_factory=list)
    name: str = "counting-bytes"

    @property
    def vocab_size(self):
        return 256

    def encode_batch(self, texts):
        self.calls.append(len(texts))
        if len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt
        return ByteTokenizer().encode_batch(texts)

    def decode(self, ids):
        return ByteTokenizer().decode(ids)

    def fingerprint(self):
        return "bytes-v1"


def write_books(folder, texts):
    folder.mkdir(exist_ok=True)
    for index, text in enumerate(texts):
        (folder / f"book{index}.txt").write_text(text, encoding="utf-8")
    return load_corpus(str(folder))


def as_bytes(tokenized):
    return bytes(tokenized.tokens.tolist())


def entries(cache_dir):
    return sorted(path.name for path in cache_dir.iterdir())


def test_wikitext_tokens_equal_plain_tokenizers_encoding(shared_file, tmp_path):
    corpus = load_corpus(str(shared_file("wikitext-103-raw/wiki.valid.raw")))
    tokenizer_path = shared_file("tokenizers/gpt-neox-20b/tokenizer.json")
    tokenized = tokenize_corpus(corpus, load_tokenizer(str(tokenizer_path)), cache_dir=tmp_path)
    documents = list(corpus)
    plain = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    expected = [encoding.ids for encoding in plain.encode_batch([d.text for d in documents], add_special_tokens=False)]
    assert len(tokenized) == 60
    assert tokenized.vocab_size == 50277
    assert isinstance(tokenized.tokens, np.memmap) and tokenized.tokens.dtype == np.uint16
    assert tokenized.doc_ids == [document.id for document in documents]
    assert tokenized.offsets.tolist() == np.cumsum([0] + [len(ids) for ids in expected]).tolist()
    assert tokenized.n_tokens == sum(len(ids) for ids in expected)
    assert all(tokenized.document(i).tolist() == ids for i, ids in enumerate(expected))
    assert tokenized.n_bytes.tolist() == [len(d.text.encode("utf-8")) for d in documents]
    assert tokenized.n_words.tolist() == [len(d.text.split()) for d in documents]
    assert tokenized.n_bytes.sum() == 1_144_248  # the file less its 1,299 blank " \n" lines, as PROVENANCE.md says


def test_second_call_reuses_the_entry_without_tokenizing(tmp_path):
    corpus = write_books(tmp_path / "books", ["first book", "second", "é"])
    tokenizer = CountingTokenizer()
    first = tokenize_corpus(corpus, tokenizer, cache_dir=tmp_path / "cache")
    assert tokenizer.calls == [3]
    second = tokenize_corpus(corpus, tokenizer, cache_dir=tmp_path / "cache")
    assert tokenizer.calls == [3]
    assert second.fingerprint == first.fingerprint
    assert second.doc_ids == ["book0.txt", "book1.txt", "book2.txt"]
    assert second.tokens.tolist() == list(b"first booksecond\xc3\xa9")
    assert second.offsets.tolist() == [0, 10, 16, 18]
    assert second.n_bytes.tolist() == [10, 6, 2]
    assert second.n_words.tolist() == [2, 1, 1]
    (entry,) = entries(tmp_path / "cache")
    assert entry.startswith("books--counting-bytes--")
    meta = json.loads((tmp_path / "cache" / entry / "meta.json").read_text())
    assert (meta["n_tokens"], meta["dtype"], meta["vocab_size"]) == (18, "uint16", 256)


def test_documents_are_encoded_in_bounded_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "BATCH_CHARACTERS", 10)
    corpus = write_books(tmp_path / "books", ["abcdefghijkl", "ab", "cd", "ef", "ghijklmnop", "x"])
    tokenizer = CountingTokenizer()
    tokenized = tokenize_corpus(corpus, tokenizer, cache_dir=tmp_path / "cache")
    assert tokenizer.calls == [1, 4, 1]  # a long document goes alone; short ones share a call
    assert as_bytes(tokenized) == b"abcdefghijklabcdefghijklmnopx"


def test_changed_source_gets_a_new_entry(tmp_path):
    corpus = write_books(tmp_path / "books", ["one", "two"])
    before = tokenize_corpus(corpus, ByteTokenizer(), cache_dir=tmp_path / "cache")
    corpus = write_books(tmp_path / "books", ["one", "two, edited"])
    after = tokenize_corpus(corpus, ByteTokenizer(), cache_dir=tmp_path / "cache")
    assert after.fingerprint != before.fingerprint
    assert as_bytes(after) == b"onetwo, edited"
    assert as_bytes(before) == b"onetwo"
    assert len(entries(tmp_path / "cache")) == 2


def test_interrupted_build_leaves_nothing_behind_and_the_next_run_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "BATCH_DOCUMENTS", 1)
    corpus = write_books(tmp_path / "books", ["one", "two", "three"])
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(corpus, CountingTokenizer(fail_on_call=2), cache_dir=tmp_path / "cache")
    assert entries(tmp_path / "cache") == []
    tokenized = tokenize_corpus(corpus, CountingTokenizer(), cache_dir=tmp_path / "cache")
    assert as_bytes(tokenized) == b"onetwothree"


def test_half_written_folder_of_a_killed_run_is_never_read(tmp_path):
    corpus = write_books(tmp_path / "books", ["one", "two"])
    cache_dir = tmp_path / "cache"
    complete = tokenize_corpus(corpus, ByteTokenizer(), cache_dir=cache_dir)
    (entry,) = entries(cache_dir)
    for path in (cache_dir / entry).iterdir():
        path.unlink()
    (cache_dir / entry).rename(cache_dir / f".{entry}.x1y2.partial")  # as a killed build leaves it
    (cache_dir / f".{entry}.x1y2.partial" / "tokens.bin").write_bytes(b"on")
    rebuilt = tokenize_corpus(corpus, ByteTokenizer(), cache_dir=cache_dir)
    assert as_bytes(rebuilt) == as_bytes(complete) == b"onetwo"
    assert entry in entries(cache_dir)


@pytest.mark.parametrize("damage", ["truncated", "same-size garbage", "metadata gone"])
def test_a_damaged_entry_is_never_used_but_rebuilt(tmp_path, capsys, damage):
    corpus = write_books(tmp_path / "books", ["one", "two"])
    first = tokenize_corpus(corpus, ByteTokenizer(), cache_dir=tmp_path / "cache")
    expected = np.array(first.tokens)
    (entry,) = entries(tmp_path / "cache")
    folder = tmp_path / "cache" / entry
    if damage == "truncated":
        (folder / "tokens.bin").write_bytes(b"on")
    elif damage == "same-size garbage":
        (folder / "tokens.bin").write_bytes((folder / "tokens.bin").read_bytes()[::-1])
    else:
        (folder / "meta.json").unlink()
    rebuilt = tokenize_corpus(corpus, ByteTokenizer(), cache_dir=tmp_path / "cache")
    assert np.array_equal(np.array(rebuilt.tokens), expected)
    assert f"token cache entry {folder} is damaged" in capsys.readouterr().err
    assert entries(tmp_path / "cache") == [entry]


def test_corpus_without_any_token_is_refused(tmp_path):
    corpus = write_books(tmp_path / "books", ["", ""])
    with pytest.raises(UserError, match="Corpus books has no tokens at all"):
        tokenize_corpus(corpus, ByteTokenizer(), cache_dir=tmp_path / "cache")
    assert entries(tmp_path / "cache") == []


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BAKALLM_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("BAKALLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "bakallm" / "tokens"


def test_from_token_lists_builds_an_in_memory_corpus():
    corpus = TokenizedCorpus.from_token_lists(
        [[5, 6, 7], [], [8]], vocab_size=10, doc_ids=["a", "b", "c"], texts=["x y", "", "zé"]
    )
    assert len(corpus) == 3
    assert corpus.tokens.dtype == np.uint16
    assert corpus.tokens.tolist() == [5, 6, 7, 8]
    assert corpus.offsets.tolist() == [0, 3, 3, 4]
    assert corpus.document(0).tolist() == [5, 6, 7] and corpus.document(1).tolist() == []
    assert corpus.n_tokens == 4
    assert corpus.n_bytes.tolist() == [3, 0, 3]
    assert corpus.n_words.tolist() == [2, 0, 1]
    same = TokenizedCorpus.from_token_lists([[5, 6, 7], [], [8]], vocab_size=10, doc_ids=["a", "b", "c"])
    other = TokenizedCorpus.from_token_lists([[5, 6], [7], [8]], vocab_size=10, doc_ids=["a", "b", "c"])
    assert same.fingerprint == corpus.fingerprint != other.fingerprint
    assert same.n_bytes.tolist() == [0, 0, 0] and same.doc_ids == ["a", "b", "c"]


def test_from_token_lists_picks_uint32_for_large_vocabularies_and_checks_ids():
    corpus = TokenizedCorpus.from_token_lists([[70000, 1]], vocab_size=70001)
    assert corpus.tokens.dtype == np.uint32 and corpus.tokens.tolist() == [70000, 1]
    assert corpus.doc_ids == ["0"]
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        TokenizedCorpus.from_token_lists([[10]], vocab_size=10)


def test_a_moved_corpus_keeps_its_fingerprint(tmp_path):
    first = tokenize_corpus(
        write_books(tmp_path / "here", ["one", "two"]), ByteTokenizer(), cache_dir=tmp_path / "cache"
    )
    moved = tokenize_corpus(
        write_books(tmp_path / "there", ["one", "two"]), ByteTokenizer(), cache_dir=tmp_path / "cache"
    )
    edited = tokenize_corpus(
        write_books(tmp_path / "edited", ["one", "two!"]), ByteTokenizer(), cache_dir=tmp_path / "cache"
    )
    assert moved.fingerprint == first.fingerprint != edited.fingerprint
