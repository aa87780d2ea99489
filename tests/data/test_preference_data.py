"""Preference data: tokenized pairs, packed pairs give per-sequence log-probs equal to separate forwards,
and every bad-input case is a DataError naming source, row and field (or a counted skip)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optsys.data.preference import packed_pair_batches, tokenize_pairs, unpaired_rows
from optsys.data.tasks import get_task
from optsys.data.tokenize import IGNORE
from optsys.errors import DataError
from optsys.losses import sequence_logprobs
from optsys.models.packed import lm_head_weight
from optsys.trainers.preference import pair_logps


def test_pairs_target_completion_only_and_share_prompt(tok):
    rows = get_task("arithmetic").preference_pairs("train", 5, difficulty=2)
    pairs, report = tokenize_pairs(rows, tok, max_tokens=256, source="t")
    assert report.kept == 5 and len(pairs) == 5
    for p, row in zip(pairs, rows):
        trained = [t for t in p.chosen.targets if t != IGNORE]
        assert tok.decode(trained).startswith(row["chosen"])  # completion (+ end-of-turn) only
        first = next(i for i, t in enumerate(p.chosen.targets) if t != IGNORE)
        assert p.chosen.input_ids[: first + 1] == p.rejected.input_ids[: first + 1]  # same prompt


def test_packed_pairs_match_separate_forwards(tiny_path, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    rows = get_task("sorting").preference_pairs("train", 7, difficulty=4)
    pairs, _ = tokenize_pairs(rows, tok, max_tokens=1024)
    (batch,) = packed_pair_batches(pairs, 1024, shuffle_seed=None)
    assert batch.num_pairs == 7 and len(batch.packed.seq_lens) == 14
    assert batch.seq_ids().shape[0] == batch.num_tokens
    with torch.no_grad():
        chosen, rejected, _ = pair_logps(model, batch, average=False, backend="torch", device="cpu")
        for name, got in (("chosen", chosen), ("rejected", rejected)):
            for j, i in enumerate(batch.pair_index):
                ex = getattr(pairs[i], name)
                ids = torch.tensor([ex.input_ids])
                hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0]
                want, _ = sequence_logprobs(hidden, lm_head_weight(model), torch.tensor(ex.targets),
                                            seq_ids=torch.zeros(len(ex.targets), dtype=torch.long), backend="torch")
                torch.testing.assert_close(got[j], want[0], rtol=1e-5, atol=1e-5)


def test_chat_rows_and_full_conversations(tok):
    prompt = [{"role": "user", "content": "2+2="}]
    a = {"prompt": prompt, "chosen": "4", "rejected": "5"}
    b = {"chosen": prompt + [{"role": "assistant", "content": "4"}],
         "rejected": prompt + [{"role": "assistant", "content": "5"}]}
    c = {"prompt": "2+2=", "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}
    pa, pb, pc = (tokenize_pairs([r], tok, max_tokens=256)[0][0] for r in (a, b, c))
    assert pa.chosen == pb.chosen == pc.chosen and pa.rejected == pb.rejected == pc.rejected


@pytest.mark.parametrize("row, field, match", [
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "rejected", "equals field 'chosen'"),
    ({"prompt": "1+1=", "chosen": " ", "rejected": "3"}, "chosen", "empty completion"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": ""}, "rejected", "empty completion"),
    ({"prompt": "1+1=", "chosen": "2"}, "rejected", "missing"),
    ({"chosen": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}],
      "rejected": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]},
     "rejected", "different prompt"),
])
def test_bad_pairs_are_errors_naming_row_and_field(tok, row, field, match):
    good = {"prompt": "3+3=", "chosen": "6", "rejected": "7"}
    with pytest.raises(DataError, match=rf"src: row 1: field '{field}'.*{match}|src: row 1: field '{field}' is "
                                        rf"{match}"):
        tokenize_pairs([good, row], tok, max_tokens=256, source="src")
    pairs, report = tokenize_pairs([good, row], tok, max_tokens=256, source="src", on_bad_pair="skip")
    assert len(pairs) == 1 and report.skipped == {"bad_pair": 1}


@pytest.mark.parametrize("label", ["yes", 1, None])
def test_kto_label_must_be_boolean(tok, label):
    rows = [{"prompt": "1+1=", "completion": "2", "label": True}, {"prompt": "1+1=", "completion": "3", "label": label}]
    with pytest.raises(DataError, match="src: row 1: field 'label' must be a boolean"):
        tokenize_pairs(rows, tok, max_tokens=256, kto=True, source="src")


def test_kto_partner_is_a_completion_of_another_prompt(tok):
    """Each KTO example's KL partner is its own prompt with the completion of an example of a DIFFERENT prompt
    (not the same pair's other answer, which unpaired_rows puts next to it), and the partners mix both labels."""
    rows = unpaired_rows([{"prompt": f"question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"}
                          for i in range(20)])
    pairs, _ = tokenize_pairs(rows, tok, max_tokens=256, kto=True)
    assert [p.label for p in pairs] == [True, False] * 20

    def trained(ex):
        return [t for t in ex.targets if t != IGNORE]

    partner_labels = []
    for k, p in enumerate(pairs):
        first = next(i for i, t in enumerate(p.rejected.targets) if t != IGNORE)
        assert p.rejected.input_ids[: first + 1] == p.chosen.input_ids[: first + 1]  # the example's own prompt
        (j,) = [j for j, q in enumerate(pairs) if trained(q.chosen) == trained(p.rejected)]  # whose completion
        assert rows[j]["prompt"] != rows[k]["prompt"], (k, j)
        partner_labels.append(rows[j]["label"])
    assert 0.25 < sum(partner_labels) / len(partner_labels) < 0.75


def test_kto_needs_two_prompts(tok):
    rows = [{"prompt": "1+1=", "completion": c, "label": lab} for c, lab in (("2", True), ("3", False))]
    with pytest.raises(DataError, match="src: all 2 KTO examples have the same prompt"):
        tokenize_pairs(rows, tok, max_tokens=256, kto=True, source="src")


def test_overlong_pair(tok):
    rows = get_task("arithmetic").preference_pairs("train", 2, difficulty=2)
    with pytest.raises(DataError, match="row 0: chosen \\+ rejected"):
        tokenize_pairs(rows, tok, max_tokens=20)
    _, report = tokenize_pairs(rows + [{"prompt": "1", "chosen": "2", "rejected": "3"}], tok, max_tokens=30,
                               overlong="skip")
    assert report.skipped == {"overlong": 2} and report.kept == 1


@pytest.mark.parametrize("margin", ["wide", True, [1], float("nan")])
def test_reward_margin_must_be_a_number(tok, margin):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 0.5},
            {"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": margin}]
    with pytest.raises(DataError, match=r"pairs.jsonl: row 1: field 'margin' must be a finite number"):
        tokenize_pairs(rows, tok, max_tokens=256, source="pairs.jsonl")
    pairs, _ = tokenize_pairs(rows[:1] + [{**rows[1], "margin": "1.5"}], tok, max_tokens=256)
    assert [p.margin for p in pairs] == [0.5, 1.5]
