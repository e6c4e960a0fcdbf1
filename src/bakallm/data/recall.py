"""Long-range recall: facts planted in real text and asked about later.

A fact reads "The code of Mary Alden is 4 8 1 2 7." and its query, some distance further on,
"Q: What is Mary Alden's code? A:", answered by " 4 8 1 2 7". The query is phrased so that nothing
read earlier continues it: the fact's code follows " is", the answer follows " A:", so no n-gram
continuation of earlier text (the document cache's, or a copying head's) predicts the answer's
first token; only what the model stored about the fact can.

One generator serves the benchmark (`recall_samples`: filler text, a fact, a chosen distance of
filler, the query and its answer) and training (`mix_recall`: facts and queries planted into the
documents of a corpus at a chosen rate). Everything is drawn from a seed, so the same arguments give
the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bakallm.data.token_cache import TokenizedCorpus
from bakallm.data.tokenizers import Tokenizer
from bakallm.errors import UserError

FIRST_NAMES = (
    "Mary",
    "John",
    "Alice",
    "Peter",
    "Clara",
    "Henry",
    "Edith",
    "Walter",
    "Agnes",
    "Oscar",
    "Ruth",
    "Victor",
    "Helen",
    "Arthur",
    "Nora",
    "Felix",
    "Irene",
    "Hugo",
    "Martha",
    "Louis",
    "Grace",
    "Simon",
    "Esther",
    "Frank",
    "Lydia",
    "Owen",
    "Violet",
    "Jonas",
    "Rosa",
    "Silas",
    "Ada",
    "Ralph",
    "Stella",
    "Isaac",
    "Maud",
    "Elias",
    "Joan",
    "Philip",
    "Hazel",
    "Carl",
)
LAST_NAMES = (
    "Alden",
    "Brooks",
    "Carver",
    "Dalton",
    "Ellis",
    "Fenwick",
    "Garner",
    "Hale",
    "Ingram",
    "Jarvis",
    "Keller",
    "Lowell",
    "Mercer",
    "Norris",
    "Oakley",
    "Porter",
    "Quinn",
    "Rhodes",
    "Sutton",
    "Thorne",
    "Upton",
    "Vance",
    "Whitaker",
    "Yates",
    "Ashford",
    "Barlow",
    "Crane",
    "Dunmore",
    "Everett",
    "Fairchild",
    "Gilmore",
    "Hollis",
    "Irving",
    "Kimball",
    "Lang",
    "Marsh",
    "Nash",
    "Pruitt",
    "Radcliffe",
    "Stroud",
)
CODE_LENGTH = 5  # digits in a fact's code: exact-match chance is 10 ** -CODE_LENGTH
# A fact is FACT_BEFORE + the answer's tokens + FACT_AFTER: its code is tokenized as the answer is.
FACT_BEFORE = "\nThe code of {name} is"
FACT_AFTER = ".\n"
QUERY_TEMPLATE = "\nQ: What is {name}'s code? A:"
ANSWER_TEMPLATE = " {code}"


@dataclass(frozen=True)
class Fact:
    name: str
    code: str  # CODE_LENGTH digits separated by spaces, e.g. "4 8 1 2 7"
    statement: np.ndarray  # token ids of the fact
    code_start: int  # where the code's tokens begin in the statement
    query: np.ndarray  # token ids of the question, up to the answer
    answer: np.ndarray  # token ids of the answer


@dataclass(frozen=True)
class RecallSample:
    """One document that ends with a query and its answer: `tokens[answer_start:]` is the answer."""

    tokens: np.ndarray
    answer_start: int
    distance_tokens: int  # filler tokens between the end of the last planted fact and the query
    fact_start: int  # where the queried fact's tokens begin
    code_start: int  # where its code's tokens begin (as many as the answer's)

    @property
    def answer(self) -> np.ndarray:
        return self.tokens[self.answer_start :]


class FactWriter:
    """Draws facts (a name and a random code) and tokenizes their statement, query and answer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]

    def facts(self, rng: np.random.Generator, count: int) -> list[Fact]:
        """`count` facts with distinct names (names repeat only after every one has been used)."""
        rounds = [rng.permutation(len(self.names)) for _ in range(-(-count // len(self.names)))]
        order = np.concatenate(rounds)[:count] if rounds else np.zeros(0, dtype=np.int64)
        codes = rng.integers(0, 10, size=(count, CODE_LENGTH))
        names = [self.names[index] for index in order]
        code_texts = [" ".join(map(str, digits)) for digits in codes]
        texts = []
        for name, code in zip(names, code_texts):
            texts += [
                FACT_BEFORE.format(name=name),
                ANSWER_TEMPLATE.format(code=code),
                QUERY_TEMPLATE.format(name=name),
            ]
        encoded = [np.asarray(ids, dtype=np.int64) for ids in self.tokenizer.encode_batch(texts)] if texts else []
        after = np.asarray(self.tokenizer.encode(FACT_AFTER), dtype=np.int64)
        facts = []
        for index, (name, code) in enumerate(zip(names, code_texts)):
            before, answer, query = encoded[3 * index : 3 * index + 3]
            facts.append(Fact(name, code, np.concatenate((before, answer, after)), len(before), query, answer))
        return facts

    def first_token_chance(self) -> float:
        """The chance of guessing an answer's first token: one over the first tokens the digits can start with."""
        first_tokens = {
            ids[0]
            for ids in self.tokenizer.encode_batch([ANSWER_TEMPLATE.format(code=digit) for digit in "0123456789"])
        }
        return 1.0 / len(first_tokens)


EXACT_MATCH_CHANCE = 10.0**-CODE_LENGTH


def parse_distances(text: str) -> tuple[float, ...]:
    """'0.5,1,16' -> (0.5, 1.0, 16.0): distances in windows, each above zero."""
    try:
        distances = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(
            f"--distances {text!r} is not a comma-separated list of numbers; write e.g. --distances 0.5,1,2,4,16."
        ) from None
    if not distances:
        raise UserError("--distances is empty; give at least one distance in windows, e.g. --distances 1,4,16.")
    for distance in distances:
        if not distance > 0 or distance == float("inf"):
            raise UserError(
                f"--distances must all be above zero (a distance in windows of the model), got {distance:g}."
            )
    return distances


def filler_stream(corpus: TokenizedCorpus) -> np.ndarray:
    """Every document of the filler corpus, one after another, as one stream of tokens."""
    return np.asarray(corpus.tokens[: corpus.n_tokens], dtype=np.int64)


def recall_samples(
    filler: np.ndarray,
    writer: FactWriter,
    distance_tokens: int,
    n_samples: int,
    seed: int,
    depth_tokens: int | None = None,
    max_depth_tokens: int = 1,
    n_facts: int = 1,
) -> list[RecallSample]:
    """Samples of `[filler | n_facts facts | distance_tokens of filler | query | answer]`, the filler cut
    from `filler` at random places; the query asks about one of the facts, drawn at random.

    The filler before the facts is `depth_tokens` long, or drawn from [0, max_depth_tokens) for each
    sample when None. Sample i depends only on (seed, distance_tokens, i).
    """
    if distance_tokens < 1:
        raise UserError(f"A recall distance must be at least one token, got {distance_tokens}; use larger --distances.")
    if n_facts < 1:
        raise UserError(f"--facts must be at least 1, got {n_facts}.")
    longest_depth = depth_tokens if depth_tokens is not None else max_depth_tokens - 1
    if longest_depth + distance_tokens > len(filler):
        raise UserError(
            f"A distance of {distance_tokens:,} tokens (after {longest_depth:,} tokens before the fact) needs more filler than the "
            f"{len(filler):,} tokens of --data; pass a longer corpus or shorter --distances."
        )
    samples = []
    for index in range(n_samples):
        rng = np.random.default_rng([seed, distance_tokens, index])
        depth = depth_tokens if depth_tokens is not None else int(rng.integers(0, max_depth_tokens))
        start = int(rng.integers(0, len(filler) - depth - distance_tokens + 1))
        facts = writer.facts(rng, n_facts)
        queried = facts[int(rng.integers(0, n_facts))]
        fact_start = depth + sum(len(fact.statement) for fact in facts[: facts.index(queried)])
        pieces = [
            filler[start : start + depth],
            *(fact.statement for fact in facts),
            filler[start + depth : start + depth + distance_tokens],
            queried.query,
            queried.answer,
        ]
        tokens = np.concatenate(pieces)
        samples.append(
            RecallSample(
                tokens, len(tokens) - len(queried.answer), distance_tokens, fact_start, fact_start + queried.code_start
            )
        )
    return samples


@dataclass(frozen=True)
class RecallMix:
    """A corpus with facts and queries planted, and which of its tokens are answers and codes."""

    corpus: TokenizedCorpus
    answers: np.ndarray  # bool per token of corpus.tokens: part of a query's answer
    codes: np.ndarray  # bool per token: part of a planted fact's code (random digits, nothing to learn)

    def scored(self, lm_share: float, seed: int) -> np.ndarray:
        """Which tokens are training targets: every answer token, each other token with probability
        `lm_share` (drawn from `seed`), and never a fact's code, whose random digits only teach noise."""
        ordinary = (
            np.random.default_rng([seed, 1]).random(len(self.answers)) < lm_share
            if lm_share < 1
            else np.ones(len(self.answers), dtype=bool)
        )
        return self.answers | (ordinary & ~self.codes)


def mix_recall(
    corpus: TokenizedCorpus, writer: FactWriter, every: int, max_distance: int, seed: int, overlap: bool = True
) -> RecallMix:
    """The corpus with facts planted about once every `every` tokens of each document, each followed,
    after a distance drawn log-uniformly from [0, max_distance] tokens, by its query and answer (left
    out when the document ends first). Without `overlap`, a fact that would come before the previous
    fact's query is dropped, so that one fact at most waits for its query. Deterministic from `seed`
    and each document's index."""
    if every < 1 or max_distance < 0:
        raise UserError(
            f"--recall-every must be at least 1 and --recall-max-distance at least 0, got {every} and {max_distance}."
        )
    documents, answer_masks, code_masks = [], [], []
    for index in range(len(corpus)):
        tokens = np.asarray(corpus.document(index), dtype=np.int64)
        rng = np.random.default_rng([seed, index])
        n_facts = int(rng.poisson(len(tokens) / every))
        positions = np.sort(rng.integers(0, len(tokens) + 1, size=n_facts))
        # Log-uniform: as many distances of 1-2 tokens as of 512-1024, so that most examples are short
        # and cheap (a model learns to recall near before far) while every scale up to the maximum is seen.
        distances = np.floor(np.exp(rng.uniform(0, np.log(max_distance + 2), size=n_facts))).astype(np.int64) - 1
        if not overlap:
            kept, free_from = [], 0
            for fact_index, (position, distance) in enumerate(zip(positions, distances)):
                if position >= free_from:
                    kept.append(fact_index)
                    free_from = position + distance + 1
            positions, distances = positions[kept], distances[kept]
        facts = writer.facts(rng, len(positions))
        # (where in the document, facts before queries planted at the same place, tokens, answer mask, code mask)
        insertions = []
        for position, distance, fact in zip(positions, distances, facts):
            code = np.zeros(len(fact.statement), dtype=bool)
            code[fact.code_start : fact.code_start + len(fact.answer)] = True
            insertions.append((int(position), 0, fact.statement, np.zeros(len(fact.statement), dtype=bool), code))
            if position + distance <= len(tokens):
                asked = np.concatenate((fact.query, fact.answer))
                answer = np.arange(len(asked)) >= len(fact.query)
                insertions.append((int(position + distance), 1, asked, answer, np.zeros(len(asked), dtype=bool)))
        insertions.sort(key=lambda insertion: insertion[:2])
        pieces, answers, codes, previous = [], [], [], 0
        for position, _, inserted, answer, code in insertions:
            ordinary = np.zeros(position - previous, dtype=bool)
            pieces += [tokens[previous:position], inserted]
            answers += [ordinary, answer]
            codes += [ordinary, code]
            previous = position
        pieces.append(tokens[previous:])
        answers.append(np.zeros(len(tokens) - previous, dtype=bool))
        codes.append(np.zeros(len(tokens) - previous, dtype=bool))
        documents.append(np.concatenate(pieces))
        answer_masks.append(np.concatenate(answers))
        code_masks.append(np.concatenate(codes))
    mixed = TokenizedCorpus.from_token_lists(documents, corpus.vocab_size, doc_ids=corpus.doc_ids)
    return RecallMix(mixed, np.concatenate(answer_masks), np.concatenate(code_masks))
