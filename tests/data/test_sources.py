"""load_rows round-trips files and folders written by `datasets`; row_format classifies and rejects rows."""

import datasets
import pytest

from optsys.data.sources import load_rows, row_format
from optsys.errors import DataError

ROWS = [
    {"messages": [{"role": "user", "content": "2+3="}, {"role": "assistant", "content": "5"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    },
]
PC_ROWS = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "3+4=", "completion": "7"}]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_files_round_trip(tmp_path, suffix):
    path = tmp_path / f"rows.{suffix}"
    ds = datasets.Dataset.from_list(ROWS)
    if suffix == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.to_json(str(path), lines=suffix == "jsonl")
    assert load_rows(str(path)) == ROWS


def test_saved_dataset_and_dataset_dict_folders(tmp_path):
    datasets.Dataset.from_list(PC_ROWS).save_to_disk(str(tmp_path / "one"))
    assert load_rows(str(tmp_path / "one")) == PC_ROWS

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PC_ROWS), "test": datasets.Dataset.from_list(PC_ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "dd"), split="test") == PC_ROWS[:1]
    with pytest.raises(DataError, match=r"splits \['test', 'train'\].*data.split"):
        load_rows(str(tmp_path / "dd"), split="validation")


def test_folder_of_data_files(tmp_path):
    datasets.Dataset.from_list(PC_ROWS).to_json(str(tmp_path / "train.jsonl"))
    datasets.Dataset.from_list(PC_ROWS[1:]).to_json(str(tmp_path / "test.jsonl"))
    assert load_rows(str(tmp_path)) == PC_ROWS
    assert load_rows(str(tmp_path), split="test") == PC_ROWS[1:]


def test_missing_empty_and_unsupported_files(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="does not exist") as e:
        load_rows(str(missing))
    assert str(missing) in str(e.value) and "data.dataset" in str(e.value) and "data.path" not in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        load_rows("./not/here")

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty; point data.dataset"):
        load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(DataError, match="suffix '.txt'"):
        load_rows(str(tmp_path / "rows.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl"):
        load_rows(str(tmp_path / "bad.jsonl"))


def test_hub_ids_go_to_load_dataset(monkeypatch):
    # No hub is reachable here: check the dispatch and the error wrapping with a stand-in.
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        if path == "org/broken":
            raise ConnectionError("hub unreachable")
        return (
            datasets.Dataset.from_list(PC_ROWS)
            if path == "org/sft"
            else datasets.Dataset.from_dict({"text": []})
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_rows("org/sft", split="validation") == PC_ROWS
    assert calls == [("org/sft", "validation")]
    with pytest.raises(DataError, match=r"'org/broken'.*hub unreachable"):
        load_rows("org/broken")
    with pytest.raises(DataError, match="has no rows; point data.dataset"):
        load_rows("org/empty")


def test_row_format():
    assert row_format(ROWS[0], source="s", index=0) == "messages"
    assert row_format(PC_ROWS[0], source="s", index=0) == "prompt_completion"
    assert row_format({"text": "hi"}, source="s", index=0) == "text"
    # Columnar readers fill missing fields with None: those do not count as present.
    assert (
        row_format({"messages": None, "prompt": None, "completion": None, "text": "x"}, source="s", index=0)
        == "text"
    )


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"question": "q", "answer": "a"}, "['answer', 'question']"),
        ({"prompt": "q"}, "no 'completion'"),
        ({"completion": "a"}, "no 'prompt'"),
        ({"conversations": []}, "Rename 'conversations'"),
        ({"text": None}, "fields []"),
        ({**ROWS[0], **PC_ROWS[0]}, "has 'messages' and ['prompt', 'completion']"),  # which one is the example?
        ({**ROWS[0], "prompt": "q"}, "has 'messages' and ['prompt']"),
        ({**PC_ROWS[0], "text": "t"}, "has 'prompt' and 'completion' and 'text'"),
    ],
)
def test_row_format_errors_name_source_row_and_fields(row, fragment):
    with pytest.raises(DataError) as e:
        row_format(row, source="mydata.jsonl", index=7)
    msg = str(e.value)
    assert "mydata.jsonl" in msg and "row 7" in msg and fragment in msg
    assert "'messages'" in msg and "'prompt'" in msg and "'text'" in msg


def test_a_file_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    """A latin-1 byte in a jsonl file: `datasets` reads the file and pyarrow fails later with a UnicodeDecodeError
    deep in to_list; the check names the file, the line and the byte first. Parquet stores UTF-8 by type."""
    good = '{"text": "fine"}\n'.encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    msg = str(e.value)
    assert "latin1.jsonl" in msg and "line 2 is not UTF-8" in msg and "0xe9" in msg and "save the file as UTF-8" in msg
    csv = tmp_path / "rows.csv"
    csv.write_bytes(b"text\nok\n" + "na\u00efve\n".encode("latin-1"))
    with pytest.raises(DataError, match="rows.csv': line 3 is not UTF-8"):
        load_rows(str(csv))
