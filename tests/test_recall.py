"""The long-range recall benchmark and training mix (bakallm.data.recall, bakallm.evaluation.recall)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bakallm.cli import main
from bakallm.data.recall import (
    CODE_LENGTH,
    EXACT_MATCH_CHANCE,
    FactWriter,
    RecallSample,
    mix_recall,
    parse_distances,
    recall_samples,
)
from bakallm.data.token_cache import TokenizedCorpus
from bakallm.data.tokenizers import load_tokenizer
from bakallm.errors import UserError
from bakallm.evaluation.recall import RecallTally, bakallm_answer_log_probs
from bakallm.training.arguments import TrainConfig
from bakallm.training.trainer import Trainer
from test_bench_cli import bench, make_run, stored_rows
from test_evaluation import WINDOW, small_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEOX_TOKENIZER = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
)
FILLER_WORDS = "the old river ran past quiet fields while rain fell on the city and a dog slept".split()


def filler_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(FILLER_WORDS[index] for index in rng.integers(0, len(FILLER_WORDS), size=n_words))


@pytest.fixture(scope="module")
def byte_writer():
    return FactWriter(load_tokenizer("bytes"))


@pytest.fixture(scope="module")
def byte_filler():
    return np.frombuffer(filler_text(3000).encode("utf-8"), dtype=np.uint8).astype(np.int64)


def tokenizers():
    found = [load_tokenizer("bytes")]
    if NEOX_TOKENIZER.is_file():
        found.append(load_tokenizer(str(NEOX_TOKENIZER)))
    return found


# ----- the generator -----


FACT = re.compile(r"\nThe code of (\w+ \w+) is (\d(?: \d){4})\.\n")
QUERY = re.compile(r"\nQ: What is (\w+ \w+)'s code\? A: (\d(?: \d){4})")


def text_of(tokens: np.ndarray) -> str:
    return bytes(np.asarray(tokens).astype(np.uint8)).decode("utf-8")


def test_samples_are_deterministic_from_the_seed_and_hold_fact_filler_query_and_answer(byte_writer, byte_filler):
    first = recall_samples(byte_filler, byte_writer, 200, 6, seed=3, max_depth_tokens=40)
    again = recall_samples(byte_filler, byte_writer, 200, 6, seed=3, max_depth_tokens=40)
    other = recall_samples(byte_filler, byte_writer, 200, 6, seed=4, max_depth_tokens=40)
    assert all(np.array_equal(a.tokens, b.tokens) and a.answer_start == b.answer_start for a, b in zip(first, again))
    assert any(not np.array_equal(a.tokens, b.tokens) for a, b in zip(first, other))
    filler = text_of(byte_filler)
    for sample in first:
        text = text_of(sample.tokens)
        fact = FACT.match(text, sample.fact_start)
        query = QUERY.fullmatch(text, fact.end() + 200)
        assert fact is not None and query is not None and sample.fact_start < 40
        assert text_of(sample.tokens[sample.code_start : sample.code_start + len(sample.answer)]) == " " + fact.group(2)
        assert query.groups() == fact.groups() and text_of(sample.answer) == " " + fact.group(2)
        assert (
            text[: sample.fact_start] + text[fact.end() : fact.end() + 200] in filler
        )  # one contiguous piece of filler


def test_a_sample_depends_only_on_seed_distance_and_index(byte_writer, byte_filler):
    three = recall_samples(byte_filler, byte_writer, 100, 3, seed=0, depth_tokens=5)
    five = recall_samples(byte_filler, byte_writer, 100, 5, seed=0, depth_tokens=5)
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(three, five))
    assert all(sample.fact_start == 5 for sample in three)


@pytest.mark.parametrize("tokenizer", tokenizers(), ids=lambda tokenizer: tokenizer.name)
def test_the_query_never_shares_an_ngram_continuation_with_its_fact(tokenizer):
    """The tokens before the answer's first token, at every context length up to 4, never precede that
    token anywhere in the fact: copying what followed the same context cannot answer."""
    facts = FactWriter(tokenizer).facts(np.random.default_rng(0), 600)
    assert len({fact.name for fact in facts}) == 600
    for fact in facts:
        first = fact.answer[0]
        for context_length in range(1, 5):
            context = tuple(fact.query[-context_length:])
            statement = fact.statement
            continuations = {
                statement[end]
                for end in range(context_length, len(statement))
                if tuple(statement[end - context_length : end]) == context
            }
            assert first not in continuations, (fact.name, fact.code, context_length)


def test_chance_levels(byte_writer):
    assert EXACT_MATCH_CHANCE == 10.0**-CODE_LENGTH
    assert byte_writer.first_token_chance() == 1.0  # every answer starts with the byte " "
    if NEOX_TOKENIZER.is_file():
        assert FactWriter(load_tokenizer(str(NEOX_TOKENIZER))).first_token_chance() == pytest.approx(0.1)


@pytest.mark.parametrize("text", ["", "1,,x", "0.5,0", "-2", "inf"])
def test_bad_distances_are_refused_in_one_sentence(text):
    with pytest.raises(UserError, match="--distances"):
        parse_distances(text)


def test_a_distance_longer_than_the_filler_is_refused(byte_writer, byte_filler):
    with pytest.raises(UserError, match="needs more filler"):
        recall_samples(byte_filler, byte_writer, len(byte_filler), 1, seed=0, max_depth_tokens=10)
    with pytest.raises(UserError, match="at least one token"):
        recall_samples(byte_filler, byte_writer, 0, 1, seed=0)


# ----- scoring -----


def test_accuracy_loss_and_first_token_by_hand():
    """Three samples of a two-token answer over a vocabulary of 3: all right, first right only, none right."""
    tally = RecallTally()
    probabilities = [
        ([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [0, 2]),
        ([[0.1, 0.6, 0.3], [0.5, 0.4, 0.1]], [1, 1]),
        ([[0.5, 0.4, 0.1], [0.3, 0.3, 0.4]], [1, 0]),
    ]
    for probs, answer in probabilities:
        tally.add(torch.tensor(probs).log(), torch.tensor(answer))
    score = tally.score(2.0, 64, chance=0.01, first_token_chance=1 / 3)
    expected_loss = (
        -sum(math.log(probs[i][token]) for probs, answer in probabilities for i, token in enumerate(answer)) / 6
    )
    assert (score.accuracy, score.first_token_accuracy, score.samples, score.answer_tokens) == (1 / 3, 2 / 3, 3, 6)
    assert score.answer_loss == pytest.approx(expected_loss)
    assert (score.distance_windows, score.distance_tokens, score.chance, score.first_token_chance) == (
        2.0,
        64,
        0.01,
        1 / 3,
    )


def samples_of_lengths(writer, filler, distances, depth):
    return [
        sample
        for distance in distances
        for sample in recall_samples(filler, writer, distance, 2, seed=distance, depth_tokens=depth)
    ]


@pytest.mark.parametrize("n_ctx", [None, WINDOW, 3 * WINDOW + 5])
def test_each_answer_token_is_scored_once_as_a_plain_forward_scores_it(byte_writer, byte_filler, n_ctx):
    """Samples of different lengths in one batch, read in calls of several windows with resets every
    n_ctx: the answer log-probabilities equal those of one forward call per segment from a fresh state."""
    model = small_model()
    samples = samples_of_lengths(byte_writer, byte_filler, [5, 23, 70], depth=3)
    got = list(bakallm_answer_log_probs(model, samples, batch_size=4, device=torch.device("cpu"), n_ctx=n_ctx))
    assert len(got) == len(samples)
    segment = n_ctx or 1 << 20
    with torch.no_grad():
        for sample, (log_probs, answer) in zip(samples, got):
            inputs = torch.from_numpy(sample.tokens[:-1])
            logits = torch.cat(
                [model(inputs[None, start : start + segment]).logits[0] for start in range(0, len(inputs), segment)]
            )
            expected = F.log_softmax(logits[sample.answer_start - 1 :].float(), dim=-1)
            assert log_probs.shape == (len(sample.answer), 256) and torch.equal(answer, torch.from_numpy(sample.answer))
            torch.testing.assert_close(log_probs, expected, rtol=1e-5, atol=1e-5)


def with_code(sample: RecallSample, code: str) -> RecallSample:
    """The same sample with another code in its fact (the query and answer stay): nothing else changes."""
    tokens = sample.tokens.copy()
    start = sample.code_start + 1  # after the code's leading space
    tokens[start : start + len(code)] = np.frombuffer(code.encode(), dtype=np.uint8)
    return RecallSample(tokens, sample.answer_start, sample.distance_tokens, sample.fact_start, sample.code_start)


def test_a_model_reset_every_window_knows_nothing_of_a_fact_beyond_the_attention_reach(byte_writer, byte_filler):
    """With the state reset every window, the answer's log-probabilities do not depend on a fact read
    more than two windows before the query, so its accuracy there is chance whatever its weights; with
    the state carried, they do."""
    model = small_model()
    sample = recall_samples(byte_filler, byte_writer, 3 * WINDOW, 1, seed=0, depth_tokens=WINDOW)[0]
    changed = with_code(sample, "0 0 0 0 0")
    assert not np.array_equal(sample.tokens, changed.tokens)

    def answer_log_probs(samples, n_ctx):
        return [
            log_probs for log_probs, _ in bakallm_answer_log_probs(model, samples, 2, torch.device("cpu"), n_ctx=n_ctx)
        ]

    reset = answer_log_probs([sample, changed], WINDOW)
    assert torch.equal(reset[0], reset[1])
    carried = answer_log_probs([sample, changed], None)
    assert not torch.allclose(carried[0], carried[1])


def test_keeping_the_document_cache_across_resets_keeps_only_its_counts(byte_writer, byte_filler):
    model = small_model(document_cache=True, document_cache_order=3)
    state = model(torch.randint(0, 256, (2, 3 * WINDOW)), state=model.init_state(2)).state
    rows = torch.tensor([True, False])
    kept, cleared = state.reset(rows, keep_document_cache=True), state.reset(rows)
    for name in ("token_counts", "recent_tokens"):
        assert torch.equal(getattr(kept, name), getattr(state, name)) and getattr(cleared, name)[0].abs().sum() == 0
    for kept_table, table in zip(kept.ngram_counts, state.ngram_counts):
        assert torch.equal(kept_table, table)
    assert (
        not kept.has_past[0]
        and kept.has_past[1]
        and kept.memory[0].abs().sum() == 0
        and torch.equal(kept.memory[1], state.memory[1])
    )


# ----- the training mix -----


def test_mix_plants_facts_and_queries_at_the_rate_and_distances_asked_and_keeps_the_text(byte_writer):
    texts = [filler_text(n_words, seed) for seed, n_words in enumerate([800, 50, 2500])]
    corpus = TokenizedCorpus.from_token_lists([list(text.encode()) for text in texts], 256)
    mixed = mix_recall(corpus, byte_writer, every=300, max_distance=400, seed=7).corpus
    assert mixed.fingerprint == mix_recall(corpus, byte_writer, every=300, max_distance=400, seed=7).corpus.fingerprint
    assert mixed.fingerprint != mix_recall(corpus, byte_writer, every=300, max_distance=400, seed=8).corpus.fingerprint
    n_facts = n_queries = 0
    for index, text in enumerate(texts):
        planted = text_of(mixed.document(index))
        facts = {}  # name -> (code, where in the original text the fact was planted)
        inserted = 0  # characters planted so far
        for match in sorted([*FACT.finditer(planted), *QUERY.finditer(planted)], key=lambda match: match.start()):
            at = match.start() - inserted
            if match.re is FACT:
                assert match.group(1) not in facts
                facts[match.group(1)] = (match.group(2), at)
            else:
                code, planted_at = facts[match.group(1)]
                assert match.group(2) == code and 0 <= at - planted_at <= 400
                n_queries += 1
            inserted += match.end() - match.start()
        n_facts += len(facts)
        assert QUERY.sub("", FACT.sub("", planted)) == text
    expected = sum(len(text) for text in texts) / 300
    assert abs(n_facts - expected) < 4 * math.sqrt(expected)
    assert n_facts / 2 < n_queries <= n_facts


def test_training_with_the_recall_mix_plants_the_facts_and_resumes(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "book.txt").write_text(filler_text(3000), encoding="utf-8")
    model_file = tmp_path / "model.json"
    model_file.write_text(
        json.dumps({"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "window": 32, "n_memory": 2, "n_pauses": 2})
    )
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "tiny",
        "--model-config",
        str(model_file),
        "--data",
        str(corpus),
        "--tokenizer",
        "bytes",
        "--batch-size",
        "1",
        "--train-ctx",
        "64",
        "--max-steps",
        "2",
        "--run-dir",
        str(run_dir),
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--threads",
        "1",
        "--recall-every",
        "200",
        "--recall-max-distance",
        "300",
    ]
    assert main(args) == 0, capsys.readouterr().err
    trainer = Trainer(TrainConfig(resume=str(run_dir), max_steps=3), explicit={"resume", "max_steps"})
    planted = text_of(trainer.corpus.tokens)
    assert len(FACT.findall(planted)) > 10 and QUERY.search(planted)
    assert trainer.train()["steps"] == 3


# ----- the command -----


@pytest.fixture
def filler_file(tmp_path):
    path = tmp_path / "filler.txt"
    path.write_text(filler_text(1500), encoding="utf-8")
    return path


def test_bench_recall_prints_json_stores_the_row_and_results_show_it(tmp_path, filler_file, capsys):
    run_dir = tmp_path / "small-run"
    make_run(run_dir)
    db_path = tmp_path / "results.sqlite3"
    status, out, err = bench(
        capsys,
        run_dir,
        "--task",
        "recall",
        "--data",
        filler_file,
        "--distances",
        "0.5,2,8",
        "--samples",
        "3",
        "--reset-every",
        WINDOW,
        "--json",
        "--db",
        db_path,
        "--cache-dir",
        tmp_path / "cache",
    )
    assert status == 0, err
    printed = json.loads(out[-1])
    assert printed["task"] == "recall" and printed["n_ctx"] == 1 << 20
    assert [score["distance_windows"] for score in printed["recall"]] == [0.5, 2.0, 8.0]
    assert [score["distance_tokens"] for score in printed["recall"]] == [WINDOW // 2, 2 * WINDOW, 8 * WINDOW]
    keys = {
        "distance_windows",
        "distance_tokens",
        "accuracy",
        "first_token_accuracy",
        "answer_loss",
        "samples",
        "chance",
    }
    for score in printed["recall"]:
        assert keys <= score.keys() and score["samples"] == 3 and score["chance"] == EXACT_MATCH_CHANCE
    assert printed["tokens"] == 3 * 3 * (2 * CODE_LENGTH)  # bytes: " 4 8 1 2 7" is ten tokens
    rows = stored_rows(db_path)
    assert [(row.task, row.n_ctx) for row in rows] == [("recall", 1 << 20), ("recall", WINDOW)]
    assert rows[0].recall == printed["recall"]

    assert main(["results", "--db", str(db_path)]) == 0
    listing = capsys.readouterr().out
    assert "Recall: exact answers" in listing and "| 0.5 w | 2 w | 8 w |" in listing and listing.count("small-run") == 2
    assert main(["results", "--db", str(db_path), "--task", "recall", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [record["exact@2"] for record in records] == [row.recall[1]["accuracy"] for row in rows]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--distances", "1,0"], "must all be above zero"),
        (["--distances", "-1"], "must all be above zero"),
        (["--distances", "1000"], "needs more filler"),
        (["--samples", "0"], "--samples must be at least 1"),
        (["--depth", "-1"], "--depth must be at least 0"),
        (["--keep-document-cache"], "has none"),
        (["--reset-every", str(WINDOW // 2)], "smaller than the model's window"),
        (["--position-buckets", "0,64"], "applies only to --task lm"),
    ],
)
def test_bad_recall_arguments_exit_2_with_one_sentence_and_write_nothing(
    tmp_path, filler_file, capsys, arguments, message
):
    run_dir = tmp_path / "small-run"
    make_run(run_dir)
    db_path = tmp_path / "results.sqlite3"
    status, out, err = bench(
        capsys,
        run_dir,
        "--task",
        "recall",
        "--data",
        filler_file,
        "--samples",
        "2",
        "--db",
        db_path,
        "--cache-dir",
        tmp_path / "cache",
        *arguments,
    )
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert stored_rows(db_path) == []


def test_an_empty_filler_corpus_and_recall_flags_without_the_task_are_refused(tmp_path, capsys):
    run_dir = tmp_path / "small-run"
    make_run(run_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, err = bench(capsys, run_dir, "--task", "recall", "--data", empty, "--db", tmp_path / "db.sqlite3")
    assert status == 2 and len(err) == 1 and "holds no documents" in err[0]
    status, _, err = bench(capsys, run_dir, "--distances", "1,2", "--data", empty, "--db", tmp_path / "db.sqlite3")
    assert status == 2 and len(err) == 1 and "--distances applies only to --task recall" in err[0]


def test_plot_recall_writes_a_png(tmp_path, filler_file, capsys):
    run_dir = tmp_path / "small-run"
    make_run(run_dir)
    db_path = tmp_path / "results.sqlite3"
    assert (
        bench(
            capsys,
            run_dir,
            "--task",
            "recall",
            "--data",
            filler_file,
            "--distances",
            "1,4",
            "--samples",
            "2",
            "--db",
            db_path,
            "--cache-dir",
            tmp_path / "cache",
        )[0]
        == 0
    )
    out = tmp_path / "recall.png"
    assert main(["plot", "recall", "--db", str(db_path), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_overlap_one_fact_at_most_waits_for_its_query(byte_writer):
    text = filler_text(4000, seed=5)
    corpus = TokenizedCorpus.from_token_lists([list(text.encode())], 256)
    planted = text_of(
        mix_recall(corpus, byte_writer, every=100, max_distance=300, seed=1, overlap=False).corpus.document(0)
    )
    events = sorted(
        [(match.start(), "fact") for match in FACT.finditer(planted)]
        + [(match.start(), "query") for match in QUERY.finditer(planted)]
    )
    kinds = [kind for _, kind in events]
    assert kinds.count("fact") > 20
    # fact, its query, the next fact, ...: never two facts without a query between them (the last may lack its query)
    assert all(kinds[index] == ("fact" if index % 2 == 0 else "query") for index in range(len(kinds)))
    assert QUERY.sub("", FACT.sub("", planted)) == text


def test_the_mix_marks_answers_and_codes_and_scores_answers_always_and_codes_never(byte_writer):
    text = filler_text(3000, seed=2)
    mix = mix_recall(
        TokenizedCorpus.from_token_lists([list(text.encode())], 256), byte_writer, every=150, max_distance=200, seed=3
    )
    planted = text_of(mix.corpus.tokens)
    answers = np.zeros(len(planted), dtype=bool)
    codes = np.zeros(len(planted), dtype=bool)
    for match in QUERY.finditer(planted):
        answers[match.start(2) - 1 : match.end(2)] = True  # the answer's leading space is its first byte
    for match in FACT.finditer(planted):
        codes[match.start(2) - 1 : match.end(2)] = True
    assert answers.any() and codes.any()
    assert np.array_equal(mix.answers, answers) and np.array_equal(mix.codes, codes)
    assert np.array_equal(mix.scored(1.0, seed=0), ~codes)
    sparse = mix.scored(0.1, seed=0)
    assert sparse[answers].all() and not sparse[codes].any() and np.array_equal(sparse, mix.scored(0.1, seed=0))
    ordinary = ~answers & ~codes
    assert abs(sparse[ordinary].mean() - 0.1) < 0.02


def test_the_batcher_scores_only_the_tokens_asked_and_counts_them():
    from bakallm.data.batching import IGNORE_INDEX, DocumentBatcher

    corpus = TokenizedCorpus.from_token_lists([list(range(1, 41)), list(range(50, 70))], 256)  # every token value once
    position_of = {int(token): position for position, token in enumerate(corpus.tokens)}
    scored = np.arange(corpus.n_tokens) % 3 == 0
    batcher = DocumentBatcher(corpus, batch_size=2, train_ctx=8, scored=scored, rows=range(0, 1))
    plain = DocumentBatcher(corpus, batch_size=2, train_ctx=8)
    for _ in range(5):
        batch, full = batcher.next_batch(), plain.next_batch()
        assert torch.equal(batch.input_ids, full.input_ids[:1])
        expected = [
            [target if target == IGNORE_INDEX or scored[position_of[target]] else IGNORE_INDEX for target in row]
            for row in full.targets.tolist()
        ]
        assert batch.targets.tolist() == expected[:1]
        assert batch.n_targets == sum(target != IGNORE_INDEX for target in expected[0])
        assert batch.total_targets == sum(target != IGNORE_INDEX for row in expected for target in row)


@pytest.mark.parametrize("document_cache", [False, True])
def test_a_loss_over_few_targets_equals_the_full_cross_entropy(document_cache):
    """On a CPU the output layer runs only at scored positions: the loss and each token's loss equal
    those of the full distribution, and (without the cache's mixture) every gradient too."""
    torch.manual_seed(0)
    model = small_model(document_cache=document_cache).train()
    ids = torch.randint(0, 256, (2, 3 * WINDOW + 5))
    targets = torch.randint(0, 256, ids.shape)
    targets[torch.rand(ids.shape) < 0.8] = -100
    targets[1, WINDOW : 2 * WINDOW] = -100  # a window of one row without any target
    output = model(ids, targets=targets)
    scored = targets != -100
    nll = -output.logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(output.token_losses, torch.where(scored, nll, 0.0).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.loss, nll[scored].mean(), rtol=1e-5, atol=1e-5)
    assert float(model(ids, targets=torch.full_like(targets, -100)).loss.detach()) == 0.0
    if document_cache:
        return
    output.loss.backward()
    sparse = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    model.zero_grad()
    F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(sparse[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_without_carrying_the_memory_a_window_ignores_the_memory_it_was_handed():
    from dataclasses import replace

    model = small_model(carry_memory=False, carry_mamba_state=False, xl_cache=False)
    first = torch.randint(0, 256, (1, WINDOW))
    second = torch.randint(0, 256, (1, WINDOW))
    state = model(first).state
    scrambled = replace(state, memory=torch.randn_like(state.memory))
    with torch.no_grad():
        torch.testing.assert_close(
            model(second, state=state).logits, model(second, state=scrambled).logits, rtol=0, atol=0
        )
        torch.testing.assert_close(
            model(second, state=state).logits, model(second).logits, rtol=0, atol=0
        )  # as a fresh window
    carried = small_model(carry_mamba_state=False, xl_cache=False)
    carried.load_state_dict(model.state_dict())
    with torch.no_grad():
        state = carried(first).state
        assert not torch.allclose(
            carried(second, state=state).logits,
            carried(second, state=replace(state, memory=torch.randn_like(state.memory))).logits,
        )
    with pytest.raises(ValueError, match="carry_memory false needs memory_layout learned_slots"):
        small_model(carry_memory=False, memory_layout="copy_memory")
