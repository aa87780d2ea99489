"""The C++ packer (csrc/packing.cpp) returns exactly the Python reference's bins; build failures fall back to it.

The op is built once into torch's extensions dir (a few seconds cold on the CI machine, ~0.03 s warm after that).
"""

import random
import warnings

import numpy as np
import pytest
import torch

from optsys import csrc
from optsys.data import packing
from optsys.data.packing import pack_best_fit_decreasing, pack_best_fit_decreasing_reference


@pytest.fixture(scope="module")
def ext():
    return csrc.load("packing", required=True)  # fails the tests if gcc/ninja cannot build it: it must here


def random_case(seed):
    """Odd sizes; caps from 1 up; many duplicates, lengths equal to the cap, halves and thirds (ties everywhere)."""
    rng = random.Random(seed)
    cap = rng.choice([1, 2, 3, 7, 8, 61, 100, 513, 4096, 70_001])  # 70_001 > 2**16: the sparse structure
    n = rng.randrange(0, 400)
    special = [1, cap, max(1, cap // 2), max(1, cap // 3), max(1, cap - 1)]
    lengths = [rng.choice(special) if rng.random() < 0.4 else rng.randint(1, cap) for _ in range(n)]
    return lengths, cap


def test_cpp_matches_reference_on_random_inputs(ext):
    for seed in range(150):
        lengths, cap = random_case(seed)
        ref = pack_best_fit_decreasing_reference(lengths, cap)
        assert pack_best_fit_decreasing(lengths, cap, backend="cpp") == ref, seed
        for structure in ("dense", "sparse"):  # both C++ structures, whatever "auto" would pick
            bins, bad = ext.pack_bfd(lengths, cap, structure)
            assert bad == -1 and bins == ref, (seed, structure)
        (flat, offsets), _ = ext.pack_bfd(tuple(lengths), cap, "auto", False)
        flat = torch.frombuffer(flat, dtype=torch.int32).tolist() if lengths else []
        offsets = torch.frombuffer(offsets, dtype=torch.int64).tolist()
        assert [flat[a:b] for a, b in zip(offsets, offsets[1:])] == ref, seed


def test_cpp_matches_reference_on_long_tailed_data_and_array_inputs(ext):
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.0, 1.2, packing.AUTO_CPP_MIN + 1001).astype(np.int64), 1, 4096)
    ref = pack_best_fit_decreasing_reference(lengths.tolist(), 4096)
    assert len(ref) > 1000 and sorted(i for b in ref for i in b) == list(range(len(lengths)))
    assert pack_best_fit_decreasing(lengths.tolist(), 4096) == ref  # auto: >= AUTO_CPP_MIN lengths
    assert pack_best_fit_decreasing(lengths, 4096, backend="cpp") == ref  # numpy int64
    t = torch.from_numpy(lengths)
    assert pack_best_fit_decreasing(t.to(torch.int32), 4096, backend="cpp") == ref
    assert pack_best_fit_decreasing(t, 4096, backend="python") == ref
    strided = torch.stack([t, t]).t()[:, 0]  # non-contiguous view
    assert pack_best_fit_decreasing(strided, 4096, backend="cpp") == ref
    # Identical lengths: every placement is a tie between rooms and between bins.
    for n, cap in [(999, 3), (1001, 2), (500, 1)]:
        assert pack_best_fit_decreasing([1] * n, cap, backend="cpp") == pack_best_fit_decreasing_reference([1] * n, cap)


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_same_results_and_errors_on_edge_cases(ext, backend):
    pack = lambda lengths, cap: pack_best_fit_decreasing(lengths, cap, backend=backend)  # noqa: E731
    assert pack([], 8) == [] and pack([], 0) == [] and pack(torch.zeros(0, dtype=torch.long), 8) == []
    assert pack([8, 8], 8) == [[0], [1]]
    assert pack([2, 5, 4, 3, 2], 8) == [[1, 3], [0, 2, 4]]
    assert pack([5, 4, 3, 3, 1], 8) == [[0, 2], [1, 3, 4]]  # 3 goes to the 5's bin (room 3), the tighter fit
    for lengths, cap, msg in [([3, 9], 8, "example 1 has 9 tokens; packing needs 1..8 \\(data.max_tokens\\)"),
                              ([4, 0, 99], 8, "example 1 has 0 tokens"), ([-2], 8, "example 0 has -2 tokens"),
                              ([1], 0, "example 0 has 1 tokens; packing needs 1..0"),
                              (torch.tensor([1, 2, 3000]), 2048, "example 2 has 3000 tokens; packing needs 1..2048")]:
        with pytest.raises(ValueError, match=msg):
            pack(lengths, cap)
    with pytest.raises(ValueError, match="lengths must be 1-D integers"):
        pack(torch.ones(2, 3, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="lengths must be 1-D integers"):
        pack(np.array([1.0, 2.0]), 8)


def test_auto_and_cpp_on_values_the_op_cannot_read(ext):
    assert csrc.is_loaded("packing")  # so auto takes the op even for a short input
    floats = [2.0, 3.5, 6.0]
    assert pack_best_fit_decreasing(floats, 8) == pack_best_fit_decreasing_reference(floats, 8) == [[0, 2], [1]]
    huge = [1, 2**70]  # past int64: the reference raises the usual error
    with pytest.raises(ValueError, match="example 1 has 1180591620717411303424 tokens"):
        pack_best_fit_decreasing(huge, 8)
    with pytest.raises(TypeError, match="backend='cpp' needs integer lengths"):
        pack_best_fit_decreasing(floats, 8, backend="cpp")
    with pytest.raises(ValueError, match="backend must be 'auto', 'cpp' or 'python', got 'c'"):
        pack_best_fit_decreasing([1], 8, backend="c")


@pytest.fixture
def failing_build(monkeypatch):
    """A fresh process's view of csrc (nothing loaded yet) whose packing build raises like a compile error."""
    calls = []

    def broken(name):
        calls.append(name)
        raise RuntimeError(f"Error building extension 'optsys_{name}': [1/2] c++ -c packing.cpp\nFAILED: packing.o\n"
                           f"packing.cpp:1:2: error: boom\nninja: build stopped: subcommand failed.\n")

    monkeypatch.setattr(csrc, "_loaded", {})
    monkeypatch.setattr(csrc, "_warned", set())
    monkeypatch.setattr(csrc, "_build", broken)
    monkeypatch.setattr(packing, "AUTO_CPP_MIN", 1)  # auto tries the op on small inputs too
    return calls


def test_build_failure_warns_once_and_runs_the_python_twin(failing_build):
    lengths, cap = random_case(3)
    ref = pack_best_fit_decreasing_reference(lengths, cap)
    with pytest.warns(RuntimeWarning, match=r"csrc/packing.cpp is unavailable \(RuntimeError: Error building "
                                            r"extension 'optsys_packing': packing.cpp:1:2: error: boom\); its "
                                            r"pure-Python twin runs instead \(same results, slower\)"):
        assert pack_best_fit_decreasing(lengths, cap) == ref
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second build attempt
        assert pack_best_fit_decreasing(lengths, cap) == ref
        assert pack_best_fit_decreasing([5, 3], 8) == [[0, 1]]
    assert failing_build == ["packing"]
    assert not csrc.is_loaded("packing")


def test_cpp_backend_when_the_build_fails_is_a_clear_error(failing_build):
    with pytest.raises(csrc.CsrcBuildError, match=r"backend='cpp' needs the C\+\+ op csrc/packing.cpp, which could "
                                                  r"not be built or loaded \(RuntimeError: .*error: boom\)\. Use "
                                                  r"backend='auto' or 'python'"):
        pack_best_fit_decreasing([1, 2], 8, backend="cpp")
    assert pack_best_fit_decreasing([1, 2], 8, backend="python") == [[0, 1]]
    with pytest.warns(RuntimeWarning, match="csrc/packing.cpp is unavailable"):  # auto still says so, once
        assert pack_best_fit_decreasing([1, 2], 8) == [[0, 1]]
    assert failing_build == ["packing"]  # one build attempt per process


@pytest.mark.parametrize("failure", ["compile error", "no compiler"])
def test_real_build_failures_are_caught(tmp_path, monkeypatch, failure):
    """torch.utils.cpp_extension itself fails (a source that does not compile, a missing compiler): one warning."""
    (tmp_path / "broken.cpp").write_text('#error "deliberately broken"\n' if failure == "compile error" else
                                         "int x;\n")
    monkeypatch.setattr(csrc, "source_dir", lambda: tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    if failure == "no compiler":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setattr(csrc, "_loaded", {})
    monkeypatch.setattr(csrc, "_warned", set())
    with pytest.warns(RuntimeWarning, match="csrc/broken.cpp is unavailable") as record:
        assert csrc.load("broken") is None
    assert len(record) == 1
    reason = "error: #error \"deliberately broken\"" if failure == "compile error" else "no-such-c++: not found"
    assert reason in str(record[0].message), str(record[0].message)
    with pytest.raises(csrc.CsrcBuildError):
        csrc.load("broken", required=True)
