"""DATASET as the datasets it mixes: one source, or several with their shares of the training rows.

DATASET is comma-separated `path` or `path:weight` items, or a YAML/JSON list of mappings of SOURCE_KEYS;
`parse_sources` turns either into Sources and collects every problem (config.validate reports them with the other
settings). Reads no data: job.data reads each source.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import yaml

BUILTIN_DATASET = "builtin:tasks"  # the bundled task set (job.data): a name, though it holds a colon

# The keys of a source in the list form of DATASET, and what other tools' keys for a dataset are here.
SOURCE_KEYS = ("path", "weight", "split", "config", "revision")
SOURCE_FOREIGN = {
    "fraction": "weight: TRL's fraction never repeats rows, so it shrinks the mix to what the smallest share "
                "allows; a weight repeats a small source to reach its share",
    "name": "config (the dataset configuration)",
    "type": "nothing: DATA_FORMAT=auto detects each source's format, and COLUMN_MAP renames columns",
    "data_files": "path (a file, or a directory of them)",
}


@dataclass(frozen=True)
class Source:
    """One dataset of DATASET: where it is, its share of the mix, and its own split, configuration or revision
    where it has one (else DATASET_SPLIT, DATASET_CONFIG and DATASET_REVISION)."""
    path: str
    weight: float | None = None
    split: str | None = None
    config: str | None = None
    revision: str | None = None

    def alone(self, s):
        """The settings `s` (a job.config.Settings) as if this source were the whole DATASET, so it is read, split,
        fingerprinted and named in messages as a single dataset is."""
        return dataclasses.replace(s, dataset=self.path, dataset_split=self.split or s.dataset_split,
                                   dataset_config=self.config or s.dataset_config,
                                   dataset_revision=self.revision or s.dataset_revision)


def parse_sources(text: str) -> tuple[list[Source], list[str]]:
    """DATASET as its sources, and every problem with it, each naming the setting and the source.

    A list (YAML or JSON: a YAML file's `dataset:` list arrives as JSON) holds mappings of SOURCE_KEYS or short
    items. Otherwise the text is comma-separated short items, `path` or `path:weight`, the weight after the last
    colon: Hub ids hold no comma or colon, builtin:tasks is a name, and a path that holds one needs the list form."""
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            items = yaml.safe_load(stripped)
        except yaml.YAMLError as error:
            return [], [f"DATASET={text!r}: not a YAML or JSON list of sources: {error}"]
        items = [items] if isinstance(items, dict) else items
        if not isinstance(items, list) or not items:
            return [], [f"DATASET={text!r}: expected a non-empty list of sources"]
    else:
        items = stripped.split(",")
    found, problems = [], []
    for number, item in enumerate(items, start=1):
        try:
            found.append(_source(item))
        except ValueError as error:
            problems.append(f"DATASET source {number} ({item!r}): {error}")
    weighted = [source.weight is not None for source in found]
    if len(found) > 1 and any(weighted) and not all(weighted):
        problems.append("DATASET: give every source a weight, or none (then every row of every source is trained on)")
    if len(found) == 1 and all(weighted):
        problems.append(f"DATASET={text!r}: a weight is a source's share of a mix of several; one source is the "
                        "whole of it: remove the weight")
    return found, problems


def _source(item) -> Source:
    """One item of DATASET as a Source; ValueError says what is wrong with it."""
    if isinstance(item, str):
        item = item.strip()
        path, colon, weight = item.rpartition(":")
        item = {"path": path, "weight": weight} if colon and item != BUILTIN_DATASET else {"path": item}
    if not isinstance(item, dict):
        raise ValueError(f"expected a path or a mapping of {', '.join(SOURCE_KEYS)}")
    for key in item:
        if key not in SOURCE_KEYS:
            raise ValueError(f"{key!r} is not a key of a source; use " + SOURCE_FOREIGN.get(
                key, f"one of {', '.join(SOURCE_KEYS)}"))
    path = item.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ValueError("no path")
    overrides = {key: str(item[key]).strip() for key in ("split", "config", "revision") if item.get(key) is not None}
    return Source(path.strip(), _weight(item.get("weight")), **overrides)


def _weight(raw) -> float | None:
    if raw is None:
        return None
    try:
        if isinstance(raw, bool):  # YAML's yes/no would pass as 1 and 0
            raise ValueError
        weight = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"the weight {raw!r} is not a number") from None
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"the weight {raw!r} must be a positive number (leave the source out to skip it)")
    return weight
