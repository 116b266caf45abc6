"""Reading one dataset into rows, each with where it came from (file:line, for error messages): the bundled set, local
files by suffix (a folder's splits named by file or folder), and the Hub."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from job.config import BUILTIN_DATASET, Settings
from job.errors import DataError, unreachable_or

BUNDLED_DATASET = Path(__file__).parent.parent / "assets" / "tasks.jsonl"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Row:
    where: str  # "file.jsonl:12" or "dataset[split]:12", for error messages
    record: dict


def read_rows(s: Settings, split: str) -> list[Row]:
    """Rows of one split, each with where it came from."""
    if s.dataset == BUILTIN_DATASET:
        return _read_jsonl(BUNDLED_DATASET) if split == s.dataset_split else []
    path = Path(s.dataset)
    if path.exists():
        return [row for f in local_files(s, split) for row in _read_local(f)]
    if s.dataset.startswith((".", "/")) or Path(s.dataset).suffix in LOCAL_SUFFIXES:
        raise DataError(f"DATASET={s.dataset}: no such file or directory")
    return _read_hub(s, split)


def local_files(s: Settings, split: str) -> list[Path]:
    """The files of one split of a local DATASET. A directory whose files (or subdirectories) are named by split,
    as `datasets` names them (train.jsonl, test-00000-of-00001.parquet, validation/part1.csv), holds each split in
    its own; any other file or directory is one split, the training one, and evaluation is cut from it."""
    path = Path(s.dataset)
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"DATASET={s.dataset}: no {', '.join(LOCAL_SUFFIXES)} files in it")
    by_split = {f: split_of(f.relative_to(path)) for f in files} if path.is_dir() else {}
    if not any(by_split.values()):
        if split == s.dataset_split:
            return files
        raise DataError(f"EVAL_SPLIT={split}: DATASET={s.dataset} holds one split (no files or directories named "
                        f"by split, such as train.jsonl and {split}.jsonl); unset EVAL_SPLIT to cut EVAL_FRACTION "
                        "of the rows off for evaluation")
    chosen = [f for f, name in by_split.items() if name == split]
    if not chosen:
        names = sorted({name for name in by_split.values() if name})
        setting = "DATASET_SPLIT" if split == s.dataset_split else "EVAL_SPLIT"
        raise DataError(f"{setting}={split}: DATASET={s.dataset} has no files for it; its splits: {', '.join(names)}")
    return chosen


SPLIT_NAME = re.compile(r"(?P<split>train|test|validation|valid|eval|dev)(?:[-._ 0-9].*)?")


def split_of(relative: Path) -> str | None:
    """The split a file belongs to by its name or its first directory's, as `datasets` reads a folder; else None."""
    for part in (relative.parts[0], relative.stem) if len(relative.parts) > 1 else (relative.stem,):
        match = SPLIT_NAME.fullmatch(part)
        if match:
            return match["split"]
    return None


def _read_local(path: Path) -> list[Row]:
    kind = LOCAL_SUFFIXES.get(path.suffix)
    if kind is None:
        raise DataError(f"DATASET={path}: unsupported file type {path.suffix!r}; use {', '.join(LOCAL_SUFFIXES)}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json(path)
    import datasets

    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as error:  # the builders raise many types; all mean the file cannot be parsed
        where = csv_problem(path) if kind == "csv" else None
        raise DataError(where or f"{path}: cannot be read as {kind}: {error}") from None
    offset = 2 if kind == "csv" else 1  # a CSV's first data row is line 2
    return [Row(f"{path}:{i + offset}", dict(r)) for i, r in enumerate(table)]


def csv_problem(path: Path) -> str | None:
    """Where a CSV that the CSV builder refused goes wrong, as file:line (it names no line for bad UTF-8 or an
    unclosed quote): read again with the csv module, which counts lines."""
    import csv
    import io

    raw = path.read_bytes()
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"{path}:{number}: not valid UTF-8 (byte {error.start} of the line); save the file as UTF-8"
    reader = csv.reader(io.StringIO(raw.decode("utf-8"), newline=""), strict=True)
    width, start = None, 1
    try:
        for row in reader:
            if width is None:
                width = len(row)
            elif row and len(row) != width:
                return f"{path}:{start}: {len(row)} fields where the header has {width}"
            start = reader.line_num + 1
    except csv.Error as error:
        return f"{path}:{start}: the row starting here cannot be parsed ({error}); an unclosed quote?"
    return None


def _read_jsonl(path: Path) -> list[Row]:
    """JSON Lines read by hand so a bad line is reported as file:line with the reason."""
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: not valid UTF-8 (byte {error.start}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})") from None
            rows.append(Row(f"{path}:{number}", record))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows (or use .jsonl)")
    return [Row(f"{path}[{i}]", r) for i, r in enumerate(data)]


def _read_hub(s: Settings, split: str) -> list[Row]:
    import datasets

    try:
        table = datasets.load_dataset(s.dataset, s.dataset_config, split=split, revision=s.dataset_revision,
                                      trust_remote_code=s.trust_remote_code or None)
    except ValueError as error:
        if split != s.dataset_split and "split" in str(error).lower():
            return []
        raise DataError(f"DATASET={s.dataset} split {split!r}: {error}") from None
    except Exception as error:
        raise unreachable_or(error, f"DATASET={s.dataset}",
                             DataError(f"DATASET={s.dataset}: cannot load it from the hub or disk: {error}")) from None
    return [Row(f"{s.dataset}[{split}]:{i}", dict(r)) for i, r in enumerate(table)]
