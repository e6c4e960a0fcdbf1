"""benchmarks/recall_diagnostics.py: where a fact lives in the state."""

from pathlib import Path

import numpy as np
import pytest

from bakallm import BakaLM, ModelConfig
from bakallm.data.recall import FactWriter, recall_samples
from bakallm.data.tokenizers import load_tokenizer
from conftest import load_benchmark

NEOX_TOKENIZER = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.skipif(
    not NEOX_TOKENIZER.is_file(), reason="needs ../shared/data/tokenizers/gpt-neox-20b (codes of one token per digit)"
)
def test_the_trace_sees_a_fact_only_in_the_parts_that_carry_it():
    diagnostics = load_benchmark("recall_diagnostics")
    tokenizer = load_tokenizer(str(NEOX_TOKENIZER))
    writer = FactWriter(tokenizer)
    filler = np.asarray(
        tokenizer.encode(" the quiet river ran past the old mill and on to the sea" * 60), dtype=np.int64
    )
    small = {
        "vocab_size": tokenizer.vocab_size,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 2,
        "d_ff": 64,
        "window": 16,
        "n_memory": 2,
        "n_pauses": 2,
    }
    samples = recall_samples(filler, writer, 5 * 16, 2, seed=0, depth_tokens=0)
    carried = diagnostics.fact_traces(BakaLM(ModelConfig.preset("tiny", **small)).eval(), samples, writer, windows=3)
    assert (carried[3] > 0).all()  # every part still differs three windows after the code
    stateless = BakaLM(
        ModelConfig.preset("tiny", **{**small, "n_memory": 0, "xl_cache": False, "carry_mamba_state": False})
    ).eval()
    traces = dict(zip(diagnostics.PARTS, diagnostics.fact_traces(stateless, samples, writer, windows=3)[1]))
    assert all(value == 0.0 for value in traces.values()), traces  # nothing of the fact a window later
