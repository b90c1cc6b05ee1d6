"""`collective_plan` without a collective during planning: every rank plans on its own, then the
ranks compare plan hashes through the process group's key-value store, under fastplan's own deadline.

No rank waits inside a gloo/NCCL collective while another is still planning, so a slow planner can
never trip the process group's timeout. Ranks whose plans differ (different inputs) get an error
naming the disagreeing ranks and the first table whose sharding differs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
from datetime import timedelta
from typing import Dict, List

import torch.distributed as dist
from torchrec.distributed.types import ShardingPlan

DEFAULT_AGREEMENT_TIMEOUT_S = 1800.0
_rounds: Dict[str, "itertools.count[int]"] = {}


class PlanMismatchError(RuntimeError):
    """Ranks computed different plans."""


class PlanAgreementTimeout(TimeoutError):
    """Some ranks never published a plan before the deadline."""


def table_digests(plan: ShardingPlan) -> Dict[str, str]:
    """sha256 of each table's sharding ("module.table" -> digest), independent of object identity."""
    out = {}
    for path, module_plan in plan.plan.items():  # plan order: the module's table order
        for name, ps in module_plan.items():
            spec = None
            if ps.sharding_spec is not None:
                spec = [(m.shard_offsets, m.shard_sizes, str(m.placement)) for m in ps.sharding_spec.shards]
            doc = [ps.sharding_type, ps.compute_kernel, ps.ranks, spec]
            out[f"{path}.{name}" if path else name] = hashlib.sha256(json.dumps(doc).encode()).hexdigest()
    return out


def plan_hash(digests: Dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def _store_for(pg: dist.ProcessGroup):
    return dist.distributed_c10d._get_default_store()


def agree_on_plan(planner, module, sharders, pg: dist.ProcessGroup, timeout_s: float = None) -> ShardingPlan:
    rank = dist.get_rank(pg)
    world = dist.get_world_size(pg)
    global_ranks = dist.get_process_group_ranks(pg)
    group_id = "-".join(map(str, global_ranks))
    round_id = next(_rounds.setdefault(group_id, itertools.count()))
    prefix = f"fastplan/agree/{group_id}/{round_id}"
    timeout_s = timeout_s or float(getattr(planner, "_timeout_seconds", None) or DEFAULT_AGREEMENT_TIMEOUT_S)

    plan = planner.plan(module, sharders)
    digests = table_digests(plan)
    mine = plan_hash(digests)
    store = _store_for(pg)
    store.set(f"{prefix}/hash/{rank}", mine)
    store.set(f"{prefix}/tables/{rank}", pickle.dumps(digests))
    keys = [f"{prefix}/hash/{r}" for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - the store raises a generic error on timeout
        missing = [r for r in range(world) if not store.check([f"{prefix}/hash/{r}"])]
        raise PlanAgreementTimeout(
            f"rank {rank}: ranks {missing} (group ranks {[global_ranks[r] for r in missing]}) published no plan "
            f"within {timeout_s:.0f} s ({e})"
        ) from e
    hashes = [store.get(k).decode() for k in keys]
    if len(set(hashes)) > 1:
        groups: Dict[str, List[int]] = {}
        for r, h in enumerate(hashes):
            groups.setdefault(h, []).append(r)
        other = next(r for r, h in enumerate(hashes) if h != mine)
        theirs = pickle.loads(store.get(f"{prefix}/tables/{other}"))
        differing = [k for k in list(digests) + [k for k in theirs if k not in digests] if digests.get(k) != theirs.get(k)]
        raise PlanMismatchError(
            f"rank {rank}: ranks disagree on the sharding plan: "
            + "; ".join(f"ranks {rs} have plan {h[:12]}" for h, rs in groups.items())
            + f". First differing table between rank {rank} and rank {other}: '{differing[0]}' "
            f"({len(differing)} differ). Check that every rank sees the same tables, constraints and topology."
        )
    return plan
