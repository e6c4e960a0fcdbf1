import math

from bakallm.evaluation.positions import PositionLoss, count_label, position_label
from bakallm.results.context_use import context_uses, format_context_gains, format_context_use, relative_gain
from bakallm.results.db import ResultRow


def row(row_id, n_ctx, losses, model_name="m", checkpoint_hash="h", overall=None):
    buckets = [
        {"start": 0, "stop": 512, "tokens": 100, "loss": losses[0]},
        {"start": 512, "stop": None, "tokens": 300, "loss": losses[1]},
    ]
    loss = overall if overall is not None else (100 * losses[0] + 300 * losses[1]) / 400
    return ResultRow(
        "bakallm",
        model_name,
        "books",
        "test",
        n_ctx=n_ctx,
        tokens=400,
        loss=loss,
        ppl=math.exp(loss),
        checkpoint_hash=checkpoint_hash,
        position_losses=buckets,
        id=row_id,
    )


def test_labels_and_gain():
    assert [
        position_label(0, 512),
        position_label(512, 2048),
        position_label(8192, None),
        position_label(100, 1536),
    ] == ["0-512", "512-2K", "8K+", "100-1536"]
    assert [count_label(512), count_label(1 << 20), count_label(1 << 40), count_label(3 << 30)] == [
        "512",
        "1M",
        "1T",
        "3G",
    ]  # 1T: an ablation's whole document
    assert relative_gain(5.0, 4.5) == 0.1 and math.isnan(relative_gain(math.nan, 1.0))
    assert PositionLoss.from_dict(PositionLoss(0, None, 0, math.nan).to_dict()).tokens == 0


def test_whole_and_reset_rows_pair_up_with_the_gain_worked_out_by_hand():
    rows = [row(1, 512, [6.0, 5.0]), row(2, 1 << 20, [6.0, 4.5]), row(3, 512, [7.0, 7.0], model_name="other")]
    (use, other) = context_uses(rows)
    assert list(use.losses_by_n_ctx) == [512, 1 << 20] and list(other.losses_by_n_ctx) == [512]
    table = format_context_use([use])
    # Overall: reset (100*6 + 300*5)/400 = 5.25, whole (600 + 1350)/400 = 4.875, 7.14% lower.
    assert "| 0-512 | 100 | 6.0000 | 6.0000 | 0.00% lower |" in table
    assert "| 512+ | 300 | 5.0000 | 4.5000 | 10.00% lower |" in table
    assert "| all | 400 | 5.2500 | 4.8750 | 7.14% lower |" in table


def test_newest_row_wins_and_other_checkpoints_stay_apart():
    rows = [row(1, 512, [6.0, 5.0]), row(2, 512, [6.0, 6.0]), row(3, 512, [1.0, 1.0], checkpoint_hash="other")]
    first, second = context_uses(rows)
    assert first.losses_by_n_ctx[512][1].loss == 6.0 and second.losses_by_n_ctx[512][1].loss == 1.0
    assert "| 512+ | 300 | 6.0000 |" in format_context_use([first]) and "vs" not in format_context_use([first])


def test_the_gains_table_has_one_line_per_model_with_the_gain_by_position():
    rows = [row(1, 512, [6.0, 5.0]), row(2, 1 << 20, [6.0, 4.5]), row(3, 512, [7.0, 7.0], model_name="single")]
    lines = format_context_gains(context_uses(rows)).splitlines()
    assert (
        lines[0]
        == "| model | benchmark | contexts | loss (longest) | loss (shortest) | gain 0-512 | gain 512+ | gain all |"
    )
    # 512+: (5.0 - 4.5) / 5.0 = 10% lower; all: 5.25 against 4.875, 7.14% lower. A model read at one context has no line.
    assert lines[2:] == ["| m | books | 1M vs 512 | 4.8750 | 5.2500 | +0.00% | +10.00% | +7.14% |"]
    assert format_context_gains(context_uses(rows[2:])) == ""
