"""Speed/memory levers (train/perf.py, train/master_weights.py, train/optim.py) and `colodiffusion bench`.

Every lever's code path runs here on the CPU with the tiny preset; timings and GPU memory are
measured by bench/ scripts, never asserted. torch.compile itself only runs in a slow test, with
dynamo's eager backend (no inductor code generation)."""

import copy
import json
import sys

import pytest
import torch

from colodiffusion import bench  # noqa: E402
from colodiffusion.config import ConfigError, load_config  # noqa: E402
from colodiffusion.models.presets import build_unet, get_preset  # noqa: E402
from colodiffusion.parallel import plain_copy  # noqa: E402
from colodiffusion.train.master_weights import MasterWeightOptimizer  # noqa: E402
from colodiffusion.train.optim import build_optimizer  # noqa: E402
from colodiffusion.train.perf import (  # noqa: E402
    FastAttnProcessor,
    apply_perf,
    compile_unet,
    convert_fp8,
    select_checkpointing,
    unet_blocks,
)

CPU = torch.device("cpu")


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return build_unet(get_preset("tiny"))


def tiny_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([3, 700][:batch]),
            torch.randn(batch, 24, 128, generator=g))


def forward_backward(unet, inputs):
    unet.zero_grad(set_to_none=True)
    out = unet(*inputs).sample
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


# -- config ---------------------------------------------------------------------------------------
def test_perf_config_defaults_and_errors():
    cfg = load_config(None, [])
    assert cfg.perf.compile == "none" and cfg.perf.param_dtype == "fp32" and not cfg.perf.optimizer_offload
    with pytest.raises(ConfigError, match="perf.param_dtype=bf16 needs precision=bf16"):
        load_config(None, ["perf.param_dtype=bf16"])
    with pytest.raises(ConfigError, match="perf.compile"):
        load_config(None, ["perf.compile=everything"])
    with pytest.raises(ConfigError, match="perf.sdpa_backend"):
        load_config(None, ["perf.sdpa_backend=fastest"])


# -- attention ------------------------------------------------------------------------------------
def test_fused_qkv_matches_unfused_and_keeps_parameter_names():
    ref, fused = tiny_unet(), tiny_unet()
    fused.set_attn_processor(FastAttnProcessor(fuse_qkv=True))
    assert list(ref.state_dict()) == list(fused.state_dict())
    inputs = tiny_inputs()
    out_ref, grads_ref = forward_backward(ref, inputs)
    out_fused, grads_fused = forward_backward(fused, inputs)
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-5, atol=1e-5)
    assert grads_fused.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_fused[name], grads_ref[name], rtol=1e-4, atol=1e-5)


def test_sdpa_backend_is_entered(monkeypatch):
    import colodiffusion.train.perf as perf

    chosen = []
    real = perf.sdpa_kernel

    def recording(backends):
        chosen.append(backends)
        return real(backends)

    monkeypatch.setattr(perf, "sdpa_kernel", recording)
    ref, unet = tiny_unet(), tiny_unet()
    unet.set_attn_processor(FastAttnProcessor(fuse_qkv=False, sdpa_backend="math"))
    inputs = tiny_inputs()
    torch.testing.assert_close(unet(*inputs).sample, ref(*inputs).sample)
    n_attn = sum(type(m).__name__ == "Attention" for m in unet.modules())
    assert len(chosen) == n_attn and all(b == [torch.nn.attention.SDPBackend.MATH] for b in chosen)


# -- activation checkpointing -------------------------------------------------------------------------
def count_forwards(unet, inputs):
    counts = {"ResnetBlock2D": 0, "BasicTransformerBlock": 0}

    def hook(module, *_):
        counts[type(module).__name__] += 1

    # pre-hooks: non-reentrant checkpointing stops a recomputation as soon as it has what backward needs
    handles = [m.register_forward_pre_hook(hook) for m in unet.modules() if type(m).__name__ in counts]
    forward_backward(unet, inputs)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("mode,recomputed", [
    ("none", set()), ("attention", {"BasicTransformerBlock"}), ("resnets", {"ResnetBlock2D"}),
    ("full", {"BasicTransformerBlock", "ResnetBlock2D"}),
])
def test_selective_checkpointing_recomputes_only_the_chosen_blocks(mode, recomputed):
    inputs = tiny_inputs()
    plain = count_forwards(tiny_unet(), inputs)
    unet = tiny_unet()
    select_checkpointing(unet, mode)
    counts = count_forwards(unet, inputs)
    for kind, n in plain.items():
        assert (counts[kind] > n) == (kind in recomputed), (mode, kind, counts, plain)
    _, grads = forward_backward(unet, inputs)
    _, grads_ref = forward_backward(tiny_unet(), inputs)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6)


# -- compile, memory format, dtype --------------------------------------------------------------------
def test_compile_wraps_blocks_lazily_and_plain_copy_drops_the_wrappers():
    unet = tiny_unet()
    compile_unet(unet, "blocks")  # torch.compile is lazy: nothing is compiled until a call
    blocks = unet_blocks(unet)
    assert len(blocks) == 7 and all(b._compiled_call_impl is not None for b in blocks)
    assert unet._compiled_call_impl is None
    dup = plain_copy(unet)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in dup.modules())
    assert all(b._compiled_call_impl is not None for b in blocks)  # the original keeps them
    with torch.no_grad():
        next(dup.parameters()).add_(1.0)
    assert not torch.equal(next(dup.parameters()), next(unet.parameters()))
    full = tiny_unet()
    compile_unet(full, "full", "max-autotune-no-cudagraphs")
    assert full._compiled_call_impl is not None


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    ref, unet = tiny_unet(), tiny_unet()
    compile_unet(unet, "blocks", backend="eager")  # dynamo tracing without inductor codegen
    inputs = tiny_inputs()
    out, grads = forward_backward(unet, inputs)
    out_ref, grads_ref = forward_backward(ref, inputs)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6)


def test_apply_perf_channels_last_and_bf16_params():
    cfg = load_config(None, ["precision=bf16", "perf.param_dtype=bf16", "perf.channels_last=true",
                             "perf.fuse_qkv=true", "perf.activation_checkpointing=attention"])
    unet = apply_perf(tiny_unet(), cfg, CPU)
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(unet.attn_processors[next(iter(unet.attn_processors))], FastAttnProcessor)
    with torch.autocast("cpu", torch.bfloat16):
        out = unet(*tiny_inputs()).sample
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out.float()).all()
    opt = build_optimizer(unet.parameters(), cfg, CPU)
    assert isinstance(opt, MasterWeightOptimizer) and all(m.dtype == torch.float32 for m in opt.masters)


# -- fp32 master weights --------------------------------------------------------------------------
def sgd(params):
    return torch.optim.SGD(params, lr=1e-4)


def test_master_weights_keep_updates_that_bf16_rounds_away():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt, plain_opt = MasterWeightOptimizer([w], sgd), sgd([plain])
    for _ in range(100):  # each step moves w by 1e-4, below bf16's resolution at 1.0 (2**-8)
        for p, o in ((w, opt), (plain, plain_opt)):
            p.grad = torch.ones_like(p)
            o.step()
            o.zero_grad()
    assert torch.equal(plain.detach(), torch.ones(4, dtype=torch.bfloat16))  # lost every update
    torch.testing.assert_close(opt.masters[0], torch.full((4,), 0.99), rtol=0, atol=1e-5)  # fp32 sum of 100 steps
    assert torch.equal(w.detach(), torch.full((4,), 0.99).to(torch.bfloat16))
    assert w.grad is None


def train_steps(opt, params, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
        opt.zero_grad()


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def test_offload_staging_path_equals_in_place_path_and_state_round_trips():
    make = lambda: [torch.nn.Parameter(torch.randn(3, 5, generator=torch.Generator().manual_seed(i))
                                       .to(torch.bfloat16)) for i in range(3)]
    a, b = make(), make()
    opt_a = MasterWeightOptimizer(a, adamw)
    opt_b = MasterWeightOptimizer(b, adamw, offload=True)  # staging buffers, as with masters on the CPU
    assert opt_b.offload and not opt_a.offload
    train_steps(opt_a, a, 5)
    train_steps(opt_b, b, 5)
    for x, y in zip(opt_a.masters + a, opt_b.masters + b):
        assert torch.equal(x, y)
    # resume: a fresh optimizer loaded from the state continues exactly
    state = copy.deepcopy(opt_a.state_dict())  # as through torch.save/load: no tensors shared with opt_a
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_c = MasterWeightOptimizer(c, adamw)
    opt_c.load_state_dict(state)
    train_steps(opt_a, a, 3, seed=1)
    train_steps(opt_c, c, 3, seed=1)
    for x, y in zip(opt_a.masters, opt_c.masters):
        assert torch.equal(x, y)


def test_master_optimizer_works_with_lr_scheduler_and_skips_params_without_grad():
    p, q = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16)), torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    opt = MasterWeightOptimizer([p, q], sgd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.5e-4)
    p.grad = torch.full_like(p, 100.0)
    opt.step()
    sched.step()
    torch.testing.assert_close(opt.masters[0], torch.full((2,), 0.995))
    assert torch.equal(opt.masters[1], torch.ones(2))  # no gradient: untouched
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [torch.zeros(1)]})


def test_plain_copy_takes_full_precision_master_weights():
    cfg = load_config(None, ["precision=bf16", "perf.param_dtype=bf16"])
    unet = apply_perf(tiny_unet(), cfg, CPU)
    opt = build_optimizer(unet.parameters(), cfg, CPU)
    with torch.no_grad():
        opt.masters[0].add_(1e-4)  # below bf16 resolution: only the master sees it
    first = next(plain_copy(unet, opt).parameters())
    assert first.dtype == torch.float32 and torch.equal(first, opt.masters[0])


def test_offload_config_builds_a_master_optimizer_on_the_cpu():
    cfg = load_config(None, ["perf.optimizer_offload=true"])
    opt = build_optimizer(tiny_unet().parameters(), cfg, CPU)
    assert isinstance(opt, MasterWeightOptimizer) and opt.master_device == CPU


# -- optional libraries -------------------------------------------------------------------------------
def test_missing_8bit_and_fp8_libraries_give_one_sentence(monkeypatch):
    for name in ("bitsandbytes", "torchao", "torchao.optim", "torchao.float8"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    cfg = load_config(None, ["perf.optimizer=adamw8bit"])
    with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes"):
        build_optimizer(tiny_unet().parameters(), cfg, CPU)
    with pytest.raises(ConfigError, match="perf.fp8 needs torchao"):
        convert_fp8(tiny_unet())
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        convert_fp8(tiny_unet(), CPU)


def test_fp8_conversion_when_torchao_is_installed():
    pytest.importorskip("torchao.float8")
    unet = tiny_unet()
    n = convert_fp8(unet)
    assert n > 0 and any(type(m).__name__ == "Float8Linear" for m in unet.modules())


# -- bench ------------------------------------------------------------------------------------------
def run_bench(capsys, *argv):
    code = bench.main(["--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1", *argv])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    return code, lines, captured.err


def test_bench_smoke_with_baseline_and_ratio(capsys, tmp_path):
    out = tmp_path / "bench.jsonl"
    code, lines, _ = run_bench(capsys, "--baseline", "--peak-tflops", "1", "--out", str(out),
                            "perf.param_dtype=bf16", "perf.fuse_qkv=true")
    assert code == 0
    events = {(r["event"], r.get("name")): r for r in lines}
    base, fast = events[("bench", "diffusers-default")], events[("bench", "colodiffusion")]
    ratio = events[("ratio", None)]
    for r in (base, fast):
        assert r["img_per_s"] > 0 and r["step_s"] > 0 and r["batch"] == 2
        assert r["train_flops_per_img"] > 1e8 and r["memory_kind"] == "cpu_process_max_rss"
        assert r["peak_memory_gib"] > 0 and r["mfu"] == pytest.approx(r["train_flops_per_img"] * r["img_per_s"] / 1e12, rel=1e-2)
    assert ratio["ratio"] == pytest.approx(fast["img_per_s"] / base["img_per_s"], rel=1e-2)
    assert fast["config"]["perf"]["param_dtype"] == "bf16" and fast["config"]["preset"] == "tiny"
    assert len(out.read_text().splitlines()) == len(lines)


def test_bench_bad_arguments_exit_2(capsys):
    code, _, err = run_bench(capsys, "--batch", "0")
    assert code == 2 and "--batch must be" in err
    code, _, err = run_bench(capsys, "perf.compile=sometimes")
    assert code == 2 and "perf.compile" in err and "Traceback" not in err


def test_cli_has_bench(capsys):
    from colodiffusion.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1"])
    assert exc.value.code == 0
    assert any(json.loads(l)["event"] == "bench" for l in capsys.readouterr().out.splitlines() if l.startswith("{"))


@pytest.mark.slow
def test_bench_memory_reports_batch_1_and_8(capsys):
    code, lines, _ = run_bench(capsys, "--memory", "perf.param_dtype=bf16", "perf.optimizer_offload=true",
                            "perf.activation_checkpointing=full")
    assert code == 0
    assert [r["batch"] for r in lines if r.get("name") == "memory"] == [1, 8]


@pytest.mark.slow
def test_fast_path_loss_matches_eager_fp32_master_path_over_50_steps():
    """bf16 params + fp32 masters + fused QKV + channels-last + selective checkpointing against the eager
    fp32-weight path, same data, noise and timesteps: every step's loss within LOSS_MATCH_RTOL."""
    cfg = load_config(None, ["precision=bf16", "model.preset=tiny", "perf.param_dtype=bf16", "perf.fuse_qkv=true",
                             "perf.channels_last=true", "perf.activation_checkpointing=attention"])
    result = bench.loss_match(cfg, 50, 2, None, CPU)
    assert result["ok"], result
    first, last = result["reference_first_last"]
    assert last < 0.5 * first  # the runs actually trained, so matching losses means matching training


@pytest.mark.slow
def test_trainer_with_bf16_master_weights_resumes_and_exports_fp32(tmp_path):
    """The loop's hook: perf levers on, checkpoint at step 2, resume to 4, export full-precision weights."""
    from safetensors.torch import load_file

    from colodiffusion.train.loop import train

    base = [f"run.dir={tmp_path / 'run'}", "first_stage.steps=2", "first_stage.scale_samples=16",
            "train.batch_size=4", "data.num_samples=64", "train.sample_every=0", "train.checkpoint_every=2",
            "precision=bf16", "perf.param_dtype=bf16", "perf.fuse_qkv=true",
            "perf.activation_checkpointing=attention", "train.ema.enabled=false"]
    train(load_config(None, base + ["train.max_steps=2"]))
    run = train(load_config(None, base + ["train.max_steps=4", "train.resume=auto"]))
    state = torch.load(run / "checkpoints" / "step_00000004" / "state.pt", weights_only=False)
    weights = load_file(str(next((run / "final" / "unet").glob("*.safetensors"))))
    assert len(state["optimizer"]["masters"]) == len(weights)  # fp32 masters are checkpointed
    assert all(v.dtype == torch.float32 for v in weights.values())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4 and all(m["loss"] == m["loss"] for m in metrics)
