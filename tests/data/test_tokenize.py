"""Chat template + loss mask: exactly the assistant tokens are trained, targets shifted, overlong counted."""

import copy

import pytest

from optsys.data.tokenize import IGNORE, DataReport, tokenize_rows
from optsys.errors import DataError

END = "<|im_end|>"
TOKENIZER = "factory"  # the tok fixture (tests/conftest.py): the tiny factory's own tokenizer


@pytest.fixture(scope="module")
def plain_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def trained_runs(tok, ex):
    """Decode each maximal run of trained targets: one string per trained span."""
    runs, cur = [], []
    for t in ex.targets + [IGNORE]:
        if t != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


def check_shift(ex):
    assert len(ex.input_ids) == len(ex.targets)
    assert ex.targets[-1] == IGNORE
    for i, t in enumerate(ex.targets[:-1]):
        assert t == IGNORE or t == ex.input_ids[i + 1], i


def one(rows, tok, **kw):
    kw.setdefault("max_tokens", 512)
    examples, report = tokenize_rows(rows, tok, **kw)
    return examples, report


def test_single_turn_trains_only_the_assistant_turn(tok):
    msgs = [{"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "42"}]
    (ex,), report = one([{"messages": msgs}], tok)
    check_shift(ex)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert trained_runs(tok, ex) == ["42" + END]  # content + end-of-turn, not the newline after it
    assert report.trained_tokens == ex.num_target_tokens == len(tok("42")["input_ids"]) + 1


def test_multi_turn_with_system(tok):
    msgs = [
        {"role": "system", "content": "Answer with the number only."},
        {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "Now times 10?"},
        {"role": "assistant", "content": "The answer is 30."},
        {"role": "user", "content": "thanks"},  # a trailing user turn is context, never trained
    ]
    (ex,), _ = one([{"messages": msgs}], tok)
    check_shift(ex)
    assert trained_runs(tok, ex) == ["3" + END, "The answer is 30." + END]


def test_train_on_prompt_trains_every_next_token(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (ex,), _ = one([{"messages": msgs}], tok, train_on_prompt=True)
    check_shift(ex)
    assert ex.targets[:-1] == ex.input_ids[1:]


def test_prompt_completion_with_and_without_template(tok, plain_tok):
    row = {"prompt": "7+8=", "completion": "15"}
    (chat,), _ = one([row], tok)
    (as_msgs,), _ = one(
        [{"messages": [{"role": "user", "content": "7+8="}, {"role": "assistant", "content": "15"}]}], tok
    )
    assert chat == as_msgs

    (plain,), _ = one([row], plain_tok)
    check_shift(plain)
    prompt_ids = plain_tok("7+8=")["input_ids"]
    assert plain.input_ids == prompt_ids + plain_tok("15")["input_ids"] + [plain_tok.eos_token_id]
    assert trained_runs(plain_tok, plain) == ["15" + END]
    (plain_all,), _ = one([row], plain_tok, train_on_prompt=True)
    assert plain_all.targets[:-1] == plain_all.input_ids[1:]


def test_conversational_prompt_completion(tok):
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    (ex,), _ = one([row], tok)
    assert trained_runs(tok, ex) == ["4" + END]


def test_text_rows_train_everything_and_end_with_eos(tok, plain_tok):
    for t in (tok, plain_tok):
        (ex,), _ = one([{"text": "The quick brown fox."}], t)
        check_shift(ex)
        assert ex.input_ids[-1] == t.eos_token_id
        assert ex.targets[:-1] == ex.input_ids[1:]


def test_none_fields_from_columnar_readers_are_ignored(tok):
    row = {
        "messages": [
            {"role": "user", "content": "hi", "name": None},
            {"role": "assistant", "content": "yo", "name": None},
        ],
        "text": None,
    }
    (ex,), _ = one([row], tok)
    assert trained_runs(tok, ex) == ["yo" + END]


GOOD = {"prompt": "1+1=", "completion": "2"}
BAD_ROWS = [
    ({"question": "q"}, "question"),
    ({"prompt": "q"}, "completion"),
    ({"prompt": "q", "completion": "  "}, "'completion'"),
    ({"text": ""}, "'text'"),
    ({"messages": []}, "'messages'"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        "'messages[1]'.content",
    ),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "tool", "content": "x"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "'messages[1]'.role",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
        "'messages[1]'.content",
    ),
    ({"messages": ["user: hi"]}, "'messages[0]'"),
]


@pytest.mark.parametrize("row, field", BAD_ROWS)
def test_bad_rows_name_source_row_and_field(tok, row, field):
    with pytest.raises(DataError) as e:
        tokenize_rows([GOOD, row], tok, max_tokens=64, source="sft.jsonl")
    msg = str(e.value)
    assert "sft.jsonl" in msg and "row 1" in msg and field in msg, msg


def test_messages_without_chat_template(plain_tok):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError) as e:
        tokenize_rows([GOOD, row], plain_tok, max_tokens=64, source="sft.jsonl")
    msg = str(e.value)
    assert "sft.jsonl" in msg and "row 1" in msg and "'messages'" in msg
    assert "tokenizer.chat_template" in msg and "prompt/completion" in msg


def test_prefix_unstable_template_is_an_error(tok):
    t = copy.deepcopy(tok)
    # The generation prompt says "Sure:" but rendered assistant turns do not: not a prefix.
    t.chat_template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\nSure: ' }}{%- endif %}"
    )
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match="not prefix-stable") as e:
        tokenize_rows([row], t, max_tokens=64, source="sft.jsonl")
    assert "row 0" in str(e.value) and "messages[1]" in str(e.value)


def overlong_rows():
    short = {"prompt": "1+1=", "completion": "2"}
    long = {"prompt": "Sort the list in ascending order.", "completion": "1 2 3 4 5 6 7 8 9 " * 4}
    return [short, short, long, short]


def test_overlong_error_names_row_length_and_config_keys(tok):
    with pytest.raises(DataError) as e:
        tokenize_rows(overlong_rows(), tok, max_tokens=32, source="sft.jsonl")
    msg = str(e.value)
    assert "sft.jsonl" in msg and "row 2" in msg and "data.max_tokens=32" in msg and "data.overlong" in msg
    n = len(tokenize_rows(overlong_rows()[2:3], tok, max_tokens=4096)[0][0].input_ids)
    assert f"{n} tokens" in msg


def test_overlong_truncate_and_skip_are_counted(tok):
    rows = overlong_rows()
    full, _ = tokenize_rows(rows, tok, max_tokens=4096)

    ex, rep = tokenize_rows(rows, tok, max_tokens=32, overlong="truncate")
    assert (rep.rows, rep.kept, rep.truncated, rep.skipped) == (4, 4, 1, {})
    assert ex[2].input_ids == full[2].input_ids[:32]
    assert ex[2].targets[:31] == full[2].targets[:31] and ex[2].targets[-1] == IGNORE
    assert rep.tokens == sum(len(e.input_ids) for e in ex)
    assert rep.trained_tokens == sum(e.num_target_tokens for e in ex)

    ex, rep = tokenize_rows(rows, tok, max_tokens=32, overlong="skip")
    assert (rep.rows, rep.kept, rep.truncated, rep.skipped) == (4, 3, 0, {"overlong": 1})
    assert [e.input_ids for e in ex] == [full[i].input_ids for i in (0, 1, 3)]
    assert rep.metrics()["data/skipped_overlong"] == 1

    # Truncating away every trained token leaves nothing to learn: skipped and counted, not kept.
    prompt_heavy = {"prompt": "Sort the list in ascending order. " * 4, "completion": "ok"}
    ex, rep = tokenize_rows([rows[0], prompt_heavy], tok, max_tokens=16, overlong="truncate")
    assert (rep.kept, rep.truncated, rep.skipped) == (1, 0, {"no_trained_tokens_after_truncation": 1})

    with pytest.raises(DataError, match="all 1 rows were skipped"):
        tokenize_rows([rows[2]], tok, max_tokens=16, overlong="skip")


def test_bad_options(tok):
    with pytest.raises(ValueError, match="data.overlong"):
        tokenize_rows([GOOD], tok, max_tokens=64, overlong="drop")
    with pytest.raises(ValueError, match="data.max_tokens"):
        tokenize_rows([GOOD], tok, max_tokens=1)
    assert DataReport().metrics()["data/rows"] == 0
