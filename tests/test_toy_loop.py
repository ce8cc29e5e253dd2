"""scripts/toy_loop.py: reading evaluate.py's report (the loop died there once, after 29 minutes of training)."""

import toy_loop  # scripts/ is on the test path (pyproject.toml)


def test_report_metrics_reads_evaluate_reports_floats() -> None:
    # The shape evaluate.py writes: metrics maps a name to its float (a prefix run has no FVD).
    report = {"benchmark": "toy", "metrics": {"color_adherence": 0.75, "motion_adherence": 0.15625}}
    assert toy_loop.report_metrics(report) == {
        "fvd": None,
        "color_adherence": 0.75,
        "motion_adherence": 0.15625,
    }


def test_every_generator_of_the_loop_composes_with_evaluate_py(tmp_path) -> None:
    # The naive row once passed a key the cascade generator does not have: evaluate.py refused it after 50 minutes.
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    ckpts = {n: tmp_path / f"{n}.ckpt" for n in toy_loop.STAGE_ORDER}
    sizes = {
        "keyframe": (8, 16, 24),
        "interpolation": (29, 16, 24),
        "pixel_sr": (29, 32, 48),
        "latent_sr": (29, 64, 96),
    }
    gens = toy_loop.generators(ckpts, sizes)
    assert set(gens) == {
        "prefix_keyframe",
        "prefix_keyframe+interpolation",
        "prefix_keyframe+interpolation+pixel_sr",
        "cascade",
        "naive",
        "real",
    }
    conf = Path(toy_loop.ROOT) / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        for name, (gen, size) in gens.items():
            cfg = compose("eval", overrides=toy_loop.evaluate_args(tmp_path, name, gen, size, 4, "g"))
            assert cfg.benchmark.adapter.num_frames == size[0]
            assert cfg.batch_size == toy_loop.CALL_BATCH  # small generator calls: faster on a CPU
    naive = gens["naive"][0]
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("eval", overrides=toy_loop.evaluate_args(tmp_path, "naive", naive, sizes["latent_sr"], 4, "g"))
    assert list(cfg.generator.baseline_stages) == ["interpolation", "pixel_sr", "latent_sr"]
    assert cfg.generator.latent_sr == str(ckpts["latent_sr"])


def test_prefixes_are_scored_from_the_cascade_outputs_only_when_all_were_saved(tmp_path) -> None:
    from hydra import compose, initialize_config_dir

    folder = tmp_path / "eval" / "cascade" / "intermediates" / "interpolation"
    folder.mkdir(parents=True)
    label = "prefix_keyframe+interpolation"
    assert toy_loop.prefix_folder(tmp_path, label, 2) is None  # nothing saved (e.g. a resumed evaluation)
    (folder / "manifest.jsonl").write_text("")
    (folder / "000000.mp4").write_bytes(b"")
    assert toy_loop.prefix_folder(tmp_path, label, 2) is None  # one of two
    (folder / "000001.mp4").write_bytes(b"")
    gen = toy_loop.prefix_folder(tmp_path, label, 2)
    assert gen == ["generator=folder", f"generator.root={folder}", f"generator.name={label}", "generator.fps=16"]
    with initialize_config_dir(config_dir=str(toy_loop.ROOT / "conf"), version_base=None):
        cfg = compose("eval", overrides=toy_loop.evaluate_args(tmp_path, label, gen, (29, 16, 24), 2, "g"))
    assert cfg.generator.root == str(folder) and cfg.generator.fps == 16
    with initialize_config_dir(config_dir=str(toy_loop.ROOT / "conf"), version_base=None):
        cfg = compose("eval", overrides=["save_intermediates=true"])
    assert cfg.save_intermediates is True
