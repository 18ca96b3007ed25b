import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TINY  # noqa: E402


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory) -> Path:
    """Frozen parts (tokenizer, text encoder, first-stage VAE) built once and copied into runs."""
    import torch

    from colodiffusion.config import load_config
    from colodiffusion.data import build_dataset
    from colodiffusion.train.first_stage import frozen_components

    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("components")
    cfg = load_config(None, TINY)
    frozen_components(cfg, build_dataset(cfg), folder, torch.device("cpu"), show_progress=False)
    return folder


@pytest.fixture
def run_dir(tmp_path, tiny_components) -> Path:
    """A run folder that already holds the shared frozen components."""
    d = tmp_path / "run"
    shutil.copytree(tiny_components, d / "components")
    return d
