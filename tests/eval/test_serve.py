"""optsys.serve (vLLM's OpenAI server, optsys defaults) and optsys.eval.endpoint.EndpointEngine (its client).

Unit tests build the server's argv and talk to fake endpoints (nothing listening; a stub HTTP server); the slow
ones start `python -m optsys.serve` once for the module and check that the endpoint generates exactly what the
in-process VLLMEngine generates, and that a LoRA adapter is served.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import free_port

from optsys import serve
from optsys.eval.endpoint import EndpointEngine
from optsys.rollout.engine import EngineError, Sampling

ROOT = Path(__file__).resolve().parents[2]


def write_adapter_stub(folder: Path, r: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 2 * r}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


# --- the server's argv -------------------------------------------------------------------------------------------


def test_server_args_cpu_defaults_and_extra_args_last():
    argv = serve.build_server_args("/m", served_name="m", port=1234, max_model_len=512, dtype="float32", cpu=True,
                                   extra=["--enforce-eager", "--seed", "7"])
    assert argv[argv.index("--model") + 1] == "/m" and argv[argv.index("--port") + 1] == "1234"
    assert argv[argv.index("--logprobs-mode") + 1] == "processed_logprobs"  # Completion.logprobs' meaning
    assert "--no-enable-chunked-prefill" in argv and "--enforce-eager" in argv
    assert argv[-3:] == ["--enforce-eager", "--seed", "7"]  # extra args come last: they win in argparse
    gpu = serve.build_server_args("/m", served_name="m", cpu=False)
    assert "--no-enable-chunked-prefill" not in gpu and "--enforce-eager" not in gpu and "--enable-lora" not in gpu
    assert "--max-model-len" not in gpu and "--dtype" not in gpu  # vLLM's own defaults unless asked


def test_server_args_lora_rank_is_rounded_up_to_a_rank_vllm_accepts(tmp_path):
    adapters = [serve.read_adapter(f"a={write_adapter_stub(tmp_path / 'a', 4)}"),
                serve.read_adapter(f"b={write_adapter_stub(tmp_path / 'b', 12)}")]
    assert [a.rank for a in adapters] == [4, 12]
    argv = serve.build_server_args("/m", served_name="m", adapters=adapters, cpu=True)
    assert "--enable-lora" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "16"  # 12 -> 16 (vLLM takes 1, 8, 16, 32, ...)
    assert argv[argv.index("--max-loras") + 1] == "2"
    i = argv.index("--lora-modules")
    assert argv[i + 1 : i + 3] == [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]
    eight = serve.build_server_args("/m", served_name="m", adapters=adapters[:1], cpu=True)
    assert eight[eight.index("--max-lora-rank") + 1] == "8"
    with pytest.raises(EngineError, match="rank 600"):
        serve.build_server_args("/m", served_name="m", adapters=[serve.Adapter("x", "/x", 600)], cpu=True)
    with pytest.raises(serve.ServeError, match="distinct"):
        serve.build_server_args("/m", served_name="a", adapters=adapters, cpu=True)


def test_bad_adapter_specs_are_refused(tmp_path):
    with pytest.raises(serve.ServeError, match="NAME=ADAPTER_DIR"):
        serve.read_adapter("no-equals-sign")
    with pytest.raises(serve.ServeError, match="adapter_config.json"):
        serve.read_adapter(f"a={tmp_path}")


def test_served_model_name(tmp_path):
    run_final = tmp_path / "runs" / "sft" / "final"
    assert serve.served_model_name("tiny:test", "/cache/tiny/test-seed0-abc") == "tiny:test"
    assert serve.served_model_name(str(run_final), str(run_final)) == "sft"
    assert serve.served_model_name(str(tmp_path / "my-model"), str(tmp_path / "my-model")) == "my-model"


def test_model_folder_without_tokenizer_fails_before_vllm_starts(tiny_path, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_path, folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    monkeypatch.setattr(serve, "run_vllm_server", lambda argv: pytest.fail("vLLM was started"))
    assert serve.main(["--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "tokenizer" in err and "Traceback" not in err
    assert serve.main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    adapter = write_adapter_stub(tmp_path / "adapter", 8)
    assert serve.main(["--model", str(adapter)]) == 2  # an adapter is not a model: serve it with --lora
    assert "--lora" in capsys.readouterr().err


def test_main_hands_vllm_the_built_argv_and_the_kv_cache_size(tiny_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "")  # restored at teardown
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    started = []
    monkeypatch.setattr(serve, "run_vllm_server", started.append)
    port = str(free_port())  # the port is checked free before vLLM starts
    assert serve.main(["--model", str(tiny_path), "--port", port, "--kv-cache-gib", "2", "--", "--seed", "3"]) == 0
    (argv,) = started
    assert argv[argv.index("--served-model-name") + 1] == tiny_path.name and argv[-2:] == ["--seed", "3"]
    assert "--no-enable-chunked-prefill" in argv and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    # no --dtype: the one config.json states (vLLM's auto would serve this float32 model in bfloat16 on CPU)
    assert json.loads((tiny_path / "config.json").read_text())["dtype"] == "float32"
    assert argv[argv.index("--dtype") + 1] == "float32"
    started.clear()
    assert serve.main(["--model", str(tiny_path), "--port", port, "--dtype", "bfloat16"]) == 0
    assert started[0][started[0].index("--dtype") + 1] == "bfloat16"


def test_serve_cli_exits_2_without_a_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-m", "optsys.serve", "--model", str(empty)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    assert "config.json" in r.stderr and "*.safetensors" in r.stderr and "Traceback" not in r.stderr


# --- the client against endpoints that fail ------------------------------------------------------------------------


def test_endpoint_that_does_not_answer_raises_after_bounded_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    t0 = time.perf_counter()
    with pytest.raises(EngineError) as e:
        EndpointEngine(url, retries=2, backoff_s=0.05)  # model=None asks GET /v1/models
    msg = str(e.value)
    assert url in msg and "3 attempts" in msg and "optsys.serve" in msg and "refused" in msg
    engine = EndpointEngine(url, model="m", retries=1, backoff_s=0.05)  # a named model: no request until generate
    with pytest.raises(EngineError, match="2 attempts"):
        engine.generate([[1, 2, 3]], Sampling(), seeds=[0])
    assert time.perf_counter() - t0 < 5


class StubHandler(BaseHTTPRequestHandler):
    """Answers every request with the server's next (status, body); counts requests."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.hits += 1
        self.server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        status, body = self.server.replies[min(self.server.hits, len(self.server.replies)) - 1]
        data = json.dumps(body).encode()
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    server.hits, server.replies, server.seen = 0, [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def choice(index, ids, finish="length"):
    return dict(index=index, token_ids=ids, finish_reason=finish, text="",
                logprobs=dict(token_logprobs=[-0.5] * len(ids)))


def test_5xx_is_retried_and_4xx_is_not(stub):
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    ok = {"choices": [choice(1, [7], "stop"), choice(0, [5, 6])]}
    stub.replies = [(503, {"error": {"message": "busy"}}), (500, {"error": {"message": "oops"}}), (200, ok)]
    engine = EndpointEngine(url, model="m", retries=2, backoff_s=0.01)
    (group,) = engine.generate([[1, 2]], Sampling(n=2), seeds=[3])
    assert stub.hits == 3
    assert [c.token_ids for c in group] == [(5, 6), (7,)]  # ordered by choice index
    assert [c.finish_reason for c in group] == ["length", "stop"] and group[0].logprobs == (-0.5, -0.5)

    stub.hits, stub.replies = 0, [(500, {"error": {"message": "oops"}})]
    with pytest.raises(EngineError, match="3 attempts.*HTTP 500: oops"):
        engine.generate([[1, 2]], Sampling(), seeds=[3])
    assert stub.hits == 3

    stub.hits, stub.replies = 0, [(400, {"error": {"message": "This model's maximum context length is 256"}})]
    with pytest.raises(EngineError, match="HTTP 400.*maximum context length is 256"):
        engine.generate([[1, 2]], Sampling(), seeds=[3])
    assert stub.hits == 1  # a refused request is not retried

    stub.hits, stub.replies = 0, [(200, {"choices": [{"index": 0, "token_ids": [1], "prompt_logprobs": None}]})]
    with pytest.raises(EngineError, match="does not support scoring"):
        engine.token_logprobs([[1, 2, 3]], [1])


def test_api_key_429_retry_and_the_named_models_context(stub, monkeypatch):
    """Issue 23, item 12: the client sent no API key, did not retry 429, and took 2048 as the context of a named
    model (endpoint_model) instead of the server's max_model_len."""
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    models = {"data": [{"id": "base", "max_model_len": 256}, {"id": "ad", "max_model_len": 384}]}
    ok = {"choices": [choice(0, [5], "stop")]}
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    stub.replies = [(200, models), (429, {"error": {"message": "slow down"}}), (503, {"error": {"message": "busy"}}),
                    (200, ok)]
    engine = EndpointEngine(url, model="ad", retries=2, backoff_s=0.01)
    assert engine.context_length() == 384  # the named model's, not the first one's, not 2048
    (group,) = engine.generate([[1, 2]], Sampling(), seeds=[0])
    assert [c.token_ids for c in group] == [(5,)] and stub.hits == 4  # 429 and 503 retried
    assert [a for _, _, a in stub.seen] == ["Bearer from-env"] * 4
    assert EndpointEngine(url, model="m", api_key="given").api_key == "given"  # --api-key wins over the variable

    stub.hits, stub.seen, stub.replies = 0, [], [(429, {"error": {"message": "slow down"}})]
    with pytest.raises(EngineError, match="2 attempts.*HTTP 429: slow down"):  # bounded
        EndpointEngine(url, model="m", retries=1, backoff_s=0.01).generate([[1]], Sampling(), seeds=[0])
    stub.hits, stub.replies = 0, [(401, {"error": {"message": "Unauthorized"}})]
    with pytest.raises(EngineError, match="HTTP 401.*--api-key KEY or set OPENAI_API_KEY"):
        EndpointEngine(url, model="m").generate([[1]], Sampling(), seeds=[0])
    assert stub.hits == 1
    stub.hits, stub.replies = 0, [(200, models)]
    with pytest.raises(EngineError, match="does not serve a model named 'nope'.*'base', 'ad'"):
        EndpointEngine(url, model="nope").context_length()
    stub.hits, stub.replies = 0, [(200, {"data": [{"id": "x"}]})]
    assert EndpointEngine(url, model="x").context_length() is None  # the server does not say: the config's


def test_the_endpoints_tokenizer_comes_from_the_folder_the_server_loaded(stub, tiny_path, tmp_path):
    """optsys.serve names a run's final-merged/ by its run ("sft"), which is no folder here: the tokenizer is then
    read from the folder GET /v1/models says it loaded (`root`; an adapter's base through `parent`), when this
    machine has it. A root that is not here keeps the error that asks for --model."""
    from pathlib import Path

    from optsys.config import ConfigError
    from optsys.eval.config import load_eval_config
    from optsys.eval.run import open_endpoint

    def offline(value, seed, dtype):  # what a name that is no folder gets here, without the hub's timeouts
        if not Path(value).is_dir():
            raise OSError(f"cannot load model {value!r}: no such folder, and no hub")
        return value

    url = f"http://127.0.0.1:{stub.server_address[1]}"
    served = [{"id": "sft", "root": str(tiny_path), "parent": None, "max_model_len": 256},
              {"id": "ad", "root": "/nowhere/adapter", "parent": "sft", "max_model_len": 256}]
    for model in (None, "ad"):
        stub.hits, stub.replies = 0, [(200, {"data": served})]
        cfg = load_eval_config(flags={"endpoint": url, **({"endpoint_model": model} if model else {})})
        opened = open_endpoint(cfg, None, resolve=offline)
        assert opened.tokenizer.chat_template and opened.extra["max_model_len"] == 256
    stub.hits, stub.replies = 0, [(200, {"data": [{"id": "sft", "root": str(tmp_path / "gone")}]})]
    with pytest.raises(ConfigError, match="pass --model <the served model's folder>"):
        open_endpoint(load_eval_config(flags={"endpoint": url}), None, resolve=offline)


def test_the_api_key_is_never_written_and_endpoint_settings_need_an_endpoint():
    from optsys.config import ConfigError
    from optsys.eval.config import load_eval_config, to_dict

    cfg = load_eval_config(flags={"endpoint": "http://127.0.0.1:1", "api_key": "secret"})
    assert to_dict(cfg)["api_key"] == "<set>" and "secret" not in json.dumps(to_dict(cfg))
    for key, value in (("api_key", "k"), ("endpoint_model", "m")):
        with pytest.raises(ConfigError, match=f"{key} applies to --endpoint"):
            load_eval_config(flags={"model": "tiny:test", key: value})


# --- a real server --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_adapter(tiny_path, tmp_path_factory):
    """A peft adapter (r=8 on q_proj, v_proj) for the tiny model, with lora_B nonzero so it changes outputs."""
    pytest.importorskip("vllm", reason="serving needs vLLM (the `cpu`/`gpu` extra)")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    path = tmp_path_factory.mktemp("adapter") / "ad"
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server_proc(tiny_path, lora_adapter, tmp_path_factory):
    """`python -m optsys.serve` on a free port, in its own process group (killed whole at teardown)."""
    pytest.importorskip("vllm", reason="serving needs vLLM (the `cpu`/`gpu` extra)")
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it (vLLM's default)
    cmd = [sys.executable, "-m", "optsys.serve", "--model", str(tiny_path), "--lora", f"ad={lora_adapter}",
           "--port", str(port), "--max-model-len", "256"]  # no --dtype: config.json's float32 (the default)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    proc.url, proc.log_path, proc.t0 = f"http://127.0.0.1:{port}", log_path, time.perf_counter()
    yield proc
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the API server, its engine core and worker processes
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def local_engine(server_proc, tiny_path):
    """The in-process engine with the server's settings, built while the server boots."""
    import torch

    from optsys.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny_path), dtype=torch.float32, max_model_len=256, seed=0, device=torch.device("cpu"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server_url(server_proc):
    """Wait (bounded) for /health; the failure message carries the server's log."""
    deadline = server_proc.t0 + 240
    while time.perf_counter() < deadline:
        if server_proc.poll() is not None:
            log = server_proc.log_path.read_text()[-6000:]
            pytest.fail(f"optsys.serve exited with {server_proc.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(f"{server_proc.url}/health", timeout=2) as r:
                if r.status == 200:
                    print(f"server up in {time.perf_counter() - server_proc.t0:.1f} s")
                    return server_proc.url
        except OSError:  # not listening yet (URLError is an OSError)
            pass
        time.sleep(0.5)
    pytest.fail(f"optsys.serve not healthy after 240 s:\n{server_proc.log_path.read_text()[-6000:]}")


def prompts_for(tiny_path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    texts = ["What is 12 + 7?", "sort: 5 3 9 1", "The quick brown fox"]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for t in texts]


@pytest.mark.slow
def test_endpoint_generates_what_the_in_process_engine_generates(server_url, local_engine, tiny_path):
    import torch

    endpoint = EndpointEngine(server_url, backoff_s=0.1)
    assert endpoint.model == tiny_path.name and endpoint.max_model_len == 256  # the base model, listed first
    prompts = prompts_for(tiny_path)
    seeds = [11, 12, 13]
    # the random tiny model is near-uniform: 15 stop tokens end about half the sampled completions early
    runs = {"greedy": Sampling(n=1, temperature=0.0, max_new_tokens=8),
            "sampled": Sampling(n=2, temperature=0.9, top_p=0.95, top_k=100, max_new_tokens=8,
                                stop_token_ids=tuple(range(100, 115)))}
    for what, sampling in runs.items():
        got, want = endpoint.generate(prompts, sampling, seeds), local_engine.generate(prompts, sampling, seeds)
        assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want], what
        assert [[c.finish_reason for c in g] for g in got] == [[c.finish_reason for c in g] for g in want], what
        for g, w in zip(got, want):
            for c, d in zip(g, w):
                assert len(c.logprobs) == len(c.token_ids)
                torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(d.logprobs), atol=1e-4, rtol=1e-4)
    finishes = {c.finish_reason for g in got for c in g}
    assert finishes == {"stop", "length"}, finishes  # both endings were compared
    assert all(c.token_ids[-1] in range(100, 115) for g in got for c in g if c.finish_reason == "stop")
    assert len({c.token_ids for g in got for c in g}) > 1  # the samples differ from one another

    seqs = [p + [5, 6, 7] for p in prompts]
    starts = [len(p) for p in prompts]
    torch.testing.assert_close(torch.tensor(endpoint.token_logprobs(seqs, starts)),
                               torch.tensor(local_engine.token_logprobs(seqs, starts)), atol=1e-4, rtol=1e-4)

    with pytest.raises(EngineError, match="HTTP 400.*maximum context length is 256"):  # at once
        endpoint.generate([[1] * 300], Sampling(max_new_tokens=4), seeds=[0])


@pytest.mark.slow
def test_lora_adapter_is_served_by_name(server_url, tiny_path, lora_adapter):
    """A request with "model": NAME runs through the adapter: greedy tokens are peft's (and not the base's)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompts = prompts_for(tiny_path)
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=6)
    served = EndpointEngine(server_url, model="ad").generate(prompts, greedy, seeds=[0] * len(prompts))
    base = EndpointEngine(server_url).generate(prompts, greedy, seeds=[0] * len(prompts))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                      lora_adapter).eval()
    for p, (c,) in zip(prompts, served):
        out = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(p):]
        assert c.token_ids == tuple(out.tolist())
    assert [s[0].token_ids for s in served] != [b[0].token_ids for b in base]


@pytest.mark.slow
def test_eval_through_the_endpoint_equals_the_in_process_eval(server_url, local_engine, tiny_path, tmp_path):
    """`python -m optsys.eval --endpoint URL` (test-time methods included: pools and budget forcing on token ids)
    gives the same completions, answers and scores as the same eval on the in-process engine."""
    from optsys.eval.config import load_eval_config
    from optsys.eval.generate import stop_token_ids
    from optsys.eval.run import Opened, _generation_config, run_generate_task
    from optsys.eval.tasks import resolve_tasks
    from optsys.eval_cli import main
    from optsys.models.load import load_tokenizer

    settings = {"tasks": ["arithmetic"], "num": 4, "methods": ["greedy", "sample", "self_consistency", "budget"],
                "n": [1, 2], "budgets": [4], "max_new_tokens": 6, "answer_tokens": 3, "max_model_len": 256,
                "plots": False, "resamples": 50}
    via = main(["--endpoint", server_url, "--model", str(tiny_path), "--out", str(tmp_path / "e"),
                *[f"{k}={v}" if not isinstance(v, list) else f"{k}={','.join(map(str, v))}"
                  for k, v in settings.items()]])
    cfg = load_eval_config(flags={"model": str(tiny_path), **settings})
    tok = load_tokenizer(str(tiny_path))
    opened = Opened(str(tiny_path), str(tiny_path), tok, engine=local_engine, engine_name="vllm",
                    stop_ids=tuple(stop_token_ids(_generation_config(str(tiny_path)), tok)))
    local = run_generate_task(resolve_tasks(["arithmetic"])[0], opened, cfg, {})
    remote = via["results"][0]["tasks"]["arithmetic"]
    assert via["results"][0]["engine"] == "endpoint"
    for a, b in zip(remote["samples"], local["samples"]):
        for method in settings["methods"]:
            for key in ("completions", "answers", "correct", "tokens"):
                assert a["methods"][method][key] == b["methods"][method][key], (method, key)
    for method in settings["methods"]:
        assert remote["methods"][method]["points"] == local["methods"][method]["points"]


def test_bad_port_or_max_model_len_exits_2_before_vllm_starts(tiny_path, monkeypatch, capsys):
    """vLLM fails on these with a traceback after loading the model; optsys.serve refuses them first: a port
    outside 1..65535 and --max-model-len 0 before the model resolves (here a tiny: preset that does not exist), a
    port in use after the model checks, just before vLLM would start."""
    import socket

    monkeypatch.setattr(serve, "run_vllm_server", lambda argv: pytest.fail("vLLM was started"))
    for args, words in [(["--port", "70000"], "--port 70000 is not a TCP port; give one in 1..65535"),
                        (["--port", "0"], "--port 0 is not a TCP port"),
                        (["--max-model-len", "0"], "--max-model-len 0: give a positive number of tokens")]:
        assert serve.main(["--model", "tiny:no-such-preset", *args]) == 2
        err = capsys.readouterr().err
        assert words in err and "no tiny preset" not in err, err
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert serve.main(["--model", str(tiny_path), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"--port {port} on 127.0.0.1: cannot listen there (Address already in use)" in err, err
    serve.check_port_free("127.0.0.1", port)  # free again once its listener closed
