"""The bakallm_wikitext task's documents and figures: articles of a local WikiText file, read by
bakallm's own corpus reader so that the harness scores exactly the texts `bakallm bench` scores."""

from __future__ import annotations

import logging

import datasets

from bakallm.data.corpora import load_corpus
from bakallm.data.token_cache import count_bytes, count_words
from bakallm.errors import UserError

TASK = "bakallm_wikitext"


class _MetadataAdvice(logging.Filter):
    """The harness advises every task with a custom loader, on every run, to take its arguments
    through --metadata: this task already does (its file's path), so the advice is dropped for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(f"{TASK}: Custom kwargs can be passed to `--metadata`")


# Read when the harness parses the task's YAML, before it loads the documents and would warn.
logging.getLogger("lm_eval.api.task").addFilter(_MetadataAdvice())


def load_articles(path: str | None = None, max_articles: int | None = None, **unused) -> datasets.DatasetDict:
    if path is None:
        raise UserError(
            'The bakallm_wikitext task needs the WikiText file: pass --metadata \'{"path": "PATH/wiki.valid.raw"}\'.'
        )
    rows = []
    for document in load_corpus(path, "test"):
        if max_articles is not None and len(rows) >= int(max_articles):
            break
        rows.append({"title": document.id, "text": document.text})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def article_text(doc: dict) -> str:
    return doc["text"]


def process_results(doc: dict, results: list[float]) -> dict:
    (loglikelihood,) = results
    words, n_bytes = count_words(doc["text"]), count_bytes(doc["text"])
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
