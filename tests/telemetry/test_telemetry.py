"""Telemetry the ecosystem reads: TensorBoard event files (read back with TensorBoard's own reader), W&B (offline,
for real when wandb is installed; a stand-in module otherwise), the run's PNG curves, and their settings."""

import importlib.util
import json
import math
import struct
import sys
import time
import types
from pathlib import Path

import pytest

from optsys.config import ConfigError
from optsys.telemetry import sinks
from optsys.telemetry.metrics import MetricsLog
from optsys.telemetry.plots import family, main, plot_run
from optsys.validation import load_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROWS = [  # (step, metrics) as trainers log them: an eval row at a train row's step, a NaN, ints, a tensor
    (0, {"eval/accuracy_before": 0.25}),
    (2, {"train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": float("nan"), "train/tokens": 512}),
    (2, {"eval/loss": 2.75}),
    (4, {"train/loss": 1.75, "train/lr": 5e-4, "train/grad_norm": 0.5, "train/tokens": 1024}),
    (4, {"eval/accuracy_after": 0.75, "throughput/tokens_per_s": 1234.5}),
]


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl(out: Path) -> dict[str, list[tuple[int, float]]]:
    series = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("step", "time_s"):
                series.setdefault(key, []).append((row["step"], float(value)))
    return series


def _same_as_tensorboard(jsonl: dict, events: dict) -> None:
    assert set(events) == set(jsonl)
    for tag, points in jsonl.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        for (_, want), (_, got) in zip(points, events[tag]):
            f32 = struct.unpack("f", struct.pack("f", want))[0]  # TensorBoard keeps float32
            assert (math.isnan(got) and math.isnan(want)) or got == f32, (tag, want, got)


def test_tensorboard_events_hold_the_jsonl_metrics_flushed_every_row(tmp_path):
    pytest.importorskip("tensorboard")
    import torch

    log = MetricsLog(tmp_path, tensorboard=True)
    for step, metrics in ROWS[:-1]:
        log.log(step, metrics)
    # not closed yet (a killed run): what metrics.jsonl has, the event file has too
    _same_as_tensorboard(_jsonl(tmp_path), _scalars(tmp_path / "tensorboard"))
    log.log(ROWS[-1][0], {**ROWS[-1][1], "train/loss": torch.tensor(1.5)})
    log.close()
    events = _scalars(tmp_path / "tensorboard")
    _same_as_tensorboard(_jsonl(tmp_path), events)
    assert events["train/loss"][-1] == (4, 1.5) and "step" not in events and "time_s" not in events


def test_a_resumed_run_hides_what_the_killed_run_logged_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    killed = MetricsLog(tmp_path, tensorboard=True)
    for step in (1, 2, 3, 4):  # checkpoint at 2; steps 3 and 4 are lost with the kill
        killed.log(step, {"train/loss": 10.0 + step})
    killed.close()
    resumed = MetricsLog(tmp_path, tensorboard=True, start_step=2)
    for step in (3, 4, 5):
        resumed.log(step, {"train/loss": float(step)})
    resumed.close()
    assert _scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 11.0), (2, 12.0), (3, 3.0), (4, 4.0), (5, 5.0)]


def test_without_tensorboard_one_warning_and_metrics_jsonl_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `from torch.utils.tensorboard import` fails
    monkeypatch.setattr(sinks, "_said", set())
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        log = MetricsLog(tmp_path / run, tensorboard=True)
        log.log(1, {"train/loss": 1.0})
        log.close()
        assert json.loads((tmp_path / run / "metrics.jsonl").read_text())["train/loss"] == 1.0
        assert not (tmp_path / run / "tensorboard").exists()
    err = capsys.readouterr().err
    assert err.count("pip install tensorboard") == 1 and "trainer.tensorboard=false" in err


def test_only_an_enabled_log_writes(tmp_path):
    log = MetricsLog(tmp_path, enabled=False, tensorboard=True, wandb_project="optsys", plots=True)
    log.log(1, {"train/loss": 1.0})
    log.close()
    assert list(tmp_path.iterdir()) == []  # rank > 0: no jsonl, no events, no W&B run, no plots


@pytest.mark.run_plots
def test_a_short_run_writes_events_and_plots_of_its_metrics(tmp_path, tiny_path):
    pytest.importorskip("tensorboard")
    image = pytest.importorskip("matplotlib.image")
    from optsys.trainers import sft

    out = tmp_path / "run"
    cfg = load_config("quickstart", overrides=[
        f"model.name_or_path={tiny_path}", f"output_dir={out}", "data.num_train=64", "data.num_eval=8",
        "data.max_tokens=256", "trainer.batch_tokens=256", "trainer.max_steps=4", "trainer.warmup_steps=1",
        "trainer.log_every=2", "trainer.eval_every=2", "trainer.progress=false", "eval.batch_size=8"])
    sft.train(cfg)
    jsonl = _jsonl(out)
    assert {"train/loss", "eval/loss", "eval/accuracy_before", "throughput/tokens_per_s"} <= set(jsonl)
    _same_as_tensorboard(jsonl, _scalars(out / "tensorboard"))
    names = sorted(p.name for p in (out / "plots").iterdir())
    assert names == ["accuracy.png", "grad_norm.png", "loss.png", "lr.png", "throughput.png"]
    for name in names:
        height, width, _ = image.imread(out / "plots" / name).shape
        assert (out / "plots" / name).read_bytes()[:8] == PNG_SIGNATURE and height > 200 and width > 300


@pytest.mark.parametrize("key, fig", [
    ("train/loss", "loss"), ("eval/loss", "loss"), ("eval/accuracy_before", "accuracy"),
    ("eval/accuracy_after", "accuracy"), ("train/accuracy", "accuracy"), ("train/rewards_chosen", "rewards"),
    ("eval/rewards_rejected", "rewards"), ("eval/reward_accuracy_before", "reward_accuracy"),
    ("eval/sampled_success_rate_after", "success_rate"), ("reward/mean", "reward"), ("reward/errors_len", "reward"),
    ("throughput/tokens_per_s", "throughput"), ("time/generate_s", "time"), ("sync/mb", "sync_mb"),
    ("train/logp_gap_mean", "logp_gap"), ("train/logp_gap_max", "logp_gap"), ("train/clip_fraction", "fractions"),
    ("train/truncated_fraction", "fractions"), ("train/lr", "lr"), ("train/epoch", None), ("train/tokens", None),
    ("nosplit", None),
])
def test_metric_families(key, fig):
    assert family(key) == fig


@pytest.mark.run_plots
def test_plot_run_draws_one_png_per_family_with_data(tmp_path, capsys):
    rows = [{"step": 1, "time_s": 0.1, "train/loss": 2.0, "train/grad_norm": "nan", "reward/mean": 0.1,
             "reward/std": 0.3, "train/epoch": 0},
            {"step": 2, "time_s": 0.2, "train/loss": 1.0, "train/grad_norm": "nan", "reward/mean": 0.4,
             "reward/std": 0.2, "eval/loss": 1.5, "eval/reward_accuracy": 0.6, "note": "text"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "train/lo')
    paths = plot_run(tmp_path)
    # grad_norm is all NaN (clipping off), epoch is a counter, "note" is not a number: none drawn
    assert [p.name for p in paths] == ["loss.png", "reward.png", "reward_accuracy.png"]
    assert all(p.parent == tmp_path / "plots" and p.read_bytes()[:8] == PNG_SIGNATURE for p in paths)
    assert "1 line(s) are not JSON rows" in capsys.readouterr().err  # the half line a kill can leave

    assert main([str(tmp_path), "--out", str(tmp_path / "again")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "again" / p.name) for p in paths]
    assert main([str(tmp_path / "nope")]) == 1
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_a_plotting_failure_is_one_warning_not_a_failed_run(tmp_path, monkeypatch, capsys):
    import optsys.telemetry.plots

    def broken(run_dir, out_dir=None):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(optsys.telemetry.plots, "plot_run", broken)
    log = MetricsLog(tmp_path, plots=True)
    log.log(1, {"train/loss": 1.0})
    log.close()  # does not raise
    err = capsys.readouterr().err
    assert "could not draw the run's plots (RuntimeError: no fonts)" in err
    assert f"python -m optsys.telemetry.plots {tmp_path}" in err


# ---------------------------------------------------------------------------- W&B


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (.wandb: LevelDB log framing of 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, buf, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST piece of a record
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def _finished_wandb_run(folder: Path, timeout_s: float = 20.0) -> list:
    """The records of the one offline run in `folder`, once W&B's service has written its exit record: finish()
    can return before the service (a separate process) has written the file."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = list(folder.glob("offline-run-*/run-*.wandb"))
        if len(files) == 1:
            records = _wandb_records(files[0])
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        assert len(files) <= 1 and time.monotonic() < deadline, f"no finished W&B run in {folder}: {files}"
        time.sleep(0.2)


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B's own settings and caches in the test folder, offline mode left to optsys (WANDB_MODE unset)."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(sinks, "_said", set())


def test_wandb_offline_run_holds_the_rows_and_the_config(tmp_path, wandb_home, capsys):
    pytest.importorskip("wandb")
    out = tmp_path / "sft-20260101-000000"
    out.mkdir()
    log = MetricsLog(out, wandb_project="optsys-test", run_config={"method": "sft", "trainer": {"lr": 0.002}})
    for step, metrics in ROWS:
        log.log(step, metrics)
    log.close()
    assert "W&B: offline mode (WANDB_MODE is not set)" in capsys.readouterr().err
    records = _finished_wandb_run(out / "wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == out.name and run.project == "optsys-test"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["method"] == "sft" and config["trainer"] == {"lr": 0.002}
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {item.nested_key[0] if item.nested_key else item.key: item.value_json for item in r.history.item}
            history[r.history.step.num] = {k: json.loads(v) for k, v in items.items() if not k.startswith("_")}
    want = {}
    for step, metrics in ROWS:  # rows of one step merge into one W&B step
        want.setdefault(step, {}).update(metrics)
    assert sorted(history) == sorted(want)
    for step, metrics in want.items():
        assert set(history[step]) == set(metrics)
        for key, value in metrics.items():
            got = history[step][key]
            assert (math.isnan(value) and str(got).lower() == "nan") or got == value, (step, key, got)


def test_wandb_mode_set_by_the_user_is_kept(tmp_path, wandb_home, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = MetricsLog(tmp_path, wandb_project="optsys")
    log.log(1, {"train/loss": 1.0})
    log.close()
    assert "offline mode" not in capsys.readouterr().err
    assert not list(tmp_path.glob("wandb/offline-run-*"))


def test_wandb_sink_calls_with_a_stand_in_module(tmp_path, wandb_home, monkeypatch):
    """What WandbSink hands to wandb, checked without the package (CI machines without the extra)."""
    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("log", dict(row), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    log = MetricsLog(tmp_path, wandb_project="proj", run_config={"seed": 3})
    log.log(2, {"train/loss": 1.5, "train/tokens": 7, "note": "text"})
    log.close()
    assert calls == [("init", {"project": "proj", "name": tmp_path.name, "config": {"seed": 3},
                               "dir": str(tmp_path), "mode": "offline"}),
                     ("log", {"train/loss": 1.5, "train/tokens": 7.0}, 2), ("finish",)]


# ---------------------------------------------------------------------------- settings


def test_telemetry_settings_defaults():
    tc = load_config("quickstart").trainer
    assert (tc.tensorboard, tc.plots, tc.wandb, tc.wandb_project) == (True, True, False, "optsys")
    off = load_config("quickstart", overrides=["trainer.tensorboard=false", "trainer.plots=false"]).trainer
    assert (off.tensorboard, off.plots) == (False, False)
    if importlib.util.find_spec("wandb") is not None:
        on = load_config("quickstart", overrides=["trainer.wandb=true", "trainer.wandb_project=mine"]).trainer
        assert (on.wandb, on.wandb_project) == (True, "mine")


@pytest.mark.parametrize("overrides, words", [
    (["trainer.tensorboard=maybe"], ["trainer.tensorboard", "true or false"]),
    (["trainer.plots=2"], ["trainer.plots", "true or false"]),
    (["trainer.wandb_project=mine"], ["trainer.wandb_project='mine' has no effect with trainer.wandb=false"]),
    (["trainer.wandb=true", "trainer.wandb_project=a/b"], ["trainer.wandb_project='a/b' is not a W&B project name"]),
    (["trainer.wandb=true", "trainer.wandb_project="], ["is not a W&B project name"]),
    (["trainer.wandbb=true"], ["did you mean 'wandb'"]),
])
def test_bad_telemetry_settings_are_refused_naming_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", overrides=overrides)
    for w in words:
        assert w in str(e.value)


def test_wandb_on_without_the_package_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib.util.find_spec("wandb") -> None
    with pytest.raises(ConfigError, match=r"trainer.wandb=true needs the wandb package.*pip install wandb"):
        load_config("quickstart", overrides=["trainer.wandb=true"])


def test_a_run_from_before_the_telemetry_settings_resumes(tmp_path):
    """Its config.yaml lacks trainer.tensorboard & co.: it ran with their defaults, so resume=true is no change."""
    import yaml

    from optsys.config import dump_yaml
    from optsys.trainers.run import check_output_dir

    cfg = load_config("quickstart", overrides=[f"output_dir={tmp_path}"])
    old = yaml.safe_load(dump_yaml(cfg))
    for key in ("tensorboard", "plots", "wandb", "wandb_project"):
        del old["trainer"][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    check_output_dir(load_config("quickstart", overrides=[f"output_dir={tmp_path}", "resume=true"]))
    with pytest.raises(ConfigError, match=r"trainer.plots: True -> False"):  # a real change is still refused
        check_output_dir(load_config("quickstart", overrides=[f"output_dir={tmp_path}", "resume=true",
                                                              "trainer.plots=false"]))
