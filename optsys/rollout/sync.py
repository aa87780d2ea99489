"""Trainer -> engine weight sync that cannot fail silently: bucketed streaming, then a canary check.

`engine_weights` streams the trainer's parameters one full tensor at a time (an FSDP2 shard is all-gathered
into one full tensor, never the whole model at once) in the engine's dtype, grouped in buckets of at most
`bucket_bytes` (one tensor bigger than a bucket travels alone): the extra memory a sync holds is one bucket
plus the engine's own reload buffers, stated in SyncReport.peak_bucket_bytes.

`Canary` then scores a fixed prompt + completion with the engine and with the trainer: their token log-probs
must agree within a tolerance (fp32 on CPU: measured ~5e-7, default 1e-4), or the run stops with what differs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from optsys.errors import SyncError
from optsys.rollout.engine import EngineError, SyncReport


def engine_weights(model, *, dtype: torch.dtype, bucket_bytes: int, report: SyncReport, skip=()):
    """(name, full tensor) in checkpoint (HF) names, cast to `dtype`, bucket by bucket; fills `report`.

    Under FSDP2 every rank must iterate (full_tensor() is a collective). `skip`: names left out (tests only:
    a sync made to miss a parameter, which the canary must catch)."""
    bucket, size = [], 0
    t0 = time.perf_counter()
    for name, param in model.named_parameters():
        if name in skip:
            continue
        t = param.detach()
        if hasattr(t, "full_tensor"):  # DTensor shard -> the full tensor (all ranks take part)
            t = t.full_tensor()
        t = t.to(dtype)
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        report.tensors += 1
        report.bytes += t.numel() * t.element_size()
        report.names.append(name)
        if size >= bucket_bytes:
            report.peak_bucket_bytes = max(report.peak_bucket_bytes, size)
            yield from bucket
            bucket, size = [], 0
    report.peak_bucket_bytes = max(report.peak_bucket_bytes, size)
    yield from bucket
    report.seconds = time.perf_counter() - t0


def sync_weights(engine, model, *, dtype: torch.dtype, bucket_mb: float, skip=()) -> SyncReport:
    """Stream the trainer's weights into the engine in place; returns what was sent and how long it took."""
    report = SyncReport()
    t0 = time.perf_counter()
    engine.load_weights(engine_weights(model, dtype=dtype, bucket_bytes=int(bucket_mb * 2**20), report=report,
                                       skip=skip))
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class Canary:
    """A fixed prompt + completion scored by the engine and by the trainer after every (N-th) sync."""

    prompt_ids: list[int]
    completion_ids: list[int]
    tolerance: float

    def trainer_logprobs(self, model) -> torch.Tensor:
        seq = self.prompt_ids + self.completion_ids
        device = next(model.parameters()).device
        ids = torch.tensor([seq], device=device)
        targets = torch.full_like(ids, -100)
        n = len(self.prompt_ids)
        targets[0, n - 1 : -1] = ids[0, n:]
        positions = torch.arange(len(seq), device=device)[None]
        with torch.no_grad():
            logp, _ = model.packed_token_logps(ids, positions, [len(seq)], targets)
        return logp.float().cpu()

    def check(self, engine, model) -> float:
        """Max |engine - trainer| log-prob over the completion tokens; raises SyncError above tolerance."""
        got = torch.tensor(engine.token_logprobs([self.prompt_ids + self.completion_ids],
                                                 [len(self.prompt_ids)])[0])
        want = self.trainer_logprobs(model)
        if got.shape != want.shape:
            raise EngineError(f"the engine scored {got.numel()} canary tokens, the trainer {want.numel()}")
        diff = (got - want).abs()
        err = float(diff.max()) if diff.numel() else 0.0
        if not err <= self.tolerance:  # NaN fails too
            i = int(diff.argmax())
            raise SyncError(
                f"weight sync check failed: after the sync the engine's log-probs of the canary completion differ "
                f"from the trainer's by {err:.3g} (tolerance rl.canary_tolerance={self.tolerance:g}); worst at "
                f"completion token {i} (id {self.completion_ids[i]}): engine {float(got[i]):.6f}, trainer "
                f"{float(want[i]):.6f}. The engine is not generating with the trained weights: a parameter was not "
                f"synced, was renamed, or the engine runs another dtype (a bf16 engine needs a looser tolerance).")
        return err
