"""3D blocks of the Show-1 pixel UNets (DeepFloyd-IF blocks inflated to video).

Module and attribute names follow the released Show-1 checkpoints (``showone/models/unet_3d_blocks.py`` in
showlab/Show-1), so that a released ``diffusion_pytorch_model.safetensors`` maps onto these modules key for key:

- every block holds ``resnets`` (diffusers ``ResnetBlock2D``), ``temp_convs`` (diffusers ``TemporalConvLayer``,
  dropout 0.1) and, when it attends, ``attentions`` (diffusers ``Attention`` with added key/value projections, the
  IF "simple cross-attention") and ``temp_attentions`` (a diffusers ``TransformerTemporalModel``);
- down/up sampling is a ``ResnetBlock2D(down=True | up=True)`` in ``downsamplers`` / ``upsamplers`` (IF's
  ``resblock_updown``).

Frames travel folded into the batch: hidden states are ``(batch * frames, channels, height, width)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import AttentionPooling
from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from torch import nn

__all__ = [
    "AddedKVAttnProcessor",
    "FusedAttentionPooling",
    "BlockConfig",
    "ResnetDownsampleBlock3D",
    "SimpleCrossAttnDownBlock3D",
    "UNetMidBlock3DSimpleCrossAttn",
    "ResnetUpsampleBlock3D",
    "SimpleCrossAttnUpBlock3D",
    "DOWN_BLOCK_TYPES",
    "UP_BLOCK_TYPES",
    "get_down_block",
    "get_up_block",
]


class FusedAttentionPooling(AttentionPooling):
    """diffusers' ``AttentionPooling`` (the pooled-text embedding of ``TextTimeEmbedding``) through
    ``F.scaled_dot_product_attention`` instead of einsum + softmax; same parameters and maths.

    The class token (mean token + positional embedding) attends to itself and the text tokens; SDPA's default
    scale ``1/sqrt(head_dim)`` is the product of diffusers' two ``head_dim ** -0.25`` factors.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, _, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (bs, n, width) -> (bs, heads, n, head_dim)
            return t.view(bs, -1, self.num_heads, self.dim_per_head).transpose(1, 2)

        class_token = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)
        x = torch.cat([class_token, x], dim=1)
        out = F.scaled_dot_product_attention(
            heads(self.q_proj(class_token)), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        return out.transpose(1, 2).reshape(bs, width)


def fuse_attention_pooling(module: nn.Module) -> nn.Module:
    """Swap every ``AttentionPooling`` inside ``module`` for :class:`FusedAttentionPooling` (parameters kept)."""
    for child in module.modules():
        if type(child) is AttentionPooling:
            child.__class__ = FusedAttentionPooling
    return module


class AddedKVAttnProcessor:
    """Attention processor for IF-style "simple cross-attention" (``Attention(added_kv_proj_dim=...)``).

    Same maths as diffusers' ``AttnAddedKVProcessor2_0`` (text keys/values from ``add_k_proj``/``add_v_proj``
    concatenated before the spatial self keys/values, group norm on the query input, residual add), but the
    additive text mask is padded to the real key length: diffusers pads it by the spatial length even when
    ``only_cross_attention`` leaves no spatial keys, which breaks masked calls of cross-attention-only layers.

    ``attention_mask``: additive bias ``(batch, 1, text_len)`` (0 keep, large negative drop) or ``None``.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        batch, channels = hidden_states.shape[:2]
        x = hidden_states.reshape(batch, channels, -1).transpose(1, 2)  # (B, HW, C)
        if encoder_hidden_states is None:
            encoder_hidden_states = x
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)

        query = attn.head_to_batch_dim(attn.to_q(x), out_dim=4)
        key = attn.head_to_batch_dim(attn.add_k_proj(encoder_hidden_states), out_dim=4)
        value = attn.head_to_batch_dim(attn.add_v_proj(encoder_hidden_states), out_dim=4)
        if not attn.only_cross_attention:
            key = torch.cat([key, attn.head_to_batch_dim(attn.to_k(x), out_dim=4)], dim=2)
            value = torch.cat([value, attn.head_to_batch_dim(attn.to_v(x), out_dim=4)], dim=2)

        mask = None
        if attention_mask is not None:
            if attention_mask.dim() == 2:
                attention_mask = attention_mask[:, None, :]
            if attention_mask.shape[0] != batch:
                raise ValueError(
                    f"attention mask batch {attention_mask.shape[0]} does not match hidden states batch {batch}"
                )
            pad = key.shape[2] - attention_mask.shape[-1]
            if pad < 0:
                raise ValueError(f"attention mask length {attention_mask.shape[-1]} exceeds key length {key.shape[2]}")
            mask = F.pad(attention_mask, (0, pad), value=0.0)[:, None].to(query.dtype)  # (B, 1, 1, K)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, channels)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(1, 2).reshape(residual.shape)
        return out + residual


def _resnet(
    in_channels: int, out_channels: int, temb_channels: int, cfg: BlockConfig, down: bool = False, up: bool = False
) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=temb_channels,
        eps=cfg.resnet_eps,
        groups=cfg.resnet_groups,
        dropout=cfg.dropout,
        time_embedding_norm=cfg.resnet_time_scale_shift,
        non_linearity=cfg.resnet_act_fn,
        output_scale_factor=cfg.output_scale_factor,
        skip_time_act=cfg.skip_time_act,
        down=down,
        up=up,
    )


def _added_kv_attention(channels: int, cfg: BlockConfig) -> Attention:
    # IF semantics: attention_head_dim is the per-head width; heads = channels // head_dim.
    if channels % cfg.attention_head_dim != 0:
        raise ValueError(f"channels {channels} not divisible by attention_head_dim {cfg.attention_head_dim}")
    return Attention(
        query_dim=channels,
        cross_attention_dim=channels,
        heads=channels // cfg.attention_head_dim,
        dim_head=cfg.attention_head_dim,
        added_kv_proj_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.resnet_groups,
        bias=True,
        upcast_softmax=True,
        only_cross_attention=cfg.only_cross_attention,
        cross_attention_norm=cfg.cross_attention_norm,
        processor=AddedKVAttnProcessor(),
    )


def _temporal_conv(channels: int, cfg: BlockConfig) -> TemporalConvLayer:
    # GroupNorm groups follow the config (32 as released; small models need fewer).
    return TemporalConvLayer(channels, channels, dropout=cfg.temporal_conv_dropout, norm_num_groups=cfg.resnet_groups)


# Longest frame axis a sinusoidal temporal position table covers (the paper's stages see at most 29 frames).
MAX_FRAMES = 128


def _temporal_attention(channels: int, cfg: BlockConfig) -> TransformerTemporalModel:
    # As released: heads = attention_head_dim and head width = channels // attention_head_dim (inner dim = channels).
    # The released code ran diffusers 0.19.3, whose output un-flattening `reshape(b, h, w, channel, frames)` looks
    # like a frames/channels swap but is numerically identical to today's (tests/test_show1_unet.py proves it).
    return TransformerTemporalModel(
        num_attention_heads=cfg.attention_head_dim,
        attention_head_dim=channels // cfg.attention_head_dim,
        in_channels=channels,
        num_layers=1,
        cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.resnet_groups,
        positional_embeddings=cfg.temporal_positional_embeddings,
        num_positional_embeddings=MAX_FRAMES if cfg.temporal_positional_embeddings else None,
    )


class BlockConfig:
    """Hyper-parameters shared by all Show-1 3D blocks (kept in one object to keep signatures short)."""

    def __init__(
        self,
        temb_channels: int,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_time_scale_shift: str = "default",
        skip_time_act: bool = False,
        output_scale_factor: float = 1.0,
        dropout: float = 0.0,
        attention_head_dim: int = 64,
        cross_attention_dim: int = 1280,
        only_cross_attention: bool = False,
        cross_attention_norm: str | None = None,
        temporal_conv_dropout: float = 0.1,
        temporal_positional_embeddings: str | None = None,
    ) -> None:
        self.temb_channels = temb_channels
        self.resnet_eps = resnet_eps
        self.resnet_act_fn = resnet_act_fn
        self.resnet_groups = resnet_groups
        self.resnet_time_scale_shift = resnet_time_scale_shift
        self.skip_time_act = skip_time_act
        self.output_scale_factor = output_scale_factor
        self.dropout = dropout
        self.attention_head_dim = attention_head_dim
        self.cross_attention_dim = cross_attention_dim
        self.only_cross_attention = only_cross_attention
        self.cross_attention_norm = cross_attention_norm
        self.temporal_conv_dropout = temporal_conv_dropout
        self.temporal_positional_embeddings = temporal_positional_embeddings

    def replace(self, **changes: Any) -> BlockConfig:
        """Copy with some fields changed (e.g. the mid block's own scale factor)."""
        new = BlockConfig.__new__(BlockConfig)
        new.__dict__.update(self.__dict__)
        for key, value in changes.items():
            if key not in new.__dict__:
                raise AttributeError(f"unknown block option {key!r}")
            setattr(new, key, value)
        return new


class _Show1Block3D(nn.Module):
    """Shared layer loop: resnet -> temporal conv [-> added-KV attention -> temporal attention] per layer."""

    has_cross_attention: bool = False

    def _init_layers(self, channels_in: list[int], out_channels: int, cfg: BlockConfig, attend: bool) -> None:
        self.has_cross_attention = attend
        self.resnets = nn.ModuleList([_resnet(c, out_channels, cfg.temb_channels, cfg) for c in channels_in])
        self.temp_convs = nn.ModuleList([_temporal_conv(out_channels, cfg) for _ in channels_in])
        if attend:
            self.attentions = nn.ModuleList([_added_kv_attention(out_channels, cfg) for _ in channels_in])
            self.temp_attentions = nn.ModuleList([_temporal_attention(out_channels, cfg) for _ in channels_in])
        self.gradient_checkpointing = False

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        # ModelMixin.enable_gradient_checkpointing() sets both attributes on every module that has the flag.
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(fn, *args)
        return fn(*args)

    def _layer(
        self,
        i: int,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        mask: torch.Tensor | None,
        num_frames: int,
        cross_attention_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor:
        hidden_states = self._run(self.resnets[i], hidden_states, temb)
        hidden_states = self._run(self.temp_convs[i], hidden_states, num_frames)
        if self.has_cross_attention:
            attn = functools.partial(self.attentions[i], **(cross_attention_kwargs or {}))
            hidden_states = self._run(attn, hidden_states, encoder_hidden_states, mask)
            temp_attn = functools.partial(
                self.temp_attentions[i],
                num_frames=num_frames,
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False,
            )
            hidden_states = self._run(temp_attn, hidden_states)[0]
        return hidden_states

    @staticmethod
    def _pick_mask(
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        # Released/IF semantics: an explicit attention_mask wins, else the text mask applies to cross-attention.
        if attention_mask is not None:
            return attention_mask
        return None if encoder_hidden_states is None else encoder_attention_mask


class _DownBlock3D(_Show1Block3D):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        add_downsample: bool,
        cfg: BlockConfig,
        attend: bool,
    ) -> None:
        super().__init__()
        self._init_layers([in_channels] + [out_channels] * (num_layers - 1), out_channels, cfg, attend)
        self.downsamplers = (
            nn.ModuleList([_resnet(out_channels, out_channels, cfg.temb_channels, cfg, down=True)])
            if add_downsample
            else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_frames: int = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Returns the block output and the skip tensors for the up path."""
        mask = self._pick_mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        output_states: tuple[torch.Tensor, ...] = ()
        for i in range(len(self.resnets)):
            hidden_states = self._layer(
                i, hidden_states, temb, encoder_hidden_states, mask, num_frames, cross_attention_kwargs
            )
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            for downsampler in self.downsamplers:
                hidden_states = self._run(downsampler, hidden_states, temb)
            output_states += (hidden_states,)
        return hidden_states, output_states


class ResnetDownsampleBlock3D(_DownBlock3D):
    """IF ``ResnetDownsampleBlock2D`` + temporal convs; downsampling by a ``ResnetBlock2D(down=True)``."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool, cfg: BlockConfig):
        super().__init__(in_channels, out_channels, num_layers, add_downsample, cfg, attend=False)


class SimpleCrossAttnDownBlock3D(_DownBlock3D):
    """IF ``SimpleCrossAttnDownBlock2D`` + temporal convs and temporal attention."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool, cfg: BlockConfig):
        super().__init__(in_channels, out_channels, num_layers, add_downsample, cfg, attend=True)


class _UpBlock3D(_Show1Block3D):
    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        num_layers: int,
        add_upsample: bool,
        cfg: BlockConfig,
        attend: bool,
    ) -> None:
        super().__init__()
        channels_in = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            channels_in.append((prev_output_channel if i == 0 else out_channels) + skip)
        self._init_layers(channels_in, out_channels, cfg, attend)
        self.upsamplers = (
            nn.ModuleList([_resnet(out_channels, out_channels, cfg.temb_channels, cfg, up=True)])
            if add_upsample
            else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_frames: int = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Consumes one skip tensor per layer (last first) and returns the (upsampled) block output."""
        mask = self._pick_mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        for i in range(len(self.resnets)):
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = self._layer(
                i, hidden_states, temb, encoder_hidden_states, mask, num_frames, cross_attention_kwargs
            )
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                hidden_states = self._run(upsampler, hidden_states, temb)
        return hidden_states


class ResnetUpsampleBlock3D(_UpBlock3D):
    """IF ``ResnetUpsampleBlock2D`` + temporal convs; upsampling by a ``ResnetBlock2D(up=True)``."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        num_layers: int,
        add_upsample: bool,
        cfg: BlockConfig,
    ):
        super().__init__(in_channels, prev_output_channel, out_channels, num_layers, add_upsample, cfg, attend=False)


class SimpleCrossAttnUpBlock3D(_UpBlock3D):
    """IF ``SimpleCrossAttnUpBlock2D`` + temporal convs and temporal attention."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        num_layers: int,
        add_upsample: bool,
        cfg: BlockConfig,
    ):
        super().__init__(in_channels, prev_output_channel, out_channels, num_layers, add_upsample, cfg, attend=True)


class UNetMidBlock3DSimpleCrossAttn(_Show1Block3D):
    """IF mid block inflated: resnet, temporal conv, then ``num_layers`` x (attention, temporal attention,
    resnet, temporal conv). Parameter names: ``resnets.{0..n}``, ``temp_convs.{0..n}``, ``attentions.{0..n-1}``,
    ``temp_attentions.{0..n-1}``."""

    def __init__(self, in_channels: int, cfg: BlockConfig, num_layers: int = 1) -> None:
        super().__init__()
        self.has_cross_attention = True
        self.resnets = nn.ModuleList([_resnet(in_channels, in_channels, cfg.temb_channels, cfg)])
        self.temp_convs = nn.ModuleList([_temporal_conv(in_channels, cfg)])
        self.attentions = nn.ModuleList()
        self.temp_attentions = nn.ModuleList()
        for _ in range(num_layers):
            self.attentions.append(_added_kv_attention(in_channels, cfg))
            self.temp_attentions.append(_temporal_attention(in_channels, cfg))
            self.resnets.append(_resnet(in_channels, in_channels, cfg.temb_channels, cfg))
            self.temp_convs.append(_temporal_conv(in_channels, cfg))
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_frames: int = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mid block forward on ``(batch*frames, C, H, W)``."""
        mask = self._pick_mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        hidden_states = self._run(self.resnets[0], hidden_states, temb)
        hidden_states = self._run(self.temp_convs[0], hidden_states, num_frames)
        for i in range(len(self.attentions)):
            attn = functools.partial(self.attentions[i], **(cross_attention_kwargs or {}))
            hidden_states = self._run(attn, hidden_states, encoder_hidden_states, mask)
            temp_attn = functools.partial(
                self.temp_attentions[i],
                num_frames=num_frames,
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False,
            )
            hidden_states = self._run(temp_attn, hidden_states)[0]
            hidden_states = self._run(self.resnets[i + 1], hidden_states, temb)
            hidden_states = self._run(self.temp_convs[i + 1], hidden_states, num_frames)
        return hidden_states


DOWN_BLOCK_TYPES: dict[str, type[_DownBlock3D]] = {
    "ResnetDownsampleBlock3D": ResnetDownsampleBlock3D,
    "SimpleCrossAttnDownBlock3D": SimpleCrossAttnDownBlock3D,
}
UP_BLOCK_TYPES: dict[str, type[_UpBlock3D]] = {
    "ResnetUpsampleBlock3D": ResnetUpsampleBlock3D,
    "SimpleCrossAttnUpBlock3D": SimpleCrossAttnUpBlock3D,
}
_STOCK_LAYOUT_HINT = (
    " Blocks CrossAttnDownBlock3D/DownBlock3D/CrossAttnUpBlock3D/UpBlock3D are the ModelScope/zeroscope layout"
    " (show-1-sr2): use show1_lightning.models.show1_unet.Show1SR2UNet3DConditionModel for them."
)


def get_down_block(
    down_block_type: str, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool, cfg: BlockConfig
) -> _DownBlock3D:
    """Build a Show-1 down block by its released config name."""
    if down_block_type not in DOWN_BLOCK_TYPES:
        raise ValueError(
            f"Unknown down block type {down_block_type!r}; expected one of {sorted(DOWN_BLOCK_TYPES)}."
            + _STOCK_LAYOUT_HINT
        )
    return DOWN_BLOCK_TYPES[down_block_type](in_channels, out_channels, num_layers, add_downsample, cfg)


def get_up_block(
    up_block_type: str,
    in_channels: int,
    prev_output_channel: int,
    out_channels: int,
    num_layers: int,
    add_upsample: bool,
    cfg: BlockConfig,
) -> _UpBlock3D:
    """Build a Show-1 up block by its released config name."""
    if up_block_type not in UP_BLOCK_TYPES:
        raise ValueError(
            f"Unknown up block type {up_block_type!r}; expected one of {sorted(UP_BLOCK_TYPES)}." + _STOCK_LAYOUT_HINT
        )
    return UP_BLOCK_TYPES[up_block_type](in_channels, prev_output_channel, out_channels, num_layers, add_upsample, cfg)
