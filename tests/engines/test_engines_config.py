"""Config and launch contract of the engines: the seed's spellings, ZeRO stages per strategy, the
DeepSpeed JSON built from our config and the checks on a user's, and one-sentence errors."""

from __future__ import annotations

import json

import pytest

from colodiffusion.config import ConfigError, load_config
from colodiffusion.parallel import check_launch


@pytest.mark.parametrize("spelling, want", [("16", "fp16"), ("32", "fp32"), ("bf16", "bf16"), ("16-mixed", "fp16"),
                                            ("bf16-mixed", "bf16"), ("fp32", "fp32")])
def test_seed_precision_spellings(spelling, want):
    assert load_config(None, [f"precision={spelling}"]).precision == want


def test_precision_16_as_yaml_int(tmp_path):
    (tmp_path / "c.yaml").write_text("precision: 16\n")
    assert load_config(tmp_path / "c.yaml").precision == "fp16"
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["precision=8"])


def test_zero_stages_per_strategy():
    assert load_config(None, ["parallel.strategy=deepspeed", "parallel.zero=1"]).parallel.zero == 1
    with pytest.raises(ConfigError, match="fsdp"):
        load_config(None, ["parallel.strategy=fsdp", "parallel.zero=1"])
    with pytest.raises(ConfigError, match="parallel.zero"):
        load_config(None, ["parallel.strategy=deepspeed", "parallel.zero=4"])
    with pytest.raises(ConfigError, match="gemini"):
        load_config(None, ["parallel.strategy=colossalai", "parallel.colossalai.plugin=low_level_zero",
                           "parallel.zero=3"])


def test_deepspeed_config_path_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        load_config(None, ["parallel.strategy=deepspeed", f"parallel.deepspeed.config={tmp_path / 'nope.json'}"])
    (tmp_path / "ds.json").write_text("{}")
    with pytest.raises(ConfigError, match="only read by parallel.strategy=deepspeed"):
        load_config(None, ["parallel.strategy=ddp", f"parallel.deepspeed.config={tmp_path / 'ds.json'}"])


def test_an_engines_options_live_under_it_and_its_flat_keys_still_read(tmp_path):
    """parallel.deepspeed.* / parallel.colossalai.*; the flat keys of earlier recipes are read as those."""
    flat = load_config(None, ["parallel.strategy=colossalai", "parallel.plugin=low_level_zero", "parallel.zero=2"])
    assert flat.parallel.colossalai.plugin == "low_level_zero"
    (tmp_path / "old.yaml").write_text("parallel:\n  strategy: deepspeed\n  offload_params: true\n")
    assert load_config(tmp_path / "old.yaml").parallel.deepspeed.offload_params is True
    (tmp_path / "both.yaml").write_text("parallel:\n  strategy: colossalai\n  plugin: gemini\n"
                                        "  colossalai:\n    plugin: torch_ddp\n")
    with pytest.raises(ConfigError, match="sets both parallel.plugin and parallel.colossalai.plugin"):
        load_config(tmp_path / "both.yaml")
    with pytest.raises(ConfigError, match=r"^parallel.colossalai.plugin is only read by "
                                          r"parallel.strategy=colossalai \(strategy is ddp\)"):
        load_config(None, ["parallel.strategy=ddp", "parallel.colossalai.plugin=gemini"])
    with pytest.raises(ConfigError, match="'parallel.deepspeed' in override .* is a section, not a value; its keys "
                                          "are: offload_params, config"):
        load_config(None, ["parallel.deepspeed=3"])


def test_built_deepspeed_json():
    from colodiffusion.parallel.deepspeed import ds_config

    cfg = load_config(None, ["parallel.strategy=deepspeed", "parallel.zero=3", "parallel.offload=cpu",
                             "parallel.deepspeed.offload_params=true", "train.batch_size=32", "train.grad_accum=2",
                             "precision=bf16", "train.grad_clip=0.5"])
    ds = ds_config(cfg, dp_size=4, on_cuda=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        32,
        4,
        2,
    )
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 4 * ds["gradient_accumulation_steps"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    plain = ds_config(load_config(None, ["parallel.strategy=deepspeed", "parallel.zero=2"]), 1, False)
    assert "offload_optimizer" not in plain["zero_optimization"] and "offload_param" not in plain["zero_optimization"]


def user_json(tmp_path, content, extra=()):
    from colodiffusion.parallel.deepspeed import ds_config, user_ds_config

    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    cfg = load_config(None, ["parallel.strategy=deepspeed", f"parallel.deepspeed.config={path}",
                             "train.batch_size=16", *extra])
    return user_ds_config(cfg, ds_config(cfg, dp_size=2, on_cuda=False))


def test_user_deepspeed_json_overrides_sections_and_fills_auto(tmp_path):
    ds = user_json(tmp_path, {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 8,
                              "zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}, "steps_per_print": 7})
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["zero_optimization"]["stage"] == 1 and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["steps_per_print"] == 7


@pytest.mark.parametrize("content, match", [
    ("{not json", "not a readable JSON"),
    ("[1, 2]", "JSON object"),
    ({"train_batch_size": 64}, "train_batch_size=64.*16"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
    ({"optimizer": {"type": "Adam"}}, "'optimizer' section"),
    ({"fp16": {"enabled": True}}, "fp16.enabled=true but precision=fp32"),
])
def test_user_deepspeed_json_errors(tmp_path, content, match):
    with pytest.raises(ConfigError, match=match):
        user_json(tmp_path, content)


def test_devices_and_accelerator_are_checked_against_the_launch(monkeypatch):
    import torch

    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(load_config(None, ["trainer.devices=1"]))
    with pytest.raises(ConfigError, match="trainer.devices=4 but 1 process.*torchrun --nproc_per_node 4"):
        check_launch(load_config(None, ["trainer.devices=4"]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            check_launch(load_config(None, ["trainer.accelerator=gpu"]))
        check_launch(load_config(None, ["trainer.accelerator=cpu"]))


@pytest.mark.no_cuda  # with a GPU these plugins are allowed (deselected there, tests/conftest.py)
@pytest.mark.parametrize("plugin", ["gemini", "low_level_zero"])
def test_colossalai_zero_plugins_need_cuda(plugin):
    from colodiffusion.parallel import build_backend

    with pytest.raises(ConfigError, match=f"parallel.colossalai.plugin={plugin} runs only on CUDA"):
        build_backend(load_config(None, ["parallel.strategy=colossalai", f"parallel.colossalai.plugin={plugin}",
                                         "parallel.zero=2", "precision=bf16", "train.ema.enabled=false"]))


def test_deepspeed_param_offload_needs_zero3():
    from colodiffusion.parallel import build_backend

    with pytest.raises(ConfigError, match="offload_params=true needs parallel.zero=3"):
        build_backend(
            load_config(None, ["parallel.strategy=deepspeed", "parallel.zero=2",
                               "parallel.deepspeed.offload_params=true"])
        )


def test_max_epochs_becomes_steps():
    from types import SimpleNamespace

    from colodiffusion.train.loop import apply_max_epochs

    backend = SimpleNamespace(dp_size=2, is_main=False)
    cfg = load_config(None, ["train.max_epochs=3", "train.batch_size=8", "train.max_steps=1000"])
    apply_max_epochs(cfg, backend, range(64))  # 32 samples per rank, 4 per rank-step: 8 steps an epoch
    assert cfg.train.max_steps == 24
    capped = load_config(None, ["train.max_epochs=3", "train.batch_size=8", "train.max_steps=5"])
    apply_max_epochs(capped, backend, range(64))
    assert capped.train.max_steps == 5


GEMINI = ["parallel.strategy=colossalai", "parallel.colossalai.plugin=gemini", "precision=bf16",
          "train.ema.enabled=false"]


@pytest.mark.parametrize(
    "policy, want",
    [
        (
            "cuda",
            {
                "placement_policy": "static",
                "shard_param_frac": 1.0,
                "offload_optim_frac": 0.0,
                "offload_param_frac": 0.0,
            },
        ),
        (
            "cpu",
            {
                "placement_policy": "static",
                "shard_param_frac": 1.0,
                "offload_optim_frac": 1.0,
                "offload_param_frac": 1.0,
            },
        ),
        ("auto", {"placement_policy": "auto"}),
    ],
)
def test_gemini_takes_the_seeds_placement_policies(policy, want):
    from colodiffusion.parallel.colossalai import gemini_placement

    cfg = load_config(None, GEMINI + [f"parallel.colossalai.placement_policy={policy}"])
    assert gemini_placement(cfg.parallel.colossalai) == want


def test_gemini_static_fractions_and_their_conflicts():
    from colodiffusion.parallel.colossalai import gemini_placement

    cfg = load_config(None, GEMINI + ["parallel.colossalai.placement_policy=static",
                                      "parallel.colossalai.offload_optim_frac=0.5"])
    assert gemini_placement(cfg.parallel.colossalai) == {"placement_policy": "static", "shard_param_frac": 1.0,
                                              "offload_optim_frac": 0.5, "offload_param_frac": 0.0}
    with pytest.raises(ConfigError, match="parallel.colossalai.offload_optim_frac is read only with "
                                          "parallel.colossalai.placement_policy=static"):
        load_config(None, GEMINI + ["parallel.colossalai.placement_policy=cpu",
                                    "parallel.colossalai.offload_optim_frac=0.5"])
    with pytest.raises(ConfigError, match="allowed values are: static, cuda, cpu, auto"):
        load_config(None, GEMINI + ["parallel.colossalai.placement_policy=gpu"])


@pytest.mark.parametrize("precision", ["32", "fp32", "32-true"])
def test_gemini_refuses_fp32_in_one_sentence(precision):
    with pytest.raises(
        ConfigError, match=r"^parallel.colossalai.plugin=gemini computes in fp16 or bf16 only \(precision is fp32\)"
    ):
        load_config(None, GEMINI + [f"precision={precision}"])
    load_config(
        None, ["parallel.strategy=colossalai", "parallel.colossalai.plugin=low_level_zero", "parallel.zero=2",
               "precision=32"]
    )  # takes fp32


def test_gemini_fp32_is_refused_before_main_py_launches(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "sd15").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(root / "main.py"), "-t", "-b", "configs/train_colossalai.yaml", "-l",
                           str(tmp_path / "logs"), f"model.pretrained={tmp_path / 'sd15'}",
                           f"data.path={tmp_path / 'cache'}", "precision=32"],
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root / "src")}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "computes in fp16 or bf16 only" in proc.stderr
    assert "launching" not in proc.stdout and "Traceback" not in proc.stderr and not (tmp_path / "logs").exists()


def test_gemini_gets_colossalais_adam_with_the_trainers_settings(monkeypatch):
    """GeminiOptimizer accepts only Colossal-AI's Adams: the backend asks the trainer for its AdamW
    settings on HybridAdam (stood in for here: its kernels need CUDA)."""
    import torch

    from colodiffusion.parallel import colossalai as cai
    from colodiffusion.train.optim import build_optimizer

    class StandIn(torch.optim.AdamW):
        pass

    monkeypatch.setattr(cai, "hybrid_adam", lambda: StandIn)
    cfg = load_config(None, GEMINI + ["train.lr=3e-4", "train.adam_beta2=0.99", "train.weight_decay=0.05"])
    backend = object.__new__(cai.ColossalAIBackend)  # no process group or Booster: only prepare's wiring
    backend.cfg, backend.device, backend._model_factory = cfg, torch.device("cpu"), None
    backend.booster = type("B", (), {"boost": staticmethod(lambda m, o: (m, o))})()
    model = torch.nn.Linear(3, 2)
    _, opt = backend.prepare(model, lambda params, **kw: build_optimizer(params, cfg, torch.device("cpu"), **kw))
    assert type(opt) is StandIn and backend.wrapped_optimizer is opt
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["weight_decay"]) == (3e-4, (0.9, 0.99), 0.05)
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    with pytest.raises(ConfigError, match="HybridAdam"):
        load_config(None, GEMINI + ["perf.optimizer=adamw8bit"])
