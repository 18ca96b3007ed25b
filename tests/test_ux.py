"""Messages and the command line (issue 14, items 5 and "Sampling"): YAML errors say where, `colodiffusion
config` prints the effective config and every key's help, image sizes that diffusers would silently
replace are refused, the parser needs neither torch nor diffusers (quick `--help`), and per-prompt
sample options parse as kohya's prompt files do.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from colodiffusion.config import (KARRAS_SAMPLERS, SAMPLER_NAMES, Config, ConfigError, _walk, describe, field_docs,
                                  load_config, parse_prompt)

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "colodiffusion", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# -- YAML errors --------------------------------------------------------------------------------------

def test_yaml_syntax_error_names_line_and_column(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  batch_size: 4\n  lr: [1e-3\nmodel:\n  preset: tiny\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "line 4, column 6" in msg and "line 3, column 7" in msg and "\n" not in msg


def test_yaml_tab_indentation_is_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n\tbatch_size: 4\n")
    with pytest.raises(ConfigError, match="line 2, column 1.*tabs"):
        load_config(p)


# -- colodiffusion config -----------------------------------------------------------------------------

def test_config_command_prints_the_effective_config(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  batch_size: 8\n")
    out = cli("config", "-c", str(recipe), "train.lr=0.5")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["train"]["batch_size"] == 8 and printed["train"]["lr"] == 0.5
    assert printed["model"]["preset"] == "tiny"  # defaults are printed too: it is the effective config
    bad = cli("config", "train.lr=-1")
    assert bad.returncode == 2 and "train.lr" in bad.stderr and "Traceback" not in bad.stderr


def test_config_all_lists_every_key_with_its_default_and_help():
    cfg = load_config(None, ["train.lr=0.5"])
    text = describe(cfg)
    docs = field_docs()
    for path, f, _ in _walk(cfg):
        assert f"\n{path} = " in "\n" + text, f"{path} is missing"
    assert "train.lr = 0.5  (default: 0.001)" in text
    assert "model.preset = tiny  [tiny | sd15 | sd2 | sdxl]" in text
    assert docs["train.lr"] == "Peak learning rate." and "    Peak learning rate." in text
    assert "(default" not in text.split("train.max_steps = ")[1].splitlines()[0]  # unchanged keys show no default


def test_every_config_key_has_a_docstring():
    docs = field_docs()
    assert set(docs) == {path for path, _, _ in _walk(Config())}
    assert [k for k, v in docs.items() if not v] == []


# -- --help without heavy imports ---------------------------------------------------------------------

def test_the_parser_imports_neither_torch_nor_diffusers():
    code = ("import sys, colodiffusion.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for command in ("sample", "bench", "config"):
        assert cli(command, "--help").returncode == 0


def test_sampler_names_match_the_registry():
    import inspect

    from colodiffusion.diffusion.samplers import SAMPLERS

    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    for name in SAMPLER_NAMES:
        takes_karras = "use_karras_sigmas" in inspect.signature(SAMPLERS[name][0].__init__).parameters
        assert takes_karras == (name in KARRAS_SAMPLERS), name
    assert Config().sample.sampler in SAMPLER_NAMES
    assert dataclasses.fields(Config().sample)[4].metadata["choices"] == SAMPLER_NAMES  # sample.sampler


# -- image sizes --------------------------------------------------------------------------------------

def fake_pipe(sample_size=16, vae_scale_factor=2):
    return SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=sample_size)),
                           vae_scale_factor=vae_scale_factor)


def test_a_side_that_is_not_a_multiple_of_8_is_refused():
    from colodiffusion.generate import image_size

    with pytest.raises(ConfigError, match="height 30 is not a multiple of 8; use 24 or 32"):
        image_size(fake_pipe(), 30, None)
    # diffusers resets *both* sides to the model's when one is missing; here the missing one is the model's
    assert image_size(fake_pipe(), 48, None) == (48, 32)
    assert image_size(fake_pipe(), None, None) == (32, 32)


def test_sample_refuses_height_30_with_one_sentence(tmp_path):
    out = cli("sample", str(tmp_path / "no-model"), "--prompt", "x", "--height", "30")
    assert out.returncode == 2
    assert "--height 30 is not a multiple of 8; use 24 or 32." in out.stderr and "Traceback" not in out.stderr


# -- per-prompt options -------------------------------------------------------------------------------

def test_prompt_options_follow_kohyas_prompt_files():
    spec = parse_prompt("a dog, on grass --n blurry, low quality --s 30 --l 7.5 --d 3 --w 512 --h 256 --ss euler "
                        "--karras")
    assert (spec.prompt, spec.negative_prompt, spec.steps, spec.guidance, spec.seed) == \
        ("a dog, on grass", "blurry, low quality", 30, 7.5, 3)
    assert (spec.width, spec.height, spec.sampler, spec.karras) == (512, 256, "euler", True)
    assert parse_prompt("a cat").negative_prompt is None


def test_sample_specs_fill_the_defaults_and_count_seeds():
    cfg = load_config(None, ["sample.prompts=[a,b --d 9 --n red]", "sample.negative_prompt=ugly", "sample.seed=5"])
    a, b = cfg.sample.specs()
    assert (a.prompt, a.seed, a.negative_prompt, a.steps, a.sampler) == ("a", 5, "ugly", 25, "ddim")
    assert (b.prompt, b.seed, b.negative_prompt) == ("b", 9, "red")


@pytest.mark.parametrize("prompt, fragment", [
    ("a --x 1", "unknown option '--x'"),
    ("a --s many", "--s needs a whole number"),
    ("a --karras", "Karras sigmas need a k-sampler"),
    ("a --w 30", "width 30 is not a multiple of 8; use 24 or 32"),
    ("a --i /no/such.png", "init image '/no/such.png' is not a file"),
    ("a --strength 0.5", "strength needs an init image"),
    ("a --ss plms", "sampler 'plms' is not one of"),
])
def test_bad_prompt_options_are_one_sentence_at_config_load(prompt, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"sample.prompts=['{prompt}']"])
    assert fragment in str(e.value) and "sample.prompts" in str(e.value) and "\n" not in str(e.value)


def test_karras_needs_a_k_sampler():
    with pytest.raises(ConfigError, match="sample.karras=true needs a k-sampler"):
        load_config(None, ["sample.karras=true"])
    assert load_config(None, ["sample.karras=true", "sample.sampler=dpm++"]).sample.karras


def test_sample_flags_fill_what_a_prompt_leaves_out():
    from colodiffusion.cli import build_parser, sample_specs

    args = build_parser().parse_args(
        [
            "sample",
            "m",
            "--prompt",
            "a",
            "--prompt",
            "b --d 42 --n red --s 7",
            "--n-samples",
            "2",
            "--negative-prompt",
            "ugly",
            "--seed",
            "5",
            "--sampler",
            "euler",
            "--karras",
        ]
    )
    specs = sample_specs(args)
    assert [(s.prompt, s.seed, s.negative_prompt, s.steps) for s in specs] == [
        ("a", 5, "ugly", 25), ("a", 6, "ugly", 25), ("b", 42, "red", 7), ("b", 43, "red", 7)]
    assert all(s.sampler == "euler" and s.karras for s in specs)
    bad = build_parser().parse_args(["sample", "m", "--prompt", "a", "--karras"])  # dpm++ by default: fine
    assert sample_specs(bad)[0].karras
    with pytest.raises(ConfigError, match="Karras sigmas need a k-sampler"):
        sample_specs(build_parser().parse_args(["sample", "m", "--prompt", "a", "--karras", "--sampler", "ddim"]))
