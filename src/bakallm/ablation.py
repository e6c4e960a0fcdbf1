"""`bakallm ablate SPEC.yaml`: train variants of a model for the same token budget and compare them.

A study file names the shared setup (tokenizer, training corpus, token budget, seed, model and
training arguments), the held-out corpora and contexts to evaluate at, and the variants: each a
preset or a transformers config (`hf_config`) with model and training overrides over the shared
ones. Every variant is a normal run directory `<output>/<variant>`; a variant whose results are
recorded is skipped when the study runs again, and an interrupted one resumes from its last
checkpoint. Results go to the results database tagged with the study name: see
`bakallm results --study NAME` and `bakallm plot study NAME`. docs/ablations.md has an example.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bakallm.atomic import atomic_path, write_text_atomic
from bakallm.errors import UserError
from bakallm.kinds import WHOLE_DOCUMENT_N_CTX
from bakallm.locks import Busy, RunLock
from bakallm.training.arguments import TrainConfig, train_config_from_values

DONE_FILE = "ablation-result.json"
STUDY_KEYS = frozenset(
    {"study", "output", "tokenizer", "data", "train_tokens", "seed", "model", "training", "eval", "variants"}
)
SETTINGS_FILE = "ablation-variant.json"  # what the variant was asked to be, to refuse mixing two versions of a study
WHOLE_DOCUMENT = "whole"


class StudyInterrupted(Exception):
    """SIGINT or SIGTERM stopped a variant's training: it must not be evaluated or marked done."""


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str | None = None
    hf_config: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalCorpus:
    name: str
    sources: list[str]
    max_characters: int | None = None  # keep only the start of each document, for a fast evaluation


@dataclass(frozen=True)
class RecallEval:
    """The study's recall test (`bench --task recall`): filler sources and what to ask."""

    sources: list[str]
    settings: Any  # a bakallm.evaluation.recall.RecallSettings
    window: int | None  # tokens per window, the unit of the distances; None: each model of ours its own
    contexts: list[int | str]


@dataclass(frozen=True)
class Study:
    name: str
    output: Path
    tokenizer: str
    train_sources: list[str]
    train_tokens: int
    seed: int
    model: dict[str, Any]
    training: dict[str, Any]
    eval_corpora: list[EvalCorpus]
    contexts: list[int | str]  # WHOLE_DOCUMENT, or reset every N tokens
    eval_batch_size: int
    variants: list[Variant]
    recall: RecallEval | None = None

    def run_dir(self, variant: Variant) -> Path:
        return self.output / variant.name


# ----- the study file -----


def load_study(path: str | Path) -> Study:
    from bakallm.training.arguments import read_recipe

    values = read_recipe(str(path), kind="Study file", contents="study settings (see docs/ablations.md)")

    def require(name: str, kind: type) -> Any:
        if not isinstance(values.get(name), kind):
            raise UserError(f"Study file {path} needs a {name!r} entry of type {kind.__name__}; see docs/ablations.md.")
        return values[name]

    name = require("study", str)
    unknown = sorted(set(values) - STUDY_KEYS)
    if unknown:
        raise UserError(
            f"Study file {path} has unknown entries {unknown}; use {', '.join(sorted(STUDY_KEYS))} (see docs/ablations.md)."
        )
    variants = [_variant(entry, path) for entry in require("variants", list)]
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names) or not names:
        raise UserError(f"Study file {path} must list at least one variant, each with its own name (got {names}).")
    evaluation = require("eval", dict)
    contexts = evaluation.get("contexts", [WHOLE_DOCUMENT])
    if not all(context == WHOLE_DOCUMENT or (isinstance(context, int) and context > 0) for context in contexts):
        raise UserError(f"eval.contexts of {path} must be {WHOLE_DOCUMENT!r} or positive token counts, got {contexts}.")
    corpora = [
        EvalCorpus(
            name=_plain_name(entry.get("name"), "held-out corpus", path),
            sources=_sources(entry.get("data")),
            max_characters=entry.get("max_characters"),
        )
        for entry in _mappings(evaluation.get("corpora", []), "eval.corpora", path)
    ]
    if len({corpus.name for corpus in corpora}) != len(corpora):
        raise UserError(
            f"The held-out corpora of {path} must each have their own name (got {[corpus.name for corpus in corpora]})."
        )
    if not corpora:
        raise UserError(f"Study file {path} needs eval.corpora: at least one held-out corpus with a name and data.")
    recall = _recall_eval(evaluation["recall"], path) if "recall" in evaluation else None
    return Study(
        recall=recall,
        name=name,
        output=Path(values.get("output", f"runs/ablations/{name}")),
        tokenizer=require("tokenizer", str),
        train_sources=_sources(values.get("data")),
        train_tokens=require("train_tokens", int),
        seed=int(values.get("seed", 0)),
        model=dict(values.get("model", {})),
        training=dict(values.get("training", {})),
        eval_corpora=corpora,
        contexts=list(contexts),
        eval_batch_size=int(evaluation.get("batch_size", 1)),
        variants=variants,
    )


def _recall_eval(entry: Any, path: str | Path) -> RecallEval:
    from bakallm.evaluation.recall import RecallSettings

    known = {"data", "distances", "samples", "seed", "facts", "depth_windows", "window", "contexts"}
    if not isinstance(entry, dict) or "data" not in entry or set(entry) - known:
        raise UserError(
            f"eval.recall of {path} must be a mapping with data and any of {', '.join(sorted(known - {'data'}))}; see docs/recall.md."
        )
    contexts = entry.get("contexts", [WHOLE_DOCUMENT])
    if not all(context == WHOLE_DOCUMENT or (isinstance(context, int) and context > 0) for context in contexts):
        raise UserError(
            f"eval.recall.contexts of {path} must be {WHOLE_DOCUMENT!r} or positive token counts, got {contexts}."
        )
    distances = entry.get("distances")
    if distances is not None and not (
        isinstance(distances, list) and distances and all(isinstance(d, (int, float)) and d > 0 for d in distances)
    ):
        raise UserError(
            f"eval.recall.distances of {path} must be a list of distances above zero, in windows, got {distances!r}."
        )
    values = {name: entry[name] for name in ("samples", "seed", "facts", "depth_windows") if name in entry}
    settings = RecallSettings(**values, **({"distances": tuple(float(d) for d in distances)} if distances else {}))
    return RecallEval(_sources(entry["data"]), settings, entry.get("window"), list(contexts))


def _mappings(entries: Any, what: str, path: str | Path) -> list[dict[str, Any]]:
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise UserError(f"{what} of {path} must be a list of mappings, got {entries!r}.")
    return entries


def _plain_name(name: Any, what: str, path: str | Path) -> str:
    """A name that becomes a file or folder name inside the study's output: one plain component."""
    reserved = {"data", "model-configs"}
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or any(character in name for character in "/\\\0")
        or name in reserved
    ):
        raise UserError(
            f"The {what} name {name!r} in {path} must be a plain file name (no '/' or '\\', not starting with '.') "
            f"other than {' and '.join(sorted(reserved))}, which the study uses itself."
        )
    return name


def _variant(entry: Any, path: str | Path) -> Variant:
    if not isinstance(entry, dict):
        raise UserError(f"Every variant of {path} must be a mapping with a name, got {entry!r}.")
    _plain_name(entry.get("name"), "variant", path)
    if (entry.get("preset") is None) == (entry.get("hf_config") is None):
        raise UserError(f"Variant {entry['name']} of {path} must give exactly one of preset and hf_config.")
    unknown = sorted(set(entry) - {"name", "preset", "hf_config", "model", "training"})
    if unknown:
        raise UserError(
            f"Variant {entry['name']} of {path} has unknown entries {unknown}; use name, preset, hf_config, model, training."
        )
    return Variant(
        entry["name"],
        entry.get("preset"),
        entry.get("hf_config"),
        dict(entry.get("model") or {}),
        dict(entry.get("training") or {}),
    )


def _sources(data: Any) -> list[str]:
    sources = [data] if isinstance(data, str) else data
    if not isinstance(sources, list) or not sources or not all(isinstance(source, str) for source in sources):
        raise UserError(f"A study's data must be a corpus path or a list of them, got {data!r}.")
    return sources


def write_corpus(sources: list[str], folder: Path, name: str, max_characters: int | None = None) -> Path:
    """The documents of all `sources`, in order, as one JSONL corpus (each cut to `max_characters`).

    Its file name holds a hash of what it was made from, so a changed study never reads a stale one.
    """
    import hashlib

    from bakallm.data.corpora import load_corpus

    key = hashlib.sha256(json.dumps([sources, max_characters]).encode("utf-8")).hexdigest()[:12]
    path = folder / f"{name}-{key}.jsonl"
    if path.is_file():
        return path
    with atomic_path(path) as temporary, temporary.open("w", encoding="utf-8") as out:
        for source in sources:
            for document in load_corpus(source):
                text = document.text[:max_characters] if max_characters else document.text
                out.write(json.dumps({"id": f"{Path(source).name}:{document.id}", "text": text}) + "\n")
    return path


# ----- running -----


def run_study(
    study: Study, db_path: Path | None = None, progress: bool = False, log=print, only: list[str] | None = None
) -> list[str]:
    """Trains and evaluates every variant not yet done (of those in `only`, when given); returns the names of those run now.

    Several processes may run one study side by side on disjoint `only` lists: they share the
    results database, and the table orders variants as the study file does.
    """
    if only is not None:
        unknown = sorted(set(only) - {variant.name for variant in study.variants})
        if unknown:
            raise UserError(
                f"--variants names {', '.join(unknown)}, not in study {study.name}; choose among {', '.join(v.name for v in study.variants)}."
            )
    from bakallm.results.db import ResultsDB, default_db_path

    study.output.mkdir(parents=True, exist_ok=True)
    train_data = write_corpus(study.train_sources, study.output / "data", "train")
    eval_data = {
        corpus.name: write_corpus(corpus.sources, study.output / "data", f"eval-{corpus.name}", corpus.max_characters)
        for corpus in study.eval_corpora
    }
    recall_filler = write_corpus(study.recall.sources, study.output / "data", "recall-filler") if study.recall else None
    ran = []
    chosen = [variant for variant in study.variants if only is None or variant.name in only]
    with ResultsDB(db_path if db_path is not None else default_db_path()) as db:
        # A variant another process is running is left for later, then waited for: processes that
        # share a study (the same or overlapping --variants) run each variant once.
        deferred = []
        for variant in chosen:
            try:
                lock = RunLock(study.run_dir(variant))
            except Busy:
                log(f"{variant.name}: another process is running it; coming back to it later")
                deferred.append(variant)
                continue
            with lock:
                if run_variant(study, variant, train_data, eval_data, recall_filler, db, progress, log):
                    ran.append(variant.name)
        for variant in deferred:
            with RunLock(study.run_dir(variant), wait=True):
                if run_variant(study, variant, train_data, eval_data, recall_filler, db, progress, log):
                    ran.append(variant.name)
    return ran


def run_variant(
    study: Study,
    variant: Variant,
    train_data: Path,
    eval_data: dict[str, Path],
    recall_filler: Path | None,
    db,
    progress: bool,
    log,
) -> bool:
    """Trains and evaluates one variant, holding its run directory's lock; False when it was done before."""
    run_dir = study.run_dir(variant)
    check_settings(study, variant)
    if (run_dir / DONE_FILE).is_file():
        log(f"{variant.name}: done, skipped ({run_dir})")
        return False
    earlier = {other.name: other for other in study.variants}.get(
        {**study.training, **variant.training}.get("init_from")
    )
    if earlier is not None and not (study.run_dir(earlier) / DONE_FILE).is_file():
        log(f"{variant.name}: waiting for {earlier.name}, which it starts from")
        RunLock(study.run_dir(earlier), wait=True).release()  # returns once no other process runs it
    log(f"{variant.name}: training in {run_dir}")
    trained = train_variant(study, variant, train_data, progress)
    if trained["interrupted"]:
        raise StudyInterrupted(
            f"study {study.name} interrupted while training {variant.name} (checkpoint saved at its last step); "
            "run the same command again to resume it."
        )
    log(f"{variant.name}: {trained['tokens']:,} tokens in {trained['train_seconds']:.0f} s; evaluating")
    rows = evaluate_variant(study, variant, eval_data, trained, progress)
    if recall_filler is not None:
        rows += recall_variant(study, variant, recall_filler, trained, progress)
    for row in rows:
        db.add(row)
        if row.task == "recall":
            accuracies = ", ".join(f"{score['accuracy']:.0%} at {score['distance_windows']:g}" for score in row.recall)
            log(f"{variant.name}: recall context {row.extra['context']}: exact answers {accuracies} windows")
        else:
            log(f"{variant.name}: {row.benchmark} context {row.extra['context']}: loss {row.loss:.4f}")
    write_text_atomic(run_dir / DONE_FILE, json.dumps({**trained, "rows": len(rows)}, indent=2))
    return True


def variant_settings(study: Study, variant: Variant) -> dict[str, Any]:
    return {
        "preset": variant.preset,
        "hf_config": variant.hf_config,
        "model": variant.model if variant.hf_config else {**study.model, **variant.model},
        "training": {**study.training, **variant.training},
        "train_tokens": study.train_tokens,
        "seed": study.seed,
        "tokenizer": study.tokenizer,
        "data": study.train_sources,
    }


def check_settings(study: Study, variant: Variant) -> None:
    """Records the variant's settings in its run directory, or refuses a directory made with others."""
    path = study.run_dir(variant) / SETTINGS_FILE
    settings = json.loads(json.dumps(variant_settings(study, variant)))  # as JSON gives it back
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key in settings if recorded.get(key) != settings[key])
        if changed:
            raise UserError(
                f"{path.parent} holds variant {variant.name} made with other settings ({', '.join(changed)} differ); "
                "delete that directory or give the study another output folder (--output)."
            )
    else:
        write_text_atomic(path, json.dumps(settings, indent=2, sort_keys=True))


def variant_train_config(study: Study, variant: Variant, train_data: Path):
    run_dir = study.run_dir(variant)
    values = {**study.training, **variant.training}
    tokens_per_step = (
        values.get("batch_size", TrainConfig.batch_size)
        * values.get("train_ctx", TrainConfig.train_ctx)
        * values.get("grad_accum", TrainConfig.grad_accum)
    )
    steps = math.ceil(study.train_tokens / tokens_per_step)
    model_values = variant.model if variant.hf_config else {**study.model, **variant.model}
    model_file = study.output / "model-configs" / f"{variant.name}.json"
    write_text_atomic(model_file, json.dumps(model_values, indent=2, sort_keys=True))
    values.update(
        data=str(train_data),
        tokenizer=study.tokenizer,
        seed=variant.training.get("seed", study.seed),
        max_steps=steps,
        run_dir=str(run_dir),
        model_config=str(model_file),
        progress=values.get("progress", False),
    )
    if variant.hf_config:
        values["hf_config"] = variant.hf_config
    else:
        values["preset"] = variant.preset
    earlier = {other.name: other for other in study.variants}.get(values.get("init_from"))
    if earlier is not None:
        # A later stage of a staged recipe starts from an earlier variant's weights, wherever the study's output is.
        if not (study.run_dir(earlier) / DONE_FILE).is_file():
            raise UserError(
                f"Variant {variant.name} starts from variant {earlier.name}, which is not done; run {earlier.name} first."
            )
        values["init_from"] = str(study.run_dir(earlier))
    return train_config_from_values(values)


def train_variant(study: Study, variant: Variant, train_data: Path, progress: bool) -> dict[str, Any]:
    from bakallm.training import checkpoint as ckpt
    from bakallm.training.trainer import Trainer

    config = variant_train_config(study, variant, train_data)
    config.progress = progress
    run_dir = Path(config.run_dir)
    if ckpt.latest_checkpoint(run_dir) is not None:
        config.resume = str(run_dir)  # an interrupted variant continues where it stopped
    trainer = Trainer(config)
    summary = trainer.train()
    return {
        "run_dir": str(run_dir),
        "tokens": int(summary["tokens"]),
        "train_seconds": float(trainer.elapsed),
        "params": trainer.model.num_parameters(),
        "interrupted": bool(summary.get("interrupted")),
    }


class TrainedVariant:
    """A variant's model from its last checkpoint, where and how it is scored, and what its rows record."""

    def __init__(self, study: Study, variant: Variant, trained: dict[str, Any]):
        from bakallm.acceleration import autocast_dtype, resolve_device
        from bakallm.data.tokenizers import load_tokenizer
        from bakallm.kinds import kind_of_run, model_record
        from bakallm.training import checkpoint as ckpt

        values = {**study.training, **variant.training}
        # Scored where and how it trained (its device and precision settings), so a GPU study is not scored on the CPU.
        self.device = resolve_device(values.get("device", "auto"))
        self.autocast = autocast_dtype(values.get("precision", "auto"), self.device)
        self.train_ctx = values.get("train_ctx", TrainConfig.train_ctx)
        self.kind = kind_of_run({"hf_config": variant.hf_config})
        self.checkpoint = ckpt.latest_checkpoint(Path(trained["run_dir"]))
        self.model = self.kind.load(self.checkpoint, self.device)
        self.record = model_record(self.kind, self.model, f"{study.name}/{variant.name}", self.checkpoint)
        self.tokenizer = load_tokenizer(study.tokenizer)
        self.extra = {
            "variant": variant.name,
            "variant_index": study.variants.index(variant),
            "train_tokens": trained["tokens"],
            "train_seconds": trained["train_seconds"],
            "run_dir": trained["run_dir"],
        }

    def reading(self, context: int | str) -> tuple[int, int | None]:
        """(n_ctx, stride) for a study context: "whole", or N tokens at most."""
        return self.kind.reading(WHOLE_DOCUMENT_N_CTX if context == WHOLE_DOCUMENT else context, reach=self.train_ctx)


def evaluate_variant(
    study: Study, variant: Variant, eval_data: dict[str, Path], trained: dict[str, Any], progress: bool
) -> list:
    """One result row per held-out corpus and context, scored on the variant's last checkpoint."""
    from bakallm.data.corpora import load_corpus
    from bakallm.data.token_cache import tokenize_corpus
    from bakallm.evaluation.settings import EvalSettings
    from bakallm.results.rows import lm_figures, result_row

    scored = TrainedVariant(study, variant, trained)
    rows = []
    for corpus_name, data in eval_data.items():
        corpus = tokenize_corpus(load_corpus(str(data)), scored.tokenizer)
        for context in study.contexts:
            n_ctx, stride = scored.reading(context)
            settings = EvalSettings(
                n_ctx=n_ctx,
                stride=stride,
                batch_size=study.eval_batch_size,
                device=scored.device,
                autocast=scored.autocast,
                progress=progress,
            )
            result = scored.kind.evaluate(scored.model, corpus, settings)
            rows.append(
                result_row(
                    scored.record,
                    corpus_name,
                    "test",
                    n_ctx,
                    stride,
                    scored.tokenizer.name,
                    lm_figures(result),
                    {**scored.extra, "context": context},
                    study=study.name,
                )
            )
    return rows


def recall_variant(study: Study, variant: Variant, filler: Path, trained: dict[str, Any], progress: bool) -> list:
    """One recall row per context of eval.recall: our models read the whole sample with their state
    (reset every N tokens for a context N); a transformer reads the train_ctx tokens before the answer."""
    from bakallm.data.corpora import load_corpus
    from bakallm.data.token_cache import tokenize_corpus
    from bakallm.evaluation.recall import RecallTest, recall_figures
    from bakallm.results.rows import result_row

    scored = TrainedVariant(study, variant, trained)
    kind, model, recall = scored.kind, scored.model, study.recall
    window = recall.window or kind.window(model) or scored.train_ctx
    reach = kind.attention_reach(model) or scored.train_ctx

    def answer_log_probs(samples, n_ctx, batch_size, keep_document_cache):
        return kind.answer_log_probs(model, samples, n_ctx, batch_size, scored.device, keep_document_cache)

    test = RecallTest.draw(
        recall.settings, tokenize_corpus(load_corpus(str(filler)), scored.tokenizer), scored.tokenizer, window
    )
    rows = []
    for context in recall.contexts:
        n_ctx, _ = scored.reading(context)
        figures = recall_figures(test.score(answer_log_probs, n_ctx, study.eval_batch_size, progress))
        extra = {**recall.settings.extra(window), "attention_reach": reach, **scored.extra, "context": context}
        rows.append(
            result_row(
                scored.record,
                "recall-filler",
                "test",
                n_ctx,
                None,
                scored.tokenizer.name,
                figures,
                extra,
                study=study.name,
            )
        )
    return rows
