"""`bakallm plot`: training curves of run directories, benchmark loss against context length, and recall against distance."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bakallm.atomic import atomic_path
from bakallm.errors import UserError
from bakallm.evaluation.positions import count_label
from bakallm.results.context_use import context_uses
from bakallm.results.db import ResultRow, ResultsDB
from bakallm.training.metrics import METRICS_FILE_NAME, MetricsLog, metrics_path

EVAL_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def debiased_ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Exponential moving average, divided by (1 - smoothing**n) so the first points are not pulled towards 0."""
    average, weight, smoothed = 0.0, 0.0, []
    for value in values:
        average = smoothing * average + (1.0 - smoothing) * value
        weight = smoothing * weight + (1.0 - smoothing)  # equals 1 - smoothing**n
        smoothed.append(average / weight)
    return smoothed


def plot_training(run_dirs: Sequence[str | Path], out_path: str | Path, smooth: float = 0.9) -> Path:
    """PNG of each run's smoothed training loss (lines) and evaluation losses (markers) against tokens seen."""
    out_path = _png_path(out_path)
    if not 0.0 <= smooth < 1.0:
        raise UserError(f"--smooth {smooth} is outside [0, 1): use 0 for raw values, 0.9 or 0.99 for smoother curves.")
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    logs = []
    for run_dir in run_dirs:
        if not metrics_path(run_dir).is_file():
            raise UserError(f"{run_dir} has no {METRICS_FILE_NAME}: give run directories written by `bakallm train`.")
        with MetricsLog(run_dir) as log:
            # NaN losses are stored as NULL; leaving them out keeps one bad step from blanking the smoothed curve.
            steps = [row for row in log.read_steps() if row["loss"] is not None]
            evals = [row for row in log.read_evals() if row["loss"] is not None]
        logs.append((steps, evals))
    if not any(steps or evals for steps, evals in logs):
        raise UserError(
            f"nothing to plot: no training step or evaluation is logged yet in {', '.join(map(str, run_dirs))}."
        )

    figure, axes = _new_figure()
    eval_sets = sorted({row["data"] for _, evals in logs for row in evals})
    for index, (label, (steps, evals)) in enumerate(zip(_run_labels(run_dirs), logs)):
        color, linestyle = _line_style(index)
        if steps:
            losses = debiased_ema([row["loss"] for row in steps], smooth)
            axes.plot(
                [row["tokens"] for row in steps], losses, color=color, linestyle=linestyle, label=f"{label} train"
            )
        for data in eval_sets:
            points = [row for row in evals if row["data"] == data]
            if points:
                axes.plot(
                    [row["tokens"] for row in points],
                    [row["loss"] for row in points],
                    linestyle="none",
                    marker=EVAL_MARKERS[eval_sets.index(data) % len(EVAL_MARKERS)],
                    color=color,
                    label=f"{label} eval {data}",
                )
    axes.set_xlabel("tokens seen")
    return _finish_loss_plot(figure, axes, f"training loss (smoothing {smooth:g}) and evaluations", out_path)


def study_run_dirs(db_path: str | Path | None, study: str) -> list[Path]:
    """The run directories of a study's variants, in the order they were recorded."""
    with ResultsDB(db_path, must_exist=True) as db:
        rows = db.rows(study=study)
        db_shown = db.path
    rows = sorted(rows, key=lambda row: row.extra.get("variant_index", 0))  # the study file's order
    run_dirs = list(dict.fromkeys(row.extra["run_dir"] for row in rows if "run_dir" in row.extra))
    if not run_dirs:
        raise UserError(f"no results of study {study!r} in {db_shown}; run `bakallm ablate` on its study file first.")
    return [Path(run_dir) for run_dir in run_dirs]


def plot_context(
    db_path: str | Path | None,
    out_path: str | Path,
    models: Sequence[str] | None = None,
    benchmark: str | None = None,
    split: str | None = None,
) -> Path:
    """PNG of benchmark loss against n_ctx (log2 axis), one line per model_name, to show whether longer context helps.

    Where a model was measured more than once at one n_ctx, the newest row counts.
    """
    out_path = _png_path(out_path)
    rows, benchmarks = _benchmark_rows(db_path, models, benchmark, split)

    newest: dict[tuple[str, int], ResultRow] = {}
    for row in rows:  # rows come in id order, so later rows replace earlier ones
        newest[(row.model_name, row.n_ctx)] = row
    figure, axes = _new_figure()
    for model_name in dict.fromkeys(row.model_name for row in rows):
        points = sorted((n_ctx, row.loss) for (name, n_ctx), row in newest.items() if name == model_name)
        axes.plot([n_ctx for n_ctx, _ in points], [loss for _, loss in points], marker="o", label=model_name)
    contexts = sorted({n_ctx for _, n_ctx in newest})
    axes.set_xscale("log", base=2)
    axes.set_xticks(contexts, [count_label(n_ctx) for n_ctx in contexts])
    axes.minorticks_off()
    axes.set_xlabel("context length n_ctx (tokens)")
    return _finish_loss_plot(figure, axes, f"{benchmarks[0]}: loss against context length", out_path)


def plot_positions(
    db_path: str | Path | None,
    out_path: str | Path,
    models: Sequence[str] | None = None,
    benchmark: str | None = None,
    split: str | None = None,
) -> Path:
    """PNG of benchmark loss by position bucket in the article, one line per model_name and n_ctx.

    A whole-article line below the reset-every-N line of the same model, and more so at later
    positions, is the carried state at work. Where a model was measured more than once at one n_ctx,
    the newest row counts.
    """
    out_path = _png_path(out_path)
    rows, benchmarks = _benchmark_rows(db_path, models, benchmark, split)
    uses = context_uses(rows)
    if not uses:
        raise UserError(
            "nothing to plot: these results hold no loss by position; record some with `bakallm bench --reset-every 512`."
        )
    figure, axes = _new_figure()
    labels: list[str] = []
    for use in uses:
        for n_ctx, buckets in use.losses_by_n_ctx.items():
            for bucket in buckets:
                if bucket.label not in labels:
                    labels.append(bucket.label)
            points = [(labels.index(bucket.label), bucket.loss) for bucket in buckets if bucket.tokens]
            axes.plot(
                [x for x, _ in points],
                [y for _, y in points],
                marker="o",
                label=f"{use.model_name}, n_ctx {count_label(n_ctx)}",
            )
    axes.set_xticks(range(len(labels)), labels)
    axes.set_xlabel("position of the predicted token's input in its article (tokens)")
    return _finish_loss_plot(figure, axes, f"{benchmarks[0]}: loss by position in the article", out_path)


def plot_recall(
    db_path: str | Path | None,
    out_path: str | Path,
    models: Sequence[str] | None = None,
    benchmark: str | None = None,
    split: str | None = None,
) -> Path:
    """PNG of exact-answer accuracy against the distance from fact to query (log2 axis, in tokens), one
    line per model_name and n_ctx, with each model's window and attention reach marked: a line that
    stays up beyond the reach is the recurrent state remembering. The newest row of each line counts."""
    out_path = _png_path(out_path)
    rows, benchmarks = _benchmark_rows(db_path, models, benchmark, split, task="recall")
    newest: dict[tuple[str, int, bool], ResultRow] = {}
    for row in rows:  # rows come in id order, so later rows replace earlier ones
        newest[(row.model_name, row.n_ctx, bool(row.extra.get("keep_document_cache")))] = row
    figure, axes = _new_figure()
    for (model_name, n_ctx, kept_cache), row in newest.items():
        points = sorted((score["distance_tokens"], score["accuracy"]) for score in row.recall or [])
        label = f"{model_name}, n_ctx {count_label(n_ctx)}" + (", cache kept" if kept_cache else "")
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    marks = sorted(
        {("window", row.extra["window"]) for row in newest.values() if row.extra.get("window")}
        | {
            ("attention reach", row.extra["attention_reach"])
            for row in newest.values()
            if row.extra.get("attention_reach")
        }
    )
    for index, (kind, tokens) in enumerate(marks):
        axes.axvline(tokens, color="grey", linestyle=":" if kind == "window" else "--", linewidth=1)
        axes.annotate(
            f"{kind} {tokens:,}",
            (tokens, 1.0 - 0.06 * (index % 4)),
            rotation=90,
            fontsize="small",
            color="grey",
            ha="right",
            va="top",
        )
    chance = next((row.recall[0]["chance"] for row in newest.values() if row.recall), None)
    if chance is not None:
        axes.axhline(chance, color="black", linewidth=0.8, linestyle="-.", label=f"chance ({chance:.3%})")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("distance from the end of the fact to the query (tokens)")
    axes.set_ylabel("exact answers")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(f"{benchmarks[0]}: recall of a fact against its distance")
    axes.grid(alpha=0.3)
    _add_legend(figure, axes)
    _save_png(figure, out_path)
    return out_path


def _benchmark_rows(
    db_path: str | Path | None, models: Sequence[str] | None, benchmark: str | None, split: str | None, task: str = "lm"
) -> tuple[list[ResultRow], list[str]]:
    """The rows of the chosen models on one benchmark and split for one task, and that benchmark's name; refuses a mix."""
    with ResultsDB(db_path, must_exist=True) as db:
        rows = db.rows(benchmark=benchmark, split=split, task=task)
        db_shown = db.path
    if models:
        known = {row.model_name for row in rows}
        unknown = [name for name in models if name not in known]
        if unknown:
            raise UserError(
                f"no results for model(s) {', '.join(unknown)} in {db_shown}: "
                f"choose among {', '.join(sorted(known)) or '(none with these filters)'}."
            )
        rows = [row for row in rows if row.model_name in models]
    if not rows:
        raise UserError(
            f"nothing to plot: {db_shown} has no results for these filters; record some with `bakallm bench`."
        )
    benchmarks = sorted({f"{row.benchmark}/{row.split}" for row in rows})
    if len(benchmarks) > 1:
        raise UserError(
            f"the results mix several benchmarks ({', '.join(benchmarks)}): choose one with --benchmark and --split."
        )
    return rows, benchmarks


def _run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [run_dir.resolve().name for run_dir in run_dirs]  # resolved, so that '.' is named too
    return [name if names.count(name) == 1 else str(run_dir) for name, run_dir in zip(names, run_dirs)]


def _png_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".png":
        raise UserError(
            f"the output {out_path} does not end in .png: plots are written as PNG, name the file e.g. {out_path.with_suffix('.png')}."
        )
    return out_path


def _new_figure() -> tuple[Any, Any]:
    # A Figure on its own Agg canvas, not pyplot: no global backend switch, no figure kept alive after saving.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(
            "plotting needs matplotlib: run `pip install matplotlib` (or `pip install bakallm[plot]`)."
        ) from None
    from cycler import cycler
    from matplotlib import rcParams

    figure = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # Ten colours, then the same ten dashed, dotted, ...: a study of 28 variants keeps every line apart.
    colors = rcParams["axes.prop_cycle"].by_key()["color"][:10]
    axes.set_prop_cycle(cycler(linestyle=LINE_STYLES) * cycler(color=colors))
    return figure, axes


LINE_STYLES = ("-", "--", ":", "-.")
LEGEND_INSIDE_AT_MOST = 12  # entries; more would cover the curves


def _line_style(index: int) -> tuple[str, str]:
    """The colour and line style of the index-th curve, as the axes' own cycle gives them."""
    return f"C{index % 10}", LINE_STYLES[index // 10 % len(LINE_STYLES)]


def _finish_loss_plot(figure: Any, axes: Any, title: str, out_path: Path) -> Path:
    """Labels the loss axis, titles, grids, adds the legend and writes the PNG."""
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    _add_legend(figure, axes)
    _save_png(figure, out_path)
    return out_path


def _add_legend(figure: Any, axes: Any) -> None:
    """A legend in the axes for a few entries; beside them, in a wider figure, for many."""
    handles, labels = axes.get_legend_handles_labels()
    if len(labels) <= LEGEND_INSIDE_AT_MOST:
        axes.legend()
        return
    columns = -(-len(labels) // 30)
    figure.set_size_inches(
        figure.get_figwidth() + 3.5 * columns, max(figure.get_figheight(), 0.2 * -(-len(labels) // columns) + 1)
    )
    figure.legend(handles, labels, loc="outside right upper", ncols=columns, fontsize="small")


def _save_png(figure: Any, out_path: Path) -> None:
    with atomic_path(out_path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
