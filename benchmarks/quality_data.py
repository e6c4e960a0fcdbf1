"""Builds the corpora of the small-scale quality study (docs/quality.md) as .jsonl files.

- train.jsonl: the WikiText validation articles except every `--wiki-holdout-every`-th one, plus six books.
- test-books.jsonl: the first `--book-tokens` tokens of each held-out book (books of the shared folder
  that are not in training).
- test-wiki.jsonl: the WikiText validation articles left out of training.
- train-wiki.jsonl: the training articles alone (recipes/ablations/quality-1m-wikitext.yaml adds its own books).

No data is stored in the repository; run:
    python benchmarks/quality_data.py --shared ../shared/data --out data/quality
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bakallm.data.corpora import load_corpus
from bakallm.data.tokenizers import load_tokenizer

TRAIN_BOOKS = (
    "pride-and-prejudice",
    "a-tale-of-two-cities",
    "life-on-the-mississippi",
    "the-time-machine",
    "the-wonderful-wizard-of-oz",
    "the-red-badge-of-courage",
)
TEST_BOOKS = (
    "persuasion",
    "treasure-island",
    "the-war-of-the-worlds",
    "black-beauty",
    "the-prisoner-of-zenda",
    "the-scarlet-letter",
    "my-antonia",
    "the-jungle-book",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("data/quality"))
    parser.add_argument("--book-tokens", type=int, default=16384)
    parser.add_argument("--wiki-holdout-every", type=int, default=6)
    args = parser.parse_args()
    tokenizer = load_tokenizer(str(args.shared / "tokenizers/gpt-neox-20b/tokenizer.json"))
    books = {path.name.split("_")[0]: path for path in (args.shared / "books/train").glob("*.txt")}
    articles = list(load_corpus(str(args.shared / "wikitext-103-raw/wiki.valid.raw")))
    held_out = {
        index for index in range(len(articles)) if index % args.wiki_holdout_every == args.wiki_holdout_every - 1
    }
    train_wiki = [{"id": doc.id, "text": doc.text} for index, doc in enumerate(articles) if index not in held_out]
    train = train_wiki + [{"id": name, "text": books[name].read_text(encoding="utf-8")} for name in TRAIN_BOOKS]
    test_wiki = [{"id": articles[index].id, "text": articles[index].text} for index in sorted(held_out)]
    test_books = []
    for name in TEST_BOOKS:
        text = books[name].read_text(encoding="utf-8")
        ids = tokenizer.encode(text)
        if len(ids) > args.book_tokens:
            # Cut at a character boundary that keeps about book_tokens tokens (tokens roughly track characters).
            keep = int(len(text) * args.book_tokens / len(ids))
            text = text[:keep]
        test_books.append({"id": name, "text": text})
    args.out.mkdir(parents=True, exist_ok=True)
    for file_name, records in (
        ("train.jsonl", train),
        ("test-books.jsonl", test_books),
        ("test-wiki.jsonl", test_wiki),
        ("train-wiki.jsonl", train_wiki),
    ):
        with (args.out / file_name).open("w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record) + "\n")
        tokens = sum(len(tokenizer.encode(record["text"])) for record in records)
        print(f"{file_name}: {len(records)} documents, {tokens:,} tokens")


if __name__ == "__main__":
    main()
