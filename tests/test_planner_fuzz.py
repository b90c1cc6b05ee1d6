"""A seeded slice of the differential fuzzer (`benchmarks/fuzz.py`): on random problems TorchRec's
planner can face, fastplan never crashes, never says "infeasible" where TorchRec plans, never
returns a plan that overflows a rank or uses an option TorchRec would not offer, and is never worse
on TorchRec's own cost model."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fuzz  # noqa: E402

SEEDS = range(1000, 1040)  # small problems (<= 16 ranks, <= 12 tables) so TorchRec finishes quickly


def test_fastplan_matches_or_beats_torchrec_on_a_seeded_slice():
    outcomes = fuzz.run(SEEDS, max_world=16, max_tables=12)
    bad = [fuzz.format_outcome(o) for o in outcomes if o.kind in fuzz.BAD]
    assert not bad, "\n".join(bad)
    planned = [o for o in outcomes if o.kind == "ok"]
    assert len(planned) >= 25, fuzz.summary(outcomes)  # the slice must exercise planning, not just rejections
    assert all(o.ratio <= 1 + fuzz.WORSE_TOLERANCE for o in planned)
