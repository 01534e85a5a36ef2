"""Loaders of the toy task pack: the JSONL files beside this module, read with `datasets`.

A `custom_dataset` function (rather than `dataset_path: json` with `data_files`) keeps the
YAML free of absolute paths, so the pack works from any checkout and any working directory,
and never touches the hub.
"""

from __future__ import annotations

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(file_name: str) -> datasets.DatasetDict:
    path = HERE / file_name
    if not path.is_file():
        raise FileNotFoundError(f"toy task data missing: {path}")
    return datasets.load_dataset("json", data_files={"test": str(path)})


def load_toy_mc(**_metadata) -> datasets.DatasetDict:
    """Rows {question, choices, answer}: one valid answer among invalid ones."""
    return _load("toy_mc.jsonl")


def load_toy_gen(**_metadata) -> datasets.DatasetDict:
    """Rows {question, answers}: every valid answer of the prompt."""
    return _load("toy_gen.jsonl")


def process_toy_gen(doc: dict, results: list[str]) -> dict[str, float]:
    """1.0 when the (stripped) generation is one of the row's valid answers, else 0.0."""
    prediction = results[0].strip()
    return {"exact_match": float(prediction in {a.strip() for a in doc["answers"]})}
