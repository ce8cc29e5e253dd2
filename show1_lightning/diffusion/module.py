"""The shared diffusion LightningModule every stage builds on.

A stage subclass only says what differs: how a training pair is made from a batch of clips
(``training_inputs``), which conditioning tensors enter the UNet, and the shape of its samples.
Schedule, loss, caption dropout, EMA, optimizer, guided sampling and checkpoint contents live here.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn

from show1_lightning.diffusion.compile import compile_in_place, compile_options
from show1_lightning.diffusion.guidance import drop_captions
from show1_lightning.diffusion.lora import (
    TRAIN_ADAPTER,
    LoraSpec,
    add_lora,
    base_checksum,
    checksum_matches,
    is_lora_key,
)
from show1_lightning.diffusion.objectives import (
    check_frame_correlation,
    correlate_frames,
    diffusion_loss,
    frame_difference_loss,
    log_snr_time_table,
    min_snr_weights,
    sample_timesteps,
    shift_noise_schedule,
    split_learned_variance,
    timestep_range,
    training_target,
)
from show1_lightning.diffusion.sampling import denoise, make_sampler, seeded_noise
from show1_lightning.diffusion.sharding import clip_sharded_grad_norm, stage_ema_state_dict, sync_stage_ema
from show1_lightning.models.checkpointing import enable_gradient_checkpointing
from show1_lightning.models.frame_conv import use_frame_convs
from show1_lightning.models.show1_unet import released_train_mode_dropout


@dataclass
class StageCondition:
    """Per-sample conditioning besides text.

    concat: channels concatenated to the noisy sample (interpolation, pixel SR), B x c x T x H x W.
    class_labels: B integers fed to the UNet's class embedding (SR noise-augmentation level).
    """

    concat: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None

    def repeat_to(self, batch: int) -> StageCondition:
        """Tile along the batch axis (the guided batch is uncond + cond = 2B)."""

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None or x.shape[0] == batch:
                return x
            return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))

        return StageCondition(rep(self.concat), rep(self.class_labels))

    def slice(self, lo: int, hi: int) -> StageCondition:
        """Samples ``lo:hi`` of the batch."""
        return StageCondition(
            None if self.concat is None else self.concat[lo:hi],
            None if self.class_labels is None else self.class_labels[lo:hi],
        )


class DiffusionStage(L.LightningModule):
    """Base LightningModule: a UNet denoiser trained with the DDPM objective and sampled with DPM-Solver++.

    Args:
        unet: the denoiser; called as ``unet(x, t, encoder_hidden_states=..., [class_labels=...],
            [encoder_attention_mask=...]).sample``.
        noise_scheduler: the training schedule (Show-1: cosine ``squaredcos_cap_v2``, 1000 steps).
        optimizer: a partial optimizer (``_partial_: true`` in Hydra), called with the UNet parameters.
        text_encoder: frozen text encoder with ``encode(captions) -> (emb, mask)``; None when every batch
            carries cached ``text_emb`` and ``null_text_cache_dir`` provides the empty-caption embedding.
        sample_channels: channels of the generated sample (3 pixels, 4 latents).
        caption_dropout: probability of training on the empty caption (classifier-free guidance).
        t_min, t_max: closed range of training timesteps (None: the whole schedule).
        lr_scheduler: diffusers scheduler name and warmup steps.
        ema: ``decay``, ``use_ema_warmup``, ``power``, ``enabled``; EMA weights are used for sampling.
        sampling: defaults for ``generate`` (num_steps, guidance_scale, negative_prompt, solver args).
        gradient_checkpointing: trade compute for memory in the UNet.
        snr_gamma: Min-SNR-gamma loss weighting (None: plain MSE, as the paper's models).
        snr_floor: with ``snr_gamma``, the truncated-SNR floor of the x0 weight (``clamp(SNR, floor, gamma)``).
        zero_init_output: zero the UNet's output convolution at construction (a checkpoint loaded afterwards
            replaces it). With ``prediction_type: sample`` and a residual target, the untrained stage then returns
            exactly its baseline and training moves it from there (as ControlNet's zero convolutions).
        lora: ``{rank, alpha, dropout, target_modules, init_from}`` (``show1_lightning.diffusion.lora.LoraSpec``;
            None or rank 0: off): the UNet starts from ``init_from``, is frozen, and only a peft LoRA adapter trains;
            optimizer, EMA, checkpoint and export hold only the adapter.
        residual_scale: for a stage that learns a residual over its baseline (``residual: true``), the factor the
            residual is multiplied by before diffusion (and divided by after sampling). The residual of a good
            baseline is small (toy pixel SR: rms 0.027) next to the diffusion noise (0.39 at t = 250), which then
            hides it from the UNet; scaling it to about unit variance is the usual remedy (SRDiff, ResShift).
        time_input: what the UNet is told about the noise: ``timestep`` (the step, as released) or ``log_snr`` (the
            step's log-SNR mapped onto the step range, :func:`show1_lightning.diffusion.objectives.log_snr_time_table`).
        noise_schedule_shift: divide the SNR of every timestep of ``noise_scheduler`` by its square, for training
            and sampling (:func:`show1_lightning.diffusion.objectives.shift_noise_schedule`); 1 = as configured.
        compile: ``torch.compile`` the UNet in place (``configure_model``, and before sampling outside a Trainer):
            false, true, or torch.compile arguments (``show1_lightning.diffusion.compile``); state_dict keys unchanged.
        noise_frame_correlation: share this fraction of the noise's variance between the frames of a sample, in
            training and in the starting noise of sampling (:func:`show1_lightning.diffusion.objectives.correlate_frames`;
            PYoCo's mixed noise prior); 0 = independent frames, as released.
        frame_difference_loss_weight: add this multiple of the loss on the frame-to-frame differences of prediction
            and target (:func:`show1_lightning.diffusion.objectives.frame_difference_loss`: the motion's share of
            the error); 0 = the plain loss, as released.
        frame_convs: run the UNet's frames-only ``Conv3d`` layers (temporal convolutions) as ``Conv2d``
            (``show1_lightning.models.frame_conv``): the same weights and sums, several times faster on a CPU.
    """

    #: channels a stage concatenates to the noisy sample (interpolation: 4, pixel SR: 3).
    condition_channels: int = 0

    def __init__(
        self,
        unet: nn.Module,
        noise_scheduler: DDPMScheduler,
        optimizer: Callable[..., torch.optim.Optimizer],
        text_encoder: nn.Module | None = None,
        sample_channels: int = 3,
        caption_dropout: float = 0.1,
        t_min: int = 0,
        t_max: int | None = None,
        lr_scheduler: dict | None = None,
        ema: dict | None = None,
        sampling: dict | None = None,
        gradient_checkpointing: bool = False,
        null_text_cache_dir: str | None = None,
        snr_gamma: float | None = None,
        snr_floor: float | None = None,
        zero_init_output: bool = False,
        lora: dict | None = None,
        compile: bool | dict | None = False,
        frame_convs: bool = True,
        residual_scale: float = 1.0,
        noise_schedule_shift: float = 1.0,
        time_input: str = "timestep",
        noise_frame_correlation: float = 0.0,
        frame_difference_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if not residual_scale > 0:
            raise ValueError(f"stage.residual_scale must be > 0, got {residual_scale}")
        self.residual_scale = float(residual_scale)
        if snr_floor is not None and not snr_gamma:
            raise ValueError("stage.snr_floor needs stage.snr_gamma (the floor bounds Min-SNR weights)")
        self.snr_gamma, self.snr_floor = snr_gamma, snr_floor
        compile_options(compile)  # refuse a bad value now, not at the first step
        self.compile_spec = compile
        if frame_convs:  # temporal Conv3d (k x 1 x 1) as Conv2d: oneDNN instead of the CPU's conv3d fallback
            use_frame_convs(unet)
        self.unet = unet
        self.noise_scheduler = shift_noise_schedule(noise_scheduler, noise_schedule_shift)
        if time_input not in ("timestep", "log_snr"):
            raise ValueError(f"stage.time_input must be 'timestep' or 'log_snr', got {time_input!r}")
        # log_snr: the UNet is told the noise level (log_snr_time_table), not the step; the released models: steps.
        self._time_table = log_snr_time_table(self.noise_scheduler) if time_input == "log_snr" else None
        check_frame_correlation(noise_frame_correlation)
        self.noise_frame_correlation = float(noise_frame_correlation)
        if frame_difference_loss_weight < 0:
            raise ValueError(f"stage.frame_difference_loss_weight must be >= 0, got {frame_difference_loss_weight}")
        self.frame_difference_loss_weight = float(frame_difference_loss_weight)
        self.optimizer_factory = optimizer
        # Kept out of the module tree: frozen, possibly huge, never in checkpoints or DDP.
        self._frozen: dict[str, Any] = {"text_encoder": text_encoder}
        self.sample_channels = sample_channels
        self.caption_dropout = caption_dropout
        n_train = noise_scheduler.config.num_train_timesteps
        self.t_min, self.t_max = timestep_range(t_min, t_max, n_train)
        self.lr_scheduler_cfg = dict(lr_scheduler or {"name": "constant_with_warmup", "num_warmup_steps": 0})
        self.sampling_cfg = dict(sampling or {})
        self.null_text_cache_dir = null_text_cache_dir
        self._null_text: tuple[torch.Tensor, torch.Tensor] | None = None
        self._negative_text: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.stage_config: dict | None = None  # set by train.py: rebuilds the stage from a checkpoint
        unet_in = getattr(getattr(unet, "config", None), "in_channels", None)
        if unet_in is not None and unet_in != sample_channels + self.condition_channels:
            raise ValueError(
                f"{type(self).__name__} feeds the UNet {sample_channels} sample + {self.condition_channels} condition "
                f"channels, but the UNet config has in_channels={unet_in} (set model.in_channels)"
            )
        if zero_init_output:
            conv_out = getattr(unet, "conv_out", None)
            if not isinstance(conv_out, nn.Conv2d | nn.Conv3d):
                raise ValueError(f"stage.zero_init_output: {type(unet).__name__} has no conv_out convolution to zero")
            with torch.no_grad():
                conv_out.weight.zero_()
                if conv_out.bias is not None:
                    conv_out.bias.zero_()
        # After zero_init_output: the LoRA base weights (lora.init_from) replace the fresh UNet's.
        self.lora_spec = LoraSpec.from_config(lora)
        if self.lora_spec is not None:
            add_lora(unet, self.lora_spec)
        if gradient_checkpointing:
            # the class's own checkpointing, or per-layer checkpointing of diffusers' stock 3D blocks
            enable_gradient_checkpointing(unet)
        forward_params = inspect.signature(unet.forward).parameters
        self._unet_takes_mask = "encoder_attention_mask" in forward_params
        ema = dict(ema or {})
        self.ema: EMAModel | None = None
        if ema.pop("enabled", True):
            self.ema = EMAModel(self.ema_parameters(), **ema)
        # Skipped-sample totals over all ranks (identical on every rank), by reason. Plain attributes, not a
        # registered buffer: DDP broadcasts buffers from rank 0 before every forward, which overwrote each
        # rank's own count with rank 0's (the logged sum was about world_size x rank 0's count).
        self.skip_totals: dict[str, int] = {}

    # ------------------------------------------------------------------ stage hooks
    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, StageCondition]:
        """The clean target x0 (B x C x T x H x W) and the non-text conditioning of a batch."""
        return batch["video"], StageCondition()

    def sample_shape(self) -> tuple[int, ...]:
        """C x T x H x W of one generated sample."""
        raise NotImplementedError

    def auxiliary_loss(self, x0: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """A loss added to the diffusion loss for the stage's own trainable parts besides the UNet (the keyframe
        stage's layout planner), from the clean target and the captions' embeddings; None: none."""
        return None

    # ------------------------------------------------------------------ the stage interface
    # One call for every stage (the cascade is a loop over it, validation and evaluation use it too):
    #   video = stage.run(upstream, prompts, seeds, **sampling)
    # ``upstream`` is the previous stage's video (None for the keyframe stage). ``make_upstream`` makes that
    # input from a ground-truth clip at the stage's output size, and ``baseline`` is the stage's non-learned
    # answer to the same input (linear blend, bicubic): what the trained stage has to beat.

    #: False for a stage that makes video from text alone (the keyframe stage).
    takes_upstream: bool = True

    #: what the stage's upstream video is, for error messages ("keyframes", "a low-res video", ...).
    upstream_name: str = "an upstream video"

    def run(
        self,
        upstream: torch.Tensor | None,
        prompts: Sequence[str],
        seeds: Sequence[int],
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """This stage's output video (B x 3 x T x H x W in [-1, 1]) for ``upstream`` (None: text only),
        sample i seeded by ``seeds[i]``; ``sampling`` overrides the configured sampling values."""
        if self.takes_upstream and upstream is None:
            raise ValueError(f"{type(self).__name__} needs {self.upstream_name} (upstream)")
        if not self.takes_upstream and upstream is not None:
            raise ValueError(f"{type(self).__name__} makes video from text alone: upstream must be None")
        return self._run(upstream, list(prompts), list(seeds), text=text, **sampling)

    def _run(self, upstream: torch.Tensor | None, prompts: list[str], seeds: list[int], **kwargs: Any) -> torch.Tensor:
        """The stage's own sampling call behind :meth:`run` (arguments already checked)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")

    def make_upstream(self, video: torch.Tensor) -> torch.Tensor | None:
        """The input this stage gets in the cascade, made from a ground-truth clip at its output size
        (B x 3 x T x H x W); None for a stage that takes none."""
        return None

    def to_residual(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The diffused sample of a residual stage: ``(x - base) * residual_scale``."""
        return (x - base.to(x.dtype)) * self.residual_scale

    def from_residual(self, residual: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_residual`: ``residual / residual_scale + base``."""
        return residual / self.residual_scale + base.to(residual.dtype)

    def baseline(self, upstream: torch.Tensor) -> torch.Tensor:
        """The non-learned output for ``upstream`` (what the stage must beat), B x 3 x T x H x W in [-1, 1]."""
        raise NotImplementedError(f"{type(self).__name__} has no baseline: it takes no upstream video")

    def reference_outputs(self, upstream: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Further non-learned outputs reported beside the baseline in validation (name -> video)."""
        return {}

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> DiffusionStage:
        """Device moves of the stage (``.to(device)``, ``.cuda()``, ``.cpu()``) also move the frozen modules
        kept outside the module tree (text encoder, VAE), so a stage sent back to the CPU (the cascade keeps
        one stage on the accelerator) frees them too. Their dtype is left alone: they run in their own."""
        out = super()._apply(fn, *args, **kwargs)
        frozen = self.__dict__.get("_frozen", {})
        if frozen and any(True for _ in self.unet.parameters()):
            device = next(self.unet.parameters()).device
            for module in frozen.values():
                if isinstance(module, nn.Module):
                    first = next(module.parameters(), None)
                    if first is not None and first.device != device:
                        module.to(device)
        return out

    # ------------------------------------------------------------------ text
    @property
    def text_encoder(self) -> nn.Module | None:
        return self._frozen["text_encoder"]

    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the frozen text encoder on this module's device."""
        te = self.text_encoder
        if te is None:
            raise RuntimeError("this stage has no text encoder (text_encoder: null); provide cached text_emb")
        if next(te.parameters()).device != self.device:
            te.to(self.device)
        with torch.no_grad():
            emb, mask = te.encode(list(captions))
        return emb.to(self.device), mask.to(self.device)

    def null_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's 1 x L x D embedding and mask (from the encoder or the text cache)."""
        if self._null_text is None:
            if self.text_encoder is not None:
                # Cached for the whole run: computed with autocast off, or a first call inside a bf16-mixed
                # training step would keep a bf16-rounded embedding that later sampling reuses.
                with torch.autocast(self.device.type, enabled=False):
                    self._null_text = self.encode_text([""])
            elif self.null_text_cache_dir:
                from show1_lightning.data.text_cache import TextEmbeddingCache

                emb, mask = TextEmbeddingCache(self.null_text_cache_dir).null_embedding()
                self._null_text = (emb.reshape(1, *emb.shape[-2:]), mask.reshape(1, -1).bool())
            else:
                raise RuntimeError("no text encoder and no null_text_cache_dir: cannot build the empty caption")
        emb, mask = self._null_text
        return emb.to(self.device), mask.to(self.device)

    def negative_text(self, prompt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding of the negative prompt used as the unconditional branch ('' = empty caption)."""
        if not prompt:
            return self.null_text()
        if prompt not in self._negative_text:
            self._negative_text[prompt] = self.encode_text([prompt])
        emb, mask = self._negative_text[prompt]
        return emb.to(self.device), mask.to(self.device)

    def batch_text(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached embeddings when the batch carries them, else run the encoder on the captions."""
        if "text_emb" in batch:
            return batch["text_emb"].to(self.device), batch["text_mask"].to(self.device).bool()
        return self.encode_text(batch["caption"])

    # ------------------------------------------------------------------ network
    def predict(
        self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor, cond: StageCondition
    ) -> torch.Tensor:
        """UNet prediction for the noisy sample, with the stage's extra channels and class labels."""
        cond = cond.repeat_to(x_t.shape[0])
        x_in = x_t if cond.concat is None else torch.cat([x_t, cond.concat.to(x_t.dtype)], dim=1)
        kwargs: dict[str, Any] = {"encoder_hidden_states": emb}
        if cond.class_labels is not None:
            kwargs["class_labels"] = cond.class_labels
        if self._unet_takes_mask:
            kwargs["encoder_attention_mask"] = mask
        if self._time_table is not None:
            t = self._time_table.to(x_t.device)[torch.as_tensor(t, device=x_t.device).long()]
        out = self.unet(x_in, t, **kwargs).sample
        return split_learned_variance(out, x_t.shape[1])

    # ------------------------------------------------------------------ training
    def diffusion_step(
        self, batch: dict, generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of one batch; returns (loss, timesteps used)."""
        x0, cond = self.training_inputs(batch)
        emb, mask = self.batch_text(batch)
        aux = self.auxiliary_loss(x0, emb, mask)  # on the captions as given, before caption dropout
        if self.training and self.caption_dropout > 0:
            emb, mask, _ = drop_captions(emb, mask, *self.null_text(), self.caption_dropout, generator)
        b = x0.shape[0]
        t = timesteps if timesteps is not None else sample_timesteps(b, self.t_min, self.t_max, x0.device, generator)
        rho = self.noise_frame_correlation
        shared_shape = (*x0.shape[:2], 1, *x0.shape[3:])
        if generator is None:
            noise = torch.randn_like(x0)
            shared = torch.randn(shared_shape, dtype=x0.dtype, device=x0.device) if rho else None
        else:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            shared = torch.randn(shared_shape, generator=generator, dtype=x0.dtype).to(x0.device) if rho else None
        noise = correlate_frames(noise, shared, rho)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self.predict(x_t, t, emb, mask, cond)
        weights = min_snr_weights(self.noise_scheduler, t, self.snr_gamma, self.snr_floor) if self.snr_gamma else None
        target = training_target(self.noise_scheduler, x0, noise, t)
        loss = diffusion_loss(pred, target, weights)
        if self.frame_difference_loss_weight:
            loss = loss + self.frame_difference_loss_weight * frame_difference_loss(pred, target, weights)
        if aux is not None:
            if self._trainer is not None:
                self.log(
                    f"{'train' if self.training else 'val'}/aux_loss",
                    aux.detach(),
                    batch_size=b,
                    sync_dist=not self.training,
                )
            loss = loss + aux
        return loss, t

    @staticmethod
    def _batch_skips(batch: dict) -> torch.Tensor | None:
        """[total, per reason...] skipped on this rank while the batch was assembled (None: no counts)."""
        if "n_skipped" not in batch:
            return None
        from show1_lightning.data.datamodule import SKIP_REASONS

        counts = torch.zeros(1 + len(SKIP_REASONS), dtype=torch.long)
        counts[0] = batch["n_skipped"].detach().long().sum().cpu()
        if "skip_reasons" in batch:
            counts[1:] = batch["skip_reasons"].detach().long().reshape(-1, len(SKIP_REASONS)).sum(0).cpu()
        return counts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _ = self.diffusion_step(batch)
        b = batch["video"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        counts = self._batch_skips(batch)
        if counts is not None:
            from show1_lightning.data.datamodule import SKIP_REASONS

            trainer = self._trainer
            if trainer is not None and trainer.world_size > 1:  # one small all-reduce; every rank is in this step
                counts = trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
            # Running totals over all ranks since the start of the run (kept in checkpoints), identical on every
            # rank, so logged without another reduction.
            for name, c in zip(("total", *SKIP_REASONS), counts.tolist()):
                if c:
                    self.skip_totals[name] = self.skip_totals.get(name, 0) + int(c)
            self.log(
                "data/skipped_samples",
                float(self.skip_totals.get("total", 0)),
                on_step=True,
                on_epoch=False,
                batch_size=b,
            )
            for name in SKIP_REASONS:
                if self.skip_totals.get(name):
                    self.log(
                        f"data/skipped/{name}",
                        float(self.skip_totals[name]),
                        on_step=True,
                        on_epoch=False,
                        batch_size=b,
                    )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Fixed noise and timesteps per batch index: the validation loss is comparable across evaluations.
        g = torch.Generator("cpu").manual_seed(10_000 + batch_idx)
        loss, _ = self.diffusion_step(batch, generator=g)
        b = batch["video"].shape[0]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=b)
        counts = self._batch_skips(batch)
        if counts is not None:
            from show1_lightning.data.datamodule import SKIP_REASONS

            # Per validation run: summed over its batches and (sync_dist) over the ranks. Every name is logged on
            # every rank at every step, so the ranks enter the same reductions.
            self.log(
                "val/skipped_samples",
                float(counts[0]),
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
                sync_dist=True,
                batch_size=b,
            )
            for name, c in zip(SKIP_REASONS, counts[1:].tolist()):
                self.log(
                    f"val/skipped/{name}",
                    float(c),
                    on_step=False,
                    on_epoch=True,
                    reduce_fx="sum",
                    sync_dist=True,
                    batch_size=b,
                )
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: callbacks (ModelCheckpoint) run before the module's batch-end
        # hook, and a checkpoint must hold the EMA of the step it records.
        if self.ema is not None:
            sync_stage_ema(self)  # FSDP: the EMA lives on this rank's parameter slices (re-laid out after a resume)
            self.ema.step(self.ema_parameters())

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # FSDP: norm clipping over the sharded gradients (Lightning's own refuses FSDP); otherwise Lightning's.
        if not clip_sharded_grad_norm(self, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_model(self) -> None:
        """Lightning hook (fit/validate/test/predict): compile the UNet in place when ``compile`` is set."""
        compile_in_place(self.unet, self.compile_spec)

    def on_fit_start(self) -> None:
        if self.ema is not None:
            sync_stage_ema(self)  # FSDP: slice the EMA before moving it, never the full copy to the device
            self.ema.to(self.device)

    def configure_optimizers(self) -> dict:
        # The UNet's and any other trainable part of the stage (e.g. a layout planner); frozen encoders live
        # outside the module tree, LoRA freezes the UNet's base.
        params = [p for p in self.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params=params)
        cfg = dict(self.lr_scheduler_cfg)
        name = cfg.pop("name", "constant_with_warmup")
        total = (
            self.trainer.max_steps if self.trainer and self.trainer.max_steps and self.trainer.max_steps > 0 else None
        )
        sched = get_scheduler(name, opt, num_training_steps=total, **cfg)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def ema_parameters(self) -> list[nn.Parameter]:
        """The parameters the EMA averages (and the optimizer trains): the UNet's, or only its LoRA adapter's."""
        if self.lora_spec is None:
            return list(self.unet.parameters())
        return [p for n, p in self.unet.named_parameters() if is_lora_key(n) and f".{TRAIN_ADAPTER}." in n]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.lora_spec is not None:  # only the adapter; the base is referenced (lora.init_from + checksum)
            state = checkpoint.get("state_dict", {})
            checkpoint["state_dict"] = {k: v for k, v in state.items() if is_lora_key(k)}
            checkpoint["lora_base"] = {"init_from": self.lora_spec.init_from, "checksum": base_checksum(self.unet)}
        if self.ema is not None:
            checkpoint["ema"] = stage_ema_state_dict(self)  # full tensors, gathered when sharded
        if self.stage_config is not None:
            checkpoint["stage_config"] = self.stage_config
        checkpoint["skip_totals"] = dict(self.skip_totals)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.lora_spec is not None and "state_dict" in checkpoint:
            # A LoRA checkpoint holds the adapter only: the base comes from lora.init_from (loaded at construction),
            # so the strict state-dict load that follows gets the base from this module and the adapter stored.
            stored = (checkpoint.get("lora_base") or {}).get("checksum")
            if stored and not checksum_matches(stored, base_checksum(self.unet)):
                import warnings

                warnings.warn(f"this LoRA checkpoint was trained on another base than {self.lora_spec.init_from}")
            base = {k: v for k, v in self.state_dict().items() if not is_lora_key(k)}
            checkpoint["state_dict"] = {**base, **checkpoint["state_dict"]}
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        # Checkpoints before the skip accounting fix kept a (DDP-overwritten) buffer in the state_dict.
        legacy = checkpoint.get("state_dict", {}).pop("skipped_samples", None)
        totals = checkpoint.get("skip_totals")
        if totals is None and legacy is not None:
            totals = {"total": int(legacy)}
        self.skip_totals = {str(k): int(v) for k, v in (totals or {}).items()}

    @contextlib.contextmanager
    def ema_weights(self, enabled: bool = True) -> Iterator[None]:
        """Temporarily swap the EMA weights into the UNet."""
        if not enabled or self.ema is None:
            yield
            return
        sync_stage_ema(self)
        self.ema.to(self.device)
        params = self.ema_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate_windows(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        cond: StageCondition,
        shape: Sequence[int],
        text: tuple[torch.Tensor, torch.Tensor],
        chunk: int | None = None,
        init: torch.Tensor | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """``generate`` over a batch of windows (one prompt, seed, condition and text row each), at most ``chunk``
        windows per call (None: all at once). Window noise depends only on its seed, so chunking changes nothing
        but memory.

        ``sampling["strength"]`` (default: the configured ``sampling.strength``, else 1) below 1 starts every window
        from ``init`` (what the stage's baseline gives, in the sample's own space) noised to that point of the
        schedule instead of from pure noise (SDEdit): the stage then refines its baseline.
        """
        n = len(prompts)
        chunk = chunk or n
        emb, mask = text
        strength = float(sampling.pop("strength", self.sampling_cfg.get("strength", 1.0)))
        if strength < 1.0 and init is None:
            raise ValueError(f"{type(self).__name__}: sampling strength {strength} < 1 needs an init")
        outs = []
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            refine = {"init": init[lo:hi], "strength": strength} if strength < 1.0 else {}
            outs.append(
                self.generate(
                    list(prompts[lo:hi]),
                    list(seeds[lo:hi]),
                    cond=cond.slice(lo, hi),
                    shape=tuple(shape),
                    text=(emb[lo:hi], mask[lo:hi]),
                    **refine,
                    **sampling,
                )
            )
        return torch.cat(outs)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        cond: StageCondition | None = None,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
        shape: Sequence[int] | None = None,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        use_ema: bool = True,
        progress: bool = False,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Generate one sample per prompt (B x C x T x H x W), sample i from noise seeded by ``seeds[i]``.

        ``text`` may carry precomputed (emb, mask) instead of running the encoder on ``prompts``.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        s = self.sampling_cfg
        num_steps = s.get("num_steps", 50) if num_steps is None else num_steps  # 0 is an error, not "the default"
        guidance_scale = s.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
        negative_prompt = s.get("negative_prompt", "") if negative_prompt is None else negative_prompt
        solver = {
            k: v
            for k, v in s.items()
            if k not in ("num_steps", "guidance_scale", "negative_prompt", "train_mode_dropout", "strength")
        }
        sampler = make_sampler(self.noise_scheduler, **solver)
        shape = tuple(shape) if shape is not None else self.sample_shape()
        emb, mask = text if text is not None else self.encode_text(prompts)
        null_emb, null_mask = self.negative_text(negative_prompt)
        cond = cond or StageCondition()
        noise = seeded_noise(shape, seeds, self.device, self.noise_frame_correlation)
        compile_in_place(self.unet, self.compile_spec)  # sampling outside a Trainer (cascade, generate.py)
        was_training = self.unet.training
        self.unet.eval()
        try:
            # Released Show-1 base sampling keeps dropout on (UNet in train mode): an explicit option.
            with self.ema_weights(use_ema), released_train_mode_dropout(self.unet, bool(s.get("train_mode_dropout"))):
                out = denoise(
                    lambda x, t, e, m: self.predict(x, t, e, m, cond),
                    sampler,
                    noise,
                    emb.to(self.device),
                    mask.to(self.device),
                    null_emb,
                    null_mask,
                    num_steps=num_steps,
                    guidance_scale=guidance_scale,
                    init=init,
                    strength=strength,
                    progress=progress,
                    last_timestep=self.t_min,  # a stage trained on t >= t_min stops there (truncated diffusion)
                )
        finally:
            self.unet.train(was_training)
        return out
