"""The seed's command line (`python main.py ...`, the original latent-diffusion flags) and seed-style YAML."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from colodiffusion.config import ConfigError, load_config

from common import ROOT, TINY

SEED_LINE = ["--logdir", "/tmp", "-t", "--postfix", "test", "-b", "config/train_colossalai.yaml"]


@pytest.fixture(scope="module")
def seed_main():
    spec = importlib.util.spec_from_file_location("seed_main", ROOT / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_seed_line_parses_and_config_folder_is_the_shipped_recipe(seed_main):
    args, overrides = seed_main.parse(SEED_LINE)
    assert (args.logdir, args.train, args.postfix, args.base, overrides) == ("/tmp", True, "test",
                                                                             ["config/train_colossalai.yaml"], [])
    configs, extra, run_dir = seed_main.plan(args, [])
    assert configs == [str(ROOT / "configs" / "train_colossalai.yaml")]
    assert run_dir.parent == Path("/tmp") and run_dir.name.endswith("_train_colossalai_test")
    assert extra == [f"run.dir={run_dir}"]


def test_boolean_flags_take_a_word_but_never_an_override(seed_main):
    args, overrides = seed_main.parse(["-t", "train.max_steps=2", "--no-test", "-d", "False", "--scale_lr"])
    assert args.train and args.no_test and not args.debug and args.scale_lr
    assert overrides == ["train.max_steps=2"]
    args, _ = seed_main.parse(["-t", "false"])
    assert args.train is False


def test_resume_takes_a_run_or_checkpoint_folder_and_its_saved_config(seed_main, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  max_steps: 7\n")
    args, _ = seed_main.parse(["-t", "-r", str(run), "-b", "extra.yaml"])
    configs, extra, run_dir = seed_main.plan(args, [])
    assert configs[0] == str(run / "config.yaml") and run_dir == run  # the saved config, then -b on top
    assert extra == [f"run.dir={run}", "train.resume=auto"]
    args, _ = seed_main.parse(["-t", "-r", str(run / "checkpoints" / "step_00000002")])
    _, extra, run_dir = seed_main.plan(args, [])
    assert run_dir == run and extra[1] == f"train.resume={run / 'checkpoints' / 'step_00000002'}"
    for bad in (["-t", "-r", str(tmp_path / "nothing")], ["-t", "-r", str(run), "-n", "other"]):
        with pytest.raises(SystemExit) as exc:
            seed_main.plan(seed_main.parse(bad)[0], [])
        assert exc.value.code == 2


def test_scale_lr_is_the_originals_product(seed_main):
    cfg = load_config(None, ["train.batch_size=8", "train.grad_accum=2", "train.lr=1e-4"])
    assert seed_main.scaled_lr(cfg, "") == f"train.lr={8 * 1e-4!r}"  # 2 (accum) x 1 GPU x 4 per step x base
    assert seed_main.scaled_lr(cfg, "run") == f"train.lr={1e-4!r}"  # a resumed run keeps its saved rate


def test_several_base_configs_merge_left_to_right(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  lr: 0.1\n  max_steps: 5\n")
    b.write_text("train:\n  lr: 0.2\n")
    cfg = load_config([a, b], ["train.seed=3"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.seed) == (0.2, 5, 3)


def test_a_seed_style_yaml_gets_one_sentence_mapping_its_keys(tmp_path):
    seed = tmp_path / "v1-finetune.yaml"
    seed.write_text("model:\n  base_learning_rate: 1.0e-4\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
                    "  params:\n    timesteps: 1000\n    first_stage_config:\n      target: x\n"
                    "lightning:\n  trainer:\n    max_epochs: 2\n    accumulate_grad_batches: 4\n")
    with pytest.raises(ConfigError) as exc:
        load_config(seed)
    msg = str(exc.value)
    assert "\n" not in msg and "latent-diffusion layout" in msg
    for pair in ("model.base_learning_rate -> train.lr", "model.params.timesteps -> diffusion.num_train_timesteps",
                 "model.params.first_stage_config -> model.vae", "lightning.trainer.max_epochs -> train.max_epochs",
                 "lightning.trainer.accumulate_grad_batches -> train.grad_accum"):
        assert pair in msg
    assert "lightning.trainer.precision" not in msg  # only the keys the file has


def run_main(*argv, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *argv], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env=env)


def test_the_seed_line_verbatim_finds_the_recipe(tmp_path):
    logs = tmp_path / "logs"
    out = run_main("--logdir", str(logs), "-t", "--postfix", "test", "-b", "config/train_colossalai.yaml",
                   cwd=tmp_path)  # where no config/ folder exists, as on a fresh checkout
    assert f"note: using {ROOT / 'configs' / 'train_colossalai.yaml'}" in out.stdout
    assert "does not exist" not in out.stderr
    # The recipe leaves the model and the data to the user ('???'): one sentence naming both, exit 2, before
    # anything is launched or written (on any machine, GPU or not).
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert (
        out.stderr.startswith("error: model.pretrained and data.path must be given") and "Traceback" not in out.stderr
    )
    assert out.stderr.count("\n") == 1 and not (logs.exists() and any(logs.iterdir()))


@pytest.mark.slow
def test_seed_flags_train_test_debug_then_resume_with_the_saved_config(tmp_path, tiny_components):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  max_steps: 2\ndiffusion:\n  caption_dropout: 0.3\n")
    logdir = tmp_path / "logs"
    out = run_main("--logdir", str(logdir), "-t", "--postfix", "test", "-b", str(recipe), "-s", "5", "-p", "myproj",
                   "-d", *TINY, f"model.vae={tiny_components / 'vae'}", "sample.steps=2")
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = (logdir / "debug_runs").iterdir()  # -d: the new run's folder went to debug_runs/
    assert run.name.endswith("_recipe_test") and not [p for p in logdir.iterdir() if p.name != "debug_runs"]
    cfg = load_config(run / "config.yaml")
    assert (cfg.train.seed, cfg.log.project, cfg.diffusion.caption_dropout) == (5, "myproj", 0.3)
    assert json.loads((run / "test.json").read_text())["n"] == 12  # the test after training (not --no-test)

    out = run_main("-t", "-r", str(run), "train.max_steps=3", "--no-test")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in out.stdout
    cfg = load_config(run / "config.yaml")  # rewritten from the saved config, not from the defaults
    assert (cfg.train.seed, cfg.diffusion.caption_dropout, cfg.train.max_steps) == (5, 0.3, 3)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
