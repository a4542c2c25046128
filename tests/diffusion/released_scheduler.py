"""diffusers' scheduler as CogVideoX ships it (imported by the tests of this folder)."""

from diffusers import CogVideoXDDIMScheduler


def released_scheduler(snr_shift: float = 3.0) -> CogVideoXDDIMScheduler:
    """The scheduler config shipped with CogVideoX-2b (snr_shift 3.0) and -5b (1.0)."""
    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=snr_shift,
        timestep_spacing="trailing",
    )
