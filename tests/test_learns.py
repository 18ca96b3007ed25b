"""The default job's text conditioning, guarded: a reduced version of the README's first command (same
preset, objective, data and held-out prompts; fewer steps) must still draw the colour it is told on wordings
it never trained on. A change that cuts the caption off the UNet scores near chance (1/4) here and fails.
About 4 CPU-minutes; marked slow, so the quick tier leaves it out."""

import os

import pytest
import torch

from colodiffusion.config import load_config
from colodiffusion.evaluate import evaluate_model
from colodiffusion.generate import load_pipeline
from colodiffusion.train import loop

# Measured with these settings (seed 0, 1 thread, bench/NOTES.md): with the 1.2M-parameter tiny UNet colour
# accuracy 0.56 at 1,000 steps (0.42 at 500), and 0.27 with the caption cut off the UNet (context zeroed in the
# train step). (The 4.2M UNet before it: 0.50 at 500 steps, cut off 0.19-0.21; the narrower one runs 2.2x the
# steps per second, so 1,000 of its steps cost about what 500 did.)
REDUCED = ["first_stage.steps=150", "train.max_steps=1000", "train.batch_size=16", "train.warmup_steps=60",
           "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=50"]
BOUND = 0.40  # n = 48: 0.56 sits 2.3 standard errors above it, the cut-off caption 2 below


@pytest.mark.slow
def test_reduced_default_run_draws_the_colour_it_is_told(tmp_path):
    # Two threads as the README's command runs on a 2-core machine; one under pytest-xdist, where the other core
    # is another worker's (a second thread buys this small model ~1.4x for twice the CPU, and spins when the
    # core is busy). The bound holds at both (the figure moves a little with the thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
    try:
        run = loop.train(load_config(None, [f"run.dir={tmp_path / 'run'}", *REDUCED]))
        # DDIM, as the bound was measured (the judge's default sampler is now euler_a; colour is what this guards)
        result = evaluate_model(load_pipeline(run / "final", device=torch.device("cpu")), per_combo=4, sampler="ddim")
    finally:
        torch.set_num_threads(threads)
    assert result["n"] == 48
    print(result)
    assert result["color_accuracy"] >= BOUND, result
