"""Every documented way in works (issue 25), each tried through the command a user types: errors that
need no model answer before torch, diffusers or transformers are imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import ROOT, TINY, run_cli

HEAVY = ("torch", "diffusers", "transformers")

# Run a command line in this interpreter and report which heavy modules it imported before it exited.
PROBE = """
import json, runpy, sys
target, sys.argv = sys.argv[1], sys.argv[1:]
code = 0
try:
    if target.endswith('.py'):
        runpy.run_path(target, run_name='__main__')
    else:
        runpy.run_module(target, run_name='__main__', alter_sys=True)
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
print(json.dumps({'code': code, 'heavy': sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def imports_of(*argv, cwd=ROOT):
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120, cwd=cwd)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["code"], result["heavy"], out.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "no-model", "--prompt", "x", "--height", "30"], "--height 30 is not a multiple of 8"),
        (["sample", "no-model", "--prompt", "x --s zero"], "--s needs a whole number"),
        (["sample", "no-model", "--prompt", "x"], "the model 'no-model' does not exist"),
        (["sample", "no-model", "--prompt", "x", "--n", "2"], "--n is the negative prompt inside a --prompt string"),
        (
            ["sample", "no-model", "--prompt-file", "no-such-prompts.txt"],
            "prompt file 'no-such-prompts.txt' does not exist",
        ),
        (["train", "train.max_stepz=10"], "unknown config key 'train.max_stepz'"),
        (["train", "data.source=folder", "data.path=/no/such/folder"], "'data.path' points to '/no/such/folder'"),
        (
            ["cache", "--out", "c", "data.file_path=x"],
            "'data.file_path' in override 'data.file_path=x' is the seed's; use data.path",
        ),
        (["config", "train.lr=-1"], "'train.lr' is -1.0"),
        (["eval", "no-model"], "the model 'no-model' does not exist"),
        (["export", "no-run", "--format", "diffusers", "--out", "o"], "the export source 'no-run' does not exist"),
        (["bench", "--batch", "0"], "--batch must be a whole number >= 1"),
    ],
)
def test_a_mistake_is_said_before_torch_diffusers_or_transformers_are_imported(argv, message):
    code, heavy, err = imports_of("colodiffusion", *argv)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert heavy == [], f"{argv} imported {heavy} before refusing"


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", ".", "--H", "30"], "height 30 is not a multiple of 8"),
    (["--ckpt", "no-model"], "--ckpt 'no-model' does not exist"),
    (["--ckpt", ".", "--from-file", "no-such-prompts.txt"], "prompt file 'no-such-prompts.txt' does not exist"),
    (["--ckpt", ".", "--plms", "--ddim_eta", "0.5"], "--ddim_eta is DDIM's"),
])
def test_txt2img_says_a_mistake_before_torch_diffusers_or_transformers_are_imported(argv, message):
    code, heavy, err = imports_of(str(ROOT / "scripts" / "txt2img.py"), "--prompt", "x", *argv)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert heavy == [], f"{argv} imported {heavy} before refusing"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["sample", "--help"], ["bench", "--help"],
                                  ["export", "--help"], ["eval", "--help"], ["cache", "--help"]])
def test_help_imports_nothing_heavy(argv):
    code, heavy, _ = imports_of("colodiffusion", *argv)
    assert code == 0 and heavy == []


def test_the_seed_line_verbatim_says_what_the_readme_says_before_importing_torch(tmp_path):
    code, heavy, err = imports_of(str(ROOT / "main.py"), "--logdir", str(tmp_path), "-t", "--postfix", "test", "-b",
                                  "config/train_colossalai.yaml")
    assert code == 2 and "model.pretrained and data.path must be given" in err and heavy == [], err
    row = next(line for line in (ROOT / "README.md").read_text().splitlines()
               if line.startswith("| `python main.py --logdir /tmp -t --postfix test -b config/train_colossalai.yaml`"))
    assert "stops with `model.pretrained and data.path must be given: ...`" in row and "verbatim" not in row
    code, heavy, err = imports_of(str(ROOT / "main.py"), "-t", "train.max_stepz=1")
    assert code == 2 and "train.max_stepz" in err and heavy == [], err


# -- model sources through `colodiffusion train` (item 1) ---------------------------------------------

def colodiffusion(*argv, env=None, timeout=1800):
    """`colodiffusion ARGV`: in this process (common.run_cli) unless `env` is given, which a new process
    reads at import (HF_HUB_OFFLINE, HF_HOME): then as a user runs it, this checkout's code, one CPU thread.
    (A tiny run takes a minute alone, ten under a load of 16 on two cores: the timeout is for a hang.)"""
    if env is None:
        return run_cli(*argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "colodiffusion", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def one_sentence(out) -> str:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr


QUICK = [*TINY, "train.max_steps=1", "train.checkpoint_every=0"]


def test_a_hub_id_missing_from_the_offline_cache_is_one_sentence_through_train(tmp_path):
    hf_home = tmp_path / "hf"
    (hf_home / "hub").mkdir(parents=True)
    run = tmp_path / "run"
    out = colodiffusion("train", *QUICK, "model.preset=sd15", "model.pretrained=test-org/not-cached",
                        f"run.dir={run}", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home),
                                               "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert "'test-org/not-cached' is not in the Hugging Face cache" in one_sentence(out)
    assert not run.exists()


def test_a_hub_id_in_an_offline_cache_trains(tmp_path, tiny_components):
    from sdfolder import make_diffusers_folder

    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--test-org--tiny-sd"
    make_diffusers_folder(tiny_components, repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    run = tmp_path / "run"
    out = colodiffusion("train", *QUICK, "model.pretrained=test-org/tiny-sd", f"run.dir={run}",
                        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "final" / "model_index.json").is_file()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_single_file_trains(tmp_path, tiny_components, suffix):
    from sdfolder import make_diffusers_folder

    from colodiffusion.export import export

    single = export(make_diffusers_folder(tiny_components, tmp_path / "sd"), "single-file", tmp_path / f"m{suffix}")
    run = tmp_path / "run"
    out = colodiffusion("train", *QUICK, f"model.pretrained={single}", f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "final" / "model_index.json").is_file()


def test_scratch_over_a_folder_without_unet_trains(tmp_path, tiny_components):
    import shutil

    from sdfolder import make_diffusers_folder

    folder = make_diffusers_folder(tiny_components, tmp_path / "sd")
    shutil.rmtree(folder / "unet")
    run = tmp_path / "run"
    out = colodiffusion("train", *QUICK, f"model.pretrained={folder}", "model.init=scratch", f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "final" / "unet" / "config.json").is_file()


# -- small folders (item 2) ---------------------------------------------------------------------------

def test_twelve_images_train_with_first_stage_batches_that_fit(tmp_path):
    from datagen import make_folder

    images = make_folder(tmp_path / "my_images", 12)
    run = tmp_path / "run"
    out = colodiffusion("train", "data.source=folder", f"data.path={images}", "data.val_fraction=0.1",
                        "first_stage.steps=2", "first_stage.scale_samples=8", "train.max_steps=1",
                        "train.sample_every=0", "train.val_every=0", f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fewer than first_stage.batch_size=16: training the autoencoder with batches of 11" in out.stdout
    assert (run / "final" / "model_index.json").is_file()


# -- a corrupt image (item 3) -------------------------------------------------------------------------

def test_a_corrupt_image_is_said_and_neither_prompted_nor_counted(tmp_path):
    from datagen import make_folder, truncated_jpeg

    images = make_folder(tmp_path / "my_images", 12)
    (images / "000003.jpg").write_bytes(truncated_jpeg())  # index 3: one of the four the grid would pick
    (images / "000003.txt").write_text("a zorblax that cannot be seen")
    run = tmp_path / "run"
    out = colodiffusion("train", "data.source=folder", f"data.path={images}", "train.batch_size=4",
                        "first_stage.steps=1", "first_stage.batch_size=4", "first_stage.scale_samples=8",
                        "train.max_steps=1", "train.sample_every=1", "sample.steps=1", f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    said = [line for line in out.stdout.splitlines() if "000003.jpg" in line]
    assert said and "cannot be used and are skipped" in said[0], out.stdout
    assert "zorblax" not in out.stdout.replace(said[0], "")  # its caption is no sample prompt
    assert json.loads((run / "run_info.json").read_text())["num_train_images"] == 11


# -- signals in the first stage (item 4) --------------------------------------------------------------

def start_first_stage(tmp_path, name):
    """`colodiffusion train` with a first stage far longer than the test, once it has begun. SIGINT gets
    its default action back in the child: an xdist worker ignores it, and an ignored signal is inherited
    (Python then installs no KeyboardInterrupt handler, as for any background job)."""
    import signal
    import time

    err = tmp_path / f"{name}.err"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "colodiffusion", "train", *TINY, "first_stage.steps=1000000",
                             f"run.dir={tmp_path / name}"], stdout=subprocess.PIPE, stderr=err.open("w"), text=True,
                            env=env, cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while "first stage (autoencoder)" not in err.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
        time.sleep(0.2)
    return proc, err


@pytest.mark.slow  # two or three CLI processes (14-19 s): kept out of the quick tier
def test_sigterm_in_the_first_stage_stops_it_and_sigint_is_one_line(tmp_path):
    import signal

    proc, err = start_first_stage(tmp_path, "term")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert "stopped by SIGTERM during the first stage (autoencoder)" in out

    proc, err = start_first_stage(tmp_path, "int")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted (continue with train.resume=auto" in err.read_text()
    assert "Traceback" not in err.read_text()


# -- sample: --n has one meaning (item 7), prompt files (item 9) -------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_components):
    from sdfolder import make_diffusers_folder

    return make_diffusers_folder(tiny_components, tmp_path_factory.mktemp("model") / "sd")


def test_a_prompt_file_gives_each_line_its_options_and_n_samples_counts_images(tmp_path, tiny_model):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# kohya-style prompt file\na red circle --n blurry --d 7\n\na blue square --s 2\n")
    out = colodiffusion("sample", str(tiny_model), "--prompt-file", str(prompts), "--n-samples", "2", "--steps", "1",
                        "--out", str(tmp_path / "s"))
    assert out.returncode == 0, out.stderr[-3000:]
    params = [Image.open(tmp_path / "s" / f"{i:05d}.png").text["parameters"] for i in range(4)]
    assert not (tmp_path / "s" / "00004.png").exists()
    assert params[0].startswith("a red circle\nNegative prompt: blurry") and "Seed: 7" in params[0]
    assert "Seed: 8" in params[1] and "Steps: 1" in params[1]
    assert params[2].startswith("a blue square") and "Steps: 2" in params[2] and "Negative prompt" not in params[2]


# -- the seed's habits (item 6) -----------------------------------------------------------------------

@pytest.mark.parametrize("recipe, overrides", [("train_colossalai", "parallel.colossalai.plugin=torch_ddp precision=32 "
                                                                    "trainer.accelerator=cpu"),
                                              ("train_deepspeed", "precision=32 trainer.accelerator=cpu")])
def test_a_gpu_recipe_on_a_cpu_is_one_sentence_before_any_process_starts(tmp_path, recipe, overrides):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the recipe runs")
    model, cache = tmp_path / "sd15", tmp_path / "cache"
    model.mkdir()
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "--logdir", str(tmp_path), "-t", "-b",
                          f"configs/{recipe}.yaml", f"model.pretrained={model}", f"data.path={cache}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "launching" not in out.stdout, out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error")]  # once, not once per rank
    assert f"on a CPU give {overrides}" in line, line
    # with what it says, the refusal is gone (the run then needs a real model: not tried here)
    from colodiffusion.config import load_config
    from colodiffusion.parallel import check_devices

    check_devices(load_config(ROOT / "configs" / f"{recipe}.yaml", [f"model.pretrained={model}", f"data.path={cache}",
                                                                    *overrides.split()]))


def test_a_refusal_in_main_py_workers_is_their_sentences_without_torchruns_traceback(tmp_path):
    """`trainer.devices: 2` under main.py: what only the workers can see (here data that cannot be read) is
    one sentence per rank, exit code 2, and no ChildFailedError traceback from torchrun under it."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(4):
        (bad / f"{i}.jpg").write_text("not an image")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "main.py"),
            "--logdir",
            str(tmp_path / "logs"),
            "-t",
            "trainer.devices=2",
            "parallel.strategy=ddp",
            "data.source=folder",
            f"data.path={bad}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 2 and "launching" in out.stdout, out.stderr[-3000:]
    assert "error (rank 0): none of the 4 samples probed" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr, out.stderr[-3000:]


@pytest.mark.slow  # two or three CLI processes (14-19 s): kept out of the quick tier
def test_txt2img_takes_the_seeds_flags_and_its_last_ckpt(tmp_path, tiny_model):
    import shutil

    from PIL import Image

    run = tmp_path / "logs" / "2024-01-01T00-00-00_train_test"
    shutil.copytree(tiny_model, run / "final")
    (run / "checkpoints").mkdir()
    yaml_file = tmp_path / "v1-inference.yaml"
    yaml_file.write_text("model: {}\n")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--prompt", "a red circle", "--ckpt",
                          str(run / "checkpoints" / "last.ckpt"), "--config", str(yaml_file), "--fixed_code",
                          "--ddim_eta", "0.5", "--precision", "full", "--n_samples", "1", "--n_iter", "2",
                          "--ddim_steps", "2", "--C", "4", "--f", "2", "--outdir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "is the original project's name for the last checkpoint" in out.stderr and "--config is not used" in out.stdout
    )
    a, b = (Image.open(tmp_path / "out" / "samples" / f"{i:05d}.png") for i in range(2))
    assert a.text["parameters"] == b.text["parameters"] and a.tobytes() == b.tobytes()  # --fixed_code: same noise
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--ckpt", str(tiny_model), "--C", "8",
                          "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "1", "--outdir", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    assert bad.returncode == 2 and "--C 8 does not match the model, which has 4" in bad.stderr, bad.stderr[-2000:]


def test_without_ema_the_final_model_says_so_and_wandb_dir_is_honoured(tmp_path):
    pytest.importorskip("wandb")
    run, wandb_dir = tmp_path / "run", tmp_path / "wandb-here"
    wandb_dir.mkdir()
    out = colodiffusion("train", *QUICK, "train.ema.enabled=false", "log.report_to=wandb", f"run.dir={run}",
                        env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final model (trained weights) written" in out.stdout and "EMA" not in out.stdout
    # the libraries' own bars for the frozen parts it writes and reads back are not the run's output
    assert "Writing model shards" not in out.stderr and "Loading weights" not in out.stderr, out.stderr[-2000:]
    assert any((wandb_dir / "wandb").glob("offline-run-*")) and not (run / "wandb").exists()


# -- kohya's caption extension and dataset subsets (item 9) -------------------------------------------

SMALL = ["first_stage.steps=1", "first_stage.scale_samples=8", "train.batch_size=4", "train.max_steps=1",
         "train.sample_every=1", "sample.steps=1", "train.val_every=0"]


def folder_with(root: Path, n: int, ext: str, word: str) -> Path:
    from datagen import make_folder

    make_folder(root, n)
    for txt in root.glob("*.txt"):
        txt.rename(txt.with_suffix(ext)).write_text(f"{word}, {txt.with_suffix(ext).read_text()}")
    return root


def test_captions_in_dot_caption_files(tmp_path):
    images = folder_with(tmp_path / "imgs", 6, ".caption", "zorblax")
    run = tmp_path / "run"
    out = colodiffusion("train", "data.source=folder", f"data.path={images}", "data.caption_extension=.caption",
                        *SMALL, f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sample grids use captions from the data: ['zorblax, " in out.stdout


@pytest.mark.slow  # two or three CLI processes (14-19 s): kept out of the quick tier
def test_a_kohya_dataset_toml_with_two_subsets_trains(tmp_path):
    a = folder_with(tmp_path / "a", 4, ".txt", "alpha")
    b = folder_with(tmp_path / "b", 3, ".caption", "beta")
    (b / "000000.caption").unlink()  # class_tokens caption it
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"[general]\nshuffle_caption = true\nkeep_tokens = 1\nnum_repeats = 2\n\n[[datasets]]\n\n"
                    f"  [[datasets.subsets]]\n  image_dir = '{a}'\n  num_repeats = 3\n\n  [[datasets.subsets]]\n  "
                    f"image_dir = '{b}'\n  caption_extension = '.caption'\n  class_tokens = 'gamma thing'\n")
    run = tmp_path / "run"
    out = colodiffusion("train", "data.source=folder", f"data.dataset_config={toml}", *SMALL, f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "run_info.json").read_text())["num_train_images"] == 4 * 3 + 3 * 2  # [general]'s for b
    prompts = next(line for line in out.stdout.splitlines() if "sample grids use captions" in line)
    assert "alpha, " in prompts and "gamma thing" in prompts  # subset b: class_tokens for its image without one
    assert "cannot be used" not in out.stdout  # (b's other images have their .caption files read)
    bad = tmp_path / "bad.toml"
    bad.write_text(f"[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = '{a}'\n")
    out = colodiffusion("train", "data.source=folder", f"data.dataset_config={bad}")
    assert "'resolution' in [[datasets]] is set here with data.resolution" in one_sentence(out)


def test_a_recipe_with_data_subsets_trains(tmp_path):
    a = folder_with(tmp_path / "a", 4, ".txt", "alpha")
    b = folder_with(tmp_path / "b", 3, ".caption", "beta")
    recipe = tmp_path / "data.yaml"
    recipe.write_text(f"data:\n  source: folder\n  subsets:\n    - path: {a}\n      repeats: 3\n"
                      f"    - path: {b}\n      caption_extension: .caption\n      tag_dropout: 0.5\n")
    run = tmp_path / "run"
    out = colodiffusion("train", "-c", str(recipe), *SMALL, f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "run_info.json").read_text())["num_train_images"] == 4 * 3 + 3
    recipe.write_text(recipe.read_text().replace("caption_extension: .caption", "caption_extension: caption"))
    out = colodiffusion("train", "-c", str(recipe))
    assert "subset 2 of data.subsets: caption_extension 'caption' must start with a dot" in one_sentence(out)


@pytest.mark.slow  # two or three CLI processes (14-19 s): kept out of the quick tier
def test_every_exported_diffusers_folder_has_a_model_card(tmp_path):
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    out = colodiffusion("train", *QUICK, "train.lr=5e-4", f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    out = colodiffusion("export", str(run), "--format", "diffusers", "--out", str(tmp_path / "exported"))
    assert out.returncode == 0, out.stderr[-3000:]
    for folder in (run / "final", tmp_path / "exported"):
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
        assert "| learning_rate | 0.0005 |" in card.text and "| steps | 1 |" in card.text
        assert "StableDiffusionPipeline.from_pretrained" in card.text and str(tmp_path) not in card.content
    assert 'from_pretrained("run/final")' in (run / "final" / "README.md").read_text()
