"""The CogVideoX noise schedule: scaled-linear betas, SNR shift, zero terminal SNR, and the v-prediction objective.

    betas    = linspace(sqrt(beta_start), sqrt(beta_end), N)^2
    abar     = cumprod(1 - betas)
    abar    <- abar / (s + (1 - s) abar)                       SNR shift: SNR(t) -> SNR(t) / s
    sqrt(abar) <- (sqrt(abar) - sqrt(abar_T)) sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_T))
                                                               zero terminal SNR: abar[N-1] == 0 exactly
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps               q_sample
    v   = sqrt(abar_t) eps - sqrt(1 - abar_t) x0               the regression target

The table is built in float64 and every noising product is computed in at least float32: in bf16, sqrt(abar_t)
for small t rounds to 1 and 1 - abar_t loses most of its digits, which erases the low timesteps.
Timestep index 0 is (almost) clean, N-1 is pure noise; the network receives the integer index.
"""

from __future__ import annotations

import torch
from torch import Tensor


class NoiseSchedule:
    """alphas_cumprod of CogVideoX (equal to diffusers' CogVideoXDDIMScheduler with scaled_linear betas,
    rescale_betas_zero_snr=True and the same snr_shift_scale) plus q_sample, v target and v loss.

    A plain object, not an nn.Module: the table is derived from four numbers, so it never goes into a checkpoint;
    per-device copies are cached on first use.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 8.5e-4,
        beta_end: float = 1.2e-2,
        snr_shift: float = 3.0,
    ) -> None:
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}.")
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"Need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}.")
        if snr_shift <= 0.0:
            raise ValueError(f"snr_shift must be positive (3.0 for CogVideoX-2B, 1.0 for 5B), got {snr_shift}.")
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.snr_shift = snr_shift

        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar = abar / (snr_shift + (1.0 - snr_shift) * abar)
        self.alphas_cumprod = _rescale_to_zero_terminal_snr(abar)  # float64 [N], abar[-1] == 0
        self._device_tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end}, snr_shift={self.snr_shift})"
        )

    # ----------------------------------------------------------------------------------------------- lookups
    def _sqrt_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(sqrt(abar), sqrt(1 - abar)) in float64 on `device`, cached."""
        if device not in self._device_tables:
            abar = self.alphas_cumprod.to(device)
            self._device_tables[device] = (abar.sqrt(), (1.0 - abar).sqrt())
        return self._device_tables[device]

    def _coefficients(self, t: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
        """sqrt(abar_t), sqrt(1 - abar_t) shaped [B, 1, ..., 1] for broadcasting against `like` ([B, ...]), in the
        compute dtype (float64 if `like` is float64, float32 otherwise)."""
        compute_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        t = self._check_timesteps(t, like)
        sqrt_abar, sqrt_one_minus_abar = self._sqrt_tables(like.device)
        view = (-1,) + (1,) * (like.ndim - 1)
        a = sqrt_abar[t].to(compute_dtype).view(view)
        b = sqrt_one_minus_abar[t].to(compute_dtype).view(view)
        return a, b, compute_dtype

    def _check_timesteps(self, t: Tensor | int, like: Tensor) -> Tensor:
        """Integer timesteps as a [B] long tensor on like.device. Values are not range-checked on the GPU (that
        would synchronise every step); on CPU an out-of-range index fails in the lookup."""
        if isinstance(t, int):
            return torch.full((like.shape[0],), t, dtype=torch.long, device=like.device)
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"Timesteps must be integer indices in [0, {self.num_train_timesteps}), got {t!r}.")
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        if t.ndim != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(
                f"Timesteps must have shape [B] = [{like.shape[0]}] to match the tensor of shape "
                f"{tuple(like.shape)}, got {tuple(t.shape)}."
            )
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(
                f"Timesteps must lie in [0, {self.num_train_timesteps - 1}], got min {int(t.min())} max {int(t.max())}."
            )
        return t.to(device=like.device, dtype=torch.long)

    # ------------------------------------------------------------------------------------------------ forward
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """q_sample: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, computed in fp32 (fp64 for fp64 inputs) and
        returned in x0's dtype (the model input dtype)."""
        _check_same_shape(x0, noise, "noise")
        a, b, dtype = self._coefficients(t, x0)
        x_t = a * x0.to(dtype) + b * noise.to(dtype)
        return x_t.to(x0.dtype)

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, returned in fp32 (fp64 for fp64 inputs): it is only used
        inside the loss, which is fp32."""
        _check_same_shape(x0, noise, "noise")
        a, b, dtype = self._coefficients(t, x0)
        return a * noise.to(dtype) - b * x0.to(dtype)

    def predict_x0_eps_from_v(self, x_t: Tensor, v: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """Invert (x_t, v) -> (x0, eps):  x0 = sqrt(abar) x_t - sqrt(1-abar) v,  eps = sqrt(abar) v + sqrt(1-abar) x_t.
        Exact for every t, including t = N-1 where abar = 0 (then x0 = -v and eps = x_t). fp32 or fp64 out."""
        _check_same_shape(x_t, v, "v")
        a, b, dtype = self._coefficients(t, x_t)
        x_t, v = x_t.to(dtype), v.to(dtype)
        return a * x_t - b * v, a * v + b * x_t

    def snr(self, t: Tensor | int) -> Tensor:
        """SNR(t) = abar_t / (1 - abar_t) in float64; 0 at the last timestep (zero terminal SNR)."""
        if isinstance(t, int):
            t = torch.tensor(t)
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return abar / (1.0 - abar)

    def v_prediction_loss(self, model_out: Tensor, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Per-sample MSE(model_out, v) averaged over every non-batch dim ([B, C, T, H, W] -> [B]), in fp32, so the
        caller can both average it and bucket it by timestep. Equal to the SAT form (x0 error weighted by
        1 / (1 - abar_t)), since v - v_hat = (x0_hat - x0) / sqrt(1 - abar_t) at fixed x_t."""
        _check_same_shape(model_out, x0, "model_out")
        target = self.v_target(x0, noise, t).float()
        return (model_out.float() - target).square().flatten(1).mean(dim=1)


def _rescale_to_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(abar) so the last value is exactly 0 and the first is unchanged (Lin et al. 2023,
    "Common diffusion noise schedules and sample steps are flawed", Algorithm 1)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root.square()


def _check_same_shape(reference: Tensor, other: Tensor, name: str) -> None:
    if other.shape != reference.shape:
        raise ValueError(f"{name} must have the shape {tuple(reference.shape)}, got {tuple(other.shape)}.")
