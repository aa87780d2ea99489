"""sequence_logprobs on packed rows vs per-sequence log_softmax.gather sums from materialized logits."""

import pytest
import torch

from optsys.losses import sequence_logprobs

SEQ_LENS = [3, 7, 1, 5, 4]  # the length-1 sequence has only an ignored target: 0 tokens
H, V = 13, 37


def _packed(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = sum(SEQ_LENS)
    hidden = torch.randn(t, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.3
    targets = torch.randint(0, V, (t,), generator=g)
    targets[[0, 3, 4, 10, 15]] = -100  # a prompt-like prefix, a whole sequence (index 10), a tail
    seq_ids = torch.repeat_interleave(torch.arange(len(SEQ_LENS)), torch.tensor(SEQ_LENS))
    cu = torch.tensor([0] + SEQ_LENS).cumsum(0).to(torch.int32)
    return hidden, weight, targets, seq_ids, cu


def _reference(hidden, weight, targets, temperature=1.0):
    """Per sequence: log_softmax over materialized logits, gathered at the kept targets, summed."""
    logp = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    sums, counts, start = [], [], 0
    for n in SEQ_LENS:
        tgt = targets[start:start + n]
        keep = tgt != -100
        rows = logp[start:start + n][keep]
        sums.append(rows.gather(-1, tgt[keep][:, None]).sum())
        counts.append(int(keep.sum()))
        start += n
    return torch.stack(sums), torch.tensor(counts)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_sums_match_materialized_logits(temperature):
    hidden, weight, targets, seq_ids, cu = _packed()
    ref_sums, ref_counts = _reference(hidden, weight, targets, temperature)
    for kw in (dict(seq_ids=seq_ids), dict(cu_seqlens=cu)):
        sums, counts = sequence_logprobs(hidden, weight, targets, temperature=temperature, **kw)
        assert sums.dtype == torch.float32 and sums.shape == (len(SEQ_LENS),)
        torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
        assert counts.tolist() == ref_counts.tolist()
    assert counts[2] == 0 and sums[2] == 0


def test_average_is_mean_token_logprob():
    hidden, weight, targets, seq_ids, _ = _packed(1)
    ref_sums, ref_counts = _reference(hidden, weight, targets)
    means, counts = sequence_logprobs(hidden, weight, targets, seq_ids, average=True)
    expected = ref_sums / ref_counts.clamp(min=1)
    torch.testing.assert_close(means, expected, rtol=1e-5, atol=1e-5)
    assert means[2] == 0  # no targets: 0, flagged by num_tokens == 0
    assert counts.tolist() == ref_counts.tolist()


def test_gradients_match_materialized_logits():
    hidden, weight, targets, seq_ids, _ = _packed(2)
    coef = torch.randn(len(SEQ_LENS), generator=torch.Generator().manual_seed(3))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    sums, _ = sequence_logprobs(h1, w1, targets, seq_ids, average=True)
    g1 = torch.autograd.grad((sums * coef).sum(), [h1, w1])
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref, counts = _reference(h2, w2, targets)
    g2 = torch.autograd.grad((ref / counts.clamp(min=1) * coef).sum(), [h2, w2])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (g1[0][targets == -100] == 0).all()  # ignored positions get no gradient


def test_packed_row_shape_and_num_seqs():
    hidden, weight, targets, seq_ids, _ = _packed(4)
    sums, _ = sequence_logprobs(hidden[None], weight, targets[None], seq_ids[None], num_seqs=7)
    ref_sums, _ = _reference(hidden, weight, targets)
    assert sums.shape == (7,)  # trailing sequences with no positions are 0
    torch.testing.assert_close(sums[:5], ref_sums, rtol=1e-5, atol=1e-5)
    assert (sums[5:] == 0).all()


def test_bad_input():
    hidden, weight, targets, seq_ids, cu = _packed()
    with pytest.raises(ValueError, match="seq_ids or cu_seqlens"):
        sequence_logprobs(hidden, weight, targets)
    with pytest.raises(ValueError, match="seq_ids or cu_seqlens"):
        sequence_logprobs(hidden, weight, targets, seq_ids, cu_seqlens=cu)
    with pytest.raises(ValueError, match="targets"):
        sequence_logprobs(hidden, weight, targets[:-1], seq_ids)
    with pytest.raises(ValueError, match="cu_seqlens"):
        sequence_logprobs(hidden, weight, targets, cu_seqlens=cu[:-1])
    with pytest.raises(ValueError, match="seq_ids"):
        sequence_logprobs(hidden, weight, targets, seq_ids, num_seqs=3)
    with pytest.raises(ValueError, match="seq_ids"):
        sequence_logprobs(hidden, weight, targets, seq_ids.float())
