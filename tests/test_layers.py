"""The layers contract (pyproject.toml, [tool.importlinter]): imports run one way, top to bottom. CI runs
`lint-imports` before the tests; these check that the contract holds on this tree and that it catches an upward
import, naming both modules."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the dev extra (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--no-logo", "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=120)


def tree_copy(tmp_path: Path) -> Path:
    for name in ("optsys", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, upward", [
    ("optsys/config.py", "optsys.stages"),  # the bottom layer reaching up (the old cycle's root)
    ("optsys/models/load.py", "optsys.sources"),  # a model load that could train a stage
    ("optsys/checkpoint.py", "optsys.parallel.zero"),  # checkpoints take a saver and know nothing of DeepSpeed
    ("optsys/losses/policy.py", "optsys.models.packed"),  # losses are pure
])
def test_an_upward_import_breaks_the_contract_naming_both_modules(tmp_path, module, upward):
    root = tree_copy(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\nimport {upward}  # noqa\n")
    result = lint_imports(root)
    importer = module.removesuffix(".py").replace("/", ".")
    assert result.returncode == 1, result.stdout
    assert importer in result.stdout and upward in result.stdout, result.stdout
