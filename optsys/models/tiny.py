"""Tiny-model factory: random-init Qwen2/Llama decoders with a byte-level BPE tokenizer.

The folders it writes are standard Hugging Face checkpoints (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a ChatML chat template) that transformers and vLLM
load like any hub model. No hub is needed: the tokenizer is trained on a built-in corpus.

Digits are split one per token (as Llama 3 and Qwen do) so that arithmetic is learnable, and
head_dim is 64 because vLLM's CPU attention backend rejects small head sizes such as 16.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from optsys.config import check_folder_creatable

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOKENIZER_VERSION = 1  # bump when the corpus or tokenizer recipe changes (invalidates caches)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny decoder. head_dim = hidden_size // num_heads must be 64 for vLLM on CPU."""

    arch: str  # "qwen2" | "llama"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int  # model vocab; the tokenizer may be smaller (rows beyond it are never used)
    tokenizer_vocab: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False


PRESETS: dict[str, TinySpec] = {
    # ~0.5M params: unit tests.
    "test": TinySpec("qwen2", 128, 2, 2, 1, 256, 512, 512),
    "test-llama": TinySpec("llama", 128, 2, 2, 2, 256, 512, 512),
    # ~3M params: the quickstart (learns 2-digit addition in about a minute on 2 cores).
    "quickstart": TinySpec("qwen2", 256, 4, 4, 2, 768, 512, 512),
    # ~30-50M params, vocab 32k: CPU benchmarks (realistic lm_head share of the FLOPs).
    "small": TinySpec("qwen2", 512, 6, 8, 2, 1536, 32000, 32000),
    "small-llama": TinySpec("llama", 512, 6, 8, 8, 1536, 32000, 32000),
    # ~0.5B params (494M), Qwen2.5-0.5B's shape (24 layers, hidden 896, GQA 14/2 heads, vocab 151936, tied
    # embeddings): the GPU suite's training steps (profiling/gpu_suite.sh sft|dpo|grpo). 2 GB in fp32 on disk.
    "gpu-0.5b": TinySpec("qwen2", 896, 24, 14, 2, 4864, 151936, 32000, tie_word_embeddings=True),
}


def cache_root() -> Path:
    """Where optsys caches what it builds (tiny/ models, stages/ runs): $OPTSYS_CACHE_DIR, else
    $XDG_CACHE_HOME/optsys or ~/.cache/optsys."""
    if os.environ.get("OPTSYS_CACHE_DIR"):
        check_folder_creatable(os.environ["OPTSYS_CACHE_DIR"], "OPTSYS_CACHE_DIR")
        return Path(os.path.expanduser(os.environ["OPTSYS_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optsys"


def default_cache_dir() -> Path:
    return cache_root() / "tiny"


def builtin_corpus(seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: English prose, chat turns, arithmetic and lists."""
    rng = random.Random(seed)
    prose = (
        "The quick brown fox jumps over the lazy dog. A language model predicts the next token "
        "from the tokens before it. Supervised fine-tuning teaches a model to answer in a given "
        "format; preference optimization teaches it which of two answers people prefer; "
        "reinforcement learning rewards answers that a checker verifies. What is the sum of two "
        "numbers? Sort the list in ascending order. Answer with the number only. The answer is "
        "correct. The answer is wrong. Think step by step, then give the final answer. "
        "Question: Answer: Solve: Compute: Reverse: Count: system user assistant"
    )
    lines = [prose] * 4
    for _ in range(4000):
        a, b = rng.randrange(10**rng.randint(1, 5)), rng.randrange(10**rng.randint(1, 5))
        op = rng.choice("+-*")
        lines.append(f"<|im_start|>user\n{a}{op}{b}=<|im_end|>\n<|im_start|>assistant\n{a + b}<|im_end|>\n")
        xs = [rng.randrange(100) for _ in range(rng.randint(2, 8))]
        lines.append(f"sort: {' '.join(map(str, xs))} -> {' '.join(map(str, sorted(xs)))}")
    words = prose.replace(".", " ").replace(";", " ").split()
    for _ in range(2000):
        lines.append(" ".join(rng.choice(words) for _ in range(12)))
    return lines


def train_tokenizer(vocab_size: int):
    """Byte-level BPE with single-digit pre-tokenization and a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Special tokens are matched before pre-tokenization; digits become one token each.
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(builtin_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"  # generation pads on the left; training packs and never pads
    return fast


def _build_model(spec: TinySpec, tokenizer, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        torch_dtype="float32",
    )
    if spec.arch == "qwen2":
        config = Qwen2Config(**common)
    elif spec.arch == "llama":
        config = LlamaConfig(head_dim=spec.hidden_size // spec.num_heads, **common)
    else:
        raise ValueError(f"unknown tiny arch {spec.arch!r}; use 'qwen2' or 'llama'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _spec_key(spec: TinySpec, seed: int) -> str:
    blob = json.dumps({"spec": asdict(spec), "seed": seed, "tok": TOKENIZER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@contextlib.contextmanager
def folder_lock(folder: Path, waiting: str):
    """An exclusive flock on `<folder>.lock` (cached stage, GGUF and tiny folders): a second process prints
    `waiting` and waits for the one building `folder`, then reuses it."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_dir(final: Path, write) -> Path:
    """Write into a temp folder beside `final`, then rename: concurrent ranks never see half a folder."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; theirs is identical
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_tiny_tokenizer(vocab_size: int = 512, cache_dir: str | os.PathLike | None = None):
    """The factory's tokenizer alone (cached), for data tests."""
    from transformers import AutoTokenizer

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / f"tokenizer-v{TOKENIZER_VERSION}-{vocab_size}"
    _atomic_dir(folder, lambda tmp: train_tokenizer(vocab_size).save_pretrained(tmp))
    return AutoTokenizer.from_pretrained(folder)


def build_tiny(preset: str = "test", seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of a tiny HF model (built once, then cached; deterministic for a seed)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / f"{preset}-seed{seed}-{_spec_key(spec, seed)}"

    def write(tmp: Path) -> None:
        tokenizer = load_tiny_tokenizer(spec.tokenizer_vocab, cache_dir=root)
        model = _build_model(spec, tokenizer, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    if not folder.exists() and _not_rank0_of_a_group():
        # transformers (5.x) writes a model's config and weights only on rank 0 of an initialized process group
        # (should_save_on_this_rank): another rank would publish a folder holding the tokenizer alone (seen on a
        # 2-node run with a node-local cache; on one node whenever rank 1 won the rename). Outside the group, a
        # child process writes the whole folder (once per cache).
        _build_in_child(preset, seed, root)
        return folder
    return _atomic_dir(folder, write)


def _not_rank0_of_a_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _build_in_child(preset: str, seed: int, root: Path) -> None:
    import subprocess
    import sys

    package_parent = str(Path(__file__).resolve().parents[2])  # optsys importable in the child as it is here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    code = ("import sys; from optsys.models.tiny import build_tiny; "
            "build_tiny(sys.argv[1], int(sys.argv[2]), sys.argv[3])")
    proc = subprocess.run([sys.executable, "-c", code, preset, str(seed), str(root)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"building tiny:{preset} (seed {seed}) into {root} in a child process failed:\n"
                           f"{proc.stderr[-3000:]}")
