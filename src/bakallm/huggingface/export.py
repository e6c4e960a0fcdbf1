"""`bakallm export RUN OUT_DIR`: a model as a Hugging Face folder, optionally pushed to the Hub.

    OUT_DIR/config.json              model_type "bakallm", auto_map, the bakallm model config
    OUT_DIR/model.safetensors        the weights, named as the wrapper's modules ("model.<name>")
    OUT_DIR/modeling_bakallm.py      the thin wrapper (bakallm/huggingface/modeling_bakallm.py)
    OUT_DIR/tokenizer.json, tokenizer_config.json   the model's tokenizer (none for `bytes`)

`transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)` loads it, and
so do `BakaLM.from_pretrained(OUT_DIR)` and every bakallm command that takes a run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bakallm.atomic import atomic_path, write_text_atomic
from bakallm.errors import UserError

MODELING_FILE = "modeling_bakallm.py"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def export(model_path: str | Path, out_dir: str | Path, tokenizer: str | None = None, force: bool = False) -> Path:
    """Writes the Hugging Face folder of the model at `model_path`; returns the folder.

    A run directory or one of its checkpoints is refused as `out_dir` (its config.json would be
    replaced and the run could no longer be resumed), and so is a folder holding files, unless `force`.
    """
    from bakallm.data.tokenizers import load_tokenizer
    from bakallm.model.io import load_model, model_files

    _check_out_dir(Path(out_dir), force)
    files = model_files(model_path)
    model = load_model(model_path)
    spec = tokenizer or files.tokenizer
    if spec is None:
        raise UserError(f"{model_path} names no tokenizer; pass the one the model was trained with as --tokenizer.")
    loaded_tokenizer = load_tokenizer(spec)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        _write_folder(model, loaded_tokenizer, out_dir)
    except BaseException:
        if created:  # nothing is left behind, so that the same command works again (a full disk, say)
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


def _write_folder(model, loaded_tokenizer, out_dir: Path) -> None:
    from safetensors.torch import save_file

    from bakallm.data.tokenizers import BYTES_TOKENIZER, HuggingFaceTokenizer
    from bakallm.model.io import HF_CONFIG_KEY, HF_MODEL_TYPE, HF_TOKENIZER_KEY, HF_WEIGHT_PREFIX
    from bakallm.runs import CONFIG_FILE, MODEL_FILE

    # A tied weight is stored once (the Hugging Face loader ties it again through the wrapper).
    tensors, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[HF_WEIGHT_PREFIX + name] = tensor.detach().contiguous()
    with atomic_path(out_dir / MODEL_FILE) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})

    if isinstance(loaded_tokenizer, HuggingFaceTokenizer):
        tokenizer_entry = TOKENIZER_FILE
        write_text_atomic(out_dir / TOKENIZER_FILE, loaded_tokenizer.backend.to_str(pretty=True))
        write_text_atomic(
            out_dir / TOKENIZER_CONFIG_FILE,
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "model_max_length": 1 << 60,
                    "clean_up_tokenization_spaces": False,
                },
                indent=2,
            ),
        )
    else:
        tokenizer_entry = BYTES_TOKENIZER

    config = model.config
    hf_config = {
        "model_type": HF_MODEL_TYPE,
        "architectures": ["BakaLMForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{Path(MODELING_FILE).stem}.BakaLMConfig",
            "AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.BakaLMForCausalLM",
        },
        HF_CONFIG_KEY: config.to_dict(),
        HF_TOKENIZER_KEY: tokenizer_entry,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        "bakallm_transformers_tested": tested_transformers(),
    }
    write_text_atomic(out_dir / CONFIG_FILE, json.dumps(hf_config, indent=2, sort_keys=True))
    with atomic_path(out_dir / MODELING_FILE) as temporary:
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), temporary)


def tested_transformers() -> str | None:
    """The transformers releases the exported folder is tested with: the range of bakallm's `hf`
    extra in pyproject.toml, as installed (None when bakallm runs without being installed)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        requirements = [Requirement(text) for text in requires("bakallm") or ()]
    except PackageNotFoundError:
        return None
    extra = next(
        (
            r
            for r in requirements
            if r.name == "transformers" and r.marker is not None and r.marker.evaluate({"extra": "hf"})
        ),
        None,
    )
    return str(extra.specifier) if extra is not None else None


def _check_out_dir(out_dir: Path, force: bool) -> None:
    from bakallm.runs import CHECKPOINTS_DIR, LATEST_FILE, MODEL_FILE

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder; pass a folder path.")
    in_a_run = (
        (out_dir / LATEST_FILE).exists()
        or (out_dir / CHECKPOINTS_DIR).is_dir()
        or ((out_dir / MODEL_FILE).is_file() and out_dir.parent.name == CHECKPOINTS_DIR)
    )
    if in_a_run:
        raise UserError(
            f"{out_dir} is a run directory or one of its checkpoints, which the export would damage; pass a new folder as OUT_DIR."
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(
            f"{out_dir} already holds files; pass an empty or new folder, or --force to replace the files of the same names."
        )


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Uploads `folder` to the Hub model repository `repo_id` (created if needed); returns its URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub; install it with `pip install bakallm[hf]`.") from None
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload bakallm model"
        )
    except Exception as error:  # network, authentication and offline-mode failures alike
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"Could not upload {folder} to the Hugging Face Hub repository {repo_id} ({first_line}); check the network and log in with `hf auth login`."
        ) from None
    return str(url)
