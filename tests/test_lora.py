"""LoRA (stage.lora, through peft): only the adapter trains and is checkpointed, exported and loaded, on the toy
keyframe stage (tiny) and on every stage's UNet type."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from conftest import compose_config
from numerics import assert_close_rel, assert_differ_rel
from omegaconf import OmegaConf

import train
from show1_lightning.callbacks.export import export_stage
from show1_lightning.diffusion.lora import (
    LORA_PREFIX,
    LORA_WEIGHT_NAME,
    LoraSpec,
    apply_lora,
    export_lora_stage,
    is_lora_key,
    read_lora,
    set_lora_scales,
)
from show1_lightning.pipelines.generator import CascadeGenerator
from show1_lightning.stages.loading import build_stage, load_stage, safe_torch_load

# LoRA adapts a UNet (released weights): the released structure, without the toy experiment's layout planner.
SMALL = ("stage.height=8", "stage.width=16", "stage.layout=null", "model.in_channels=3")
PROMPTS, SEEDS = ["a red circle moving left", "a blue square moving up"], [3, 4]


def sample(stage, **kw) -> torch.Tensor:
    return stage.generate(PROMPTS, SEEDS, num_steps=2, **kw)


def randomize_adapter(unet: torch.nn.Module, seed: int = 0) -> None:
    """Give the (zero-initialised) lora_B weights values, so the adapter changes the output noticeably."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def base_export(toy_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (seeded, untrained) toy keyframe stage exported as a full stage folder: the LoRA base."""
    out = tmp_path_factory.mktemp("lora_base")
    cfg = compose_config(toy_data_dir, out, *SMALL, tiny=False)
    torch.manual_seed(0)
    return export_stage(build_stage(cfg.stage), out / "export")


@pytest.fixture(scope="module")
def lora_stage(toy_data_dir: Path, base_export: Path, tmp_path_factory: pytest.TempPathFactory):
    """A rank-4 LoRA keyframe stage on the base, its adapter randomised (EMA copied from it)."""
    out = tmp_path_factory.mktemp("lora_stage")
    cfg = compose_config(toy_data_dir, out, *SMALL, "stage.lora.rank=4", f"stage.lora.init_from={base_export}")
    stage = build_stage(cfg.stage)
    randomize_adapter(stage.unet)
    for s, p in zip(stage.ema.shadow_params, stage.ema_parameters()):
        s.copy_(p)
    return stage.eval()


def test_spec_off_and_errors() -> None:
    assert LoraSpec.from_config(None) is None and LoraSpec.from_config({"rank": 0}) is None
    assert LoraSpec.from_config({"rank": 8}).peft_config().lora_alpha == 8  # alpha null = rank
    with pytest.raises(ValueError, match="unknown keys"):
        LoraSpec.from_config({"rank": 4, "ranks": 8})


def test_only_adapters_train_and_the_base_is_loaded(lora_stage, base_export: Path) -> None:
    names = [n for n, p in lora_stage.named_parameters() if p.requires_grad]
    assert names and all(is_lora_key(n) and ".default." in n for n in names)
    n_adapter = sum(p.numel() for p in lora_stage.ema_parameters())
    assert n_adapter == sum(lora_stage.get_parameter(n).numel() for n in names)
    assert n_adapter < 0.1 * sum(p.numel() for p in lora_stage.unet.parameters())
    assert len(lora_stage.ema.shadow_params) == len(names)  # the EMA holds only the adapter
    base = load_stage(base_export)
    set_lora_scales(lora_stage.unet, {"default": 0.0})  # scale 0 on the trained adapter: exactly the base
    try:
        assert torch.equal(sample(lora_stage), sample(base))
    finally:
        set_lora_scales(lora_stage.unet, {"default": 1.0})
    assert_differ_rel(sample(lora_stage), sample(base))


def test_target_modules_matching_nothing_is_an_error(toy_data_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config(toy_data_dir, tmp_path, *SMALL, "stage.lora.rank=2", "stage.lora.target_modules=[nope]")
    with pytest.raises(Exception, match=r"stage.lora.target_modules=\['nope'\]"):  # (Hydra wraps the ValueError)
        build_stage(cfg.stage)


@pytest.mark.parametrize("experiment", ["toy_interpolation", "toy_pixel_sr", "toy_latent_sr"])
def test_every_stage_takes_an_adapter(toy_data_dir: Path, tmp_path: Path, experiment: str) -> None:
    extra = ["vae@stage.vae=tiny"] if "latent_sr" in experiment else []
    cfg = compose_config(toy_data_dir, tmp_path, f"experiment={experiment}", *extra, "stage.lora.rank=2", tiny=False)
    stage = hydra.utils.instantiate(cfg.stage, _convert_="all")
    trainable = [n for n, p in stage.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_key(n) for n in trainable)
    # attention of every kind is adapted: the temporal attention and the text cross-attention
    assert any("temp_attentions" in n for n in trainable) or any("attn1" in n for n in trainable)
    assert any(("add_k_proj" in n) or ("attn2.to_k" in n) for n in trainable)


def test_export_reload_scale_and_several_adapters(lora_stage, base_export: Path, tmp_path: Path) -> None:
    export = export_lora_stage(lora_stage, tmp_path / "lora_export")
    assert sorted(p.name for p in export.iterdir()) == [LORA_WEIGHT_NAME, "scheduler", "stage.json"]
    config, weights, ours = read_lora(export)
    assert config.r == 4 and set(weights) == {
        k.replace(".default", "") for k in (n for n, _ in lora_stage.unet.named_parameters()) if is_lora_key(k)
    }
    assert ours["base"] == str(base_export.resolve())
    reloaded = load_stage(export)  # base from stage.json's lora.init_from + the adapter
    assert torch.equal(sample(reloaded), sample(lora_stage))
    base_plain = sample(load_stage(base_export))
    # base + the LoRA folder at scale 1 = the export; at scale 0 = the base, bit for bit
    assert torch.equal(sample(load_stage(base_export, lora=[{"path": str(export), "scale": 1.0}])), sample(lora_stage))
    assert torch.equal(sample(load_stage(base_export, lora=[{"path": str(export), "scale": 0.0}])), base_plain)
    # two adapters add up: the same one twice at 0.5 each is the one at 1 (up to rounding)
    twice = load_stage(base_export, lora=[{"path": str(export), "scale": 0.5}, {"path": str(export), "scale": 0.5}])
    assert_close_rel(sample(twice), sample(lora_stage))
    half = load_stage(base_export, lora=[{"path": str(export), "scale": 0.5}])
    assert_differ_rel(sample(half), sample(lora_stage))


def test_export_loads_with_diffusers_peft_loader(lora_stage, base_export: Path, tmp_path: Path) -> None:
    """The export is diffusers' LoRA format: a model with diffusers' PeftAdapterMixin loads it with
    ``load_lora_adapter(..., prefix="unet")`` to the same UNet output as ours."""
    from diffusers.loaders.peft import PeftAdapterMixin

    export = export_lora_stage(lora_stage, tmp_path / "lora_export")
    unet_cls = type(load_stage(base_export).unet)
    peft_cls = type("PeftUNet", (unet_cls, PeftAdapterMixin), {})
    theirs = peft_cls.from_pretrained(str(base_export), subfolder="unet").eval()
    theirs.load_lora_adapter(str(export), prefix=LORA_PREFIX, weight_name=LORA_WEIGHT_NAME, adapter_name="x")
    ours = load_stage(base_export)
    apply_lora(ours.unet, export)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 2, 8, 16, generator=g)
    emb, mask = ours.encode_text(["a red circle"])
    kw = {"encoder_hidden_states": emb, "encoder_attention_mask": mask}
    with torch.no_grad():
        a = ours.unet(x, torch.tensor([500]), **kw).sample
        b = theirs(x, torch.tensor([500]), **kw).sample
        plain = load_stage(base_export).unet(x, torch.tensor([500]), **kw).sample
    # the same up to float rounding (the two models are built by different loaders); the adapter does act
    assert_close_rel(b, a)
    assert_differ_rel(a, plain)


def test_training_checkpoint_holds_only_the_adapter_and_resumes(compose_train, base_export: Path, tmp_path: Path):
    lora = ("stage.lora.rank=4", f"stage.lora.init_from={base_export}", *SMALL, "callbacks.export=null")
    train.train(compose_train(tmp_path, *lora))
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = safe_torch_load(ckpt_path)
    keys = list(ckpt["state_dict"])
    assert keys and all(is_lora_key(k) for k in keys)  # no base weight in the checkpoint
    assert ckpt["lora_base"]["init_from"] == str(base_export)
    n_adapter = len(keys)
    assert len(ckpt["ema"]["shadow_params"]) == n_adapter
    opt = ckpt["optimizer_states"][0]
    assert sum(len(g["params"]) for g in opt["param_groups"]) == n_adapter  # the optimizer holds only the adapter
    assert (
        ckpt_path.stat().st_size < 0.5 * (base_export / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    )
    step2 = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    # the checkpoint reloads (base from init_from) and resumes: 2 more steps move the adapter on
    stage = load_stage(ckpt_path)
    for k, v in step2.items():
        assert torch.equal(stage.state_dict()[k], v)
    train.train(compose_train(tmp_path, *lora, "trainer.max_steps=4"))
    ckpt4 = safe_torch_load(ckpt_path)
    assert ckpt4["global_step"] == 4 and set(ckpt4["state_dict"]) == set(step2)
    assert any(not torch.equal(ckpt4["state_dict"][k], step2[k]) for k in step2)


def test_export_callback_writes_the_adapter_only(compose_train, base_export: Path, tmp_path: Path) -> None:
    lora = ("stage.lora.rank=4", f"stage.lora.init_from={base_export}", *SMALL, "trainer.max_steps=1")
    cfg = compose_train(tmp_path, *lora)
    train.train(cfg)
    export = Path(cfg.export_dir)
    assert (export / LORA_WEIGHT_NAME).is_file() and not (export / "unet").exists()
    stage = load_stage(tmp_path / "checkpoints" / "last.ckpt")
    assert torch.equal(sample(load_stage(export)), sample(stage))


def test_cascade_generator_with_a_lora_folder(lora_stage, base_export: Path, tmp_path: Path) -> None:
    export = export_lora_stage(lora_stage, tmp_path / "lora_export")
    steps = {"keyframe": {"num_steps": 2}}
    lora = OmegaConf.create({"keyframe": [{"path": str(export), "scale": 1.0}]})  # as Hydra passes it
    gen = CascadeGenerator(keyframe=base_export, device="cpu", sampling=steps, lora=lora)
    videos = gen.generate(PROMPTS, SEEDS)
    assert torch.equal(
        videos, CascadeGenerator(keyframe=export, device="cpu", sampling=steps).generate(PROMPTS, SEEDS)
    )
    assert_differ_rel(
        videos, CascadeGenerator(keyframe=base_export, device="cpu", sampling=steps).generate(PROMPTS, SEEDS)
    )
    assert gen.describe()["lora"] == {"keyframe": [{"path": str(export), "scale": 1.0}]}
    with pytest.raises(ValueError, match="unknown stages"):
        CascadeGenerator(keyframe=base_export, device="cpu", lora={"sr9": [str(export)]})
