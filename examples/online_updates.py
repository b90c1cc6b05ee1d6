"""Train, propagate, serve: 2 DMP trainer ranks (gloo, 127.0.0.1) publish the rows TorchRec's
ModelDeltaTracker saw touched after every step; 2 inference replicas pull them into an unsharded
EmbeddingBagCollection while a thread on each keeps answering requests. At the end every replica
must hold the trainers' rows byte for byte and give the DMP model's outputs.

    .venv/bin/python examples/online_updates.py

(`benchmarks/updates_training.py` runs the same loop at scale and prints its figures.)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastplan.comm.updates.online_stream import OnlineConfig, run_online, step_latencies  # noqa: E402


def main() -> None:
    result = run_online(OnlineConfig(replicas=2, rows=2000, steps=20, batch_size=64), timeout_s=300)
    for rank, trainer in sorted(result["trainer"].items()):
        print(f"trainer {rank}: loss {trainer['losses'][0]:.4f} -> {trainer['losses'][-1]:.4f}, "
              f"{len(trainer['steps'])} steps published")
    latencies = sorted(step_latencies(result))
    print(f"propagation: {len(latencies)} steps, median {1000 * latencies[len(latencies) // 2]:.1f} ms")
    ok = True
    for name, replica in sorted(result["replicas"].items()):
        same = replica["converged"] and replica["outputs_equal"] and not replica["errors"]
        ok &= same
        print(f"replica {name}: {len(replica['served'])} requests served while updates landed; "
              f"rows byte-equal to the trainers: {replica['converged']}; outputs equal to DMP's: {replica['outputs_equal']}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
