import json

import pyarrow
import pyarrow.parquet
import pytest

from bakallm.data import corpora
from bakallm.data.corpora import Document, load_corpus
from bakallm.errors import UserError

WIKITEXT_VALID = "wikitext-103-raw/wiki.valid.raw"


def hub_rows(path):
    """The rows Hugging Face `datasets` gives for a WikiText file: whitespace-only lines are ""."""
    with open(path, encoding="utf-8", newline="") as file:
        return [line if line.strip() else "" for line in file]


def test_wikitext_validation_file_splits_into_60_articles_that_rebuild_the_rows(shared_file):
    path = shared_file(WIKITEXT_VALID)
    documents = list(load_corpus(str(path)))
    assert len(documents) == 60
    assert documents[0].id == "Homarus gammarus"
    assert documents[0].text.startswith(" = Homarus gammarus = \n Homarus gammarus , known as the European lobster")
    assert documents[-1].id == "Rakie Ayola"
    assert all(document.text.startswith(f" = {document.id} = \n") for document in documents)
    assert "".join(document.text for document in documents) == "".join(hub_rows(path))


def test_section_headings_stay_inside_their_article():
    rows = [" = A = \n", "", " x \n", " = = Section = = \n", " y \n", " = B = \n", " z \n"]
    assert list(corpora.wikitext_articles(rows)) == [
        Document("A", " = A = \n x \n = = Section = = \n y \n"),
        Document("B", " = B = \n z \n"),
    ]


def test_rows_before_the_first_heading_are_dropped():
    rows = ["", " preamble \n", " = A = \n", " a \n"]
    assert list(corpora.wikitext_articles(rows)) == [Document("A", " = A = \n a \n")]


def test_hub_rows_give_the_same_articles_as_the_local_file(shared_file, monkeypatch):
    datasets = pytest.importorskip("datasets")
    path = shared_file(WIKITEXT_VALID)
    calls = []

    def fake_load_dataset(repo_id, config_name, split, revision):
        calls.append((repo_id, config_name, split, revision))
        return datasets.Dataset.from_dict({"text": hub_rows(path)})

    monkeypatch.setattr(corpora, "hub_revision", lambda repo_id, repo_type, advice: "abc123")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub_corpus = load_corpus("wikitext-2", split="validation")
    assert calls[0] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", "abc123")
    assert hub_corpus.name == "wikitext-2-validation"
    assert list(hub_corpus) == list(load_corpus(str(path)))
    assert list(hub_corpus) == list(hub_corpus)  # re-iterable
    assert hub_corpus.fingerprint() != load_corpus(str(path)).fingerprint()


def test_hub_name_offline_says_to_pass_a_local_path(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="offline mode is on.*pass the path of a local copy"):
        load_corpus("wikitext-103", split="validation")


def test_hub_name_offline_with_nothing_cached_says_to_pass_a_local_path(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    # As if offline mode had been set before `datasets` was imported, with empty caches.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        UserError, match="Could not load wikitext-2 from the Hugging Face Hub or its local cache; pass the path"
    ):
        load_corpus("wikitext-2", split="test")


def test_unknown_hub_split_is_refused_before_any_download():
    with pytest.raises(UserError, match="Unknown split 'dev' for wikitext-103; use one of train, validation, test"):
        load_corpus("wikitext-103", split="dev")


def test_folder_of_txt_files_gives_one_document_per_file_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second\r\nline\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first é", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    corpus = load_corpus(str(tmp_path), split="test")  # the split is ignored for local sources
    assert corpus.name == tmp_path.name
    assert list(corpus) == [Document("a.txt", "first é"), Document("b.txt", "second\r\nline\n")]


def test_single_txt_file_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Call me Ishmael.\n\nSome years ago", encoding="utf-8")
    assert list(load_corpus(str(path))) == [Document("book.txt", "Call me Ishmael.\n\nSome years ago")]


def test_jsonl_reads_text_and_optional_id(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"id": "x", "text": "one"}, {"text": "two\nlines"}, {"id": 7, "text": ""}]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n", encoding="utf-8")
    assert list(load_corpus(str(path))) == [
        Document("x", "one"),
        Document("docs.jsonl:2", "two\nlines"),
        Document("7", ""),
    ]


def test_jsonl_without_text_field_names_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"docs.jsonl line 2 has no string field \"text\""):
        list(load_corpus(str(path)))


def test_parquet_reads_the_text_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": ["alpha", "beta gamma"], "score": [1, 2]}), path)
    assert list(load_corpus(str(path))) == [
        Document("docs.parquet:0", "alpha"),
        Document("docs.parquet:1", "beta gamma"),
    ]


def test_parquet_uses_an_id_column_when_present(tmp_path):
    path = tmp_path / "docs.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"id": ["p", "q"], "text": ["alpha", "beta"]}), path)
    assert [document.id for document in load_corpus(str(path))] == ["p", "q"]


def test_parquet_without_text_column_is_refused(tmp_path):
    path = tmp_path / "docs.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"body": ["alpha"]}), path)
    with pytest.raises(UserError, match=r"has no column \"text\" \(it has body\)"):
        load_corpus(str(path))


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(UserError, match="No file or folder at .*nowhere.txt; pass an existing path"):
        load_corpus(str(tmp_path / "nowhere.txt"))


@pytest.mark.parametrize("name", ["empty.txt.d", "empty.jsonl", "empty.raw"])
def test_empty_corpus_is_refused(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".d"):
        path.mkdir()
    else:
        path.write_text("\n \n" if name.endswith(".raw") else "", encoding="utf-8")
    with pytest.raises(UserError, match=f"Corpus .*{name} holds no documents"):
        load_corpus(str(path))


def test_unsupported_file_type_is_refused(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(UserError, match="corpus files must end in"):
        load_corpus(str(path))


def test_non_utf8_file_is_named_in_the_error(tmp_path):
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    corpus = load_corpus(str(tmp_path))
    with pytest.raises(UserError, match=r"latin1.txt is not valid UTF-8 text"):
        list(corpus)


def test_non_utf8_line_of_wikitext_file_is_located(tmp_path):
    path = tmp_path / "wiki.raw"
    path.write_bytes(b" = A = \n fine \n caf\xe9 \n")
    with pytest.raises(UserError, match=r"wiki.raw \(line 3\) is not valid UTF-8"):
        load_corpus(str(path))


def test_fingerprint_is_stable_and_follows_edits(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("one", encoding="utf-8")
    first = load_corpus(str(path)).fingerprint()
    assert load_corpus(str(path)).fingerprint() == first
    path.write_text("one two", encoding="utf-8")
    assert load_corpus(str(path)).fingerprint() != first
