"""The model-kind seam: what differs between our model and a transformers one lives in bakallm.kinds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bakallm import BakaLM, ModelConfig
from bakallm.kinds import KINDS, WHOLE_DOCUMENT_N_CTX, kind_named, kind_of_run

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bakallm"
# The code that trains, scores and distributes models of every kind.
KIND_BLIND = ("training/trainer.py", "training/distributed.py", "ablation.py", "commands/bench.py")
# How code tells the kinds apart by hand: a missing ModelConfig, the class, the wrapped transformers
# model, an attribute only ours has, or the kind's name.
KIND_BRANCH = re.compile(
    r"model_config is (not )?None|isinstance\([^)]*(BakaLM|HFCausalLM|PreTrainedModel)|(?<!args)\.hf\b|model\.layers|model\.config\.|"
    r"""(kind|model_kind)(\.name)? ?[=!]= ?["']|["'](hf|bakallm)["'] if """
)
# Which kind a run trains is decided in one place (kinds.kind_of_run); a study file names each variant's
# preset or hf_config, which ablation.py reads as data.
DECIDES_THE_KIND = re.compile(r"\bhf_config\b")


@pytest.mark.parametrize("module", KIND_BLIND)
def test_the_trainer_ablation_bench_and_distributed_code_never_branch_on_the_kind(module):
    lines = (PACKAGE / module).read_text(encoding="utf-8").splitlines()
    patterns = [KIND_BRANCH] + ([DECIDES_THE_KIND] if module != "ablation.py" else [])
    branches = [
        f"{module}:{number}: {line.strip()}"
        for number, line in enumerate(lines, 1)
        if any(pattern.search(line.split("#")[0]) for pattern in patterns)
    ]
    assert branches == []


def test_the_grep_sees_the_branches_it_forbids():
    for line in (
        "if self.model_config is None:",
        "if isinstance(model, BakaLM):",
        "x = self.model.hf(ids)",
        "for block in model.layers:",
        'if kind.name == "hf":',
        'kind = "hf" if values.get("x") else "bakallm"',
    ):
        assert KIND_BRANCH.search(line), line
    assert DECIDES_THE_KIND.search("n = 8 if config.hf_config else 1")


def test_every_kind_implements_the_whole_seam():
    for name in KINDS:
        kind = kind_named(name)  # an abstract method left out makes this fail
        assert kind.name == name and isinstance(kind.carries_state, bool) and kind.noun


def test_the_kind_of_a_run_follows_its_training_arguments():
    assert kind_of_run({"preset": "tiny"}).name == "bakallm"
    assert kind_of_run({"preset": "tiny", "hf_config": "neox.json"}).name == "hf"


def test_one_rule_turns_a_context_into_what_each_kind_reads():
    ours, transformer = kind_named("bakallm"), kind_named("hf")
    assert ours.reading(512, reach=64) == (512, None)
    assert ours.reading(WHOLE_DOCUMENT_N_CTX, reach=64) == (WHOLE_DOCUMENT_N_CTX, None)
    # Beyond its reach a transformer slides windows of the reach by half; within it, windows of the context follow each other.
    assert transformer.reading(WHOLE_DOCUMENT_N_CTX, reach=64) == (64, 32)
    assert transformer.reading(100, reach=64) == (64, 32)
    assert transformer.reading(32, reach=64) == (32, 32)


def test_each_kind_names_its_blocks_for_sharding(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = BakaLM(
        ModelConfig.preset(
            "tiny", vocab_size=64, d_model=32, n_heads=2, n_layers=3, d_ff=64, window=16, n_memory=2, n_pauses=2
        )
    )
    assert kind_named("bakallm").blocks(model) == list(model.layers)
    config = transformers.GPTNeoXConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=64
    )
    from bakallm.kinds.hf import HFCausalLM

    wrapped = HFCausalLM(transformers.GPTNeoXForCausalLM(config), vocab_size=64)
    units = kind_named("hf").blocks(wrapped)
    assert len(units) == 3 and all(type(unit).__name__ == "GPTNeoXLayer" for unit in units)
    assert not any(parameter.requires_grad is False for unit in units for parameter in unit.parameters())
    torch.testing.assert_close(
        sum(p.numel() for unit in units for p in unit.parameters()),
        sum(p.numel() for p in wrapped.hf.gpt_neox.layers.parameters()),
    )


def test_activation_checkpointing_of_a_transformers_models_blocks_gives_the_same_gradients():
    import copy

    transformers = pytest.importorskip("transformers")
    from bakallm.acceleration import checkpoint_layers
    from bakallm.kinds.hf import HFCausalLM

    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64
    )
    reference = HFCausalLM(transformers.GPTNeoXForCausalLM(config), vocab_size=64)
    model = copy.deepcopy(reference)
    checkpoint_layers(kind_named("hf").blocks(model))
    ids = torch.randint(0, 64, (2, 24))
    for each in (reference, model):
        each(ids, targets=ids.roll(-1, dims=1), return_logits=False).loss.backward()
    for (name, expected), actual in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-5, atol=1e-7, msg=name)
