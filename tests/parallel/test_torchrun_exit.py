"""Leaving a torchrun job: after a normal end no rank tears its process group down while a peer is still
working (the cause of a rank's SIGABRT at exit under load); after an error, no rank waits for the others."""

import json
import time
from pathlib import Path

from helpers import run_torchrun

SCRIPT = r'''
import json, sys, time
from pathlib import Path
from optsys.parallel.dist import all_gather_objects, torchrun_world

mode, out = sys.argv[1], Path(sys.argv[2])
with torchrun_world("cpu") as world:
    all_gather_objects(world.rank, world)
    if world.rank == 1:
        time.sleep(3)  # the slow rank: still working when rank 0 is done
        if mode == "raise":
            raise RuntimeError("rank 1 fails")
    called = time.time()
(out / f"rank{world.rank}.json").write_text(json.dumps({"called": called, "returned": time.time()}))
'''


def launch(tmp_path, mode):
    script = tmp_path / "exit.py"
    script.write_text(SCRIPT)
    t0 = time.time()
    res = run_torchrun([script, mode, tmp_path], timeout=300)
    return res, time.time() - t0


def test_clean_exit_waits_for_the_slowest_rank(tmp_path):
    res, _ = launch(tmp_path, "ok")
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in (0, 1))
    # rank 0 left the group only after rank 1 had finished its work and reached the exit
    assert r0["returned"] >= r1["called"]


def test_a_failing_rank_ends_the_job_without_a_barrier(tmp_path):
    res, seconds = launch(tmp_path, "raise")
    assert res.returncode != 0 and "rank 1 fails" in res.stderr
    assert seconds < 120  # not the 600 s collective timeout a barrier against a dead rank would wait for
