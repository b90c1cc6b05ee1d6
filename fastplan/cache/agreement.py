"""`collective_plan` without a collective during planning: every rank plans on its own, then the ranks
compare plan hashes through the process group's key-value store, under one deadline shared by all ranks.

Every rank raises the same error, naming ranks: those that published nothing by the deadline, the store's
host when it is gone, a rank whose planning failed, or, when plans differ, the first table whose
*inputs* differ and the tables only some ranks have. Store messages are JSON with a schema.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

import msgspec
import torch.distributed as dist
from torchrec.distributed.types import ShardingPlan

from fastplan.planfile import table_digests

DEFAULT_AGREEMENT_TIMEOUT_S = 300.0
_rounds: Dict[str, "itertools.count[int]"] = {}

__all__ = ["DEFAULT_AGREEMENT_TIMEOUT_S", "PlanAgreementError", "PlanAgreementTimeout", "PlanMismatchError",
           "agree_on_plan", "plan_hash", "table_digests"]


class PlanAgreementError(RuntimeError):
    """The agreement could not complete: a rank failed to plan, or the store's host is gone."""


class PlanMismatchError(PlanAgreementError):
    """Ranks computed different plans."""


class PlanAgreementTimeout(PlanAgreementError, TimeoutError):
    """Some ranks published no plan before the shared deadline."""


class Summary(msgspec.Struct, forbid_unknown_fields=True):
    plan: Optional[str] = None  # hash of the plan; None when planning failed
    error: Optional[str] = None


class Details(msgspec.Struct, forbid_unknown_fields=True):
    sections: Dict[str, str]  # shared input section -> digest
    tables: List[Tuple[str, str, str]]  # (table, inputs digest, sharding digest), in planning order


def plan_hash(digests: Dict[str, str]) -> str:
    return hashlib.sha256(msgspec.json.encode(sorted(digests.items()))).hexdigest()


class _Exchange:
    """Keys under one agreement round in the store; every wait ends by `deadline` (wall clock)."""

    def __init__(self, store, prefix: str, rank: int, global_ranks: List[int]) -> None:
        self.store, self.prefix, self.rank, self.global_ranks = store, prefix, rank, global_ranks
        self.deadline = self.budget = 0.0

    def names(self, ranks: Sequence[int]) -> str:
        if list(self.global_ranks) == list(range(len(self.global_ranks))):
            return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        return f"group rank(s) {list(ranks)} (global {[self.global_ranks[r] for r in ranks]})"

    def _store_gone(self, error: Exception) -> PlanAgreementError:
        where = ""
        tcp = getattr(self.store, "underlying_store", self.store)
        if hasattr(tcp, "host"):
            where = f" at {tcp.host}:{tcp.port}"
        return PlanAgreementError(
            f"rank {self.rank}: the process group's store{where}, hosted by global rank 0, is unreachable "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); rank 0 has probably died"
        )

    def call(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - any store failure outside a wait means its host is gone
            raise self._store_gone(e) from e

    def shared_start(self, budget_s: float) -> None:
        """The first rank to arrive fixes the start; everyone's deadline is start + budget."""
        now = repr(time.time())
        start = self.call(self.store.compare_set, f"{self.prefix}/start", "", now)
        self.budget = budget_s
        self.deadline = float(start.decode() if isinstance(start, bytes) else start) + budget_s

    def publish(self, kind: str, message: msgspec.Struct) -> None:
        self.call(self.store.set, f"{self.prefix}/{kind}/{self.rank}", msgspec.json.encode(message))

    def gather(self, kind: str, ranks: Sequence[int], schema: type) -> Dict[int, msgspec.Struct]:
        keys = [f"{self.prefix}/{kind}/{r}" for r in ranks]
        try:
            self.store.wait(keys, timedelta(seconds=max(0.001, self.deadline - time.time())))
        except Exception as e:  # noqa: BLE001 - a timeout, or the store's host died
            present = self.call(lambda: [self.store.check([k]) for k in keys])
            missing = [r for r, ok in zip(ranks, present) if not ok]
            if missing:
                raise PlanAgreementTimeout(
                    f"rank {self.rank}: {self.names(missing)} published no {'plan' if kind == 'summary' else 'plan details'} "
                    f"within {self.budget:.0f} s of the first rank entering collective_plan; "
                    "they may have died, hung, or not called collective_plan"
                ) from e
        out = {}
        for r, k in zip(ranks, keys):
            try:
                out[r] = msgspec.json.decode(self.call(self.store.get, k), type=schema)
            except msgspec.DecodeError as e:
                raise PlanAgreementError(f"rank {self.rank}: malformed agreement message from rank {r}: {e}") from e
        return out


def _store(pg: dist.ProcessGroup):
    return dist.distributed_c10d._get_default_store()


def agree_on_plan(planner, module, sharders, pg: dist.ProcessGroup, timeout_s: float) -> ShardingPlan:
    rank = dist.get_rank(pg)
    world = dist.get_world_size(pg)
    global_ranks = dist.get_process_group_ranks(pg)
    group_id = "-".join(map(str, global_ranks))
    round_id = next(_rounds.setdefault(group_id, itertools.count()))
    ex = _Exchange(_store(pg), f"fastplan/agree/{group_id}/{round_id}", rank, global_ranks)
    ex.shared_start(float(getattr(planner, "_timeout_seconds", None) or 0.0) + timeout_s)

    try:
        plan = planner.plan(module, sharders)
    except Exception as e:
        try:  # let the others fail now rather than at the deadline
            ex.publish("summary", Summary(error=f"{type(e).__name__}: {e}"))
        except PlanAgreementError:
            pass
        raise
    digests = table_digests(plan)
    mine = plan_hash(digests)
    ex.publish("summary", Summary(plan=mine))
    summaries = ex.gather("summary", range(world), Summary)

    failed = {r: s.error for r, s in summaries.items() if s.error is not None}
    if failed:
        r, error = next(iter(failed.items()))
        raise PlanAgreementError(f"rank {rank}: {ex.names(sorted(failed))} failed to plan; rank {r}: {error}")
    groups: Dict[str, List[int]] = {}
    for r, s in summaries.items():
        groups.setdefault(s.plan, []).append(r)
    if len(groups) == 1:
        return plan

    representatives = [rs[0] for rs in groups.values()]
    if rank in representatives:
        inputs = planner.planning_inputs(module, sharders)
        table_inputs = inputs.table_digests()
        ex.publish("details", Details(
            sections=inputs.section_digests(),
            tables=[(t, table_inputs.get(t, ""), digests.get(t, "")) for t in dict.fromkeys([*table_inputs, *digests])],
        ))
    a, b = representatives[:2]
    details = ex.gather("details", [a, b], Details)
    raise PlanMismatchError(
        f"rank {rank}: ranks disagree on the sharding plan: "
        + "; ".join(f"{ex.names(rs)} {'has' if len(rs) == 1 else 'have'} plan {h[:12]}" for h, rs in groups.items())
        + f". Between rank {a} and rank {b}: {diagnose(details[a], details[b], a, b)}. "
        "Check that every rank sees the same tables, constraints and topology."
    )


def diagnose(x: Details, y: Details, a: int, b: int) -> str:
    """What differs between two ranks' inputs, most telling first."""
    notes = []
    sections = [s for s in dict.fromkeys([*x.sections, *y.sections]) if x.sections.get(s) != y.sections.get(s)]
    if sections:
        notes.append(f"shared inputs differ: {', '.join(sections)}")
    xt = {t: (i, p) for t, i, p in x.tables}
    yt = {t: (i, p) for t, i, p in y.tables}
    for only, here, there, r in ((x.tables, xt, yt, a), (y.tables, yt, xt, b)):
        names = [t for t, _, _ in only if t not in there]
        if names:
            notes.append(f"{len(names)} table(s) only on rank {r}: {names[:5]}")
    common = [t for t, _, _ in x.tables if t in yt]
    inputs_differ = [t for t in common if xt[t][0] != yt[t][0]]
    if inputs_differ:
        notes.append(f"first table whose inputs differ: '{inputs_differ[0]}' ({len(inputs_differ)} differ)")
    if not notes:
        sharding_differs = [t for t in common if xt[t][1] != yt[t][1]]
        first = f"'{sharding_differs[0]}'" if sharding_differs else "none"
        notes.append(
            f"their inputs are identical as fastplan sees them; first table whose sharding differs: {first} "
            "(callbacks, Stats, a custom enumerator or a nondeterministic search can cause this)"
        )
    return "; ".join(notes)
