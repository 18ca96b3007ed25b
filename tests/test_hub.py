"""Hub ids (`model.pretrained=org/name`, with model.revision and model.variant) resolve through
huggingface_hub's cache. Every test is offline (HF_HUB_OFFLINE=1) against a cache folder it builds
itself, laid out as huggingface_hub writes it (refs/ -> snapshots/<commit>/); nothing touches the network."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from colodiffusion.config import ConfigError, load_config
from colodiffusion.models.loading import load_pretrained
from colodiffusion.train import preflight

from common import ROOT, TINY
from sdfolder import make_diffusers_folder

REPO = "test-org/tiny-sd"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_components) -> Path:
    """main -> snapshot A (UNet seed 0, plus an fp16 variant holding 2x its weights); tag v2 -> snapshot B (seed 1)."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / f"models--{REPO.replace('/', '--')}"
    a = make_diffusers_folder(tiny_components, repo / "snapshots" / COMMIT_A, seed=0)
    make_diffusers_folder(tiny_components, repo / "snapshots" / COMMIT_B, seed=1)
    doubled = {k: (2 * v).half() for k, v in load_file(str(a / UNET_FILE)).items()}
    save_file(doubled, str(a / "unet/diffusion_pytorch_model.fp16.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    (repo / "refs" / "v2").write_text(COMMIT_B)
    return root


@pytest.fixture
def offline(monkeypatch, hub_cache):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a stray request fails here, locally
    return hub_cache


def unet_weights(comps) -> dict:
    return comps.unet.state_dict()


def snapshot_unet(hub_cache: Path, commit: str) -> dict:
    return load_file(str(hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit / UNET_FILE))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_hub_id_loads_offline_from_the_cache_at_the_asked_revision(offline):
    cfg = load_config(None, [f"model.pretrained={REPO}"])  # accepted although no such local path exists
    assert_same(unet_weights(load_pretrained(REPO, cfg.model, cfg.diffusion)), snapshot_unet(offline, COMMIT_A))
    for revision in ("v2", COMMIT_B):
        cfg = load_config(None, [f"model.pretrained={REPO}", f"model.revision={revision}"])
        assert_same(unet_weights(load_pretrained(REPO, cfg.model, cfg.diffusion)), snapshot_unet(offline, COMMIT_B))


def test_variant_loads_the_variants_weights(offline):
    cfg = load_config(None, [f"model.pretrained={REPO}", "model.variant=fp16"])
    got = unet_weights(load_pretrained(REPO, cfg.model, cfg.diffusion))
    expected = {k: (2 * v).half().float() for k, v in snapshot_unet(offline, COMMIT_A).items()}
    assert_same(got, expected)


def test_hub_id_missing_from_the_offline_cache_is_one_sentence(offline):
    cfg = load_config(None, ["model.pretrained=test-org/not-cached"])
    with pytest.raises(ConfigError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE=1") as exc:
        load_pretrained("test-org/not-cached", cfg.model, cfg.diffusion)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, ["model.pretrained=no/such/../path"])


def test_only_safetensors_of_the_asked_variant_are_fetched():
    from huggingface_hub.utils import filter_repo_objects

    from colodiffusion.models.hub import weight_patterns

    files = [
        "model_index.json",
        "unet/config.json",
        UNET_FILE,
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/vocab.json",
        "v1-5-pruned.ckpt",
        "safety_checker/pytorch_model.bin",
    ]

    def fetched(variant):
        allow, ignore = weight_patterns(variant)
        return set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore or None))

    assert fetched(None) == {"model_index.json", "unet/config.json", UNET_FILE, "text_encoder/model.safetensors",
                             "tokenizer/vocab.json"}
    assert fetched("fp16") == {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                               "text_encoder/model.fp16.safetensors", "tokenizer/vocab.json"}


@pytest.mark.slow
def test_train_from_a_hub_id_with_hf_hub_offline(hub_cache, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache),
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "colodiffusion", "train", *TINY, "train.max_steps=1",
                          f"model.pretrained={REPO}", "model.revision=v2", f"run.dir={run}"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert load_config(run / "config.yaml").model.pretrained == REPO  # the id is kept, resolved again on resume
    # It trained from snapshot B (tag v2), not from main's A: one step away from B's UNet, far from A's.
    final = load_file(str(run / "final" / UNET_FILE))
    a, b = snapshot_unet(hub_cache, COMMIT_A), snapshot_unet(hub_cache, COMMIT_B)
    assert final.keys() == b.keys()

    def distance(x, y):
        return sum((x[k].float() - y[k].float()).square().sum().item() for k in x) ** 0.5

    assert 0 < distance(final, b) < distance(final, a) / 10, (distance(final, b), distance(final, a))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 1 and math.isfinite(losses[0])


def test_a_revision_or_ref_never_leads_out_of_the_cache(offline, tmp_path, tiny_components):
    """Offline, huggingface_hub joins the text of refs/<revision> to snapshots/: a ref that names a path
    would load whatever lies there; a revision with '..' would read a ref file elsewhere."""
    elsewhere = make_diffusers_folder(tiny_components, tmp_path / "elsewhere")
    repo = offline / f"models--{REPO.replace('/', '--')}"
    for name, target in (("escape", "../../../" + elsewhere.relative_to(offline.parent).as_posix()),
                         ("absolute", str(elsewhere))):
        (repo / "refs" / name).write_text(target)
        cfg = load_config(None, [f"model.pretrained={REPO}", f"model.revision={name}"])
        for reader in (lambda: load_pretrained(REPO, cfg.model, cfg.diffusion), lambda: preflight.unet_parameters(cfg)):
            with pytest.raises(ConfigError, match="is not a snapshot inside its Hugging Face cache folder") as err:
                reader()
            assert "\n" not in str(err.value)
    for revision in ("../../elsewhere", "main/../v2", "a\\b", "/etc"):
        with pytest.raises(ConfigError, match="give a branch, tag or commit name"):
            load_config(None, [f"model.pretrained={REPO}", f"model.revision={revision}"])
    load_config(None, [f"model.pretrained={REPO}", "model.revision=refs/pr/1"])  # the Hub's pull requests
