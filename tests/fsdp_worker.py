"""Two-process CPU (gloo) FSDP check of the sharded EMA, state dicts and export (run by tests/test_memory.py).

Every rank trains the same tiny show-1-sr2 UNet on the same batch, once sharded (FSDP, one unit per block) and once
unsharded as the reference: FSDP averages identical gradients, so both must agree to float rounding. Each rank
writes ``<out>/rank<k>.json`` with its measurements; the test asserts on them.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers.training_utils import EMAModel
from torch import nn


class Holder(nn.Module):
    """The part of a stage the sharding helpers use: ``unet`` and ``ema``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.ema: EMAModel | None = None

    def forward(self, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.unet(**kwargs).sample


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(
        (float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True) if x.numel()), default=0.0
    )


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    from show1_lightning.callbacks.export import export_stage
    from show1_lightning.diffusion import sharding
    from show1_lightning.models.show1_unet import Show1SR2UNet3DConditionModel, build_show1_unet

    tiny = dict(
        block_out_channels=[16, 32],
        down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
        up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"],
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=16,
    )
    torch.manual_seed(0)
    unet = build_show1_unet("show-1-sr2", **tiny).eval()  # eval: no dropout, the two runs see the same maths
    g = torch.Generator().manual_seed(1)
    batch = {
        "sample": torch.randn(2, 4, 2, 8, 8, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
    }
    ema_kw = dict(decay=0.5, use_ema_warmup=False)  # a short decay: two steps move the EMA visibly

    # Reference: unsharded.
    ref = copy.deepcopy(unet)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_ema = EMAModel(ref.parameters(), **ema_kw)

    # Sharded: FSDP over the holder, EMA built on the full parameters before wrapping (as the stage does).
    holder = Holder(unet)
    holder.ema = EMAModel(unet.parameters(), **ema_kw)
    policy = lambda m: type(m).__name__ in sharding.BLOCK_CLASS_NAMES  # noqa: E731

    root = FSDP(
        holder,
        device_id=torch.device("cpu"),
        use_orig_params=True,
        auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=policy),
    )
    params = list(holder.unet.parameters())
    full_numel = sum(p.numel() for p in ref.parameters())
    local_numel = sum(p.numel() for p in params)
    changed = sharding.sync_ema_layout(holder.ema, root, params)
    shadow_local = sum(s.numel() for s in holder.ema.shadow_params)
    opt = torch.optim.AdamW(params, lr=1e-2)

    for _ in range(2):
        ref_opt.zero_grad()
        ref(**batch).sample.square().mean().backward()
        ref_opt.step()
        ref_ema.step(ref.parameters())
        opt.zero_grad()
        root(**batch).square().mean().backward()  # Holder.forward: the UNet's sample
        opt.step()
        holder.ema.step(params)

    # EMA: gathered full tensors vs the unsharded EMA; the parameters likewise.
    gathered = sharding.gather_full_ema(root, params, holder.ema.shadow_params)
    ema_diff = _max_diff(gathered, ref_ema.shadow_params)
    state = sharding.full_state_dict(root)
    names = [sharding.clean_name(n) for n, _ in root.named_parameters()]
    param_diff = _max_diff([state[n] for n in names], [p.detach() for p in ref.parameters()])
    ema_vs_params = _max_diff(gathered, [p.detach() for p in ref.parameters()])

    # The stage-level gather: checkpoint EMA = full tensors; export = an unsharded UNet with the EMA weights.
    ckpt_ema = sharding.stage_ema_state_dict(holder, root=root)
    ckpt_ema_diff = _max_diff(ckpt_ema["shadow_params"], ref_ema.shadow_params)
    exported = sharding.full_unet(holder, use_ema=True, root=root)
    export_diff = _max_diff([p.detach() for p in exported.parameters()], ref_ema.shadow_params)
    export_reload_diff = None
    if rank == 0:
        proxy = Holder(exported)
        proxy.noise_scheduler = _scheduler()
        proxy.stage_config = None
        folder = export_stage(proxy, Path(out) / "export", use_ema=False)
        loaded = Show1SR2UNet3DConditionModel.from_pretrained(folder / "unet")
        export_reload_diff = _max_diff([p.detach() for p in loaded.parameters()], ref_ema.shadow_params)
        torch.save(state, Path(out) / "full_state.pt")
    dist.barrier()

    # Save/load: the saved full state dict loads into a fresh unsharded UNet, and into a freshly sharded one.
    saved = torch.load(Path(out) / "full_state.pt", weights_only=True)
    fresh = build_show1_unet("show-1-sr2", **tiny)
    fresh.load_state_dict({k[len("unet.") :]: v for k, v in saved.items()})
    reload_diff = _max_diff([p.detach() for p in fresh.parameters()], [p.detach() for p in ref.parameters()])
    torch.manual_seed(99)  # other initial weights
    holder2 = Holder(build_show1_unet("show-1-sr2", **tiny).eval())
    root2 = FSDP(
        holder2,
        device_id=torch.device("cpu"),
        use_orig_params=True,
        auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=policy),
    )
    with sharding._full_state_dict_type(root2, rank0_only=False):
        root2.load_state_dict(saved)
    state2 = sharding.full_state_dict(root2)
    sharded_reload_diff = _max_diff([state2[n] for n in names], [saved[n] for n in names])
    outputs_diff = float((root2(**batch) - ref(**batch).sample).abs().max())

    # EMA resume: full EMA tensors (as in a checkpoint) re-sliced onto the new shards equal the original slices.
    resumed = EMAModel(list(build_show1_unet("show-1-sr2", **tiny).parameters()), **ema_kw)
    resumed.load_state_dict({**holder.ema.state_dict(), "shadow_params": gathered})
    sharding.sync_ema_layout(resumed, root2, list(holder2.unet.parameters()))
    resume_diff = _max_diff(resumed.shadow_params, holder.ema.shadow_params)

    result = {
        "rank": rank,
        "full_numel": full_numel,
        "local_numel": local_numel,
        "shadow_local_numel": shadow_local,
        "layout_changed": changed,
        "ema_diff": ema_diff,
        "ema_vs_params": ema_vs_params,
        "param_diff": param_diff,
        "ckpt_ema_diff": ckpt_ema_diff,
        "export_diff": export_diff,
        "export_reload_diff": export_reload_diff,
        "reload_diff": reload_diff,
        "sharded_reload_diff": sharded_reload_diff,
        "outputs_diff": outputs_diff,
        "resume_diff": resume_diff,
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _scheduler():  # noqa: ANN202
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


if __name__ == "__main__":
    world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.multiprocessing.spawn(run, args=(world, port, out), nprocs=world)
