"""A folder of 20 captioned images, as a user brings them (issue 14, items 2, 6 and 7 and "Metadata"):
it trains with the default batch of 32 (a batch of 20, said in one line), says how well the tokenizer
knows its caption words, writes labelled sample grids that carry their prompts, and exports single
files whose header says how the model was made (kohya's ss_* keys).
"""

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datagen import make_folder  # noqa: E402

from colodiffusion.config import load_config  # noqa: E402

FAST = ["first_stage.steps=2", "first_stage.scale_samples=16", "train.log_every=1", "train.warmup_steps=1",
        "train.checkpoint_every=0", "sample.steps=2"]


def train(run_dir, *overrides) -> str:
    """Train and return what it printed."""
    from colodiffusion.train.loop import train as run

    torch.set_num_threads(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run(load_config(None, [f"run.dir={run_dir}", *FAST, *overrides]))
    return out.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """20 images with captions that use a word the shapes tokenizer has never seen."""
    root = make_folder(tmp_path_factory.mktemp("data") / "my_images", 20, resolution=16)
    for i, txt in enumerate(sorted(root.glob("*.txt"))):
        txt.write_text(f"a photo of zorblax, {txt.read_text()}" if i % 2 else txt.read_text())
    return root


@pytest.fixture(scope="module")
def own_run(folder, tiny_components, tmp_path_factory):
    """The default batch (32), 2 steps, a sample grid with per-prompt options; the shapes tokenizer."""
    run_dir = tmp_path_factory.mktemp("own") / "run"
    shutil.copytree(tiny_components, run_dir / "components")
    printed = train(run_dir, "data.source=folder", f"data.path={folder}", "train.max_steps=2", "train.sample_every=2",
                    "sample.prompts=[a photo of zorblax,a red circle --n blue --d 7 --s 3]")
    return run_dir, printed


def test_twenty_images_train_with_a_batch_that_fits(own_run):
    run_dir, printed = own_run
    assert (run_dir / "final" / "model_index.json").exists()
    line = next(x for x in printed.splitlines() if "train.batch_size=32" in x)
    assert "20 samples" in line and "train.batch_size=20" in line
    assert json.loads((run_dir / "run_info.json").read_text())["batch_size"] == 20
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and steps[-1]["samples_per_s"] > 0


def test_tokenizer_coverage_is_reported_once_at_the_start(own_run):
    _, printed = own_run
    lines = [x for x in printed.splitlines() if x.startswith("tokenizer:")]
    assert len(lines) == 1
    # 10 of the 20 captions carry 'zorblax', which the shapes tokenizer splits into letters
    assert "'zorblax'" in lines[0] and "more than 3 pieces" in lines[0] and not lines[0].startswith("tokenizer: 0%")


def test_training_grid_is_labelled_and_carries_its_prompts(own_run):
    run_dir, _ = own_run
    grid = Image.open(run_dir / "samples" / "step_00000002.png")
    assert grid.size[0] > 2 * 32 and grid.size[1] > 128  # enlarged cells and a label band
    cells = [c.split("\n") for c in json.loads(grid.text["prompts"])]
    assert cells[0][0] == "a photo of zorblax" and "Seed: 0" in cells[0][-1]
    assert cells[1][:2] == ["a red circle", "Negative prompt: blue"]
    assert "Steps: 3" in cells[1][-1] and "Seed: 7" in cells[1][-1]


def header(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_exported_single_file_says_how_it_was_made(own_run, folder, tmp_path):
    from colodiffusion.export import export

    run_dir, _ = own_run
    out = export(run_dir, "single-file", tmp_path / "my_model.safetensors")
    meta = header(out)
    assert meta["ss_output_name"] == "my_model" and meta["ss_sd_model_name"] == "colodiffusion-tiny"
    assert meta["ss_base_model_version"] == "colodiffusion_tiny_v" and meta["ss_v2"] == "False"
    assert (meta["ss_num_train_images"], meta["ss_total_batch_size"], meta["ss_max_train_steps"]) == ("20", "20", "2")
    assert (meta["ss_steps"], meta["ss_learning_rate"], meta["ss_resolution"]) == ("2", "0.001", "(32, 32)")
    assert meta["ss_mixed_precision"] == "no" and meta["ss_seed"] == "0"
    assert json.loads(meta["ss_dataset_dirs"]) == {"my_images": {"n_repeats": 1, "img_count": 20}}
    assert json.loads(meta["ss_tag_frequency"])["my_images"]["a photo of zorblax"] == 10
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert all(isinstance(v, str) for v in meta.values())
    assert str(folder.parent) not in json.dumps(meta)  # folder names only: no local paths in a shared file


def test_exported_lora_says_its_rank_and_base(own_run, folder, tmp_path):
    from colodiffusion.export import export

    run_dir, _ = own_run
    lora_run = tmp_path / "lora"
    train(lora_run, f"model.pretrained={run_dir / 'final'}", "data.source=folder", f"data.path={folder}",
          "train.max_steps=1", "train.sample_every=0", "train.lora.rank=2", "train.lora.alpha=4")
    for path in (
        export(lora_run, "lora", tmp_path / "adapter"),
        lora_run / "lora" / "pytorch_lora_weights.safetensors",
    ):
        meta = header(path)  # the exported adapter, and the one the run wrote itself
        assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == (
            "peft.lora",
            "2",
            "4.0",
        )
        assert meta["ss_sd_model_name"] == "final" and meta["ss_steps"] == "1"
        assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 2  # diffusers' own header is kept


@pytest.mark.parametrize("n, dp, accum, batch, expected", [
    (20, 1, 1, 32, 20),  # the case
    (20, 2, 1, 32, 20),  # 10 per rank
    (21, 2, 1, 32, 20),  # whole samples per rank only
    (20, 1, 2, 64, 40),  # micro-batches of 20, two per step
    (20, 1, 2, 32, 32),  # micro-batches of 16 already fit: unchanged
    (1, 2, 1, 32, 32),   # nothing fits: unchanged, and the preflight says so
])
def test_fit_batch(n, dp, accum, batch, expected, capsys):
    from types import SimpleNamespace

    from colodiffusion.train.dataset_info import fit_batch

    cfg = load_config(None, [f"train.batch_size={batch}", f"train.grad_accum={accum}"])
    fit_batch(cfg, SimpleNamespace(dp_size=dp, is_main=True), [None] * n)
    assert cfg.train.batch_size == expected
    assert (f"train.batch_size={expected}" in capsys.readouterr().out) == (expected != batch)
