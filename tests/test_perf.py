"""Speed/memory levers (train/perf.py, train/master_weights.py, train/optim.py) and `colodiffusion bench`.

Every lever's code path runs here on the CPU with the tiny preset; timings and GPU memory are
measured by bench/ scripts, never asserted. torch.compile itself runs in one test, with
the aot_eager backend (no inductor code generation)."""

import copy
import json
import shutil
import sys
from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from colodiffusion import bench  # noqa: E402
from colodiffusion.config import ConfigError, load_config  # noqa: E402
from colodiffusion.models.presets import build_unet, get_preset  # noqa: E402
from colodiffusion.parallel import plain_copy  # noqa: E402
from colodiffusion.train.master_weights import MasterWeightOptimizer  # noqa: E402
from colodiffusion.train.optim import EMA, build_optimizer  # noqa: E402
from colodiffusion.parallel.parallelize import compile_cache_dir, compile_unet, select_checkpointing  # noqa: E402
from colodiffusion.train.perf import FastAttnProcessor, apply_perf, convert_fp8  # noqa: E402

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
    assert not cfg.perf.channels_last and not cfg.perf.fuse_qkv  # eager bf16 + channels-last measured 0.96x
    with pytest.raises(ConfigError, match="perf.param_dtype=bf16 needs precision=bf16"):
        load_config(None, ["perf.param_dtype=bf16"])
    for bad in ("everything", "blocks"):  # per-block compile was dropped (slower than the whole model)
        with pytest.raises(ConfigError, match="perf.compile"):
            load_config(None, [f"perf.compile={bad}"])
    with pytest.raises(ConfigError, match="perf.sdpa_backend"):
        load_config(None, ["perf.sdpa_backend=fastest"])
    with pytest.raises(ConfigError, match="perf.sdpa_by_head_dim entry 'forty:flash'"):
        load_config(None, ["perf.sdpa_by_head_dim=forty:flash"])
    with pytest.raises(ConfigError, match="perf.sdpa_by_head_dim entry '80:fastest'"):
        load_config(None, ["perf.sdpa_by_head_dim='40:cudnn,80:fastest'"])
    with pytest.raises(ConfigError, match="optimizer_offload does not work with precision=fp16"):
        load_config(None, ["perf.optimizer_offload=true", "precision=fp16"])
    assert load_config(None, ["perf.sdpa_by_head_dim='40:cudnn,80:flash'"]).perf.sdpa_by_head_dim == "40:cudnn,80:flash"
    for off in ("off", "no", "false", "none"):  # YAML booleans must not become a folder named "False"
        assert load_config(None, [f"perf.compile_cache={off}"]).perf.compile_cache == "off"
    assert load_config(None, ["perf.compile_cache=on"]).perf.compile_cache == "auto"


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


def test_sdpa_kernel_is_chosen_per_head_dim(monkeypatch):
    """tiny attends with head dims 4 (first attention level) and 8 (second): each layer gets its own kernel."""
    import colodiffusion.train.perf as perf

    chosen = []
    real = perf.sdpa_kernel

    def recording(backends):
        chosen.append(backends[0])
        return real(backends)

    monkeypatch.setattr(perf, "sdpa_kernel", recording)
    cfg = load_config(None, ["perf.sdpa_by_head_dim='8:math'", "perf.fuse_qkv=true"])
    ref, unet = tiny_unet(), apply_perf(tiny_unet(), cfg.perf, cfg.precision, CPU)
    inputs = tiny_inputs()
    torch.testing.assert_close(unet(*inputs).sample, ref(*inputs).sample, rtol=1e-5, atol=1e-5)
    dims = [m.inner_dim // m.heads for m in unet.modules() if type(m).__name__ == "Attention"]
    assert sorted(set(dims)) == [4, 8]
    assert chosen == [torch.nn.attention.SDPBackend.MATH] * dims.count(8)  # head dim 4: PyTorch chooses


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


@pytest.mark.parametrize("ac,gradient_checkpointing,applied", [
    ("none", False, "none"), ("none", True, "full"), ("attention", True, "attention"), ("resnets", False, "resnets"),
])
def test_parallelize_applies_tp_checkpointing_compile_fsdp_in_that_order(monkeypatch, ac, gradient_checkpointing,
                                                                        applied):
    """One function, one order (torchtitan's), on the UNet inside a model that also trains the text encoder;
    model.gradient_checkpointing is perf.activation_checkpointing=full unless a finer mode is chosen."""
    import colodiffusion.parallel.parallelize as par
    import colodiffusion.parallel.tp as tp
    from colodiffusion.models.trainable import UNetWithTextEncoder

    calls = []
    monkeypatch.setattr(tp, "parallelize_tp", lambda model, mesh: calls.append(("tp", model, mesh)))
    monkeypatch.setattr(par, "select_checkpointing", lambda unet, mode: calls.append(("ac", unet, mode)))
    monkeypatch.setattr(par, "compile_unet", lambda unet, how, *a, **kw: calls.append(("compile", unet, how)))
    monkeypatch.setattr(par, "apply_fsdp", lambda model, plan: calls.append(("fsdp", model, plan)))
    cfg = load_config(None, ["perf.compile=full", "perf.compile_cache=off", f"perf.activation_checkpointing={ac}"])
    unet = tiny_unet()
    model = UNetWithTextEncoder(unet, torch.nn.Linear(2, 2))
    assert par.parallelize(model, cfg.perf, gradient_checkpointing, tp_mesh="tp-mesh", fsdp="plan") is model
    assert calls == [("tp", model, "tp-mesh"), ("ac", unet, applied), ("compile", unet, "full"),
                     ("fsdp", model, "plan")]
    calls.clear()
    par.parallelize(unet, cfg.perf, gradient_checkpointing)  # one process: no TP, no FSDP
    assert [c[0] for c in calls] == ["ac", "compile"] and calls[0][1] is unet


def test_every_backend_parallelizes_what_it_trains(monkeypatch):
    """Backend.prepare hands the model through parallelize with the run's perf options and
    model.gradient_checkpointing, and no strategy replaces it: each one only says its layout and how it
    wraps (the distributed ones remember the architecture first, then call it)."""
    import colodiffusion.parallel as parallel
    import colodiffusion.parallel.backend as backend_module
    from colodiffusion.parallel import Backend
    from colodiffusion.parallel.distributed import DistributedBackend

    parallel._register_distributed()  # the engine modules import DeepSpeed / Colossal-AI only when built
    assert set(parallel.BACKENDS) == {"single", "ddp", "fsdp", "deepspeed", "colossalai"}
    for cls in parallel.BACKENDS.values():
        assert cls.prepare in (Backend.prepare, DistributedBackend.prepare), cls
    seen = []
    monkeypatch.setattr(backend_module, "parallelize", lambda m, perf, gc: seen.append((perf.compile, gc)) or m)
    cfg = load_config(None, ["perf.compile=full", "model.gradient_checkpointing=true"])
    model, _ = Backend(cfg).prepare(tiny_unet(), lambda params: torch.optim.SGD(params, lr=0.1))
    assert seen == [("full", True)]


# -- compile, memory format, dtype --------------------------------------------------------------------
def test_compile_wraps_lazily_and_plain_copy_drops_the_wrapper(monkeypatch):
    unet = tiny_unet()
    compile_unet(unet, "full")  # torch.compile is lazy: nothing is compiled until a call
    assert unet._compiled_call_impl is not None
    dup = plain_copy(unet)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in dup.modules())
    assert unet._compiled_call_impl is not None  # the original keeps it
    with torch.no_grad():
        next(dup.parameters()).add_(1.0)
    assert not torch.equal(next(dup.parameters()), next(unet.parameters()))
    # a mode plus Inductor options: torch.compile takes only options then, the mode spelled out
    seen = {}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.update(kw))
    compile_unet(tiny_unet(), "full", "max-autotune-no-cudagraphs", options={"conv_1x1_as_mm": True})
    assert "mode" not in seen and seen["options"] == {"max_autotune": True, "coordinate_descent_tuning": True,
                                                       "conv_1x1_as_mm": True}
    compile_unet(tiny_unet(), "full", "reduce-overhead")
    assert seen["mode"] == "reduce-overhead"


def test_compile_cache_folder_is_the_users_and_reaches_inductor(monkeypatch, tmp_path):
    from colodiffusion.parallel.parallelize import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir("auto") == tmp_path / "xdg" / "colodiffusion" / "torch_compile"
    assert compile_cache_dir("off") is None and compile_cache_dir(str(tmp_path / "c")) == tmp_path / "c"
    folder = use_compile_cache(str(tmp_path / "run_cache"))
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    assert cache_dir() == str(folder) and triton_cache_dir(0) == str(folder / "triton")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir("auto") == tmp_path / "mine"  # a folder the user set wins


@pytest.mark.slow
def test_compiled_unet_matches_eager():
    """compile_unet's module really runs through torch.compile (dynamo captures the forward, AOTAutograd the
    backward; the aot_eager backend skips Inductor's code generation) and gives the eager outputs and gradients.
    A UNet smaller than the tiny preset (same block kinds) keeps the tracing to a few CPU seconds."""
    from diffusers import UNet2DConditionModel
    from torch._dynamo.testing import CompileCounterWithBackend

    def micro_unet():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8)

    torch._dynamo.reset()
    ref, unet = micro_unet(), micro_unet()
    counter = CompileCounterWithBackend("aot_eager")
    compile_unet(unet, "full", backend=counter)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, 32, generator=g))
    out, grads = forward_backward(unet, inputs)
    assert counter.frame_count >= 1, "the UNet's forward was not compiled"
    traced = {n.target for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert traced & {torch.conv2d, torch.nn.functional.conv2d}  # the UNet's own work is in the graph
    out_ref, grads_ref = forward_backward(ref, inputs)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6)


def test_apply_perf_channels_last_and_bf16_params():
    cfg = load_config(None, ["precision=bf16", "perf.param_dtype=bf16", "perf.channels_last=true",
                             "perf.fuse_qkv=true"])
    unet = apply_perf(tiny_unet(), cfg.perf, cfg.precision, CPU)
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
    def make():
        return [torch.nn.Parameter(torch.randn(3, 5, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16))
                for i in range(3)]
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
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
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


def tensors_held(obj, skip: set) -> dict[int, torch.Tensor]:
    """Every tensor reachable from the object's attributes (lists, tuples, dicts, nested optimizers),
    by storage, except those in `skip` (the model's own parameters and gradients)."""
    found, seen = {}, set()

    def walk(x):
        if torch.is_tensor(x):
            if x.numel() and x.untyped_storage().data_ptr() not in skip:
                found[x.untyped_storage().data_ptr()] = x
            return
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                walk(v)
        elif isinstance(x, torch.optim.Optimizer) or (hasattr(x, "__dict__")
                                                      and type(x).__module__.startswith("colodiffusion")):
            walk(vars(x))

    walk(obj)
    return found


def test_master_optimizer_keeps_no_fp32_gradient_copy():
    """Between steps it holds fp32 masters (4 B/param), AdamW moments (8 B/param) and one reusable fp32
    scratch of the largest chunk: no fp32 copy of all gradients (that was another 4 B/param)."""
    unet = tiny_unet().to(torch.bfloat16)
    params = list(unet.parameters())
    n = sum(p.numel() for p in params)
    chunk = n // 8
    opt = MasterWeightOptimizer(params, adamw, chunk_numel=chunk)
    train_steps(opt, params, 2)
    skip = {p.untyped_storage().data_ptr() for p in params}
    held = sum(t.numel() * t.element_size() for t in tensors_held(opt, skip).values())
    largest = max(p.numel() for p in params)
    scratch = 4 * max(chunk, largest)
    steps = 4 * len(params)  # AdamW's per-tensor step counters
    assert held <= 4 * n + 8 * n + steps + scratch < 4 * n + 8 * n + 4 * n
    assert held >= 4 * n + 8 * n  # masters and moments are really there
    assert opt.held_bytes()["masters"] == 4 * n and opt.held_bytes()["scratch"] <= scratch
    assert all(m.grad is None for m in opt.masters)  # the scratch is lent to the masters only inside step


def test_chunked_master_step_equals_fp32_adamw_over_the_masters():
    """Chunking is invisible: any chunk size gives bitwise the update plain AdamW makes on fp32 copies."""
    def make():
        return [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16))
                for i, s in enumerate([(7, 5), (3,), (2, 2, 3), (40,)])]
    ref_params = [torch.nn.Parameter(p.detach().float()) for p in make()]
    ref = adamw(ref_params)
    runs = []
    for chunk in (1, 16, 1 << 20):
        params = make()
        opt = MasterWeightOptimizer(params, adamw, chunk_numel=chunk)
        assert len(opt.chunks) == {1: 4, 16: 3, 1 << 20: 1}[chunk]
        runs.append((opt, params))
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in ref_params]
        for p, gr in zip(ref_params, grads):
            p.grad = gr.float()
        ref.step()
        for opt, params in runs:
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
            opt.zero_grad()
    for opt, params in runs:
        for m, r, p in zip(opt.masters, ref_params, params):
            assert torch.equal(m, r.detach()) and torch.equal(p.detach(), r.detach().to(torch.bfloat16))


def bytes_allocated_by(fn) -> int:
    """Bytes of new tensors created by the ops `fn` runs (in-place ops' outputs are their inputs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    total = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if torch.is_tensor(a)}
            for t in torch.utils._pytree.tree_leaves(out):
                if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:
                    total[0] += t.numel() * t.element_size()
            return out

    with Count():
        fn()
    return total[0]


def test_ema_follows_the_fp32_masters_in_place():
    """With bf16 weights the EMA averages the fp32 masters (updates below bf16's resolution show up in
    it), lives beside them, and its update allocates no copy of the weights."""
    unet = tiny_unet().to(torch.bfloat16)
    params = list(unet.parameters())
    opt = MasterWeightOptimizer(params, sgd)
    ema = EMA(unet.named_parameters(), decay=0.5, warmup=False, optimizer=opt)
    with torch.no_grad():
        for m in opt.masters:
            m.add_(1e-4)  # the bf16 weights cannot show this
    assert all(torch.equal(p.detach().float(), s) for p, s in zip(params, ema.shadow))  # started at the weights
    new = bytes_allocated_by(lambda: ema.update(unet.parameters(), step=1))
    assert new == 0
    for s, m in zip(ema.shadow, opt.masters):
        torch.testing.assert_close(s, m - 0.5e-4, rtol=0, atol=2e-6)
    fp32 = tiny_unet()
    plain = EMA(fp32.named_parameters(), decay=0.5, warmup=False)  # no masters: the weights themselves
    assert bytes_allocated_by(lambda: plain.update(fp32.parameters(), step=1)) == 0


def test_plain_copy_takes_full_precision_master_weights():
    cfg = load_config(None, ["precision=bf16", "perf.param_dtype=bf16"])
    unet = apply_perf(tiny_unet(), cfg.perf, cfg.precision, CPU)
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
    assert convert_fp8(tiny_unet()) == 0  # every tiny linear is under the 2^16 weights fp8 pays for
    torch.manual_seed(0)
    preset = get_preset("tiny")
    # the tiny UNet before 2026-12-05
    wider = {**preset.unet, "block_out_channels": (32, 64, 128), "norm_num_groups": 16}
    unet = build_unet(replace(preset, unet=wider))
    n = convert_fp8(unet)
    assert n > 0 and sum(type(m).__name__ == "Float8Linear" for m in unet.modules()) == n


# -- bench ------------------------------------------------------------------------------------------
def run_bench(capsys, *argv):
    code = bench.main(["--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1", *argv])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    return code, lines, captured.err


def test_bench_fast_step_is_the_trainers_train_step(monkeypatch, capsys, tmp_path):
    """The bench times train.loop.Trainer.train_step itself, on a state from train.loop.build_state; the baseline
    does the same work (clipping, EMA) and both report it."""
    from colodiffusion.train import loop

    calls = {"build_state": [], "train_step": []}
    real_build, real_step = loop.build_state, loop.Trainer.train_step

    def build_state(*a, **k):
        state = real_build(*a, **k)
        calls["build_state"].append(state)
        return state

    def train_step(trainer):
        calls["train_step"].append(trainer.state)
        return real_step(trainer)

    monkeypatch.setattr(loop, "build_state", build_state)
    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    out = tmp_path / "bench.jsonl"
    code, lines, _ = run_bench(capsys, "--baseline", "--steps", "2", "--out", str(out),
                               "perf.param_dtype=bf16", "perf.fuse_qkv=true")
    assert code == 0
    events = {(r["event"], r.get("name")): r for r in lines}
    base, fast = events[("bench", "diffusers-default")], events[("bench", "colodiffusion")]
    assert len(calls["build_state"]) == 1 and calls["train_step"] == calls["build_state"] * 3  # 1 warm-up + 2 timed
    assert calls["build_state"][0].step == 3 and calls["build_state"][0].ema is not None
    assert base["work"] == fast["work"] == {"grad_clip": 1.0, "ema": True}
    assert fast["state_gib"]["ema"] > 0 and base["state_gib"]["ema"] > 0
    assert fast["config"]["perf"]["param_dtype"] == "bf16" and fast["config"]["preset"] == "tiny"
    assert len(out.read_text().splitlines()) == len(lines)


def test_bench_img_per_s_mfu_and_ratio_from_a_driven_clock(monkeypatch, capsys):
    """Figures from known times: the baseline step takes 0.4 s, ours 0.1 s, batch 8, 5e11 FLOPs per image,
    a 100 TFLOP/s peak: 20 and 80 img/s, MFU 0.1 and 0.4, ratio 4."""
    clock = [0.0]
    monkeypatch.setattr(bench, "now", lambda: clock[0])
    monkeypatch.setattr(bench, "count_train_flops", lambda preset, resolution: 5e11)

    def fake(seconds):
        def build(*args, keep=None, **kwargs):
            model = torch.nn.Linear(2, 2)
            keep.update(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), ema=None)

            def step():
                clock[0] += seconds
                return torch.zeros(())
            return step
        return build

    monkeypatch.setattr(bench, "baseline_step", fake(0.4))
    monkeypatch.setattr(bench, "trainer_step", fake(0.1))
    code, lines, _ = run_bench(capsys, "--baseline", "--batch", "8", "--steps", "3", "--peak-tflops", "100")
    assert code == 0
    events = {(r["event"], r.get("name")): r for r in lines}
    base, fast = events[("bench", "diffusers-default")], events[("bench", "colodiffusion")]
    ratio = events[("ratio", None)]
    assert (base["img_per_s"], fast["img_per_s"]) == (20.0, 80.0)
    assert (base["mfu"], fast["mfu"]) == (0.1, 0.4)
    assert fast["first_step_s"] == 0.1 and ratio["ratio"] == 4.0


def test_flop_count_is_the_anchors_without_touching_a_device():
    """sd15 at 512 px, counted on the meta device: exactly the figure the reference anchor's FlopCounterMode
    measured on an H200 (shared/reference/h200-anchor-2026-11-26.jsonl), GPU attention kernels included."""
    assert bench.count_train_flops(get_preset("sd15"), None) == 2469799198720.0


class HostReads(TorchFunctionMode):
    """Counts tensor reads into Python (item, bool, float, tolist, ...): each is a host sync on a GPU."""

    READS = {"item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.calls, self.paused = [], False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS and not self.paused:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_train_step_reads_nothing_back_to_the_host(monkeypatch):
    """The trainer's step with bf16 weights, fp32 masters on a fused AdamW, clipping, the numerical guard
    and the EMA: no tensor is read on the host. (The data side, the loader's shuffles and the
    caption-dropout draws on the CPU generator, is host work by design and not counted.)"""
    from colodiffusion.train import loop

    cfg = load_config(None, ["precision=bf16", "model.preset=tiny", "perf.param_dtype=bf16",
                             "perf.optimizer_offload=true", "perf.fuse_qkv=true"])
    counter = HostReads()

    def paused(fn):
        def run(*args):
            counter.paused = True
            try:
                return fn(*args)
            finally:
                counter.paused = False
        return run

    monkeypatch.setattr(loop, "drop_captions", paused(loop.drop_captions))
    keep = {}
    step = bench.trainer_step(cfg, 2, None, CPU, steps=3, keep=keep)
    loader = keep["state"].loader
    keep["state"].loader = type("Loader", (), {"__next__": paused(lambda self: next(loader))})()
    assert keep["optimizer"].defaults.get("fused") and keep["ema"] is not None
    with counter:
        step()
        step()
    assert counter.calls == []


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
    assert any(json.loads(line)["event"] == "bench" for line in capsys.readouterr().out.splitlines()
               if line.startswith("{"))


@pytest.mark.slow
def test_bench_memory_reports_batch_1_and_8(capsys):
    code, lines, _ = run_bench(capsys, "--memory", "perf.param_dtype=bf16", "perf.optimizer_offload=true",
                            "perf.activation_checkpointing=full")
    assert code == 0
    rows = [r for r in lines if r.get("name") == "memory"]
    assert [r["batch"] for r in rows] == [1, 8]
    # The state figures are arithmetic over the tiny UNet's n parameters (GiB rounded to 3 places): bf16 weights and
    # gradients (2 bytes each), an fp32 EMA, and fp32 masters plus AdamW's two fp32 moments in the optimizer.
    n = sum(p.numel() for p in tiny_unet().parameters())
    expected = {"weights": 2 * n, "grads": 2 * n, "ema": 4 * n}
    for r in rows:
        state = r["state_gib"]
        assert all(abs(state[k] - b / 2**30) <= 0.0005 for k, b in expected.items()), state
        assert state["optimizer"] >= round(12 * n / 2**30, 3), state
        assert abs(state["on_device"] - sum(state[k] for k in ("weights", "grads", "optimizer", "ema"))) <= 0.002
        # the process's peak (CPU: max RSS) holds at least that state; a step took time
        assert r["memory_kind"] == "cpu_process_max_rss" and r["peak_memory_gib"] > state["on_device"]
        assert r["step_s"] > 0 and r["img_per_s"] > 0
    assert rows[0]["state_gib"] == rows[1]["state_gib"]  # the batch changes activations, not the kept state


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
def test_trainer_with_bf16_master_weights_resumes_exactly_and_exports_fp32(tmp_path):
    """The loop's hook: perf levers on, EMA over the fp32 masters; a run stopped at step 2 and resumed to 4
    logs the same loss at every step and ends with bitwise the same masters, moments and EMA as an
    uninterrupted run; the export carries the full-precision masters."""
    from safetensors.torch import load_file

    from colodiffusion.storage import checkpoint
    from colodiffusion.train.loop import train

    def run(name, *extra):
        base = [f"run.dir={tmp_path / name}", "first_stage.steps=2", "first_stage.scale_samples=16",
                "train.batch_size=4", "data.num_samples=64", "train.sample_every=0", "train.checkpoint_every=2",
                "train.log_every=1", "precision=bf16", "perf.param_dtype=bf16", "perf.fuse_qkv=true",
                "perf.activation_checkpointing=attention"]
        return train(load_config(None, base + list(extra)))

    # the same frozen parts (tokenizer, text encoder, first stage) in both runs, as tests/faults does
    prep = run("prep", "train.max_steps=1", "train.ema.enabled=false") / "components"
    for name in ("straight", "resumed"):
        shutil.copytree(prep, tmp_path / name / "components")
    straight = run("straight", "train.max_steps=4")
    run("resumed", "train.max_steps=2")
    resumed = run("resumed", "train.max_steps=4", "train.resume=auto")

    def losses(r):
        return {m["step"]: m["loss"] for m in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())
                if "loss" in m}

    assert losses(straight) == losses(resumed) and sorted(losses(resumed)) == [1, 2, 3, 4]
    ends = [r / "checkpoints" / "step_00000004" for r in (straight, resumed)]
    states = [checkpoint.load_state(e / "state.pt") for e in ends]  # tensors and plain data only
    for a, b in zip(states[0]["optimizer"]["masters"], states[1]["optimizer"]["masters"]):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    moments = [[t for s in st["optimizer"]["inner"]["state"].values() for t in s.values()] for st in states]
    assert all(torch.equal(a, b) for a, b in zip(*moments))
    emas = [load_file(str(e / "ema.safetensors")) for e in ends]
    assert emas[0].keys() == emas[1].keys() and all(torch.equal(emas[0][k], emas[1][k]) for k in emas[0])
    weights = load_file(str(next((resumed / "final" / "unet").glob("*.safetensors"))))
    assert len(states[1]["optimizer"]["masters"]) == len(weights)
    assert all(v.dtype == torch.float32 for v in weights.values())
