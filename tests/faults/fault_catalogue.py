"""The faults that tests/faults/test_faults.py plants, one per concept, and the tests that must catch each.

Each fault is data: a name, what goes wrong, the patches that plant it (see fault_planting.Patch)
and the test ids that must notice it. docs/testing.md says how to add one for a new feature.
"""

from __future__ import annotations

import dataclasses

import torch
from fault_planting import Fault, Patch

IGNORE_INDEX = -100


def unmask_past_block(mask, arguments):
    # mask [B, 1, L, Lp + L]: the columns before the last L are the past block.
    mask = mask.clone()
    mask[..., : mask.shape[-1] - mask.shape[-2]] = True
    return mask


def zero_past_block(cache):
    # The attention cache of a window that starts: the previous window's keys and values, zeroed.
    return cache._replace(past_key=torch.zeros_like(cache.past_key), past_value=torch.zeros_like(cache.past_value))


def from_position_zero(table):
    # The rotary tables attention receives are row slices of one table: the same rows from its start.
    return table.as_strided(table.shape, table.stride(), 0)


def shift_targets_of_later_windows(batch, arguments):
    input_ids, attention_mask, targets = batch
    for row, window in enumerate(arguments["windows"]):
        if window.start > 0:
            targets[row] = torch.roll(targets[row], -1)
    return input_ids, attention_mask, targets


def score_the_previous_windows_last_token_again(windows, arguments):
    return (dataclasses.replace(window, first_scored=max(window.first_scored - 1, 0)) for window in windows)


def overlap_segments_by_one_token(windows, arguments):
    # Each n_ctx segment after the first starts one token early and so scores its previous token again.
    for window in windows:
        if window.reset and window.start > 0:
            window = dataclasses.replace(window, start=window.start - 1, stop=window.stop - 1)
        yield window


def skip_each_rows_first_token(batch, arguments):
    if batch is None:  # the batcher has delivered its last epoch
        return None
    input_ids, targets = batch.input_ids.clone(), batch.targets.clone()
    skipped = 0
    for row in range(targets.shape[0]):
        if (targets[row] != IGNORE_INDEX).sum() >= 2:
            input_ids[row, :-1], targets[row, :-1] = batch.input_ids[row, 1:], batch.targets[row, 1:]
            input_ids[row, -1], targets[row, -1] = 0, IGNORE_INDEX
            skipped += int(batch.targets[row, -1] != IGNORE_INDEX)
    return dataclasses.replace(batch, input_ids=input_ids, targets=targets, n_targets=batch.n_targets - skipped)


def without(key):
    # The saved generators are per rank ({"rank0": {...}, ...}); the fault drops `key` from every rank's.
    return lambda saved: {
        rank: {name: value for name, value in state.items() if name != key} for rank, state in saved.items()
    }


def keep_field(name):
    return lambda result, arguments: dataclasses.replace(result, **{name: getattr(arguments["self"], name)})


def halve(tensor):
    return tensor * 0.5


ATTENTION = "tests/test_attention.py::"
MODEL = "tests/test_model.py::"
EVALUATION = "tests/test_evaluation.py::"
TRAINING = "tests/test_training.py::"

FAULTS: tuple[Fault, ...] = (
    Fault(
        "A-xl-cache-dead",
        "attention never sees the previous window: the cached keys and values reach XLAttention as zeros",
        (Patch("bakallm.model.attention:XLAttention.attend", arguments={"cache": zero_past_block}),),
        (
            ATTENTION + "test_the_previous_window_reaches_the_next_through_attention_alone",
            ATTENTION + "test_xl_attention_equals_naive_softmax_attention_at_absolute_positions",
            MODEL + "test_xl_cache_alone_carries_the_previous_window",
        ),
    ),
    Fault(
        "B-past-never-masked",
        "the previous-window block is never masked, so fresh rows attend to a stale cache",
        (Patch("bakallm.model.attention:xl_attention_mask", result=unmask_past_block),),
        (
            ATTENTION + "test_a_fresh_row_ignores_whatever_its_cache_holds",
            ATTENTION + "test_xl_attention_equals_naive_softmax_attention_at_absolute_positions",
        ),
    ),
    Fault(
        "C-queries-from-position-zero",
        "queries are rotated from position 0 instead of after the past block",
        (
            Patch(
                "bakallm.model.attention:apply_rotary", arguments={"cos": from_position_zero, "sin": from_position_zero}
            ),
        ),
        (
            ATTENTION + "test_xl_attention_equals_naive_softmax_attention_at_absolute_positions",
            ATTENTION + "test_carried_queries_sit_after_the_past_block",
        ),
    ),
    Fault(
        "D-hf-later-windows-wrong-targets",
        "Hugging Face sliding windows after the first score each prediction against the next token's target",
        (Patch("bakallm.evaluation.hf_baseline:_window_batch", result=shift_targets_of_later_windows),),
        (EVALUATION + "test_hf_window_losses_equal_a_plain_model_call_per_window",),
        requires=("transformers",),
    ),
    Fault(
        "elephant-slope-sign",
        "the fused Elephant gate's backward uses the slope with the wrong sign",
        (Patch("bakallm.model.elephant:_signed_power_below", result=lambda slope, arguments: slope.neg_()),),
        ("tests/test_elephant.py::test_fused_gate_matches_plain_formula_in_values_and_gradients",),
    ),
    Fault(
        "scan-decay",
        "both selective scans (reference and blocked) decay the state by exp(dt * A / 2) instead of exp(dt * A)",
        (
            Patch("bakallm.kernels.blocked:selective_scan", arguments={"A": halve}),
            Patch("bakallm.kernels.reference:selective_scan_reference", arguments={"A": halve}),
        ),
        ("tests/test_mamba.py::test_scans_follow_the_mamba_recurrence_written_out",),
    ),
    Fault(
        "reset-keeps-ssm",
        "resetting a row clears every tensor but the Mamba SSM state",
        (Patch("bakallm.model.state:RecurrentState.reset", result=keep_field("ssm")),),
        (
            "tests/test_state.py::test_reset_clears_only_the_selected_rows_even_when_they_hold_nan",
            MODEL + "test_reset_row_equals_the_document_run_alone",
        ),
    ),
    Fault(
        "reset-keeps-conv",
        "resetting a row clears every tensor but the Mamba convolution state",
        (Patch("bakallm.model.state:RecurrentState.reset", result=keep_field("conv")),),
        (MODEL + "test_reset_row_equals_the_document_run_alone",),
    ),
    Fault(
        "batcher-skips-a-token",
        "every batch row skips the first token of its step",
        (Patch("bakallm.data.batching:DocumentBatcher.next_batch", result=skip_each_rows_first_token),),
        ("tests/test_batching.py::test_every_non_first_token_is_a_target_exactly_once_per_epoch",),
    ),
    Fault(
        "resume-skips-torch-rng",
        "resuming restores every random generator but torch's",
        (Patch("bakallm.training.trainer:_restore_rng", arguments={"saved": without("torch")}),),
        (TRAINING + "test_resume_restores_every_random_generator",),
    ),
    Fault(
        "resume-skips-python-rng",
        "resuming restores every random generator but Python's",
        (Patch("bakallm.training.trainer:_restore_rng", arguments={"saved": without("python")}),),
        (TRAINING + "test_resume_restores_every_random_generator",),
    ),
    Fault(
        "bench-hf-scores-a-token-twice",
        "each Hugging Face window after the first scores the previous window's last prediction again",
        (Patch("bakallm.evaluation.hf_baseline:hf_windows", result=score_the_previous_windows_last_token_again),),
        (EVALUATION + "test_hf_windows_score_every_token_exactly_once",),
    ),
    Fault(
        "resume-uses-a-damaged-checkpoint",
        "resume takes the checkpoint LATEST names without reading its files first",
        (Patch("bakallm.training.checkpoint:checkpoint_damage", result=lambda value, arguments: None),),
        (
            "tests/test_damaged_files.py::test_resume_continues_from_the_newest_complete_checkpoint_with_a_warning[garbage optimizer]",
        ),
    ),
    Fault(
        "skipped-step-updates-the-weights",
        "a step with non-finite gradients is counted as skipped but its update is applied anyway",
        (
            Patch(
                "bakallm.training.trainer:Trainer._skip_step",
                result=lambda value, arguments: arguments["self"].optimizer.step(),
            ),
        ),
        (TRAINING + "test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on[float32]",),
    ),
    Fault(
        "full-disk-not-recognised",
        "a write that fails for want of space is not recognised as such and surfaces as a raw OSError",
        (Patch("bakallm.atomic:no_room_reason", result=lambda value, arguments: None),),
        ("tests/test_disk_full.py::test_an_atomic_write_that_does_not_fit_keeps_the_old_file",),
    ),
    Fault(
        "bench-ours-scores-a-token-twice",
        "each n_ctx segment of an article after the first starts one token early, scoring one token twice",
        (Patch("bakallm.evaluation.evaluate:bakallm_windows", result=overlap_segments_by_one_token),),
        (EVALUATION + "test_state_is_reset_every_n_ctx_tokens",),
    ),
)
