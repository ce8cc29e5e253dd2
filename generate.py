"""Text -> video with the Show-1 cascade: `python generate.py [prompts=[...]] [stages.<stage>=PATH]`.

Each stage comes from a Lightning checkpoint or an export folder; only one stage's networks are on
the accelerator at a time. Writes <output_dir>/<i>_<prompt>.mp4 (and every stage's video with
save_intermediates), and prints and logs each stage's time and peak memory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from show1_lightning.callbacks.samples import slug
from show1_lightning.data.video_io import to_uint8_frames, write_mp4
from show1_lightning.fileio import atomic_write_text
from show1_lightning.pipelines.cascade import Show1Cascade, format_reports
from show1_lightning.runtime import finish_wandb, register_resolvers
from show1_lightning.wandb_mode import wandb_mode

log = logging.getLogger("generate")
register_resolvers()


def generate(cfg: DictConfig) -> list[Path]:
    """Run the cascade over ``cfg.prompts`` in batches; returns the final mp4 paths."""
    prompts = list(cfg.prompts)
    seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    stages = {k: v for k, v in cfg.stages.items() if v}
    cascade = Show1Cascade(
        **stages,
        device=cfg.device,
        precision=str(cfg.precision),
        sampling=OmegaConf.to_container(cfg.sampling, resolve=True),
        behaviour=OmegaConf.to_container(cfg.behaviour, resolve=True) if cfg.get("behaviour") else None,
        t5=cfg.get("t5"),
        if_ii_l=cfg.get("if_ii_l"),
        strict_sizes=bool(cfg.get("strict_sizes", False)),
        lora=OmegaConf.to_container(cfg.lora, resolve=True) if cfg.get("lora") else None,
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = start_wandb_run(cfg, out)
    paths, timings = [], []
    for start in range(0, len(prompts), cfg.batch_size):
        bp, bs = prompts[start : start + cfg.batch_size], seeds[start : start + cfg.batch_size]
        result = cascade(bp, bs)
        print(format_reports(result.reports), flush=True)
        timings += [{"batch": start // cfg.batch_size, **r.__dict__} for r in result.reports]
        for j, (prompt, video) in enumerate(zip(bp, result.video)):
            i = start + j
            final = write_mp4(out / f"{i:03d}_{slug(prompt)}.mp4", to_uint8_frames(video), fps=cfg.fps)
            paths.append(final)
            if cfg.save_intermediates:
                for name, x in result.intermediates.items():
                    write_mp4(out / "stages" / f"{i:03d}_{name}.mp4", to_uint8_frames(x[j]), fps=cfg.fps)
        if run is not None:
            for r in result.reports:
                run.log({f"time/{r.name}_s": r.seconds, f"memory/{r.name}_peak_gib": r.peak_bytes / 2**30})
    atomic_write_text(out / "timings.json", json.dumps(timings, indent=2, default=list))  # temp + rename
    if run is not None:
        import wandb

        run.log({"videos": [wandb.Video(str(p), caption=prompts[k], format="mp4") for k, p in enumerate(paths)]})
    log.info("wrote %d videos to %s", len(paths), out)
    return paths


def start_wandb_run(cfg: DictConfig, out: Path) -> Any:
    """The wandb run of this generation (None with ``logger.wandb=false``): offline unless ``WANDB_MODE`` says
    otherwise, as in train.py and evaluate.py (``show1_lightning.wandb_mode``)."""
    if not cfg.logger.wandb:
        return None
    import wandb

    return wandb.init(
        project=cfg.logger.project,
        name=cfg.run_name,
        dir=str(out),
        job_type="generate",
        mode=wandb_mode(),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


# An absolute config path: the same configs when run as a script or as a console script (show1-*).
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="generate.yaml")
def main(cfg: DictConfig) -> None:
    try:
        generate(cfg)
    finally:
        finish_wandb()


if __name__ == "__main__":
    main()
