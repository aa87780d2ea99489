"""A torchrun entry script whose rank 1 raises inside one training step: the kill-and-resume tests' failure."""

import textwrap


def failing_rank_script(fail_at_step: int) -> str:
    """`python -m optsys.train` with rank 1 raising in the loss of step `fail_at_step` (after fail_at_step - 1
    optimizer steps), so the steps before it, and the checkpoints they saved, are complete."""
    return textwrap.dedent(f"""
        import os, sys
        from optsys.trainers import sft

        done = {{"steps": 0}}
        clip_and_step, loss_sum = sft.clip_and_step, sft.micro_batch_loss_sum

        def counting_clip_and_step(*args, **kwargs):
            done["steps"] += 1
            return clip_and_step(*args, **kwargs)

        def failing_loss_sum(*args, **kwargs):
            if os.environ["RANK"] == "1" and done["steps"] == {fail_at_step - 1}:
                raise RuntimeError("injected failure on rank 1 at step {fail_at_step}")
            return loss_sum(*args, **kwargs)

        sft.clip_and_step, sft.micro_batch_loss_sum = counting_clip_and_step, failing_loss_sum
        from optsys.train import main

        main(sys.argv[1:])
    """)
