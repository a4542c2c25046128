"""NoiseSchedule: the table against diffusers' CogVideoXDDIMScheduler, the derived numbers, and the v objective."""

import pytest
import torch
from released_scheduler import released_scheduler

from cogvx_train.diffusion import NoiseSchedule


@pytest.mark.parametrize("snr_shift", [1.0, 3.0])
def test_alphas_cumprod_equal_diffusers(snr_shift):
    ours = NoiseSchedule(snr_shift=snr_shift).alphas_cumprod
    ref = released_scheduler(snr_shift).alphas_cumprod
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert (ours - ref.double()).abs().max().item() <= 1e-14


@pytest.mark.parametrize(
    "snr_shift, abar_0, abar_500", [(1.0, 0.99915, 0.241), (3.0, 0.99745, 0.0953)]
)
def test_derived_numbers(snr_shift, abar_0, abar_500):
    abar = NoiseSchedule(snr_shift=snr_shift).alphas_cumprod
    assert abar[0].item() == pytest.approx(abar_0, abs=5e-6)
    assert abar[500].item() == pytest.approx(abar_500, abs=5e-4)
    assert abar[999].item() == 0.0  # zero terminal SNR, exactly
    assert bool((abar[1:] < abar[:-1]).all())


def test_snr_shift_divides_snr_before_the_rescale():
    # Without the zero-SNR rescale the shift is exactly SNR / s; check it on the raw cumprod the class starts from.
    betas = torch.linspace(8.5e-4**0.5, 1.2e-2**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    shifted = abar / (3.0 + (1 - 3.0) * abar)
    torch.testing.assert_close(shifted / (1 - shifted), abar / (1 - abar) / 3.0, rtol=1e-12, atol=0)


def test_add_noise_and_velocity_equal_diffusers_in_float64():
    torch.manual_seed(0)
    schedule, ref = NoiseSchedule(snr_shift=3.0), released_scheduler(3.0)
    x0 = torch.randn(4, 3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(schedule.v_target(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=0, atol=1e-12)


def test_add_noise_computes_in_fp32_for_bf16_inputs():
    torch.manual_seed(0)
    schedule = NoiseSchedule(snr_shift=1.0)
    x0 = torch.randn(2, 4, 1, 8, 8).bfloat16()
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 3])
    out = schedule.add_noise(x0, noise, t)
    assert out.dtype == torch.bfloat16
    expected = schedule.add_noise(x0.float(), noise.float(), t).bfloat16()
    assert torch.equal(out, expected)
    # The same product in bf16 throughout loses the noise at t=0: sqrt(1 - abar_0) = 0.029 rounds badly.
    a, b = schedule.alphas_cumprod[t].sqrt(), (1 - schedule.alphas_cumprod[t]).sqrt()
    naive = a.bfloat16().view(-1, 1, 1, 1, 1) * x0 + b.bfloat16().view(-1, 1, 1, 1, 1) * noise
    assert not torch.equal(naive, expected)


@pytest.mark.parametrize("t", [0, 1, 250, 998, 999])
def test_x0_eps_recovered_from_v(t):
    torch.manual_seed(1)
    schedule = NoiseSchedule(snr_shift=3.0)
    x0 = torch.randn(2, 16, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    x_t = schedule.add_noise(x0, noise, t)
    v = schedule.v_target(x0, noise, t)
    x0_hat, eps_hat = schedule.predict_x0_eps_from_v(x_t, v, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-10)


def test_snr_values():
    schedule = NoiseSchedule(snr_shift=3.0)
    snr = schedule.snr(torch.arange(1000))
    assert snr[999].item() == 0.0
    assert bool((snr[1:] < snr[:-1]).all())
    abar0 = schedule.alphas_cumprod[0].item()
    assert schedule.snr(0).item() == pytest.approx(abar0 / (1 - abar0))


def test_v_prediction_loss_is_per_sample_fp32():
    torch.manual_seed(2)
    schedule = NoiseSchedule(snr_shift=1.0)
    x0 = torch.randn(3, 4, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 500, 990])
    v = schedule.v_target(x0, noise, t)
    assert torch.equal(schedule.v_prediction_loss(v, x0, noise, t), torch.zeros(3))

    model_out = v + torch.randn_like(v)
    loss = schedule.v_prediction_loss(model_out.bfloat16(), x0, noise, t)
    assert loss.dtype == torch.float32 and loss.shape == (3,)
    expected = (model_out.bfloat16().float() - v).square().mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(loss, expected)

    changed = model_out.clone()
    changed[1] += 5.0
    new = schedule.v_prediction_loss(changed, x0, noise, t)
    assert new[0] == schedule.v_prediction_loss(model_out, x0, noise, t)[0] and new[1] > loss[1] + 1.0


def test_v_loss_equals_snr_weighted_x0_loss():
    # The SAT objective: w(t) = 1 / (1 - abar_t) times the x0 error, at the same x_t.
    torch.manual_seed(3)
    schedule = NoiseSchedule(snr_shift=3.0)
    x0 = torch.randn(2, 4, 1, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 700])
    model_out = schedule.v_target(x0, noise, t) + 0.1 * torch.randn_like(x0)
    x0_hat, _ = schedule.predict_x0_eps_from_v(schedule.add_noise(x0, noise, t), model_out, t)
    weight = 1 / (1 - schedule.alphas_cumprod[t])
    sat = weight * (x0_hat - x0).square().flatten(1).mean(1)
    torch.testing.assert_close(schedule.v_prediction_loss(model_out, x0, noise, t).double(), sat, rtol=1e-5, atol=0)


def test_bad_inputs_raise():
    schedule = NoiseSchedule()
    x0 = torch.zeros(2, 4, 1, 2, 2)
    with pytest.raises(ValueError, match="shape"):
        schedule.add_noise(x0, torch.zeros(2, 4, 1, 2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        schedule.add_noise(x0, x0, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        schedule.add_noise(x0, x0, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="lie in"):
        schedule.add_noise(x0, x0, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="snr_shift"):
        NoiseSchedule(snr_shift=0.0)
