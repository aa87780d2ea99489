"""Best-fit-decreasing packing and collation: capacity, coverage, determinism, boundaries."""

import random

import pytest
import torch

from optsys.data.packing import (
    PackedBatch,
    collate_packed,
    collate_padded,
    pack_best_fit_decreasing,
    pack_first_fit,
    packed_batches,
    packing_efficiency,
)
from optsys.data.tokenize import IGNORE, TokenizedExample


def long_tailed(n, cap, seed):
    """Mostly short sequences with a long tail, like real SFT data."""
    rng = random.Random(seed)
    return [min(cap, max(1, int(rng.lognormvariate(4.0, 1.0)))) for _ in range(n)]


def check_bins(bins, lengths, cap):
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(b and sum(lengths[i] for i in b) <= cap for b in bins)


@pytest.mark.parametrize("seed", range(5))
def test_bfd_covers_fits_and_beats_first_fit(seed):
    cap = 512
    lengths = long_tailed(600, cap, seed)
    bfd = pack_best_fit_decreasing(lengths, cap)
    ff = pack_first_fit(lengths, cap)
    check_bins(bfd, lengths, cap)
    check_bins(ff, lengths, cap)
    assert len(bfd) <= len(ff)
    assert len(bfd) >= -(-sum(lengths) // cap)  # never below the volume bound
    assert pack_best_fit_decreasing(lengths, cap) == bfd  # deterministic


def test_bfd_edge_cases():
    assert pack_best_fit_decreasing([], 8) == []
    assert pack_best_fit_decreasing([8, 8], 8) == [[0], [1]]
    # 5+3 and 4+2+2 fill two bins exactly; first-fit in the given order opens three.
    assert sorted(pack_best_fit_decreasing([2, 5, 4, 3, 2], 8)) == [[0, 2, 4], [1, 3]]
    assert len(pack_first_fit([2, 5, 4, 3, 2], 8)) == 3
    with pytest.raises(ValueError, match="example 1 has 9 tokens.*data.max_tokens"):
        pack_best_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError, match="example 0 has 0 tokens"):
        pack_best_fit_decreasing([0], 8)


def make_examples(lengths, seed=0):
    """Distinct token values per example; about half the targets trained, last one never."""
    rng = random.Random(seed)
    out = []
    for k, n in enumerate(lengths):
        ids = [1000 * k + j for j in range(n)]
        targets = [ids[j + 1] if rng.random() < 0.5 else IGNORE for j in range(n - 1)] + [IGNORE]
        out.append(TokenizedExample(ids, targets))
    return out


def test_collate_packed_positions_and_cu_seqlens():
    exs = make_examples([3, 5, 1, 4])
    b = collate_packed(exs)
    assert isinstance(b, PackedBatch)
    assert b.input_ids.shape == b.targets.shape == b.position_ids.shape == (1, 13)
    assert b.input_ids.dtype == b.targets.dtype == b.position_ids.dtype == torch.long
    assert b.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 0, 1, 2, 3]
    assert b.seq_lens == [3, 5, 1, 4] and sum(b.seq_lens) == b.num_tokens == 13
    cu = b.cu_seqlens()
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 8, 9, 13]
    assert b.max_seqlen == 5
    assert b.input_ids[0].tolist() == [t for e in exs for t in e.input_ids]
    assert b.targets[0].tolist() == [t for e in exs for t in e.targets]
    assert b.num_target_tokens == sum(e.num_target_tokens for e in exs)
    # No label crosses a boundary: the last position of each sequence predicts nothing.
    assert all(b.targets[0, end - 1] == IGNORE for end in cu[1:].tolist())


def test_packed_batches_cover_every_example_once_and_shuffle_deterministically():
    cap = 256
    lengths = long_tailed(200, cap, seed=3)
    exs = make_examples(lengths)
    batches = packed_batches(exs, cap, shuffle_seed=None)
    assert all(b.num_tokens <= cap for b in batches)
    seen = sorted(b.input_ids[0, s].item() // 1000 for b in batches for s in b.cu_seqlens()[:-1].tolist())
    assert seen == list(range(len(exs)))
    assert sum(b.num_target_tokens for b in batches) == sum(e.num_target_tokens for e in exs)

    eff = packing_efficiency(batches, cap)
    assert eff == sum(lengths) / (len(batches) * cap) and 0.9 < eff <= 1.0
    assert packing_efficiency([], cap) == 0.0

    def order(bs):
        return [b.input_ids[0].tolist() for b in bs]

    s1 = packed_batches(exs, cap, shuffle_seed=1)
    assert order(s1) == order(packed_batches(exs, cap, shuffle_seed=1))
    assert order(s1) != order(packed_batches(exs, cap, shuffle_seed=2))
    assert sorted(order(s1)) == sorted(order(batches))


def test_collate_padded():
    exs = make_examples([3, 1, 4])
    out = collate_padded(exs, pad_id=7)
    assert out["input_ids"].shape == out["attention_mask"].shape == out["targets"].shape == (3, 4)
    assert out["input_ids"][1].tolist() == [exs[1].input_ids[0], 7, 7, 7]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert out["targets"][0].tolist() == exs[0].targets + [IGNORE]
    assert (out["targets"][out["attention_mask"] == 0] == IGNORE).all()


def test_tokenize_then_pack_end_to_end():
    from optsys.data.tokenize import tokenize_rows
    from optsys.models.tiny import load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(7)]
    rows += [{"text": "Sort the list in ascending order."}]
    exs, report = tokenize_rows(rows, tok, max_tokens=64)
    batches = packed_batches(exs, 64, shuffle_seed=0)
    assert sum(b.num_tokens for b in batches) == report.tokens
    assert sum(b.num_target_tokens for b in batches) == report.trained_tokens
    for b in batches:
        ids, tg = b.input_ids[0], b.targets[0]
        inside = torch.ones_like(tg, dtype=torch.bool)
        inside[b.cu_seqlens()[1:].long() - 1] = False  # last position of each sequence
        assert (tg[~inside] == IGNORE).all()
        trained = (tg != IGNORE) & inside
        assert torch.equal(tg[:-1][trained[:-1]], ids[1:][trained[:-1]])
