import numpy as np
import pytest
import tokenizers

from bakallm.data.tokenizers import DEFAULT_TOKENIZER, ByteTokenizer, load_tokenizer
from bakallm.errors import UserError

SAMPLE = (
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor .\n  \t naïve café 東京 🙂"
)


NEOX = "tokenizers/gpt-neox-20b/tokenizer.json"


def test_gpt_neox_tokenizer_file_has_50277_ids_and_round_trips(shared_file):
    tokenizer = load_tokenizer(str(shared_file(NEOX)))
    assert tokenizer.vocab_size == 50277
    assert tokenizer.encode(" = Robert Boulter = ") == [426, 6911, 378, 3941, 350, 426, 209]
    assert tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE
    assert tokenizer.decode(np.array(tokenizer.encode(SAMPLE), dtype=np.uint16)) == SAMPLE


def test_encode_batch_matches_plain_tokenizers_without_special_tokens(shared_file):
    path = shared_file(NEOX)
    tokenizer = load_tokenizer(str(path))
    texts = [SAMPLE, "", "<|endoftext|> is text here"]
    plain = tokenizers.Tokenizer.from_file(str(path))
    assert tokenizer.encode_batch(texts) == [
        encoding.ids for encoding in plain.encode_batch(texts, add_special_tokens=False)
    ]


def test_folder_holding_tokenizer_json_loads_the_same_tokenizer(shared_file):
    from_folder = load_tokenizer(str(shared_file(NEOX).parent))
    from_file = load_tokenizer(str(shared_file(NEOX)))
    assert from_folder.name == from_file.name
    assert from_folder.fingerprint() == from_file.fingerprint()


def test_fingerprint_ignores_json_formatting_but_not_vocabulary(shared_file):
    neox = load_tokenizer(str(shared_file(NEOX)))
    # The official copy differs only in serialisation (it omits a default field).
    official = load_tokenizer(str(shared_file("tokenizers/gpt-neox-20b/20B_tokenizer.json")))
    gpt2 = load_tokenizer(str(shared_file("tokenizers/gpt2/tokenizer.json")))
    assert neox.fingerprint() == official.fingerprint()
    assert neox.fingerprint() != gpt2.fingerprint()
    assert gpt2.vocab_size == 50257


def test_bytes_tokenizer_uses_utf8_bytes():
    tokenizer = load_tokenizer("bytes")
    assert isinstance(tokenizer, ByteTokenizer)
    assert tokenizer.vocab_size == 256
    assert tokenizer.fingerprint() == "bytes-v1"
    assert tokenizer.encode("hé") == [104, 195, 169]
    assert tokenizer.encode_batch(["a", ""]) == [[97], []]
    assert tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE
    assert tokenizer.decode(np.array([104, 195], dtype=np.uint16)) == "h\ufffd"  # a cut character is replaced


def test_hub_name_offline_says_to_pass_a_local_tokenizer_json(monkeypatch, tmp_path):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(
        UserError, match=f"{DEFAULT_TOKENIZER} is on the Hugging Face Hub but offline mode is on.*local tokenizer.json"
    ):
        load_tokenizer(DEFAULT_TOKENIZER)


def test_hub_name_offline_uses_a_cached_tokenizer(monkeypatch, tmp_path, shared_file):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    snapshot = tmp_path / "models--Org--tok" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").write_bytes(shared_file(NEOX).read_bytes())
    (tmp_path / "models--Org--tok" / "refs").mkdir()
    (tmp_path / "models--Org--tok" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    tokenizer = load_tokenizer("Org/tok")
    assert tokenizer.name == "Org/tok"
    assert tokenizer.vocab_size == 50277


def test_missing_tokenizer_path_is_refused(tmp_path):
    with pytest.raises(UserError, match="No tokenizer file at .*tok.json; pass a tokenizer.json path"):
        load_tokenizer(str(tmp_path / "tok.json"))


def test_folder_without_tokenizer_json_is_refused(tmp_path):
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_damaged_tokenizer_json_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": ', encoding="utf-8")
    with pytest.raises(UserError, match="is not a valid Hugging Face tokenizer.json file"):
        load_tokenizer(str(path))
