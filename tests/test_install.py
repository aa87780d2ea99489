"""A regular (non-editable) install ships kernels/ as optsys.kernels, recipes included."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_regular_install_imports_optsys_kernels(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=600)
    code = ("import optsys.kernels, optsys.config as c; "
            "print(optsys.kernels.__file__); print(optsys.kernels.fused_linear_cross_entropy.__name__); "
            "print(c.recipe_path('quickstart')); import optsys.eval.config as e; print(e.recipe_file('scaling_tiny'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         check=True, capture_output=True, text=True, timeout=300).stdout.splitlines()
    assert out[0] == str(site / "optsys" / "kernels" / "__init__.py")
    assert out[1] == "fused_linear_cross_entropy"
    assert Path(out[2]).is_file() and str(site) in out[2]
    assert Path(out[3]).is_file() and str(site) in out[3]  # eval recipes (optsys/recipes/eval/) ship too
    assert not (site / "kernels").exists()  # never a top-level `kernels` package (HF's name)
