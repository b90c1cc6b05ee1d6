"""Example models: the planner-timeout report's random tables, and tables from a YAML/JSON spec."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, List

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection


def report_tables(num_tables: int, seed: int = 0) -> List[EmbeddingBagConfig]:
    """Tables as in the timeout report: embedding_dim in {4, 8, 12, 16}, num_embeddings in [2, 1000]."""
    rng = random.Random(seed)
    return [
        EmbeddingBagConfig(
            name=f"table_{i}",
            feature_names=[f"feature_{i}"],
            embedding_dim=rng.choice([4, 8, 12, 16]),
            num_embeddings=rng.randint(2, 1000),
        )
        for i in range(num_tables)
    ]


def ebc(tables: List[EmbeddingBagConfig], device: str = "meta") -> EmbeddingBagCollection:
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))


def report_model(num_tables: int = 500, seed: int = 0) -> EmbeddingBagCollection:
    """The shipped example: `fastplan plan --model fastplan.models:report_model`."""
    return ebc(report_tables(num_tables, seed))


class SpecError(ValueError):
    """A table spec file is malformed; the message names the file and field."""


def load_spec(path: str) -> Dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror})") from e
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as e:  # noqa: BLE001
        raise SpecError(f"{path}: not valid {p.suffix.lstrip('.') or 'json'} ({e})") from e
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a mapping at top level")
    return doc


def tables_from_spec(path: str) -> List[EmbeddingBagConfig]:
    """`tables: [{name, num_embeddings, embedding_dim, feature_names?, pooling?}]`."""
    doc = load_spec(path)
    rows = doc.get("tables")
    if not isinstance(rows, list) or not rows:
        raise SpecError(f"{path}: field 'tables' must be a non-empty list")
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: tables[{i}]"
        if not isinstance(row, dict):
            raise SpecError(f"{where}: expected a mapping")
        for field in ("name", "num_embeddings", "embedding_dim"):
            if field not in row:
                raise SpecError(f"{where}: missing field '{field}'")
        for field in ("num_embeddings", "embedding_dim"):
            if not isinstance(row[field], int) or row[field] <= 0:
                raise SpecError(f"{where}: field '{field}' must be a positive integer, got {row[field]!r}")
        pooling = str(row.get("pooling", "sum")).upper()
        if pooling not in PoolingType.__members__:
            raise SpecError(f"{where}: field 'pooling' must be one of {sorted(PoolingType.__members__)}")
        out.append(
            EmbeddingBagConfig(
                name=str(row["name"]),
                num_embeddings=row["num_embeddings"],
                embedding_dim=row["embedding_dim"],
                feature_names=list(row.get("feature_names") or [f"{row['name']}_feature"]),
                pooling=PoolingType[pooling],
            )
        )
    return out
