"""Differential fuzzing of FastShardingPlanner against TorchRec's EmbeddingShardingPlanner.

Each seeded case draws a topology (1-64 ranks, hosts, cuda or cpu, possibly uneven memory), a
module (EBC / EC / nested, weighted or not, fp32 / fp16, dims 1-2048, rows 1-1e9), random
`ParameterConstraints` and a memory level from "cannot fit" to ample. Both planners plan it; both
plans are scored with TorchRec's own estimators (its `EmbeddingEnumerator`) against the memory its
storage reservation leaves. Outcomes:

  ok               both plan; `ratio` = fastplan's max-rank perf / TorchRec's
  ok-trec-rejects  TorchRec raises, fastplan returns a plan that fits
  both-reject      both raise (fastplan with a PlannerError naming the problem)
  CRASH            fastplan raises something that is not a PlannerError
  FALSE-INFEASIBLE TorchRec plans, fastplan raises a PlannerError
  DOES-NOT-FIT     fastplan's plan exceeds some rank's memory
  FOREIGN-OPTION   fastplan's plan uses a sharding/kernel/shard TorchRec would not offer
  BAD-PLACEMENT    shards on ranks TorchRec's sharding cannot use (e.g. table-row-wise across hosts)

    .venv/bin/python benchmarks/fuzz.py --cases 300            # seeds 0..299
    .venv/bin/python benchmarks/fuzz.py --seeds 1000 1100 -v   # a seed range, one line per case
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

WORSE_TOLERANCE = 1e-9
BAD = ("CRASH", "FALSE-INFEASIBLE", "DOES-NOT-FIT", "FOREIGN-OPTION", "BAD-PLACEMENT", "WORSE")
SHARDING_TYPES = ["data_parallel", "table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise"]
KERNELS = ["dense", "fused", "fused_uvm", "fused_uvm_caching", "key_value"]


@dataclass
class Case:
    seed: int
    world: int
    local_world: int
    device: str
    batch_size: int
    memory: float  # per-rank memory as a multiple of the tables' bytes per rank
    uneven: bool
    module: nn.Module = field(repr=False)
    constraints: Dict[str, object] = field(repr=False)
    num_tables: int = 0
    topology: object = field(default=None, repr=False)

    def describe(self) -> str:
        return (
            f"{self.num_tables} tables, {self.world} ranks ({self.local_world}/host) {self.device}, "
            f"mem x{self.memory:.2g}{' uneven' if self.uneven else ''}, {len(self.constraints)} constraints"
        )


@dataclass
class Outcome:
    seed: int
    kind: str
    ratio: Optional[float] = None
    fast_s: float = 0.0
    trec_s: float = 0.0
    detail: str = ""
    case: str = ""


def _log_uniform_int(rng: random.Random, lo: float, hi: float) -> int:
    return max(int(lo), int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))


def make_case(seed: int, max_world: int = 64, max_tables: int = 24) -> Case:
    """A random planning problem; the same seed always gives the same case."""
    from torchrec.distributed.planner.types import ParameterConstraints, Topology
    from torchrec.distributed.types import CacheParams
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    rng = random.Random(seed)
    world = rng.choice([1, 2, 2, 3, 4, 4, 8, 8, 16, 24, 32, 64])
    world = min(world, max_world)
    local_world = rng.choice([d for d in range(1, world + 1) if world % d == 0 and d <= 8] + [world if world <= 8 else 8])
    device = rng.choice(["cuda", "cuda", "cuda", "cpu"])
    n_tables = rng.randint(1, max_tables)
    dtype = rng.choice([DataType.FP32, DataType.FP32, DataType.FP16])

    def dim() -> int:
        return rng.choice([rng.randint(1, 2048), rng.choice([4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048])])

    def rows() -> int:
        return _log_uniform_int(rng, 1, 1e9) if rng.random() < 0.2 else _log_uniform_int(rng, 10, 2e6)

    layout = rng.choice(["ebc", "ebc", "ec", "nested"])
    n_ec = 0 if layout == "ebc" else (n_tables if layout == "ec" else rng.randint(0, n_tables // 2))
    ec_dim = dim()
    bag_configs = [
        EmbeddingBagConfig(name=f"t{i}", feature_names=[f"f{i}"], embedding_dim=dim(), num_embeddings=rows(), data_type=dtype)
        for i in range(n_tables - n_ec)
    ]
    seq_configs = [
        EmbeddingConfig(name=f"s{i}", feature_names=[f"g{i}"], embedding_dim=ec_dim, num_embeddings=rows(), data_type=dtype)
        for i in range(n_ec)
    ]
    weighted = rng.random() < 0.25
    meta = torch.device("meta")
    if layout == "ebc":
        module: nn.Module = EmbeddingBagCollection(tables=bag_configs, is_weighted=weighted, device=meta)
    elif layout == "ec":
        module = EmbeddingCollection(tables=seq_configs, device=meta)
    else:
        module = nn.Module()
        half = len(bag_configs) // 2
        if bag_configs[:half]:
            module.bags = EmbeddingBagCollection(tables=bag_configs[:half], is_weighted=weighted, device=meta)
        inner = nn.Module()
        if bag_configs[half:]:
            inner.bags = EmbeddingBagCollection(tables=bag_configs[half:], device=meta)
        if seq_configs:
            inner.seq = EmbeddingCollection(tables=seq_configs, device=meta)
        module.inner = inner

    constraints: Dict[str, object] = {}
    for c in bag_configs + seq_configs:
        if rng.random() > 0.35:
            continue
        kw: Dict[str, object] = {}
        if rng.random() < 0.5:
            kw["sharding_types"] = rng.sample(SHARDING_TYPES, rng.randint(1, 4) if rng.random() < 0.2 else rng.randint(2, 4))
        if rng.random() < 0.3:
            kw["compute_kernels"] = rng.sample(KERNELS, rng.randint(1, 3))
        if rng.random() < 0.4:
            n = rng.choice([1, 1, 2])
            kw["pooling_factors"] = [rng.uniform(0.1, 60) for _ in range(n)]
            if rng.random() < 0.4:
                kw["num_poolings"] = [float(rng.choice([1, 2, 3])) for _ in range(n)]
            if rng.random() < 0.4:
                kw["batch_sizes"] = [rng.choice([32, 256, 1024]) for _ in range(n)]
        if rng.random() < 0.2:
            kw["min_partition"] = rng.choice([4, 8, 16, 32, 64, 128])
        if rng.random() < 0.2:
            kw["cache_params"] = CacheParams(load_factor=rng.choice([0.05, 0.2, 0.5, 0.9]))
        if rng.random() < 0.15:
            kw["is_weighted"] = True
        if rng.random() < 0.05:
            kw["device_group"] = "cpu" if device == "cuda" else "cuda"
        constraints[c.name] = ParameterConstraints(**kw)
    if rng.random() < 0.1:
        constraints["not_a_table"] = ParameterConstraints(sharding_types=["table_wise"])

    elem = 2 if dtype == DataType.FP16 else 4
    table_bytes = sum(c.num_embeddings * c.embedding_dim * elem for c in bag_configs + seq_configs)
    low, high = rng.choices([(0.05, 0.5), (0.5, 2.0), (2.0, 30.0)], weights=[0.15, 0.45, 0.4])[0]
    memory = math.exp(rng.uniform(math.log(low), math.log(high)))  # "cannot fit", "tight", "ample"
    per_rank = max(512 << 20, int(table_bytes * memory / world))
    uneven = world > 1 and rng.random() < 0.2
    kw = {"world_size": world, "compute_device": device, "local_world_size": local_world}
    if device == "cuda":
        kw["hbm_cap"] = per_rank
        kw["ddr_cap"] = per_rank * rng.choice([1, 4, 32])
    else:
        kw["ddr_cap"] = per_rank
    if uneven:
        from torchrec.distributed.planner.types import CustomTopologyData

        key = "hbm_cap" if device == "cuda" else "ddr_cap"
        caps = [int(kw[key] * rng.choice([0.5, 1.0, 1.5])) for _ in range(world)]
        kw["custom_topology_data"] = CustomTopologyData(data={key: caps}, world_size=world)
    batch_size = rng.choice([128, 512, 512, 4096])
    case = Case(seed, world, local_world, device, batch_size, memory, uneven, module, constraints, n_tables)
    case.topology = Topology(**kw)
    return case


def _sharders():
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def _hosts_of(topology) -> List[range]:
    g = topology.intra_group_size
    return [range(h * g, (h + 1) * g) for h in range(topology.world_size // g)]


def score(case: Case, plan) -> Tuple[str, float, str]:
    """(verdict, max-rank perf, detail) of a plan under TorchRec's own estimators and reservation."""
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation

    topo = case.topology
    sharders = _sharders()
    options = EmbeddingEnumerator(topo, batch_size=case.batch_size, constraints=case.constraints).enumerate(case.module, sharders)
    reserved = HeuristicalStorageReservation(percentage=0.15).reserve(
        topology=topo, batch_size=case.batch_size, module=case.module, sharders=sharders, constraints=case.constraints
    )
    by_key = {(so.path, so.name, so.sharding_type, so.compute_kernel): so for so in options}
    tables = {(so.path, so.name) for so in options}
    planned = {(path, name) for path, mp in plan.plan.items() for name in mp}
    if planned != tables:
        return "FOREIGN-OPTION", math.nan, f"plan covers {sorted(planned ^ tables)[:3]} differently from TorchRec's tables"
    W = topo.world_size
    loads = [0.0] * W
    hbm = [0] * W
    ddr = [0] * W
    hosts = _hosts_of(topo)
    for (path, name) in sorted(tables):
        ps = plan.plan[path][name]
        so = by_key.get((path, name, ps.sharding_type, ps.compute_kernel))
        if so is None:
            return "FOREIGN-OPTION", math.nan, f"{name}: {ps.sharding_type}/{ps.compute_kernel} is not a TorchRec option"
        if ps.sharding_type == "data_parallel":
            pairs = list(zip(so.shards, ps.ranks))
            if sorted(ps.ranks) != list(range(W)):
                return "BAD-PLACEMENT", math.nan, f"{name}: data_parallel on ranks {ps.ranks}"
        else:
            want: Dict[tuple, list] = {}
            for s in so.shards:  # empty row-wise shards can repeat an (offset, size)
                want.setdefault((tuple(s.offset), tuple(s.size)), []).append(s)
            got = [(tuple(m.shard_offsets), tuple(m.shard_sizes)) for m in ps.sharding_spec.shards]
            if sorted(got) != sorted(k for k, v in want.items() for _ in v):
                return "FOREIGN-OPTION", math.nan, f"{name}: shards {got[:2]}.. differ from TorchRec's {list(want)[:2]}.."
            pairs = [(want[g].pop(0), r) for g, r in zip(got, ps.ranks)]
        ranks = [r for _, r in pairs]
        if any(not 0 <= r < W for r in ranks):
            return "BAD-PLACEMENT", math.nan, f"{name}: ranks {ranks} outside 0..{W - 1}"
        if ps.sharding_type == "row_wise" and ranks != list(range(W)):
            return "BAD-PLACEMENT", math.nan, f"{name}: row_wise shard i must be on rank i, got {ranks}"
        if ps.sharding_type in ("table_row_wise", "table_column_wise"):
            host = [h for h in hosts if all(r in h for r in ranks)]
            if not host:
                return "BAD-PLACEMENT", math.nan, f"{name}: {ps.sharding_type} shards on ranks {ranks} span hosts"
            if ps.sharding_type == "table_row_wise" and ranks != list(host[0]):
                return "BAD-PLACEMENT", math.nan, f"{name}: table_row_wise shards on {ranks}, not one per host rank"
        for shard, r in pairs:
            loads[r] += shard.perf.total
            hbm[r] += shard.storage.hbm
            ddr[r] += shard.storage.ddr
    for r, dev in enumerate(reserved.devices):
        if hbm[r] > dev.storage.hbm or ddr[r] > dev.storage.ddr:
            return "DOES-NOT-FIT", max(loads), (
                f"rank {r}: hbm {hbm[r]} > {dev.storage.hbm} or ddr {ddr[r]} > {dev.storage.ddr}"
            )
    return "fits", max(loads), ""


def run_case(case: Case) -> Outcome:
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.types import PlannerError

    from fastplan import FastShardingPlanner

    out = Outcome(case.seed, "", case=case.describe())
    kw = dict(topology=case.topology, batch_size=case.batch_size, constraints=case.constraints, debug=False)
    t0 = time.perf_counter()
    trec_plan, trec_error = None, None
    try:
        trec_plan = EmbeddingShardingPlanner(**kw).plan(case.module, _sharders())
    except Exception as e:  # noqa: BLE001 - any TorchRec failure counts as "TorchRec rejects"
        trec_error = e
    out.trec_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast_plan, fast_error = None, None
    try:
        fast_plan = FastShardingPlanner(cache=None, **kw).plan(case.module, _sharders())
    except PlannerError as e:
        fast_error = e
    except Exception as e:  # noqa: BLE001
        out.fast_s = time.perf_counter() - t0
        out.kind = "CRASH"
        out.detail = f"{type(e).__name__}: {e} | {traceback.format_exc().strip().splitlines()[-3].strip()}"
        return out
    out.fast_s = time.perf_counter() - t0
    if fast_error is not None:
        out.kind = "both-reject" if trec_error is not None else "FALSE-INFEASIBLE"
        out.detail = f"{type(fast_error).__name__}: {str(fast_error).splitlines()[0][:200]}"
        return out
    verdict, fast_perf, detail = score(case, fast_plan)
    if verdict != "fits":
        out.kind, out.detail = verdict, detail
        return out
    if trec_error is not None:
        out.kind = "ok-trec-rejects"
        out.detail = f"TorchRec: {type(trec_error).__name__}: {str(trec_error).splitlines()[0][:120]}"
        return out
    _, trec_perf, _ = score(case, trec_plan)
    out.ratio = fast_perf / trec_perf if trec_perf > 0 else (1.0 if fast_perf == 0 else math.inf)
    out.kind = "WORSE" if out.ratio > 1 + WORSE_TOLERANCE else "ok"
    return out


def run(seeds, max_world: int = 64, max_tables: int = 24, verbose: bool = False, progress=None) -> List[Outcome]:
    outcomes = []
    for seed in seeds:
        outcome = run_case(make_case(seed, max_world, max_tables))
        outcomes.append(outcome)
        if verbose:
            print(format_outcome(outcome), flush=True)
        if progress:
            progress(outcome)
    return outcomes


def format_outcome(o: Outcome) -> str:
    ratio = f"{o.ratio:.6f}" if o.ratio is not None else "-"
    return f"{o.seed:>6} {o.kind:<16} {ratio:>9} {o.fast_s:>7.3f} {o.trec_s:>8.2f}  {o.case}  {o.detail}"


def summary(outcomes: List[Outcome]) -> str:
    kinds = ["ok", "ok-trec-rejects", "both-reject", *BAD]
    counts = {k: sum(o.kind == k for o in outcomes) for k in kinds}
    ratios = sorted(o.ratio for o in outcomes if o.ratio is not None)
    lines = [f"{'outcome':<18}{'cases':>6}"] + [f"{k:<18}{counts[k]:>6}" for k in kinds]
    if ratios:
        mid = ratios[len(ratios) // 2]
        lines.append(
            f"quality (fastplan / TorchRec max-rank perf, {len(ratios)} cases): min {ratios[0]:.4f} "
            f"median {mid:.4f} max {ratios[-1]:.4f}; better in {sum(r < 1 - 1e-9 for r in ratios)}, "
            f"equal in {sum(abs(r - 1) <= 1e-9 for r in ratios)}"
        )
    fast = sorted(o.fast_s for o in outcomes)
    trec = sorted(o.trec_s for o in outcomes)
    if fast:
        lines.append(
            f"time per case: fastplan median {fast[len(fast) // 2] * 1000:.0f} ms, max {fast[-1]:.2f} s; "
            f"TorchRec median {trec[len(trec) // 2] * 1000:.0f} ms, max {trec[-1]:.2f} s"
        )
    bad = sum(counts[k] for k in BAD)
    lines.append(f"SUMMARY: {len(outcomes)} cases, {bad} bad ({', '.join(f'{k} {counts[k]}' for k in BAD)})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=300, help="run seeds 0..N-1")
    ap.add_argument("--seeds", type=int, nargs=2, metavar=("FIRST", "END"), help="run seeds FIRST..END-1 instead")
    ap.add_argument("--only", type=int, nargs="+", metavar="SEED", help="run just these seeds")
    ap.add_argument("--max-world", type=int, default=64)
    ap.add_argument("--max-tables", type=int, default=24)
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    seeds = args.only or (range(*args.seeds) if args.seeds else range(args.cases))
    print(f"{'seed':>6} {'outcome':<16} {'ratio':>9} {'fast s':>7} {'trec s':>8}  case")
    outcomes = run(
        seeds, args.max_world, args.max_tables, verbose=args.verbose,
        progress=None if args.verbose else (lambda o: o.kind in BAD and print(format_outcome(o), flush=True)),
    )
    print(summary(outcomes))
    return 1 if any(o.kind in BAD for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
