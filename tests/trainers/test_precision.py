"""Mixed precision on CPU: bf16-stored weights train as fp32 master weights with bf16 compute.

The full-scale recipes load `model.dtype: bfloat16`; before master weights, AdamW updated those bf16 tensors
in place and a small learning rate rounded every update away. These tests simulate that path on CPU: a
bf16-stored tiny model, bf16 autocast, and the same arithmetic FSDP2's MixedPrecisionPolicy does on GPUs."""

import json

import pytest
import torch
from helpers import run_torchrun
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optsys.models.load import load_model_and_tokenizer
from optsys.trainers import sft
from optsys.trainers.precision import resolve_precision, to_master
from optsys.validation import load_config

# lr 1e-6: an AdamW step moves a weight by ~lr, under half a bf16 ulp of nearly every weight of the tiny model
# (|w| ~ 0.02 -> half-ulp ~ 4e-5; only |w| < 2.6e-4 and zero-init biases can move), so in-place bf16 updates
# round away while fp32 master weights move.
SMALL_LR = 1e-6


def run_cfg(tmp_path, tiny_path, name, *extra):
    return load_config("quickstart", overrides=[
        f"model.name_or_path={tiny_path}", f"output_dir={tmp_path / name}", "data.num_train=200",
        "data.num_eval=20", "data.max_tokens=256", "trainer.batch_tokens=512", "trainer.max_steps=20",
        "trainer.warmup_steps=2", "trainer.log_every=1", "trainer.progress=false", "eval.before=false",
        "eval.after=false", *extra])


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", "bfloat16", cpu).compute == torch.float32  # no fast bf16 on CPU
    p = resolve_precision("bf16", "bfloat16", cpu)
    assert (p.compute, p.storage, p.master, p.mixed) == (torch.bfloat16, torch.bfloat16, torch.float32, True)
    assert not resolve_precision("fp32", "bfloat16", cpu).mixed


def test_master_weights_for_trainable_only(tiny_path):
    from optsys.config import LoraConfig, ModelConfig

    cpu = torch.device("cpu")
    full, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_path), dtype="bfloat16"), cpu)
    assert {p.dtype for p in full.parameters()} == {torch.bfloat16}
    to_master(full, resolve_precision("bf16", "bfloat16", cpu))
    assert {p.dtype for p in full.parameters()} == {torch.float32}

    lora_cfg = ModelConfig(name_or_path=str(tiny_path), dtype="bfloat16", lora=LoraConfig(r=4))
    lora, _ = load_model_and_tokenizer(lora_cfg, cpu)
    to_master(lora, resolve_precision("bf16", "bfloat16", cpu))
    trainable = {p.dtype for p in lora.parameters() if p.requires_grad}
    frozen = {p.dtype for p in lora.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}  # the frozen base keeps half the memory
    lora2, _ = load_model_and_tokenizer(lora_cfg, cpu)
    to_master(lora2, resolve_precision("fp32", "bfloat16", cpu))  # fp32 matmuls need fp32 frozen weights too
    assert {p.dtype for p in lora2.parameters()} == {torch.float32}


def fraction_moved(before: dict, after: dict) -> float:
    moved = total = 0
    for k, w in before.items():
        moved += int((after[k].float() != w.float()).sum())
        total += w.numel()
    return moved / total


def pure_bf16_fraction_moved(tiny_path, lr: float) -> float:
    """What the old path did: one AdamW step applied to bf16 parameters in place (same data, same lr)."""
    cpu = torch.device("cpu")
    from optsys.config import ModelConfig

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_path), dtype="bfloat16"), cpu)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([tok("What is 12 + 34? The answer is 46.")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0).step()
    return fraction_moved(before, model.state_dict())


def test_bf16_storage_moves_weights_at_a_small_lr_and_matches_fp32(tmp_path, tiny_path):
    """bf16-stored weights, bf16 compute, lr 1e-6: the fp32 master weights move (nearly all of them), where one
    pure-bf16 AdamW step moves almost none; final/ is written in bf16; the loss curve matches an fp32 run's."""
    mixed = sft.train(run_cfg(tmp_path, tiny_path, "mixed", "model.dtype=bfloat16", "trainer.precision=bf16",
                              f"trainer.lr={SMALL_LR}", "trainer.save_every=20"))
    reference = sft.train(run_cfg(tmp_path, tiny_path, "fp32", "model.dtype=float32", "trainer.precision=fp32",
                                  f"trainer.lr={SMALL_LR}"))
    assert mixed["train/steps"] == reference["train/steps"] == 20

    initial = {k: v.to(torch.bfloat16).float() for k, v in load_file(tiny_path / "model.safetensors").items()}
    master = load_file(tmp_path / "mixed" / "checkpoints" / "step-00000020" / "model.safetensors")
    assert {v.dtype for v in master.values()} == {torch.float32}  # the checkpoint holds the fp32 master weights
    moved_master = fraction_moved(initial, master)
    # Weights with no gradient (embedding rows of tokens the data never uses) move in no run: fp32 is the bar.
    moved_fp32 = fraction_moved(load_file(tiny_path / "model.safetensors"),
                                load_file(tmp_path / "fp32" / "final" / "model.safetensors"))
    moved_pure = pure_bf16_fraction_moved(tiny_path, SMALL_LR)
    print(f"fraction of weights moved at lr {SMALL_LR}: bf16-stored with fp32 master weights, 20 steps "
          f"{moved_master:.3f}; fp32, 20 steps {moved_fp32:.3f}; one pure-bf16 AdamW step {moved_pure:.4f}")
    assert moved_master > 0.98 * moved_fp32 and moved_fp32 > 0.5 and moved_pure < 0.05

    final = tmp_path / "mixed" / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(final).dtype == torch.bfloat16

    a, b = losses(tmp_path / "mixed"), losses(tmp_path / "fp32")
    rel = max(abs(x - y) / y for x, y in zip(a, b))
    print(f"train/loss bf16-mixed vs fp32, 20 steps: max relative diff {rel:.2e}")
    assert len(a) == len(b) == 20 and rel < 0.01


def test_bf16_mixed_learns_like_fp32(tmp_path, tiny_path):
    """At a normal lr the bf16-mixed loss curve follows fp32's (within 3% per step over 20 steps)."""
    extra = ["trainer.lr=2e-3"]
    sft.train(run_cfg(tmp_path, tiny_path, "mixed", "model.dtype=bfloat16", "trainer.precision=bf16", *extra))
    sft.train(run_cfg(tmp_path, tiny_path, "fp32", "trainer.precision=fp32", *extra))
    a, b = losses(tmp_path / "mixed"), losses(tmp_path / "fp32")
    rel = max(abs(x - y) / y for x, y in zip(a, b))
    print(f"train/loss bf16-mixed vs fp32 at lr 2e-3: first {a[0]:.3f}/{b[0]:.3f}, last {a[-1]:.3f}/{b[-1]:.3f}, "
          f"max relative diff {rel:.2e}")
    assert a[-1] < 0.8 * a[0] and rel < 0.03


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_summary_reports_batch_and_storage(tmp_path, tiny_path, dtype):
    summary = sft.train(run_cfg(tmp_path, tiny_path, dtype, f"model.dtype={dtype}", "trainer.max_steps=2"))
    assert summary["batch/world_size"] == 1 and summary["batch/filler_fraction"] == 0.0
    assert 256 < summary["batch/tokens_per_step"] <= 512
    with safe_open(str(tmp_path / dtype / "final" / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {f"torch.{dtype}"}


FSDP_SCRIPT = r'''
import sys, torch
from optsys.config import ModelConfig
from optsys.models.load import load_model_and_tokenizer
from optsys.parallel.dist import close_world, init_world
from optsys.trainers.common import build_optimizer, ready_for_training
from optsys.trainers.precision import resolve_precision

world = init_world("cpu")
p = resolve_precision("bf16", "bfloat16", world.device)
model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=sys.argv[1], dtype="bfloat16"), world.device)
model = ready_for_training(model, world, p)
seen = {}
layer = model.get_decoder().layers[0]
layer.mlp.down_proj.register_forward_hook(lambda m, i, o: seen.setdefault("compute", m.weight.dtype) and None)
ids = torch.arange(1, 17)[None]
loss = model.token_loss_sum(ids[0].roll(-1), input_ids=ids, position_ids=torch.arange(16)[None], seq_lens=[16])
loss.backward()
grad = layer.mlp.down_proj.weight.grad
opt = build_optimizer(model, 1e-3, 0.0, (0.9, 0.95))
opt.step()
state_dtypes = {str(s["exp_avg"].dtype) for s in opt.state.values()}
shard = layer.mlp.down_proj.weight
print("RESULT", world.rank, seen["compute"], shard.dtype, grad.dtype, sorted(state_dtypes), flush=True)
close_world()
'''


@pytest.mark.slow
def test_fsdp2_all_gathers_bf16_and_keeps_fp32_shards(tmp_path, tiny_path):
    """2 ranks on gloo: the layer computes with bf16 weights (all-gathered by the MixedPrecisionPolicy) while its
    shard, gradient and AdamW state stay fp32."""
    script = tmp_path / "fsdp_mp.py"
    script.write_text(FSDP_SCRIPT)
    out = run_torchrun([script, tiny_path], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = sorted(line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RESULT"))
    assert [r[0] for r in rows] == ["0", "1"]
    for _, compute, shard, grad, states in rows:
        assert (compute, shard, grad) == ("torch.bfloat16", "torch.float32", "torch.float32")
        assert states == "['torch.float32']"
