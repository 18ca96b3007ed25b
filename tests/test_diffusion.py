import pytest
import torch

from colodiffusion.config import load_config
from colodiffusion.diffusion import Objective, alphas_cumprod, build_noise_scheduler, drop_captions


def make(pred="epsilon", **kw):
    sched = build_noise_scheduler(load_config().diffusion, pred)
    return Objective(alphas_cumprod(sched), pred, **kw)


def test_sd_schedule_values():
    a = alphas_cumprod(build_noise_scheduler(load_config().diffusion, "epsilon"))
    assert a.shape == (1000,)
    assert abs(a[0].item() - (1 - 0.00085)) < 1e-6
    assert 0.004 < a[-1].item() < 0.005  # SD's scaled-linear schedule ends near 0.0047


def test_v_target_recovers_x0_and_noise():
    obj = make("v_prediction")
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 100, 500, 999])
    x_t, v = obj.noisy(x0, t, noise)
    a = obj.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((1 - a).sqrt() * x_t + a.sqrt() * v, noise, atol=1e-5, rtol=1e-5)


def test_perfect_model_has_zero_loss_and_determinism():
    obj = make("epsilon")
    x0 = torch.randn(3, 4, 8, 8)

    def oracle(x_t, t, ctx):  # predicts the true noise from x_t and x0
        a = obj.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    loss = obj.loss(oracle, x0, None, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    zero = lambda x_t, t, ctx: torch.zeros_like(x_t)  # noqa: E731
    l1 = obj.loss(zero, x0, None, torch.Generator().manual_seed(5))
    l2 = obj.loss(zero, x0, None, torch.Generator().manual_seed(5))
    assert l1.item() == l2.item() and 0.5 < l1.item() < 1.5  # E[eps^2] = 1


def test_min_snr_weights_cap_low_noise_steps():
    obj = make("epsilon", min_snr_gamma=5.0)
    w = obj.weights(torch.tensor([0, 999]))
    assert w[0] < 0.01 and abs(w[1].item() - 1.0) < 1e-6  # SNR >> 5 at t=0; SNR << 5 at t=999
    assert make("epsilon").weights(torch.tensor([0])) is None


@pytest.mark.parametrize("floor,gamma", [(0.0, 5.0), (1.0, 5.0), (0.2, 5.0), (1.0, None)])
def test_a_weighting_puts_the_same_weight_on_the_x0_error_for_eps_and_v(floor, gamma):
    """A model whose implied clean image is off by `delta` pays W(t) * |delta|^2 whichever target it
    predicts: W = min(SNR, gamma) + high_noise_weight (SNR + 1 without gamma and a floor of 1)."""
    x0, noise, delta = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), 0.1 * torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 300, 800, 999])
    losses = {}
    for pred in ("epsilon", "v_prediction"):
        obj = make(pred, min_snr_gamma=gamma, high_noise_weight=floor)
        a = obj.alphas_cumprod[t].view(-1, 1, 1, 1)

        def off_by_delta(x_t, tt, ctx):  # the prediction whose implied x0 is x0 + delta
            x0_hat = x0 + delta
            eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
            return eps_hat if pred == "epsilon" else a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat

        losses[pred] = obj.per_sample_loss(off_by_delta, x0, None, t, noise)
    a = make().alphas_cumprod[t]
    snr = a / (1 - a)
    w_x0 = snr if gamma is None else snr.clamp(max=gamma)
    w_x0 = w_x0 + floor
    expected = w_x0 * delta.pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["epsilon"], expected, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(losses["v_prediction"], expected, rtol=1e-3, atol=1e-7)
    if floor:  # the noisiest steps keep the floor's weight on x0, not ~SNR (0.005)
        assert w_x0[-1] > floor > 20 * snr[-1]


def test_offset_noise_shifts_channel_means():
    x0 = torch.zeros(64, 4, 16, 16)
    _, plain = make().draw(x0, torch.Generator().manual_seed(0))
    _, offset = make(offset_noise=1.0).draw(x0, torch.Generator().manual_seed(0))
    assert offset.mean(dim=(2, 3)).std() > 5 * plain.mean(dim=(2, 3)).std()


def test_caption_dropout_rate_and_determinism():
    caps = [f"c{i}" for i in range(2000)]
    out = drop_captions(caps, 0.1, torch.Generator().manual_seed(1))
    dropped = sum(c == "" for c in out)
    assert 140 < dropped < 260
    assert out == drop_captions(caps, 0.1, torch.Generator().manual_seed(1))
    assert drop_captions(caps, 0.0, torch.Generator().manual_seed(1)) == caps


def test_a_sampler_is_the_same_from_a_config_in_memory_and_one_saved_and_reloaded(tmp_path):
    """Sampling a checkpoint (its schedule built in memory) and its exported final/ (the schedule read
    back from scheduler_config.json) must use the same sampler: diffusers replaced the values a config
    got by default with the next class's defaults, so DPM++ and Euler got 'linspace' timestep spacing
    from one path and SD's 'leading' from the other."""
    from diffusers import DDIMScheduler

    from colodiffusion.config import Config
    from colodiffusion.diffusion import build_noise_scheduler
    from colodiffusion.diffusion.samplers import SAMPLERS, make_sampler
    from colodiffusion.generate import make_pipeline

    in_memory = make_pipeline(None, None, None, None, build_noise_scheduler(Config().diffusion, "epsilon")).scheduler
    in_memory.save_pretrained(tmp_path)
    reloaded = DDIMScheduler.from_pretrained(tmp_path)
    for name in SAMPLERS:
        a, b = dict(make_sampler(name, in_memory.config).config), dict(make_sampler(name, reloaded.config).config)
        a.pop("_use_default_values", None), b.pop("_use_default_values", None)
        assert a == b, name
        assert a.get("timestep_spacing", "leading") == "leading", name
