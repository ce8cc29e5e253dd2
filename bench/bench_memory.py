"""Training memory per GPU of each Show-1 stage at the paper's sizes: DDP vs FSDP vs + gradient checkpointing vs LoRA.

    python bench/bench_memory.py                 # the four paper stages, 8 GPUs for FSDP (~1-3 min on a CPU)
    python bench/bench_memory.py --gpus 4 --lora-rank 16 --divisor 8   # --divisor: shrunk widths (tests)

Counted as bench/efficiency.py counts inference memory, on the meta device (no GPU, no real memory): the stage's
UNet is built from its released config and trained on one batch of the experiment's size (conf/experiment/paper_*:
frames, height, width, per-GPU batch, composed with Hydra), and ``efficiency_lib.LiveBytesTracker`` records the
peak of the live tensor bytes over forward + backward (fused attention). Weight gradients are dropped as soon as
they are accumulated, so that peak is the activations (plus one parameter's transient gradient); the persistent
state is counted from the parameter count P:

- DDP: fp32 weights 4P + fp32 gradients 4P + AdamW moments 8P + fp32 EMA 4P = 20P bytes on every GPU.
- FSDP (FULL_SHARD over N GPUs, one unit per UNet block): 20P / N, plus the largest block gathered in bf16 twice
  (the running unit and the prefetched one) and its fp32 gradient before the reduce-scatter, plus the parameters
  outside the blocks (the root unit) gathered in bf16.
- + checkpointing: the same with ``stage.gradient_checkpointing`` (the activation peak measured with it).
- LoRA: the frozen base in fp32 (4P, not sharded: DDP) + 20 bytes per adapter parameter (rank r on the attention
  projections ``stage.lora.target_modules``: r x (in + out) each); activations measured with only those
  projections requiring gradients (what backward must keep to reach the adapters), with checkpointing.

Activations are measured with the model in bf16 (bf16-mixed autocast keeps a few ops, e.g. the norms, in fp32:
slightly more in practice). Not counted: the frozen text encoder / VAE (off the GPU with cached embeddings, else add
them), CUDA workspace and allocator fragmentation, DDP's gradient buckets (another 4P unless
``gradient_as_bucket_view``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from efficiency_lib import GiB, LiveBytesTracker, attention_policy, build_unet, reduced_unet_config
from torch import nn

from show1_lightning.models.checkpointing import enable_gradient_checkpointing

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("paper_keyframe", "paper_interpolation", "paper_pixel_sr", "paper_latent_sr")
BLOCK_NAMES = ("down_blocks", "mid_block", "up_blocks")
TEXT_TOKENS = 77
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")


@dataclasses.dataclass
class StageSize:
    """What one training step of a stage looks like (from its experiment config)."""

    experiment: str
    config: str  # released UNet config name
    batch: int
    channels: int  # UNet input channels (sample + condition)
    frames: int
    height: int  # UNet input size (latents for the latent stage)
    width: int
    text: tuple[int, int]
    class_labels: bool
    lora_targets: tuple[str, ...]


def stage_size(experiment: str) -> StageSize:
    """Compose ``train.yaml`` with ``experiment=<experiment>`` and read the sizes of one training step."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import train  # noqa: F401  (registers the OmegaConf resolvers)
    from show1_lightning.models.show1_unet import load_released_config

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={experiment}"])
    finally:
        GlobalHydra.instance().clear()
    name = str(cfg.model.config)
    unet_cfg = load_released_config(name)
    latent = "latent" in experiment
    factor = 8 if latent else 1  # SD VAE (f=8) latents for the latent stage
    text_dim = unet_cfg.get("encoder_hid_dim") or unet_cfg["cross_attention_dim"]
    lora = cfg.stage.get("lora") or {}
    return StageSize(
        experiment=experiment,
        config=name,
        batch=int(cfg.data.batch_size),
        channels=int(unet_cfg["in_channels"]),
        frames=int(cfg.stage.num_frames),
        height=int(cfg.stage.height) // factor,
        width=int(cfg.stage.width) // factor,
        text=(TEXT_TOKENS, int(text_dim)),
        class_labels=bool(unet_cfg.get("class_embed_type")),
        lora_targets=tuple(lora.get("target_modules") or DEFAULT_TARGETS),
    )


def _inputs(size: StageSize, device: torch.device, dtype: torch.dtype) -> dict:
    b = size.batch
    kw = {
        "sample": torch.randn(b, size.channels, size.frames, size.height, size.width, device=device, dtype=dtype),
        "timestep": torch.full((b,), 500, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.randn(b, *size.text, device=device, dtype=dtype),
    }
    if size.class_labels:
        kw["class_labels"] = torch.full((b,), 250, device=device, dtype=torch.long)
    return kw


def activation_peak(model: nn.Module, size: StageSize, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak live bytes over one forward + backward of ``model`` (its ``requires_grad`` flags as set), weight
    gradients freed on accumulation (so: activations, not persistent gradients)."""
    device = next(model.parameters()).device
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        for p in model.parameters()
        if p.requires_grad
    ]
    try:
        kwargs = _inputs(size, device, dtype)
        tracker = LiveBytesTracker()
        with attention_policy("efficient"), tracker:
            out = model(**kwargs).sample
            out.float().square().mean().backward()
            del out
        return tracker.peak
    finally:
        for h in hooks:
            h.remove()


def lora_params(model: nn.Module, targets: tuple[str, ...], rank: int) -> tuple[int, list[nn.Parameter]]:
    """Adapter parameter count of rank ``rank`` on the Linear layers whose names end with one of ``targets``, and
    those layers' weights (the proxy of the adapters in the activation measurement)."""
    count, weights = 0, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            count += rank * (module.in_features + module.out_features)
            weights.append(module.weight)
    return count, weights


def fsdp_unit_bytes(model: nn.Module) -> tuple[int, int]:
    """(largest block's parameter count, parameters outside the blocks) of a UNet: its FSDP units."""
    blocks: list[nn.Module] = [*model.down_blocks, model.mid_block, *model.up_blocks]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks if b is not None]
    total = sum(p.numel() for p in model.parameters())
    return max(sizes), total - sum(sizes)


def measure(size: StageSize, gpus: int, lora_rank: int, divisor: int = 1) -> dict:
    """All figures (bytes) of one stage."""
    with torch.device("meta"):
        model = build_unet(reduced_unet_config(size.config, divisor)).to(torch.bfloat16).train()
    n_params = sum(p.numel() for p in model.parameters())
    largest, outside = fsdp_unit_bytes(model)
    act = activation_peak(model, size)
    enable_gradient_checkpointing(model)
    act_ckpt = activation_peak(model, size)
    n_lora, targets = lora_params(model, size.lora_targets, lora_rank)
    for p in model.parameters():
        p.requires_grad_(False)
    for w in targets:
        w.requires_grad_(True)
    act_lora = activation_peak(model, size)
    state = 20 * n_params
    fsdp_state = state / gpus + 2 * 2 * largest + 4 * largest + 2 * outside
    lora_state = 4 * n_params + 20 * n_lora
    return {
        "params": n_params,
        "lora_params": n_lora,
        "activations": act,
        "activations_ckpt": act_ckpt,
        "activations_lora": act_lora,
        "ddp": state + act,
        "fsdp": fsdp_state + act,
        "fsdp_ckpt": fsdp_state + act_ckpt,
        "ddp_ckpt": state + act_ckpt,
        "lora_ckpt": lora_state + act_lora,
        "lora_checkpoint_bytes": 4 * n_lora,
    }


def markdown(rows: list[tuple[StageSize, dict]], gpus: int, lora_rank: int) -> str:
    """The table (GiB per GPU)."""
    g = lambda x: f"{x / GiB:.1f}"  # noqa: E731
    head = (
        f"| stage (per-GPU batch, clip) | UNet params | DDP | FSDP x{gpus} | FSDP x{gpus} + ckpt | DDP + ckpt | "
        f"LoRA r{lora_rank} + ckpt (adapter params) | activations: plain / ckpt |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for size, r in rows:
        clip = f"{size.batch} x {size.channels}x{size.frames}x{size.height}x{size.width}"
        lines.append(
            f"| {size.experiment} ({clip}) | {r['params'] / 1e6:.0f} M | {g(r['ddp'])} | {g(r['fsdp'])} | "
            f"{g(r['fsdp_ckpt'])} | {g(r['ddp_ckpt'])} | {g(r['lora_ckpt'])} ({r['lora_params'] / 1e6:.1f} M) | "
            f"{g(r['activations'])} / {g(r['activations_ckpt'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the FSDP columns shard over")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--divisor", type=int, default=1, help="divide every UNet width (quick runs)")
    parser.add_argument("--stages", nargs="*", default=list(STAGES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for experiment in args.stages:
        start = time.time()
        size = stage_size(experiment)
        rows.append((size, measure(size, args.gpus, args.lora_rank, args.divisor)))
        print(f"# {experiment}: {time.time() - start:.0f} s", flush=True)
    print(f"\nTraining memory per GPU (GiB), bf16-mixed + AdamW + fp32 EMA, divisor {args.divisor}:\n")
    print(markdown(rows, args.gpus, args.lora_rank))


if __name__ == "__main__":
    main()
