"""Non-finite isolation, a layer on train.py's forward_backward step: where adapters share
matmuls (lora's concatenated path, on GPUs; and the fixed-shape step of graphs.py), one job's NaN
row would reach every adapter's gradient as 0 x NaN. So the step checks the losses before
backward; a job whose loss is not finite stops, and the step runs again without it, drawing the
same dropout for the others. (On the per-adapter path each adapter's gradient comes from its
own rows alone: optimizer_step's finite checks stop a job there, and this layer is not used.)
"""
import math

from jobs import Fused, Run, stop_early


def isolating(forward_backward):
    """forward_backward(run, micro_batches) that leaves out the jobs whose loss is not finite."""
    def step(run: Run, micro_batches: list, check_finite: bool = True) -> Fused:
        while True:
            states = [run.jobs[mb.job] for mb in micro_batches]
            rng = [s.generator.get_state() for s in states]   # a step run again draws the same dropout
            fused = forward_backward(run, micro_batches, check_finite=True)
            if fused.stepped:
                return fused
            finite = [math.isfinite(loss) for loss in fused.losses.tolist()]
            if all(finite):   # data parallel: nothing of this step was here
                return fused
            for s, ok, state in zip(states, finite, rng):
                s.generator.set_state(state)
                if not ok:
                    stop_early(run, s, f"non-finite loss at step {s.step + 1}", nonfinite=True)
            micro_batches = [mb for mb, ok in zip(micro_batches, finite) if ok]
            if not micro_batches:
                return fused._replace(micro_batches=[])
    return step
