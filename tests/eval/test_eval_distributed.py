"""Task accuracy under torchrun: each rank generates its share, every rank gets the same records as one
process, in order; uneven shares (7 problems on 2 ranks, batches of 3) take the padded path."""

import json
import sys
from pathlib import Path

NUM, BATCH = 7, 3  # shares of 4 and 3: without padding, 2 generate calls on rank 0 and 1 on rank 1


def accuracy_records(model_path, world=None):
    from transformers import AutoModelForCausalLM

    from optsys.data.tasks import get_task
    from optsys.eval.accuracy import task_accuracy
    from optsys.models.load import load_tokenizer

    tok = load_tokenizer(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), use_safetensors=True)
    task = get_task("arithmetic_reversed")
    problems = task.problems("test", NUM, difficulty=2)
    return task_accuracy(model, tok, task, problems, max_new_tokens=5, batch_size=BATCH, world=world)


def test_two_ranks_give_one_process_records(tmp_path, tiny_path):
    from helpers import run_torchrun  # here, not at the top: each torchrun rank runs this file as a script

    acc, records = accuracy_records(tiny_path)
    res = run_torchrun([__file__, tiny_path, tmp_path], timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["records"] == records
        assert got["accuracy"] == acc


if __name__ == "__main__":  # one torchrun rank
    from optsys.parallel.dist import close_world, init_world

    world = init_world("cpu")
    acc, records = accuracy_records(sys.argv[1], world)
    Path(sys.argv[2], f"rank{world.rank}.json").write_text(json.dumps({"accuracy": acc, "records": records}))
    close_world()
