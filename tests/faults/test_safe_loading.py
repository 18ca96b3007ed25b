"""Source scan: weights load only through safetensors or `torch.load(weights_only=True)`; no
pickle, no hub code, no `trust_remote_code` anywhere in the package."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "colodiffusion"
UNSAFE_MODULES = {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def scan(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(root.parent)
        if "trust_remote_code" in text:
            problems.append(f"{where}: mentions trust_remote_code")
        tree = ast.parse(text)
        for call in _calls(tree):
            name = _name(call.func)
            head, _, last = name.rpartition(".")
            if head.split(".")[0] in UNSAFE_MODULES and last in ("load", "loads", "Unpickler"):
                problems.append(f"{where}:{call.lineno}: unpickles with {name}")
            if name in ("torch.load", "torch.serialization.load"):
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in call.keywords)
                if not ok:
                    problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
    return problems


def test_package_loads_weights_safely():
    assert scan(SRC) == []


def test_the_scan_catches_unsafe_code(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "bad.py").write_text(
        "import torch\nimport pickle\nd = pickle.loads(b'')\na = torch.load('x')\nb = torch.load('x', "
        "weights_only=False)\nc = torch.load('x', "
        "weights_only=True)\nm = Model.from_pretrained('x', trust_remote_code=True)\n"
    )
    found = scan(pkg)
    assert len([p for p in found if "weights_only" in p]) == 2
    assert any("pickle" in p for p in found) and any("trust_remote_code" in p for p in found)


# -- behaviour: a payload in any file a resume or an export reads never runs ---------------------------
# The scan above cannot see unpickling inside torch DCP or DeepSpeed, so each file a resume (and an
# export) reads gets a pickle that would create a marker folder, the manifest is rewritten to match
# (an attacker can do that too), and the command must stop with one sentence, exit code 2, and no
# marker.

import dataclasses  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from faultkit import env, run_to_end  # noqa: E402

from colodiffusion.config import ConfigError  # noqa: E402
from colodiffusion.storage import checkpoint  # noqa: E402

STEP = "step_00000002"


class Payload:
    """Unpickling this calls os.mkdir(marker): the side effect the tests look for."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # ImportError, or Colossal-AI failing against this torch
        return False
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory, components):
    """A 2-step run (checkpoint at step 2) per checkpoint kind: single, ddp (DCP), deepspeed, colossalai."""
    root = tmp_path_factory.mktemp("kinds")
    out = {}
    for strategy in ("single", "ddp", "deepspeed", "colossalai"):
        if strategy in ("deepspeed", "colossalai") and not _installed(strategy):
            continue
        run_dir = root / strategy
        run_dir.mkdir()
        shutil.copytree(components, run_dir / "components")
        done = run_to_end(run_dir, "train.max_steps=2", f"parallel.strategy={strategy}")
        assert done.returncode == 0, done.stderr[-3000:]
        out[strategy] = run_dir
    return out


def _attack(runs, strategy: str, tmp_path: Path, craft) -> tuple[Path, Path]:
    if strategy not in runs:
        pytest.skip(f"{strategy} is not installed here (CI installs it: .ci/run)")
    run_dir = tmp_path / "run"
    shutil.copytree(runs[strategy], run_dir)
    folder = run_dir / "checkpoints" / STEP
    marker = tmp_path / "pwned"
    craft(folder, marker)
    checkpoint.write_manifest(folder, 2)
    return run_dir, marker


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "colodiffusion", *args], env=env(), capture_output=True,
                          text=True, timeout=600)


def _assert_refused(proc: subprocess.CompletedProcess, marker: Path, words: str = "refused") -> None:
    errors = [line[line.index("error: "):] for line in proc.stderr.splitlines() if "error: " in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and words in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "the pickle payload ran"


def _resume(run_dir: Path, strategy: str) -> subprocess.CompletedProcess:
    from faultkit import overrides

    return _cli("train", *overrides(run_dir, "train.max_steps=4", "train.resume=auto", f"parallel.strategy={strategy}"))


def _export(run_dir: Path) -> subprocess.CompletedProcess:
    return _cli("export", str(run_dir / "checkpoints" / STEP), "--format", "single-file", "--ema",
                "--out", str(run_dir.parent / "out.safetensors"))


def _pickle_payload(name: str):
    def craft(folder: Path, marker: Path) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump({"evil": Payload(marker)}, f)
    return craft


def _torch_payload(pattern: str):
    """Add the payload to a torch.save'd file of the checkpoint (matched by glob), keeping the rest."""
    def craft(folder: Path, marker: Path) -> None:
        path = next(folder.glob(pattern))
        state = torch.load(path, weights_only=False)  # our own file, read by the attacker
        state["evil"] = Payload(marker)
        torch.save(state, path)
    return craft


def _dcp_bytes_payload(folder: Path, marker: Path) -> None:
    """Point one of the DCP checkpoint's non-tensor values (an optimizer hyper-parameter, which torch
    stores as a torch.save'd blob and reads back with weights_only=False) at a payload appended to its shard."""
    meta_path = folder / "dcp" / ".metadata"
    with open(meta_path, "rb") as f:
        md = pickle.load(f)  # our own file, read by the attacker
    key = next(k for k in md.storage_data if k.fqn.endswith(".lr"))
    shard = folder / "dcp" / md.storage_data[key].relative_path
    blob = io.BytesIO()
    torch.save(Payload(marker), blob)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(blob.getvalue())
    md.storage_data[key] = dataclasses.replace(md.storage_data[key], offset=offset, length=len(blob.getvalue()))
    with open(meta_path, "wb") as f:
        pickle.dump(md, f)


RESUME_CASES = [
    ("ddp", "dcp/.metadata", _pickle_payload("dcp/.metadata")),
    ("ddp", "dcp/__0_0.distcp", _dcp_bytes_payload),
    ("ddp", "state.pt", _torch_payload("state.pt")),
    ("ddp", "rank_0.pt", _torch_payload("rank_0.pt")),
    ("single", "dcp/.metadata next to unet.safetensors", _pickle_payload("dcp/.metadata")),
    ("deepspeed", "ds/state/*model_states.pt", _torch_payload("ds/state/*model_states.pt")),
    ("deepspeed", "ds/state/*optim_states.pt", _torch_payload("ds/state/*optim_states.pt")),
    ("colossalai", "colossalai/optimizer.bin", _torch_payload("colossalai/optimizer.bin")),
]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,file,craft", RESUME_CASES, ids=[f"{s}:{f}" for s, f, _ in RESUME_CASES])
def test_a_payload_in_any_file_a_resume_reads_never_runs(runs, strategy, file, craft, tmp_path, report):
    if strategy == "single":  # a single-process checkpoint that also carries DCP metadata: which is read?
        run_dir, marker = _attack(runs, "single", tmp_path, lambda f, m: ((f / "dcp").mkdir(), craft(f, m)))
    else:
        run_dir, marker = _attack(runs, strategy, tmp_path, craft)
    report["faults_injected"]["malicious_pickle"] += 1
    proc = _resume(run_dir, strategy)
    if strategy == "single":  # its own weights are read; the stray metadata stays unread
        assert proc.returncode == 0 and not marker.exists(), proc.stderr[-3000:]
        return
    _assert_refused(proc, marker)


EXPORT_CASES = [("ddp", _pickle_payload("dcp/.metadata")), ("deepspeed", _torch_payload("ds/state/*model_states.pt")),
                ("deepspeed", _torch_payload("ds/state/*optim_states.pt"))]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,craft", EXPORT_CASES, ids=["dcp-metadata", "ds-model", "ds-optim"])
def test_a_payload_in_a_checkpoint_never_runs_on_export(runs, strategy, craft, tmp_path, report):
    run_dir, marker = _attack(runs, strategy, tmp_path, craft)
    report["faults_injected"]["malicious_pickle"] += 1
    _assert_refused(_export(run_dir), marker)


@pytest.mark.slow
def test_dcp_metadata_may_not_name_files_outside_its_folder(runs, tmp_path):
    """A shard path such as '../../secret' would let a checkpoint read any file into the model."""
    def craft(folder: Path, marker: Path) -> None:
        meta_path = folder / "dcp" / ".metadata"
        with open(meta_path, "rb") as f:
            md = pickle.load(f)
        key = next(iter(md.storage_data))
        md.storage_data[key] = dataclasses.replace(md.storage_data[key], relative_path="../state.pt")
        with open(meta_path, "wb") as f:
            pickle.dump(md, f)

    run_dir, marker = _attack(runs, "ddp", tmp_path, craft)
    _assert_refused(_export(run_dir), marker, words="outside its folder")


# -- single files: metadata never picks a path, and nesting is bounded ----------------------------------

def _our_single_file(tmp_path: Path) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from colodiffusion.config import Config
    from colodiffusion.diffusion import build_noise_scheduler
    from colodiffusion.models.single_file import save_single_file
    from colodiffusion.models.tokenizer import train_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                layers_per_block=1, sample_size=8)
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=1, vocab_size=300, max_position_embeddings=16))
    tok = train_clip_tokenizer(["a red circle"], vocab_size=300, max_length=16)
    return save_single_file(tmp_path / "ours.safetensors", unet, vae, text, tok,
                            build_noise_scheduler(Config().diffusion, "epsilon"))


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_tokenizer_metadata_cannot_write_outside_a_temporary_folder(tmp_path, where, capsys):
    """Our single files carry their tokenizer as {file name: text}; a crafted name must never pick the
    path that `export`, `sample`, `eval`, txt2img or model.pretrained would write to."""
    import json
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from colodiffusion.cli import main

    ours = _our_single_file(tmp_path)
    with safe_open(str(ours), framework="pt") as f:
        meta = f.metadata()
    inner = json.loads(meta["colodiffusion"])
    target = tmp_path / "written_by_the_file" if where == "absolute" else \
        Path(tempfile.gettempdir()) / f"written_by_the_file_{os.getpid()}"
    name = str(target) if where == "absolute" else f"../{target.name}"
    inner["tokenizer"][name] = "attacker's text"
    evil = tmp_path / "evil.safetensors"
    save_file(load_file(str(ours)), str(evil), metadata={**meta, "colodiffusion": json.dumps(inner)})

    with pytest.raises(SystemExit) as exit_:
        main(["export", str(evil), "--format", "diffusers", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "tokenizer" in err[0] and "refused" in err[0]
    assert not target.exists(), "the file's metadata chose a path and it was written"
    assert not (tmp_path / "out").exists()


def test_a_ckpt_that_contains_itself_is_refused_not_looped_over(tmp_path):
    from colodiffusion.models.single_file import read_checkpoint

    looped: dict = {}
    looped["state_dict"] = looped
    path = tmp_path / "loop.ckpt"
    torch.save(looped, path)

    def hang(*_):
        raise TimeoutError("read_checkpoint loops forever")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        with pytest.raises(ConfigError, match="nests 'state_dict'") as e:
            read_checkpoint(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "\n" not in str(e.value)
