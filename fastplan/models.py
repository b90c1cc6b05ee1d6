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


def scale_tables(num_tables: int, seed: int = 0) -> List[EmbeddingBagConfig]:
    """Issue 13's large-job tables: embedding_dim a multiple of 4 in [4, 128], num_embeddings
    log-uniform in [10, 1e7]."""
    rng = random.Random(seed)
    return [
        EmbeddingBagConfig(
            name=f"table_{i}",
            feature_names=[f"feature_{i}"],
            embedding_dim=4 * rng.randint(1, 32),
            num_embeddings=int(round(10 ** rng.uniform(1, 7))),
        )
        for i in range(num_tables)
    ]


TABLE_SETS = {"report": report_tables, "scale": scale_tables}


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
    names = set()
    for i, row in enumerate(rows):
        where = f"{path}: tables[{i}]"
        if not isinstance(row, dict):
            raise SpecError(f"{where}: expected a mapping")
        for field in ("name", "num_embeddings", "embedding_dim"):
            if field not in row:
                raise SpecError(f"{where}: missing field '{field}'")
        if row["name"] in names:
            raise SpecError(f"{where}: field 'name': table '{row['name']}' is listed twice")
        names.add(row["name"])
        for field in ("num_embeddings", "embedding_dim"):
            if isinstance(row[field], bool) or not isinstance(row[field], int) or row[field] <= 0:
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


class SmallDLRM(torch.nn.Module):
    """A small DLRM for inference examples: sparse EBC + dense MLP over [dense input, pooled embeddings]."""

    def __init__(self, tables: List[EmbeddingBagConfig], dense_in: int = 8, hidden: int = 32, device: str = "cpu") -> None:
        super().__init__()
        self.sparse = EmbeddingBagCollection(tables=tables, device=torch.device(device))
        width = dense_in + sum(t.embedding_dim for t in tables)
        self.over = torch.nn.Sequential(
            torch.nn.Linear(width, hidden, device=device), torch.nn.ReLU(), torch.nn.Linear(hidden, 1, device=device)
        )

    def dense(self, dense_input: torch.Tensor, pooled) -> torch.Tensor:
        """The part after the embeddings (what `BLSInferencePipeline` calls)."""
        return self.over(torch.cat([dense_input, pooled.values()], dim=1))

    def forward(self, dense_input: torch.Tensor, features) -> torch.Tensor:
        out = self.sparse(features)
        return self.dense(dense_input, out.wait() if hasattr(out, "wait") else out)


def random_batches(tables: List[EmbeddingBagConfig], num_batches: int, batch_size: int, seed: int,
                   dense_in: int = 8, max_ids: int = 4, hot_feature_scale: Dict[int, int] = None):
    """Deterministic (dense, KJT) batches; `hot_feature_scale[b]` multiplies ids per sample in batch b."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    keys = [f for t in tables for f in t.feature_names]
    limits = torch.tensor([t.num_embeddings for t in tables for _ in t.feature_names])
    out = []
    for b in range(num_batches):
        scale = (hot_feature_scale or {}).get(b, 1)
        lengths = torch.randint(0, max_ids * scale + 1, (len(keys), batch_size), generator=g)
        values = torch.cat([
            torch.randint(0, int(limits[f]), (int(lengths[f].sum()),), generator=g) for f in range(len(keys))
        ])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths.flatten())
        out.append((torch.randn(batch_size, dense_in, generator=g), kjt))
    return out
