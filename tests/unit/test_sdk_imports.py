"""The SDK and the client half of the CLI never import torch, numpy or transformers, and the
client-only distribution (clients/pyproject.toml, alise-client) ships nothing else."""

import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "transformers", "sentence_transformers", "faiss")


def loaded_heavy_modules(statement: str, python_args: tuple[str, ...] = ()) -> list[str]:
    code = (f"import sys; {statement}; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, *python_args, "-c", code], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


def test_importing_the_sdk_imports_neither_torch_nor_transformers():
    assert loaded_heavy_modules("import alise.client; from alise.client import AsyncClient, Client") == []


def test_building_the_cli_parser_stays_light():
    assert loaded_heavy_modules("from alise.cli.main import build_parser; build_parser()") == []


def test_the_check_itself_sees_torch_when_it_is_imported():
    assert "torch" in loaded_heavy_modules("import torch")


def test_both_distributions_declare_the_same_client_dependencies():
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]
    assert client["dependencies"] == server["dependencies"]
    assert client["version"] == server["version"] and client["scripts"] == server["scripts"]


@pytest.fixture(scope="module")
def client_install(tmp_path_factory) -> Path:
    """alise-client built from a copy of clients/ and src/ (its package filter reads ../src) and
    installed into a folder of its own."""
    tmp = tmp_path_factory.mktemp("alise-client")
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    for folder in ("clients", "src"):
        shutil.copytree(ROOT / folder, tmp / folder, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(tmp / "site"), str(tmp / "clients")], check=True, capture_output=True)
    return tmp / "site"


def _run_in_client_install(site: Path, statement: str) -> subprocess.CompletedProcess:
    """Python without site processing (so the editable server install is invisible), with the
    client install first and this environment's site-packages after it for grpc/protobuf."""
    paths = [str(site), sysconfig.get_paths()["purelib"]]
    code = f"import sys; sys.path[:0] = {paths!r}; {statement}"
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)


def test_the_client_install_has_only_the_client_packages(client_install):
    found = sorted(p.name for p in (client_install / "alise").iterdir() if p.name != "__pycache__")
    assert found == ["__init__.py", "cli", "client", "sampling_rules.py", "v1"]
    out = _run_in_client_install(client_install, "import importlib.util as u; "
                                 "print(u.find_spec('alise.cluster'), u.find_spec('alise.core'))")
    assert out.stdout.split() == ["None", "None"], out.stderr


def test_the_client_install_imports_nothing_heavy(client_install):
    out = _run_in_client_install(client_install, "import alise.client, alise.cli.main; "
                                 "alise.cli.main.build_parser(); "
                                 f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.stdout.strip() == "[]", out.stderr


def test_server_commands_in_the_client_install_say_what_to_install(client_install):
    for argv in (["up", "--workers", "2"], ["scheduler"], ["predictor", "serve"], ["sim"]):
        out = _run_in_client_install(client_install, f"import alise.cli.main as m; sys.exit(m.main({argv!r}))")
        assert out.returncode == 2, out.stderr
        assert f"`alise {argv[0]}` is not among the commands of this client-only install" in out.stderr
        assert "pip install '.[server]'" in out.stderr and "Traceback" not in out.stderr
