import subprocess
import sys

import pytest

from colodiffusion.config import ConfigError, load_config, to_yaml


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.max_steps=7", "precision=bf16", "sample.prompts=[a,b]"])
    assert cfg.train.max_steps == 7 and cfg.precision == "bf16" and cfg.sample.prompts == ["a", "b"]
    assert cfg.model.preset == "tiny" and cfg.data.source == "shapes"


def test_yaml_file_and_roundtrip(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  batch_size: 16\nmodel:\n  preset: tiny\n")
    cfg = load_config(p, ["train.seed=3"])
    assert cfg.train.batch_size == 16 and cfg.train.seed == 3
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize("override, fragment", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("train.max_steps=abc", "'train.max_steps'"),
    ("precision=fp8", "allowed values are: fp32, bf16, fp16"),
    ("train.lr=-1", "'train.lr'"),
    ("data.resolution=30", "multiple of 8"),
    ("model.pretrained=/does/not/exist", "does not exist"),
    ("data.source=folder", "data.path"),
    ("train.resume=/no/such/ckpt", "train.resume"),
    ("train", "key=value"),
    ("sample.prompts=5", "config key 'sample.prompts' in override 'sample.prompts=5' must be a list"),
    ("train.ema=0.99", "'train.ema' in override 'train.ema=0.99' is a section, not a value; its keys are: enabled"),
])
def test_bad_input_is_one_sentence(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match="train.batchsize.*bad.yaml"):
        load_config(p)


@pytest.mark.parametrize("text, fragment", [
    ("train:\n  ema: 0.99\n", "config key 'train.ema' in '{p}' is a section, not a value; its keys are: enabled, "),
    ("parallel:\n  deepspeed: 3\n", "config key 'parallel.deepspeed' in '{p}' is a section, not a value"),
    ("- train\n- data\n", "config file '{p}' holds a list; a config is a mapping of sections"),
])
def test_a_yaml_section_given_a_value_is_named_and_an_empty_one_is_its_defaults(tmp_path, text, fragment):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert fragment.format(p=p) in str(e.value) and "\n" not in str(e.value)
    p.write_text("train:\n  # max_steps: 10 (commented out: the section is empty)\nprecision: bf16\n")
    cfg = load_config(p)
    assert cfg.precision == "bf16" and cfg.train.max_steps == load_config(None).train.max_steps


@pytest.mark.parametrize("text", ["hf_SECRETtoken123\n", "user:x:0:0:root:/root:/bin/bash\npassword hunter2\n"],
                         ids=["token", "passwd"])
def test_a_text_file_given_as_config_is_refused_without_echoing_it(tmp_path, text):
    p = tmp_path / "token.txt"  # e.g. `-c ~/.cache/huggingface/token` by mistake: its content is not printed
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "is not a config: its top level is not a mapping of sections" in str(e.value)
    assert "SECRET" not in str(e.value) and "hunter2" not in str(e.value) and "/bin/bash" not in str(e.value)


@pytest.mark.parametrize("args, fragment", [
    (["train.max_stepz=3"], "train.max_stepz"),
    (["train.batch_size=many"], "train.batch_size"),
    (["data.source=folder", "data.path=/nonexistent/folder"], "data.path"),
    (["-c", "/nonexistent.yaml"], "does not exist"),
])
def test_cli_exits_2_without_traceback(tmp_path, args, fragment):
    out = subprocess.run([sys.executable, "-m", "colodiffusion", "train", f"run.dir={tmp_path / 'r'}", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert fragment in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists(), "nothing may be written before the config is valid"


def test_a_later_file_fills_what_a_recipe_leaves_to_the_user(tmp_path):
    """-b recipe.yaml mine.yaml (merged left to right): a '???' of the recipe is given by the next file;
    one the next file does not give still stops the load with one sentence."""
    recipe, mine = tmp_path / "recipe.yaml", tmp_path / "mine.yaml"
    recipe.write_text("data:\n  source: folder\n  path: ???\ntrain:\n  max_steps: ???\n")
    images = tmp_path / "images"
    images.mkdir()
    mine.write_text(f"data:\n  path: {images}\n")
    with pytest.raises(ConfigError, match=r"^train.max_steps must be given"):
        load_config([recipe, mine])
    cfg = load_config([recipe, mine], ["train.max_steps=3"])
    assert cfg.data.path == str(images) and cfg.train.max_steps == 3


def test_interpolations_are_refused_so_no_secret_is_resolved_and_saved(tmp_path, monkeypatch):
    """`${oc.env:...}` would copy an environment variable (a token) into config.yaml, sample prompts
    and the tracker's project name; no value is ever resolved."""
    monkeypatch.setenv("MY_TOKEN", "hf_secret_value")
    recipe = tmp_path / "r.yaml"
    for text in ("log:\n  project: ${oc.env:MY_TOKEN}\n", "sample:\n  prompts: [a cat, '${oc.env:MY_TOKEN}']\n",
                 "train:\n  seed: 1\nrun:\n  dir: runs/${train.seed}\n"):
        recipe.write_text(text)
        with pytest.raises(ConfigError, match="is an interpolation") as err:
            load_config(recipe)
        assert "hf_secret_value" not in str(err.value) and "\n" not in str(err.value)
    for override in ("log.project=${oc.env:MY_TOKEN}", "sample.prompts=[${oc.env:MY_TOKEN}]",
                     "log.run_name=${oc.decode:${oc.env:MY_TOKEN}}"):
        with pytest.raises(ConfigError, match="is an interpolation") as err:
            load_config(None, [override])
        assert "hf_secret_value" not in str(err.value)
