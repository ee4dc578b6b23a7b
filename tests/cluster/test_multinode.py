"""The multi-node proof: a real head + worker Ray cluster (separate `ray start` processes),
`serve deploy` of configs/cluster.yaml, autoscaling across nodes, a worker SIGKILL under load.

It runs before tests/integration (directory order), so its vLLM and the shared one never
run side by side. `python -m benchmarks.multinode` runs the same scenario and writes the
README's figures and plot.
"""

import pytest

from benchmarks import multinode

pytestmark = pytest.mark.slow


def test_scale_across_nodes_survive_a_worker_kill_and_lose_nothing(tmp_path):
    result = multinode.run(tmp_path, clients=16)

    scale_up = result["scale_up"]
    grown = [name for name, s in scale_up.items() if s["peak_replicas"] > 1]
    assert {"Router", "Embedder"} <= set(grown), scale_up
    assert result["scale_down_s"] < 120

    kill = result["worker_kill"]
    assert sum(kill["replicas_on_worker"].values()) >= 1, "nothing ran on the killed node"
    assert kill["failed_after_retries"] == 0, result["failed"]
    assert kill["requests_during_and_after"] > 0
    assert kill["generation_after_recovery"] == 200  # chat may fail while vLLM restarts
    assert result["failed_count"] == 0, result["failed"]

    memories = result["memories"]
    assert memories["acknowledged"] >= 20 and memories["lost"] == 0, memories
    assert result["auth"] == {"no_key": 401, "agent_outside_its_namespaces": 403}
