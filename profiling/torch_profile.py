"""A few training steps of SFT, DPO or GRPO under torch.profiler: a Chrome trace, the memory timeline, a summary.

    python profiling/torch_profile.py --method sft|dpo|grpo [--model tiny:test] [--device cpu|cuda]
        [--engine auto|hf|vllm] [--wait 1] [--warmup 1] [--active 1] [--out DIR] [--rows 25]
        [--under torch|nsys] [key.sub=value ...]

Each method runs its tiny recipe (quickstart, dpo_tiny, grpo_tiny) on --model with small data, for wait + warmup +
active steps (trainer.max_steps), plus any dotted overrides given after the options. The profiler's schedule skips
the first `wait` steps (model load, data, the first step's lazy init) and `warmup` more, then records `active`
steps. It writes into --out:
  <method>-trace.json[.gz]   Chrome trace: open in https://ui.perfetto.dev or chrome://tracing
  <method>-memory.html       CUDA only: memory over the active steps by category (export_memory_timeline)
  <method>-summary.txt       the optsys.* ranges (data, forward, loss.*, backward, optimizer, generate, ...) and
                             the top ops by self time, as printed
--under nsys runs the same steps without torch.profiler and brackets the active ones with cudaProfilerStart/Stop,
for `nsys profile --capture-range=cudaProfilerApi` (profiling/nsys_profile.sh). The ranges are optsys's phases
(optsys/telemetry/nvtx.py); trainer.telemetry=false removes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from optsys.telemetry.nvtx import PREFIX, on_step_end  # noqa: E402

# method -> (recipe, overrides that make its run short); the user's overrides come after and win.
METHODS = {
    "sft": ("quickstart", ["data.num_train=256", "data.num_eval=8", "trainer.batch_tokens=512"]),
    "dpo": ("dpo_tiny", ["data.num_train=64", "data.num_eval=8", "data.max_tokens=512",
                         "trainer.batch_tokens=512", "trainer.eval_every=0"]),
    "grpo": ("grpo_tiny", ["data.num_train=64", "data.num_eval=8", "rl.prompts_per_step=4", "rl.group_size=4",
                           "rl.max_new_tokens=8"]),
}


def run_overrides(args, run_dir: str) -> list[str]:
    recipe, short = METHODS[args.method]
    steps = args.wait + args.warmup + args.active
    out = [f"model.name_or_path={args.model}", f"device={args.device}", f"output_dir={run_dir}", "overwrite=true",
           f"trainer.max_steps={steps}", "trainer.warmup_steps=0", "trainer.log_every=1", "trainer.progress=false",
           "eval.before=false", "eval.after=false", *short]
    if args.method == "grpo":
        out.append(f"rl.engine={args.engine}")
    return out + args.overrides


def range_table(averages, cuda: bool) -> str:
    """The optsys.* ranges: calls and total time (CPU wall time in the range; CUDA: also the device time of the
    kernels launched inside), largest first. They nest (step > forward > ...), so totals overlap."""
    rows = [e for e in averages if e.key.startswith(PREFIX)]
    rows.sort(key=lambda e: -e.cpu_time_total)
    step = next((e.cpu_time_total for e in rows if e.key == PREFIX + "step"), 0) or 1
    w = max([len("range"), *(len(e.key) for e in rows)])
    head = f"{'range':<{w}} {'calls':>6} {'CPU total ms':>13} {'% of step':>10}"
    head += f" {'CUDA total ms':>14}" if cuda else ""
    lines = [head, "-" * len(head)]
    for e in rows:
        line = f"{e.key:<{w}} {e.count:>6} {e.cpu_time_total / 1e3:>13.3f} {100 * e.cpu_time_total / step:>9.1f}%"
        if cuda:
            line += f" {e.device_time_total / 1e3:>14.3f}"
        lines.append(line)
    return "\n".join(lines)


def train(method: str, overrides: list[str]) -> dict | None:
    from optsys.train import run
    from optsys.validation import load_config

    cfg = load_config(METHODS[method][0], None, overrides)
    return run(cfg)


def profile_torch(args, overrides: list[str], out: Path) -> str:
    cuda = args.device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    memory = cuda and not args.no_memory
    trace_path = out / f"{args.method}-trace.json{'.gz' if cuda else ''}"
    report: dict = {}

    def ready(prof):  # at the end of the active steps
        prof.export_chrome_trace(str(trace_path))
        averages = prof.key_averages()
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        report["ranges"] = range_table(averages, cuda)
        report["ops"] = averages.table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60)
        if memory:
            try:  # deprecated in torch 2.13 (still there); the plot needs matplotlib
                prof.export_memory_timeline(str(out / f"{args.method}-memory.html"), device="cuda:0")
            except Exception as e:  # noqa: BLE001 - a missing plot must not lose the trace
                report["memory_error"] = f"memory timeline not written: {type(e).__name__}: {e}"

    schedule = torch.profiler.schedule(wait=args.wait, warmup=args.warmup, active=args.active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=ready,
                                record_shapes=memory, profile_memory=memory, with_stack=memory) as prof:
        with on_step_end(lambda step: prof.step()):
            train(args.method, overrides)
    if "ranges" not in report:
        raise SystemExit(f"the run ended before the profiler's active steps (wait {args.wait} + warmup "
                         f"{args.warmup} + active {args.active}); was trainer.max_steps lowered?")
    header = json.dumps({"method": args.method, "model": args.model, "device": args.device,
                         "steps": {"wait": args.wait, "warmup": args.warmup, "active": args.active},
                         "overrides": overrides, "torch": torch.__version__})
    text = (f"{header}\n\noptsys ranges over {args.active} active step(s):\n{report['ranges']}\n\n"
            f"top ops by self {'CUDA' if cuda else 'CPU'} time:\n{report['ops']}\n")
    if "memory_error" in report:
        text += report["memory_error"] + "\n"
    (out / f"{args.method}-summary.txt").write_text(text)
    return text + f"wrote {trace_path} (open in https://ui.perfetto.dev) and {out / args.method}-summary.txt\n"


def profile_nsys(args, overrides: list[str]) -> str:
    """cudaProfilerStart after wait + warmup steps, Stop after the active ones (for --capture-range=cudaProfilerApi)."""
    if args.device != "cuda":
        raise SystemExit("--under nsys needs --device cuda (Nsight Systems captures CUDA and NVTX)")
    first, last = args.wait + args.warmup, args.wait + args.warmup + args.active

    def hook(step: int) -> None:
        if step == first:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        elif step == last:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()

    if first == 0:
        torch.cuda.profiler.start()
    with on_step_end(hook):
        train(args.method, overrides)
    return f"steps {first + 1}..{last} ran between cudaProfilerStart and cudaProfilerStop\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=sorted(METHODS), default="sft")
    ap.add_argument("--model", default="tiny:test", help="a model (tiny:<preset>, a folder, a hub id)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--engine", choices=["auto", "hf", "vllm"], default="auto",
                    help="GRPO's rollout engine (auto: vLLM when installed, else HF generate)")
    ap.add_argument("--wait", type=int, default=1, help="steps run before the profiler starts")
    ap.add_argument("--warmup", type=int, default=1, help="steps profiled and dropped (the profiler's own warm-up)")
    ap.add_argument("--active", type=int, default=1, help="steps recorded")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile"))
    ap.add_argument("--run-dir", default=None, help="the training run's output_dir (default: a temporary folder)")
    ap.add_argument("--rows", type=int, default=25, help="rows of the top-ops table")
    ap.add_argument("--no-memory", action="store_true", help="CUDA: skip the memory timeline (and with_stack)")
    ap.add_argument("--under", choices=["torch", "nsys"], default="torch")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trainer.precision=bf16")
    args = ap.parse_args(argv)
    if args.wait < 0 or args.warmup < 0 or args.active < 1:
        raise SystemExit(f"--wait and --warmup must be >= 0 and --active >= 1, got {args.wait}, {args.warmup}, "
                         f"{args.active}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"optsys-profile-{args.method}-") as tmp:
        overrides = run_overrides(args, args.run_dir or str(Path(tmp) / "run"))
        text = profile_torch(args, overrides, out) if args.under == "torch" else profile_nsys(args, overrides)
    print(text, end="")


if __name__ == "__main__":
    main()
