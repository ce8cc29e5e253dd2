"""UNets that load the released Show-1 weights.

- :class:`Show1UNet3DConditionModel`: show-1-base, show-1-interpolation, show-1-sr1. DeepFloyd-IF UNets inflated to
  video (IF resnet up/down blocks, added-KV "simple" cross-attention, temporal convs and temporal attention, T5
  text projection ``encoder_hid_proj``, pooled-text ``add_embedding``, timestep-style ``class_embedding`` for the
  SR noise level). Config keys and module names follow the released ``unet/config.json`` (the official
  ``showone/models/unet_3d_condition.py``, including its misspelt ``transfromer_in_opt`` key).
- :class:`Show1SR2UNet3DConditionModel`: show-1-sr2, the zeroscope / ModelScope layout (diffusers' stock
  ``UNet3DConditionModel``), with the input temporal transformer ``transformer_in`` optional.
- :func:`build_show1_unet`: the Hydra factory (released config name or path, optional folder of released weights).
- :func:`released_train_mode_dropout`: the released pipeline samples with the temporal convolutions' dropout on,
  which changes the numbers; this helper reproduces it explicitly.

The learned-variance output channels (show-1-base, -interpolation) are split off by
``show1_lightning.diffusion.objectives.split_learned_variance``.

All models take and return videos as ``(batch, channels, frames, height, width)``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet3DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.embeddings import TextTimeEmbedding, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from diffusers.models.unets.unet_3d_condition import UNet3DConditionOutput
from diffusers.utils import logging
from torch import nn

from show1_lightning.models.show1_unet_blocks import (
    MAX_FRAMES,
    BlockConfig,
    UNetMidBlock3DSimpleCrossAttn,
    fuse_attention_pooling,
    get_down_block,
    get_up_block,
)

logger = logging.get_logger(__name__)

RELEASED_CONFIG_DIR = Path(__file__).resolve().parent / "released_configs"
# Block types of the stock diffusers/ModelScope 3D UNet (show-1-sr2); used to pick the class for a config.
_STOCK_3D_BLOCKS = {"CrossAttnDownBlock3D", "DownBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"}
# Large negative bias for masked text tokens (the value the released code uses).
_MASK_BIAS = -10000.0

__all__ = [
    "Show1UNet3DConditionModel",
    "Show1SR2UNet3DConditionModel",
    "UNet3DConditionOutput",
    "build_show1_unet",
    "load_released_config",
    "released_config_names",
    "released_train_mode_dropout",
]


def _as_list(value: Any, n: int, name: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # also an OmegaConf ListConfig
        if len(value) != n:
            raise ValueError(f"`{name}` has {len(value)} entries but there are {n} down blocks: {value}")
        return list(value)
    return [value] * n


def _mask_to_bias(mask: torch.Tensor | None, batch: int, num_frames: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``(B, L)`` keep-mask (1/True keep, 0/False drop) -> additive bias ``(B*F, 1, L)``."""
    if mask is None:
        return None
    if mask.dim() != 2 or mask.shape[0] != batch:
        raise ValueError(f"attention masks must be (batch={batch}, text_len); got {tuple(mask.shape)}")
    bias = (1.0 - mask.to(dtype)) * _MASK_BIAS
    return bias.unsqueeze(1).repeat_interleave(num_frames, dim=0)


# Rank of the caption-to-frame map of ``frame_embeddings='text'`` (the pooled text is projected to this many
# numbers, and each frame maps them onto the time embedding).
FRAME_TEXT_RANK = 16


class Show1UNet3DConditionModel(ModelMixin, ConfigMixin):
    """Show-1 pixel UNet (show-1-base / -interpolation / -sr1): DeepFloyd IF's UNet inflated to video.

    Config keys are those of the released ``unet/config.json``; two keys are ours: ``temporal_conv_dropout`` (0.1, as
    released) and ``temporal_positional_embeddings`` (None, as released: the temporal attention has no notion of frame
    order, only the temporal convs' zero padding tells frames apart; ``"sinusoidal"`` adds diffusers' parameter-free
    frame-position table before every temporal attention, as AnimateDiff's motion modules do). Unsupported options
    (e.g. Fourier time embeddings, image projections) raise ``ValueError``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 3,
        out_channels: int = 6,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "ResnetDownsampleBlock3D",
            "SimpleCrossAttnDownBlock3D",
            "SimpleCrossAttnDownBlock3D",
            "SimpleCrossAttnDownBlock3D",
        ),
        mid_block_type: str | None = "UNetMidBlock3DSimpleCrossAttn",
        up_block_types: tuple[str, ...] = (
            "SimpleCrossAttnUpBlock3D",
            "SimpleCrossAttnUpBlock3D",
            "SimpleCrossAttnUpBlock3D",
            "ResnetUpsampleBlock3D",
        ),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 960, 1280),
        layers_per_block: int | tuple[int, ...] = 3,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "gelu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int, ...] = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = 4096,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 64,
        num_attention_heads: int | tuple[int, ...] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = "text",
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "scale_shift",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = "group_norm",
        addition_embed_type_num_heads: int = 64,
        transfromer_in_opt: bool = False,  # sic: the released key name
        temporal_conv_dropout: float = 0.1,
        temporal_positional_embeddings: str | None = None,
        frame_embeddings: str | None = None,
    ) -> None:
        super().__init__()
        n = len(down_block_types)
        if len(up_block_types) != n:
            raise ValueError(f"{n} down_block_types but {len(up_block_types)} up_block_types")
        if len(block_out_channels) != n:
            raise ValueError(f"{n} down_block_types but {len(block_out_channels)} block_out_channels")
        if num_attention_heads is not None:
            raise ValueError("`num_attention_heads` is not used by Show-1 configs; set `attention_head_dim`.")
        if dual_cross_attention or use_linear_projection or upcast_attention:
            raise ValueError("dual_cross_attention / use_linear_projection / upcast_attention are not Show-1 options")
        if time_embedding_type != "positional":
            raise ValueError(f"time_embedding_type {time_embedding_type!r} unsupported (Show-1 uses 'positional')")
        if norm_num_groups is None:
            raise ValueError("norm_num_groups must be set (GroupNorm everywhere in Show-1)")
        if any(t != 1 for t in _as_list(transformer_layers_per_block, n, "transformer_layers_per_block")):
            raise ValueError("transformer_layers_per_block other than 1 has no meaning for simple cross-attention")

        only_cross = _as_list(only_cross_attention, n, "only_cross_attention")
        if mid_block_only_cross_attention is None:
            # Released semantics: a single bool also applies to the mid block; a per-block list does not.
            mid_block_only_cross_attention = only_cross_attention if isinstance(only_cross_attention, bool) else False
        head_dims = _as_list(attention_head_dim, n, "attention_head_dim")
        xattn_dims = _as_list(cross_attention_dim, n, "cross_attention_dim")
        layers = _as_list(layers_per_block, n, "layers_per_block")

        # input
        self.conv_in = nn.Conv2d(
            in_channels, block_out_channels[0], kernel_size=conv_in_kernel, padding=(conv_in_kernel - 1) // 2
        )
        # Optional temporal transformer right after conv_in (released: 8 heads x 64, one layer).
        self.transformer_in = None
        if transfromer_in_opt:
            self.transformer_in = TransformerTemporalModel(
                num_attention_heads=8, attention_head_dim=64, in_channels=block_out_channels[0], num_layers=1
            )

        # time
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        timestep_input_dim = block_out_channels[0]
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(
            timestep_input_dim,
            time_embed_dim,
            act_fn=act_fn,
            post_act_fn=timestep_post_act,
            cond_proj_dim=time_cond_proj_dim,
        )

        # text projection (T5 width -> cross-attention width)
        if encoder_hid_dim_type is None and encoder_hid_dim is not None:
            encoder_hid_dim_type = "text_proj"
            self.register_to_config(encoder_hid_dim_type=encoder_hid_dim_type)
        if encoder_hid_dim_type not in (None, "text_proj"):
            raise ValueError(f"encoder_hid_dim_type {encoder_hid_dim_type!r} unsupported (Show-1: 'text_proj')")
        if encoder_hid_dim_type == "text_proj" and encoder_hid_dim is None:
            raise ValueError("encoder_hid_dim_type 'text_proj' needs encoder_hid_dim")
        if encoder_hid_dim_type == "text_proj" and not isinstance(cross_attention_dim, int):
            raise ValueError("a text projection needs a single int cross_attention_dim")
        self.encoder_hid_proj = nn.Linear(encoder_hid_dim, cross_attention_dim) if encoder_hid_dim_type else None

        # class embedding (SR noise level enters as a timestep-style class label)
        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=act_fn)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif class_embed_type == "projection":
            if projection_class_embeddings_input_dim is None:
                raise ValueError("class_embed_type 'projection' needs projection_class_embeddings_input_dim")
            self.class_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise ValueError(f"class_embed_type {class_embed_type!r} unsupported")

        # pooled-text embedding added to the time embedding (IF: from the raw T5 states, before projection)
        if addition_embed_type == "text":
            text_dim = encoder_hid_dim if encoder_hid_dim is not None else cross_attention_dim
            self.add_embedding = TextTimeEmbedding(text_dim, time_embed_dim, num_heads=addition_embed_type_num_heads)
            fuse_attention_pooling(self.add_embedding)  # its pooling through SDPA, not einsum + softmax
        elif addition_embed_type is not None:
            raise ValueError(f"addition_embed_type {addition_embed_type!r} unsupported (Show-1: 'text' or null)")
        else:
            self.add_embedding = None

        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn else None
        if frame_embeddings not in (None, "learned", "text"):
            raise ValueError(f"frame_embeddings must be null, 'learned' or 'text', got {frame_embeddings!r}")
        # Ours, off as released: a learned per-frame vector added to the time embedding (zero at the start), so the
        # resnets' scale-shift sees time, pooled text and frame position together and can tie the text to a frame.
        blocks_temb = time_embed_dim * 2 if class_embeddings_concat else time_embed_dim
        self.frame_embedding = nn.Embedding(MAX_FRAMES, blocks_temb) if frame_embeddings else None
        if self.frame_embedding is not None:
            nn.init.zeros_(self.frame_embedding.weight)
        # "text" adds a per-frame linear map of the pooled text embedding (low rank, zero at the start): the caption
        # gets a say per frame. With "learned" alone text and frame meet only through a sum and an activation, so
        # a caption-dependent, frame-dependent signal (which way the shape moves) gets no first-order gradient:
        # the batch's directions cancel in the frame vectors' gradient. (On the toy data it did not make the
        # direction word used either: docs/toy_loop.md.)
        self.frame_text_down: nn.Linear | None = None
        self.frame_text_up: nn.Parameter | None = None
        if frame_embeddings == "text":
            if self.add_embedding is None:
                raise ValueError(
                    "frame_embeddings='text' needs the pooled-text embedding (addition_embed_type='text')"
                )
            self.frame_text_down = nn.Linear(time_embed_dim, FRAME_TEXT_RANK, bias=False)
            self.frame_text_up = nn.Parameter(torch.zeros(MAX_FRAMES, FRAME_TEXT_RANK, blocks_temb))

        def block_cfg(i: int, only_cross_flag: bool) -> BlockConfig:
            return BlockConfig(
                temb_channels=blocks_temb,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                resnet_time_scale_shift=resnet_time_scale_shift,
                skip_time_act=resnet_skip_time_act,
                output_scale_factor=resnet_out_scale_factor,
                attention_head_dim=head_dims[i] if head_dims[i] is not None else block_out_channels[i],
                cross_attention_dim=xattn_dims[i],
                only_cross_attention=only_cross_flag,
                cross_attention_norm=cross_attention_norm,
                temporal_conv_dropout=temporal_conv_dropout,
                temporal_positional_embeddings=temporal_positional_embeddings,
            )

        # down
        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(
                get_down_block(block_type, in_ch, out_ch, layers[i], i < n - 1, block_cfg(i, only_cross[i]))
            )

        # mid
        if mid_block_type == "UNetMidBlock3DSimpleCrossAttn":
            mid_cfg = block_cfg(n - 1, bool(mid_block_only_cross_attention)).replace(
                output_scale_factor=mid_block_scale_factor
            )
            self.mid_block = UNetMidBlock3DSimpleCrossAttn(block_out_channels[-1], mid_cfg)
        elif mid_block_type is None:
            self.mid_block = None
        else:
            raise ValueError(
                f"mid_block_type {mid_block_type!r} unsupported (Show-1: 'UNetMidBlock3DSimpleCrossAttn')"
            )

        # up (per-block options reversed; the head dim list is *not* reversed, as in the released code)
        self.up_blocks = nn.ModuleList()
        rev_ch = list(reversed(block_out_channels))
        rev_layers = list(reversed(layers))
        rev_xattn = list(reversed(xattn_dims))
        rev_only_cross = list(reversed(only_cross))
        self.num_upsamplers = 0
        out_ch = rev_ch[0]
        for i, block_type in enumerate(up_block_types):
            prev_ch, out_ch = out_ch, rev_ch[i]
            in_ch = rev_ch[min(i + 1, n - 1)]
            add_up = i < n - 1
            self.num_upsamplers += int(add_up)
            cfg = block_cfg(i, rev_only_cross[i]).replace(cross_attention_dim=rev_xattn[i])
            self.up_blocks.append(get_up_block(block_type, in_ch, prev_ch, out_ch, rev_layers[i] + 1, add_up, cfg))

        # out
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(
            block_out_channels[0], out_channels, kernel_size=conv_out_kernel, padding=(conv_out_kernel - 1) // 2
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet3DConditionOutput | tuple[torch.Tensor]:
        """Predict from a noisy video.

        Args:
            sample: ``(B, in_channels, F, H, W)``; H and W multiples of ``2 ** num_upsamplers``.
            timestep: scalar or ``(B,)`` diffusion timesteps.
            encoder_hidden_states: ``(B, L, encoder_hid_dim)`` text states (T5 width; projected inside).
            class_labels: ``(B,)`` SR noise levels when ``class_embed_type`` is set (required then).
            attention_mask / encoder_attention_mask: ``(B, L)`` keep-masks (1 keep, 0 drop) for the text tokens;
                as released, ``attention_mask`` takes precedence in the cross-attention blocks. Note that the
                pooled-text ``add_embedding`` pools over all tokens, as released.
            cross_attention_kwargs: passed to the attention processors.
        Returns:
            ``UNet3DConditionOutput`` with ``.sample`` ``(B, out_channels, F, H, W)`` (or a 1-tuple).
        """
        if sample.dim() != 5:
            raise ValueError(f"sample must be (batch, channels, frames, height, width); got {tuple(sample.shape)}")
        batch, channels, num_frames, height, width = sample.shape
        if channels != self.config.in_channels:
            raise ValueError(
                f"sample has {channels} channels but the model expects in_channels={self.config.in_channels}"
            )
        factor = 2**self.num_upsamplers
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}; got {height}x{width}")
        if (
            encoder_hidden_states is None
            or encoder_hidden_states.dim() != 3
            or encoder_hidden_states.shape[0] != batch
        ):
            got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"encoder_hidden_states must be (batch={batch}, tokens, dim); got {got}")

        dtype = sample.dtype
        attention_mask = _mask_to_bias(attention_mask, batch, num_frames, dtype)
        encoder_attention_mask = _mask_to_bias(encoder_attention_mask, batch, num_frames, dtype)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time (+ class, + pooled text)
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], device=sample.device)
        elif timesteps.dim() == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.to(sample.device).expand(batch)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype), timestep_cond)

        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels are required: this model has a class embedding (SR noise level)")
            class_labels = torch.as_tensor(class_labels, device=sample.device)
            if class_labels.dim() == 0:
                class_labels = class_labels[None]
            class_labels = class_labels.expand(batch)
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(dtype)
            class_emb = self.class_embedding(class_labels).to(dtype)
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        elif class_labels is not None:
            raise ValueError("class_labels given but this model has no class embedding")

        text_emb = None
        if self.add_embedding is not None:
            text_emb = self.add_embedding(encoder_hidden_states)
            emb = emb + text_emb
        emb = emb.repeat_interleave(num_frames, dim=0)  # (batch * frames, C); the activation below is elementwise
        if self.frame_embedding is not None:
            if num_frames > MAX_FRAMES:
                raise ValueError(f"{num_frames} frames, more than the frame embedding's {MAX_FRAMES}")
            frames = torch.arange(num_frames, device=emb.device)
            emb = emb + self.frame_embedding(frames).to(emb.dtype).repeat(batch, 1)
        if self.frame_text_up is not None:
            per_frame = torch.einsum("br,frc->bfc", self.frame_text_down(text_emb), self.frame_text_up[:num_frames])
            emb = emb + per_frame.reshape(batch * num_frames, -1).to(emb.dtype)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)

        encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)

        # 2. pre-process: fold frames into the batch
        x = sample.permute(0, 2, 1, 3, 4).reshape(batch * num_frames, channels, height, width)
        x = self.conv_in(x)
        if self.transformer_in is not None:
            x = self.transformer_in(
                x, num_frames=num_frames, cross_attention_kwargs=cross_attention_kwargs, return_dict=False
            )[0]

        block_kwargs = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            num_frames=num_frames,
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=encoder_attention_mask,
        )
        # 3. down
        skips: tuple[torch.Tensor, ...] = (x,)
        for block in self.down_blocks:
            x, res = block(x, emb, **block_kwargs)
            skips += res
        # 4. mid
        if self.mid_block is not None:
            x = self.mid_block(x, emb, **block_kwargs)
        # 5. up
        for block in self.up_blocks:
            n_res = len(block.resnets)
            res, skips = skips[-n_res:], skips[:-n_res]
            x = block(x, res, emb, **block_kwargs)
        # 6. post-process and unfold frames
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        out = x.reshape(batch, num_frames, -1, height, width).permute(0, 2, 1, 3, 4)
        if not return_dict:
            return (out,)
        return UNet3DConditionOutput(sample=out)


class _PassThroughTemporal(nn.Module):
    """Stand-in for an absent ``transformer_in`` (no parameters): returns its input as a 1-tuple."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        return (hidden_states,)


class Show1SR2UNet3DConditionModel(UNet3DConditionModel):
    """show-1-sr2 UNet: diffusers' stock ``UNet3DConditionModel`` (zeroscope / ModelScope layout) plus options.

    - ``use_transformer_in`` (default ``True``, as stock and zeroscope): set ``False`` for checkpoints without
      the input temporal transformer. The official Show-1 class's key ``transfromer_in_opt`` is honoured when
      present in a config (it overrides ``use_transformer_in``).
    - ``forward`` also accepts ``encoder_attention_mask`` (ignored, with a one-time warning: the ModelScope lineage
      never masks its CLIP text tokens, and the stock blocks have no cross-attention mask input) and
      ``class_labels`` (must be ``None``).
    - gradient checkpointing (``enable_gradient_checkpointing()``), which the stock class lacks: every layer of the
      stock 3D blocks runs under ``torch.utils.checkpoint`` (:mod:`show1_lightning.models.checkpointing`).
    """

    _supports_gradient_checkpointing = True

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Any = None) -> None:
        # diffusers' default would set flags the stock 3D blocks never read (and switch on the transformers' own
        # inner checkpointing): checkpoint the blocks' layers instead.
        from show1_lightning.models.checkpointing import set_stock_3d_checkpointing

        set_stock_3d_checkpointing(self, enable)

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "CrossAttnDownBlock3D",
            "DownBlock3D",
        ),
        up_block_types: tuple[str, ...] = (
            "UpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
            "CrossAttnUpBlock3D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        attention_head_dim: int | tuple[int, ...] = 64,
        num_attention_heads: int | tuple[int, ...] | None = None,
        time_cond_proj_dim: int | None = None,
        use_transformer_in: bool = True,
        transfromer_in_opt: bool | None = None,  # sic: the official Show-1 key
    ) -> None:
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            time_cond_proj_dim=time_cond_proj_dim,
        )
        if transfromer_in_opt is not None:
            use_transformer_in = bool(transfromer_in_opt)
        if not use_transformer_in:
            self.transformer_in = _PassThroughTemporal()
        self._warned_mask = False

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> UNet3DConditionOutput | tuple[torch.Tensor]:
        """Stock ``UNet3DConditionModel.forward`` on ``(B, C, F, H, W)`` latents, with input checks."""
        if sample.dim() != 5 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample must be (batch, {self.config.in_channels}, frames, height, width); got {tuple(sample.shape)}"
            )
        if class_labels is not None:
            raise ValueError("the sr2 UNet has no class embedding; class_labels must be None")
        if encoder_attention_mask is not None and not self._warned_mask:
            logger.warning(
                "Show1SR2UNet3DConditionModel ignores encoder_attention_mask (unmasked CLIP text, as released)"
            )
            self._warned_mask = True
        return super().forward(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=return_dict,
            **kwargs,
        )


# ---------------------------------------------------------------------- configs and factory
def released_config_names() -> list[str]:
    """Names of the bundled full-size released configs (``show-1-base``, ...)."""
    return sorted(p.stem for p in RELEASED_CONFIG_DIR.glob("*.json"))


def load_released_config(config: str | os.PathLike | dict) -> dict:
    """Return a config dict from a bundled name (``"show-1-sr1"``), a JSON file, a folder holding
    ``config.json`` (or ``unet/config.json``), or a dict (copied)."""
    if isinstance(config, Mapping):  # also an OmegaConf DictConfig
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
    name = str(config)
    bundled = RELEASED_CONFIG_DIR / f"{name}.json"
    if bundled.is_file():
        path = bundled
    else:
        path = Path(name)
        if path.is_dir():
            path = path / "config.json" if (path / "config.json").is_file() else path / "unet" / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"No UNet config {name!r}: not one of {released_config_names()} nor a config.json file/folder"
            )
    with open(path) as f:
        return json.load(f)


def _model_class_for(config: dict) -> type[ModelMixin]:
    blocks = set(config.get("down_block_types", ())) | set(config.get("up_block_types", ()))
    return Show1SR2UNet3DConditionModel if blocks & _STOCK_3D_BLOCKS else Show1UNet3DConditionModel


def build_show1_unet(
    config: str | os.PathLike | dict,
    pretrained_path: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a Show-1 UNet (Hydra ``_target_``).

    Args:
        config: released config name (``show-1-base``, ``show-1-interpolation``, ``show-1-sr1``, ``show-1-sr2``),
            a config JSON path, or a dict. The class is chosen from the block types (stock ModelScope blocks ->
            :class:`Show1SR2UNet3DConditionModel`, else :class:`Show1UNet3DConditionModel`).
        pretrained_path: optional folder of released weights: a model repo (``<folder>/unet/config.json``) or the
            UNet folder itself. When given, its own ``config.json`` defines the architecture and ``config`` only
            picks the class; loading fails on any missing or unexpected key.
        torch_dtype: optional dtype for loaded weights.
        overrides: config keys to override when building from ``config`` (ignored keys raise).
    """
    # Gradient checkpointing is the stage's switch (stage.gradient_checkpointing). Configs stored before that carry a
    # model-level flag too: a training-time setting that does not change the model built, dropped so they still load.
    overrides.pop("gradient_checkpointing", None)
    cfg = load_released_config(config)
    if pretrained_path is not None:
        folder = Path(pretrained_path)
        subfolder = "unet" if (folder / "unet" / "config.json").is_file() else None
        if subfolder is None and not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} holds neither unet/config.json nor config.json")
        if overrides:
            raise ValueError(f"config overrides {sorted(overrides)} cannot be applied to pretrained weights")
        cls = _model_class_for(load_released_config(folder / subfolder if subfolder else folder))
        kwargs: dict[str, Any] = {"subfolder": subfolder, "low_cpu_mem_usage": False, "output_loading_info": True}
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        model, info = cls.from_pretrained(str(folder), **kwargs)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise RuntimeError(f"Released weights in {folder} do not match {cls.__name__}: {bad}")
    else:
        cls = _model_class_for(cfg)
        unknown = set(overrides) - set(cls._get_init_keys(cls))
        if unknown:
            raise ValueError(f"unknown config overrides for {cls.__name__}: {sorted(unknown)}")
        model = cls.from_config({**cfg, **overrides})
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    return model


# ---------------------------------------------------------------------- sampling-time helpers
@contextlib.contextmanager
def released_train_mode_dropout(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Context manager: put only the dropout layers of ``model`` in train mode (``enabled=True``).

    The official show-1-base pipeline samples with the UNet in train mode, which in these UNets only changes
    dropout: the temporal convolutions' dropout (p=0.1) stays active during sampling. This reproduces exactly that
    (unlike ``model.train()`` it does not switch on gradient checkpointing or anything else). Restores the
    previous modes on exit. With ``enabled=False`` it does nothing.
    """
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    previous = [m.training for m in dropouts]
    try:
        if enabled:
            for m in dropouts:
                m.train(True)
        yield model
    finally:
        for m, mode in zip(dropouts, previous):
            m.train(mode)
