"""Data parallelism against one process over the combinations a user meets: one
``mpiexec -n 2`` launch of matrix_worker.py (a covering design of its ``AXES``, each case
compared after every step; ``fit`` on sharded loaders against one process; the refusals by
design held to their messages), with a hard limit so that a hung rank fails the test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from test_data_parallel import HERE, mpiexec  # (its folder is on the path: pytest's rootdir mode)


def test_two_ranks_equal_one_process_over_the_matrix(tmp_path: Path) -> None:
    out = tmp_path / "matrix.json"
    # (about 3 s on 2 idle cores; the limits are for a stuck job: a rank left waiting in a
    # collective by the other's failure ends after 30 s, naming the call)
    worker = str(HERE / "matrix_worker.py")  # (tests/ on its path: the covering design's module)
    env = {"PYTHONPATH": str(HERE.parent), "GPUNET_DIST_TIMEOUT": "30"}
    done = mpiexec(sys.executable, worker, str(out), timeout=120, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    design = results.pop("design")
    assert design["uncovered"] == [] and design["cases"] >= 20, design
    assert sum(k.startswith("case ") for k in results) == design["cases"]
    assert sum(k.startswith("fit ") for k in results) == design["fits"] >= 4
    failed = [f"{k}:\n{details[0][-1500:]}" for k, (ok, details) in results.items() if not ok]
    assert not failed, f"{len(failed)} of {len(results)} failed\n\n" + "\n\n".join(failed)
