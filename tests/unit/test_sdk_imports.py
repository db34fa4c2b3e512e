"""The SDK and the client half of the CLI never import torch or transformers."""

import subprocess
import sys


def loaded_heavy_modules(statement: str) -> list[str]:
    code = (f"import sys; {statement}; "
            "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers', 'faiss') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip())


def test_importing_the_sdk_imports_neither_torch_nor_transformers():
    assert loaded_heavy_modules("import alise.client; from alise.client import AsyncClient, Client") == []


def test_building_the_cli_parser_stays_light():
    assert loaded_heavy_modules("from alise.cli.main import build_parser; build_parser()") == []


def test_the_check_itself_sees_torch_when_it_is_imported():
    assert loaded_heavy_modules("import torch") == ["torch"]
