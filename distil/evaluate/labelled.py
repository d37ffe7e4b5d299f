"""The labelled sets ``distil-eval`` fine-tunes on: .jsonl / .csv / .tsv files or ``datasets`` folders,
checked row by row (errors name the file and line), and their label set."""
import csv
import json
import os
from pathlib import Path

LABELLED_SUFFIXES = (".jsonl", ".csv", ".tsv")


def _read_rows(path, text_column, label_column):
    """(texts, labels) of a .jsonl / .csv / .tsv file; errors name the file and line."""
    rows = []  # (line number, row)
    with open(path, encoding="utf-8", newline="" if path.suffix.lower() != ".jsonl" else None) as f:
        if path.suffix.lower() == ".jsonl":
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: a JSON object per line expected, got {type(row).__name__}")
                rows.append((number, row))
        else:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            rows = [(reader.line_num, row) for row in reader]
    for number, row in rows:
        for column in (text_column, label_column):
            if column not in row:
                raise ValueError(f"{path}:{number}: no column {column!r} (columns: {sorted(k for k in row if k)})")
        _check_label(row[label_column], f"{path}:{number}", label_column)
    return [row[text_column] for _, row in rows], [row[label_column] for _, row in rows]


def _check_label(value, where, label_column):
    """A null or blank label is a missing value, not a class of its own."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: empty {label_column!r} ({value!r}); every row needs a label")


def load_labelled(path, *, text_column="text", label_column="label", split=None):
    """A ``datasets.Dataset`` with columns ``text`` (str) and ``label`` (as stored) from ``path``:
    a ``.jsonl``, ``.csv`` or ``.tsv`` file with a header naming ``text_column`` and ``label_column``,
    or a ``datasets`` dataset saved with ``save_to_disk`` (a ``DatasetDict`` needs ``split``).
    Equivalent of ``datasets.load_dataset("json"/"csv", data_files=path)`` (or ``load_from_disk``)
    followed by ``select_columns`` and renaming, without touching the datasets cache."""
    import datasets

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    for name, value in (("text_column", text_column), ("label_column", label_column)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    path = Path(path)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split is None or split not in loaded:
                raise ValueError(f"{path} holds splits {sorted(loaded)}; name one with split (got {split!r})")
            loaded = loaded[split]
        missing = {text_column, label_column} - set(loaded.column_names)
        if missing:
            raise ValueError(f"{path}: no column {sorted(missing)} (columns: {loaded.column_names})")
        texts, labels = loaded[text_column], loaded[label_column]
        for i, label in enumerate(labels):
            _check_label(label, f"{path}: row {i}", label_column)
    elif path.is_file():
        if path.suffix.lower() not in LABELLED_SUFFIXES:
            raise ValueError(f"path {str(path)!r} must end in one of {LABELLED_SUFFIXES} or be a dataset folder")
        texts, labels = _read_rows(path, text_column, label_column)
    else:
        raise ValueError(f"path {str(path)!r} is neither a file nor a folder")
    if not texts:
        raise ValueError(f"{path} has no rows")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{path}: row {i} has a non-text {text_column!r}: {text!r}")
    return datasets.Dataset.from_dict({"text": list(texts), "label": list(labels)})


def label_names(train, evaluation):
    """The sorted distinct labels of ``train`` (as strings); every ``evaluation`` label must be one."""
    names = sorted({str(v) for v in train["label"]})
    if len(names) < 2:
        raise ValueError(f"train must hold at least two distinct labels, got {names}")
    unknown = sorted({str(v) for v in evaluation["label"]} - set(names))
    if unknown:
        raise ValueError(f"evaluation labels {unknown} do not occur in train ({names})")
    return names
