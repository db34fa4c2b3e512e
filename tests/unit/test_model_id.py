"""The model identity a worker's hello carries: its weights' fingerprint, read without torch."""

from __future__ import annotations

import shutil
import subprocess
import sys

from alise.common.model_id import weights_fingerprint


def test_the_fingerprint_module_imports_no_torch():
    code = "import sys, alise.common.model_id; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_same_files_same_fingerprint_other_weights_or_shapes_another(tmp_path, tiny_llama_dir):
    from tinymodels import make_tiny_model_dir

    copy = shutil.copytree(tiny_llama_dir, tmp_path / "copy")
    reseeded = make_tiny_model_dir(tmp_path / "reseeded", "llama", seed=1)
    wider = make_tiny_model_dir(tmp_path / "wider", "llama", intermediate_size=192)
    prints = [weights_fingerprint(d) for d in (tiny_llama_dir, copy, reseeded, wider)]
    assert prints[0] == prints[1] and len(set(prints)) == 3 and all(len(p) == 12 for p in prints)
    assert weights_fingerprint(tmp_path) == ""  # no weights there
