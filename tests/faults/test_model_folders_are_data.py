"""A model folder is data for every reader (train, export, sample, eval, txt2img): the same bounds,
no code named by model_index.json, no links out; exports and final/ are written beside and swapped in
whole, and a full disk is one sentence (issue 22, items 4, 6, 10 and 13)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError

from colodiffusion.config import ConfigError, load_config
from colodiffusion.export import export
from colodiffusion.generate import load_pipeline
from colodiffusion.models.loading import load_model, load_pretrained
from colodiffusion.storage.sealed import write_sealed

from common import ROOT, TINY

DISK_FULL = "I/O error: No space left on device (os error 28)"


@pytest.fixture(scope="module")
def model(tiny_components, tmp_path_factory) -> Path:
    """A tiny diffusers folder (exported by us, so sealed with a manifest)."""
    from sdfolder import make_diffusers_folder

    src = make_diffusers_folder(tiny_components, tmp_path_factory.mktemp("src") / "m")
    return export(src, "diffusers", tmp_path_factory.mktemp("model") / "m")


def _copy(model: Path, tmp_path: Path) -> Path:
    out = tmp_path / "crafted"
    shutil.copytree(model, out)
    (out / "manifest.json").unlink(missing_ok=True)  # crafted folders are not ours: no seal to match
    return out


def _edit(path: Path, **change) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


def _too_many_layers(folder: Path) -> None:
    _edit(folder / "unet" / "config.json", layers_per_block=200_000)  # main builds them all, without end


def _load_for_training(folder: Path):
    cfg = load_config(None, [f"model.pretrained={folder}"])
    return load_pretrained(folder, cfg.model, cfg.diffusion)


READERS = {
    "sample/eval/txt2img": lambda folder: load_pipeline(folder),
    "export": lambda folder: load_model(folder),
    "train": lambda folder: _load_for_training(folder),
}
CRAFTS = {
    "layers": (_too_many_layers, "describes a UNet with"),
    "timesteps": (lambda f: _edit(f / "scheduler" / "scheduler_config.json", num_train_timesteps=5 * 10**7),
                  "asks for a noise schedule of 50000000 steps"),
    "link": (lambda f: ((f / "tokenizer" / "tokenizer.json").unlink(), (f / "tokenizer" / "tokenizer.json").symlink_to(
        f.parent / "outside.json"), (f.parent / "outside.json").write_text("{}")), "is a link to"),
}


@pytest.mark.parametrize("craft", CRAFTS)
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_of_a_model_folder_applies_the_same_bounds(model, tmp_path, reader, craft):
    folder = _copy(model, tmp_path)
    change, words = CRAFTS[craft]
    change(folder)
    with pytest.raises(ConfigError, match=words) as err:
        READERS[reader](folder)
    assert "\n" not in str(err.value)


def test_the_train_preflight_bounds_the_unet_it_counts(model, tmp_path):
    """`train` counts the UNet's parameters (for the disk space check) before it loads the model."""
    from colodiffusion.train import preflight

    folder = _copy(model, tmp_path)
    _too_many_layers(folder)
    with pytest.raises(ConfigError, match="describes a UNet with"):
        preflight.unet_parameters(load_config(None, [f"model.pretrained={folder}"]))


def test_a_received_run_folders_components_are_bounded(model, tmp_path):
    """`export RUN` rebuilds the run from its components/: a received run's text encoder config is data."""
    crafted = _copy(model, tmp_path)
    _edit(crafted / "text_encoder" / "config.json", num_hidden_layers=10**7)
    comps = tmp_path / "run" / "components"
    for part in ("tokenizer", "text_encoder", "vae"):  # sealed, as a run writes them
        write_sealed(comps / part, lambda d, part=part: shutil.copytree(crafted / part, d, dirs_exist_ok=True))
    from colodiffusion.models.components import build_fresh_components

    cfg = load_config(None, TINY)
    with pytest.raises(ConfigError, match="describes a text encoder with 10000000 layers"):
        build_fresh_components(cfg, comps, captions=lambda: [], train_vae=lambda v: v)


def _evil(folder: Path, marker: Path) -> None:
    code = f"open({str(marker)!r}, 'w').write('ran')\nclass Evil:\n    pass\n"
    (folder / "evil.py").write_text(code)  # importable when the folder is the working directory
    (folder / "unet" / "evil.py").write_text(code)  # a "custom component" of diffusers
    _edit(folder / "model_index.json", unet=["evil", "Evil"])


def test_a_crafted_model_index_naming_python_code_runs_nothing(model, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    folder, marker = _copy(model, tmp_path), tmp_path / "ran"
    _evil(folder, marker)
    monkeypatch.syspath_prepend(str(folder))  # as `python -m colodiffusion sample .` run inside the folder
    for reader in READERS.values():
        with pytest.raises(ConfigError, match="names 'evil' as the library of its part 'unet'"):
            reader(folder)
    # The installed diffusers (our floor) refuses it by itself too, also where our check is not in the way.
    with pytest.raises(ValueError):
        StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert not marker.exists() and "evil" not in sys.modules


def test_the_diffusers_floor_is_a_version_that_imports_no_code_from_model_index():
    from importlib.metadata import version

    from packaging.version import Version

    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"diffusers>=([0-9.]+)"', text).group(1)
    # 0.42.1 is the first that imports only diffusers/transformers (and modules already imported) for
    # the libraries model_index.json names; 0.38-0.42.0 import any module by name, <=0.37 a .py in the folder.
    assert Version(floor) >= Version("0.42.1")
    assert Version(version("diffusers")) >= Version(floor)
    assert re.search(r'requires-python = ">=3\.11"', text)  # what diffusers 0.42.1 requires


def test_diffusers_export_into_an_existing_folder_is_all_or_nothing(model, tmp_path, monkeypatch):
    import colodiffusion.export as export_module

    out = export(model, "diffusers", tmp_path / "out")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = export_module.export_diffusers

    def disk_full_half_way(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        (Path(folder) / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr(export_module, "export_diffusers", disk_full_half_way)
    with pytest.raises(ConfigError) as err:
        export(model, "diffusers", out, dtype="fp16")
    msg = str(err.value)
    assert "No space left on device" in msg and "unchanged" in msg and "\n" not in msg
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written beside it
    load_pipeline(out)
    weights = out / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # cut short after it was written
    with pytest.raises(ConfigError, match="cut short or altered"):
        load_pipeline(out)


def test_export_never_replaces_a_folder_that_is_not_ours(model, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for fmt in ("diffusers", "lora"):
        with pytest.raises(ConfigError, match="is not a model folder we wrote"):
            export(model, fmt, mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_a_full_disk_while_writing_final_is_one_sentence_and_leaves_no_temporary_folder(tmp_path):
    def disk_full(folder):
        (folder / "unet").mkdir()
        (folder / "unet" / "weights.safetensors").write_bytes(b"half")
        raise SafetensorError(DISK_FULL)

    with pytest.raises(ConfigError) as err:
        write_sealed(tmp_path / "final", disk_full, hint="rerun with train.resume=auto")
    msg = str(err.value)
    assert msg.startswith(f"could not write '{tmp_path / 'final'}' (No space left on device)")
    assert msg.endswith("rerun with train.resume=auto") and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_a_run_whose_disk_fills_while_writing_final_says_how_to_finish(run_dir, monkeypatch):
    from colodiffusion.train import loop, outputs

    def disk_full(folder, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "export_diffusers", disk_full)
    with pytest.raises(ConfigError) as err:
        loop.train(load_config(None, [*TINY, f"run.dir={run_dir}", "train.max_steps=1"]))
    assert "No space left on device" in str(err.value) and "train.resume=auto" in str(err.value)
    assert (run_dir / "checkpoints" / "step_00000001").is_dir() and not (run_dir / ".tmp-final").exists()


def test_a_received_run_folders_final_that_links_out_is_not_loaded(model, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / "final").symlink_to(_copy(model, tmp_path))
    for reader in (load_pipeline, load_model):  # sample/eval, export
        with pytest.raises(ConfigError, match="outside"):
            reader(run)


@pytest.mark.parametrize("files", [
    lambda secret: {"../secret.txt": {"size": secret.stat().st_size, "sha256": "0" * 64}},  # a name leading out
    lambda secret: {"weights.safetensors": {"size": secret.stat().st_size, "sha256": "0" * 64}},  # a link out
    lambda secret: ["weights.safetensors"],  # not an object: was an AttributeError traceback
    lambda secret: {"weights.safetensors": 5},  # was a TypeError traceback
])
def test_a_received_folders_manifest_never_leads_outside_it(tmp_path, files):
    from colodiffusion.storage.checkpoint import CheckpointError, verify

    secret = tmp_path / "secret.txt"
    secret.write_text("hf_token")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "weights.safetensors").symlink_to(secret)
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "step": 3, "files": files(secret)}))
    opened = []
    real_open = open
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("builtins.open", lambda p, *a, **k: opened.append(Path(p).resolve()) or real_open(p, *a, **k))
        with pytest.raises(CheckpointError, match="leads outside it|unreadable manifest.json") as err:
            verify(folder)
    assert secret.resolve() not in opened and "\n" not in str(err.value)
