"""The DDIM sampler a run samples and trains a UNet model with, told before any weight loads, and what it cannot do.

The scheduler config comes from the model's files (a folder's ``scheduler/``, an architecture's shipped one, a single
file's architecture's with its ``v_pred`` and ``ztsnr`` keys), then the run's ``prediction_type`` and
``zero_terminal_snr`` apply (:func:`run_scheduler`). `plan` and training ask before loading
(``loading.check_before_load``), so a plan never says FITS for a run that training refuses; the loader builds the
sampler with the same function from what it loaded (a hub id's files are read only then).
"""

from __future__ import annotations

from lowmem_alignprop.settings.config import ZERO_SNR_EPSILON, zero_snr_eta
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.paths import scheduler_config


def run_scheduler(cfg, config, kind: str, where: str):
    """The DDIM scheduler of ``cfg``'s run over the model's scheduler ``config`` (``kind``, ``where``:
    ``loading.resolve_model``'s): refused, one line, where it cannot sample."""
    from lowmem_alignprop.models.arch import marked_zero_snr
    from lowmem_alignprop.models.sampling import ddim_scheduler

    predicts = getattr(cfg, "prediction_type", "auto")  # (auto: as the model's scheduler config says)
    zero_snr = getattr(cfg, "zero_terminal_snr", False) or (kind == "file" and marked_zero_snr(where))
    scheduler = ddim_scheduler(config, None if predicts == "auto" else predicts, zero_snr=zero_snr)
    check_sampler(cfg, scheduler.config)
    return scheduler


def check_sampler(cfg, config) -> None:
    """Zero terminal SNR (the flag's, or the model's own schedule): not with a noise-predicting UNet, whose last
    timestep's input is all noise; not with DDIM's eta 1 where sampling starts from that timestep (trailing
    spacing), which diffusers' step turns into NaN."""
    if not config.get("rescale_betas_zero_snr"):
        return
    if config.get("prediction_type") == "epsilon":
        if getattr(cfg, "zero_terminal_snr", False):
            raise UserError(ZERO_SNR_EPSILON)
        said = " (--set prediction_type=epsilon)" if getattr(cfg, "prediction_type", "auto") == "epsilon" else ""
        fix = "use" if said else "add"
        raise UserError(f"{cfg.model}'s files give it a zero terminal SNR noise schedule, and it predicts noise "
                        f"(epsilon){said}: at zero SNR the last timestep's latent is all noise, which a noise-"
                        f"predicting UNet cannot denoise: it is for v-prediction models; {fix} --set "
                        "prediction_type=v_prediction")
    if getattr(cfg, "eta", 0.0) >= 1 and config.get("timestep_spacing") == "trailing":
        raise UserError(f"{cfg.model}: " + zero_snr_eta(cfg.eta))


def ddim_settings(cfg, config) -> dict:
    """How a UNet model's images are sampled: DDIM's eta and guidance rescale (``cfg``), and what the UNet is taken
    to predict and whether at zero terminal SNR (the scheduler's ``config``): sample_results.json's and plan's."""
    return {"eta": cfg.eta, "guidance_rescale": cfg.guidance_rescale, "prediction_type": config.get("prediction_type"),
            "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr"))}


def files_scheduler_config(cfg, kind: str, where: str) -> dict | None:
    """The scheduler config the model's files give, read without its weights; None for a hub id (read as it loads)
    and for an SD3/FLUX model (no DDIM)."""
    if kind == "tiny":
        from lowmem_alignprop.models.tiny import tiny_model_dir

        return scheduler_config(tiny_model_dir())
    if kind == "dir":  # (a folder without one: the loader says what is wrong with it)
        return scheduler_config(where)
    if kind == "arch":
        from lowmem_alignprop.models.arch import arch_config_dir

        return scheduler_config(arch_config_dir(where))
    if kind == "file":
        from lowmem_alignprop.models.arch import file_scheduler_config

        return file_scheduler_config(where, getattr(cfg, "model_arch", "auto"))
    return None
