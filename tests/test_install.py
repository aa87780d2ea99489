"""A regular (non-editable) install ships kernels/ as optsys.kernels, recipes included, and csrc/'s C++ sources."""

import os
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
            "print(c.recipe_path('quickstart')); import optsys.eval.config as e; print(e.recipe_file('scaling_tiny')); "
            "import optsys.csrc as cs; print(cs.source_dir()); "
            "print(cs.load('packing', required=True).pack_bfd([5, 3, 4], 8))")
    # The C++ op builds from the installed source (into a fresh extensions dir: a few seconds).
    env = {"PYTHONPATH": str(site), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         check=True, capture_output=True, text=True, timeout=300).stdout.splitlines()
    assert out[0] == str(site / "optsys" / "kernels" / "__init__.py")
    assert out[1] == "fused_linear_cross_entropy"
    assert Path(out[2]).is_file() and str(site) in out[2]
    assert Path(out[3]).is_file() and str(site) in out[3]  # eval recipes (optsys/recipes/eval/) ship too
    assert out[4] == str(site / "optsys" / "_csrc") and (site / "optsys" / "_csrc" / "packing.cpp").is_file()
    assert out[5] == "([[0, 1], [2]], -1)"
    assert not (site / "csrc").exists()
    assert not (site / "kernels").exists()  # never a top-level `kernels` package (HF's name)
