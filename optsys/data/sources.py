"""Load dataset rows from a file, a local folder or the Hugging Face hub, and classify their format.

Every path goes through the `datasets` library so that the same code reads a user's jsonl,
a folder written by `Dataset.save_to_disk`, and a hub dataset. Rows come back as plain dicts.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from optsys.errors import DataError

# File suffix -> the `datasets` builder that reads it.
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROW_FORMATS = ("messages", "prompt_completion", "text")
_EXPECTED = "'messages' (a list of {role, content}), or 'prompt' and 'completion', or 'text'"


def load_rows(source: str, *, split: str = "train", trust_remote_code: bool = False) -> list[dict]:
    """Read all rows of `source` (file, local folder or hub id) as a list of dicts."""
    source = str(source)
    path = Path(os.path.expanduser(source))
    if path.is_file():
        ds = _load_file(path)
    elif path.is_dir():
        ds = _load_folder(path, split)
    elif _looks_like_path(source):
        raise DataError(
            f"data source {source!r} does not exist (resolved to {path.resolve()}). Point data.dataset "
            f"(or data.eval_dataset) at an existing .jsonl, .json or .parquet file, a folder written by "
            f"datasets.Dataset.save_to_disk, or a Hugging Face dataset id such as 'org/name'."
        )
    else:
        ds = _load_hub(source, split, trust_remote_code)
    try:
        rows = ds.to_list()
    except UnicodeDecodeError as e:  # a folder or hub dataset (files are checked line by line first)
        raise DataError(f"data source {source!r} holds text that is not UTF-8 ({e}); re-save it as UTF-8") from None
    if not rows:
        raise DataError(
            f"data source {source!r} (split {split!r}) has no rows; point data.dataset (or "
            f"data.eval_dataset) at a non-empty dataset."
        )
    return rows


def row_format(row: dict, *, source: str, index: int) -> str:
    """Return "messages", "prompt_completion" or "text" for one row, or raise a DataError."""
    if not isinstance(row, dict):
        raise DataError(
            f"{source}: row {index} is a {type(row).__name__}, not an object with fields; "
            f"expected fields {_EXPECTED}."
        )
    # Columnar readers fill a field missing from some rows with None: treat None as absent.
    present = sorted(k for k, v in row.items() if v is not None)
    both = [k for k in ("prompt", "completion", "text") if k in present]
    if "messages" in present and both:
        raise DataError(
            f"{source}: row {index} has 'messages' and {both}: one row holds one example, as {_EXPECTED}. "
            f"Keep one format in the row (the other would be ignored).")
    if "messages" in present:
        return "messages"
    if "prompt" in present and "completion" in present:
        if "text" in present:
            raise DataError(f"{source}: row {index} has 'prompt' and 'completion' and 'text': one row holds one "
                            f"example, as {_EXPECTED}. Keep one format in the row (the other would be ignored).")
        return "prompt_completion"
    if "text" in present:
        return "text"
    hint = ""
    if "prompt" in present:
        hint = " The row has 'prompt' but no 'completion' field."
    elif "completion" in present:
        hint = " The row has 'completion' but no 'prompt' field."
    elif "conversations" in present:
        hint = " Rename 'conversations' to 'messages' with {role, content} turns."
    raise DataError(
        f"{source}: row {index} has fields {present}; expected {_EXPECTED}.{hint} "
        f"Fix the row or convert the dataset to one of these formats."
    )


def _looks_like_path(source: str) -> bool:
    """A string that cannot be a hub id ('name' or 'org/name') is a local path that is missing."""
    if Path(source).suffix.lower() in FILE_BUILDERS:
        return True
    if source.startswith((".", "/", "~")) or "\\" in source:
        return True
    return source.count("/") > 1


def _load_file(path: Path):
    import datasets

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"data file {str(path)!r} has suffix {path.suffix!r}; supported: "
            f"{', '.join(sorted(FILE_BUILDERS))}. Convert it, or save it with datasets.Dataset.save_to_disk."
        )
    if path.stat().st_size == 0:
        raise DataError(f"data file {str(path)!r} is empty; point data.dataset (or "
                        f"data.eval_dataset) at a file with rows.")
    if builder in ("json", "csv"):
        check_utf8(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # arrow / json parse errors carry the detail we pass on
        raise DataError(
            f"could not read data file {str(path)!r} as {builder}: {type(e).__name__}: {e}"
        ) from e


def check_utf8(path: Path) -> None:
    """A DataError naming the line and byte of the first bytes in a text file that are not UTF-8 (the `datasets`
    readers take such a file and fail later, deep inside pyarrow)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"data file {str(path)!r}: line {number} is not UTF-8 (byte {line[e.start]:#04x} at column "
                    f"{e.start + 1}: {line[max(0, e.start - 20):e.start + 5]!r}); save the file as UTF-8, e.g. "
                    f"iconv -f latin1 -t utf-8") from None


def _load_folder(path: Path, split: str):
    import datasets

    # save_to_disk writes state.json (Dataset) or dataset_dict.json (DatasetDict).
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"could not load the saved dataset folder {str(path)!r}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(
                    f"saved dataset folder {str(path)!r} has splits {sorted(ds)}, not {split!r}; "
                    f"set data.split to one of them."
                )
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(str(path), split=split)
    except Exception as e:
        raise DataError(
            f"could not load split {split!r} from folder {str(path)!r}: {type(e).__name__}: {e}. The folder "
            f"should hold data files (.jsonl/.json/.parquet/.csv, split by name such as train.jsonl) or be "
            f"written by datasets.Dataset.save_to_disk."
        ) from e


def _load_hub(source: str, split: str, trust_remote_code: bool):
    import datasets

    kwargs = {}
    # datasets >= 4 dropped dataset scripts (and the argument); pass it only where it still exists.
    if trust_remote_code and "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters:
        kwargs["trust_remote_code"] = True
    try:
        return datasets.load_dataset(source, split=split, **kwargs)
    except Exception as e:
        raise DataError(
            f"data source {source!r} is not a local file or folder, and loading it as a Hugging Face hub "
            f"dataset (split {split!r}) failed: {type(e).__name__}: {e}. Check the path or the dataset id, "
            f"the split name (data.split), and network access to the hub."
        ) from e
