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


def test_parallel_training_composes_as_one_multirun_of_local_jobs(tmp_path) -> None:
    """--workers 2: the same multirun, its jobs in parallel processes (submitit's local launcher), step-budgeted."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = Path(toy_loop.ROOT) / "conf"
    for experiment in toy_loop.EXPERIMENTS.values():  # every job of the multirun (only "toy" sets a max_time)
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = compose(
                "train",
                overrides=[f"experiment={experiment}", *toy_loop.parallel_train_overrides(tmp_path)],
                return_hydra_config=True,
            )
        assert cfg.hydra.launcher._target_.endswith("LocalLauncher")
        assert cfg.hydra.launcher.submitit_folder.startswith(str(tmp_path))
        assert cfg.trainer.max_time is None
        if experiment == "toy":
            assert cfg.trainer.max_steps == 600  # the keyframe recipe's steps decide


def _fake_scoring(monkeypatch, calls: list) -> None:
    """score_all's collaborators replaced by recorders (which thread, which order, how many threads)."""
    import threading
    import time

    def fake_evaluate(out, name, generator, size, num_samples, group, extra=(), threads=None):
        calls.append(("eval_start", name, threading.current_thread().name, threads, extra))
        time.sleep(0.05 if name != "cascade" else 0.3)
        calls.append(("eval_end", name))
        return {"fvd": 1.0, "color_adherence": 1.0, "motion_adherence": 1.0}

    def fake_checks(out, stages, num_samples, group):
        import torch

        calls.append(("checks_start", threading.current_thread().name, torch.get_num_threads()))
        time.sleep(0.1)
        calls.append(("checks_end",))
        return {"interpolation": {"psnr": 2.0, "psnr_baseline": 1.0}}

    size = (29, 64, 96)
    monkeypatch.setattr(toy_loop, "load_stage", lambda path: path)
    monkeypatch.setattr(toy_loop, "stage_output_size", lambda stages, name: size)
    monkeypatch.setattr(toy_loop, "evaluate", fake_evaluate)
    monkeypatch.setattr(toy_loop, "score_stages", fake_checks)


def test_scoring_runs_evaluations_beside_the_stage_checks_and_prefixes_after_the_cascade(
    tmp_path, monkeypatch
) -> None:
    calls: list = []
    _fake_scoring(monkeypatch, calls)
    monkeypatch.setattr(toy_loop.os, "cpu_count", lambda: 4)
    ckpts = {n: tmp_path / f"{n}.ckpt" for n in toy_loop.STAGE_ORDER}
    stages, scores, seconds = toy_loop.score_all(tmp_path, ckpts, 4, "g", workers=2)
    assert list(scores) == list(toy_loop.generators(ckpts, {n: (29, 64, 96) for n in ckpts}))  # the report's order
    starts = [c for c in calls if c[0] == "eval_start"]
    # The cascade starts first, in the background, while this process checks the stages with its share of threads.
    assert starts[0][1] == "cascade" and starts[0][2] != "MainThread" and starts[0][4] == ("save_intermediates=true",)
    checks = next(c for c in calls if c[0] == "checks_start")
    assert checks[1] == "MainThread" and checks[2] == 2
    assert calls.index(checks) < calls.index(("eval_end", "cascade"))  # overlapped
    # Every prefix starts after the cascade ended (it is scored from the cascade's saved outputs).
    end_cascade = calls.index(("eval_end", "cascade"))
    assert all(calls.index(c) > end_cascade for c in starts if c[1].startswith("prefix_"))
    assert {c[3] for c in starts} == {2}  # every evaluation with cores / workers threads
    assert seconds["stage_checks"] > 0 and seconds["scoring"] >= seconds["stage_checks"]


def test_one_worker_scores_one_thing_at_a_time_with_all_threads(tmp_path, monkeypatch) -> None:
    calls: list = []
    _fake_scoring(monkeypatch, calls)
    ckpts = {n: tmp_path / f"{n}.ckpt" for n in toy_loop.STAGE_ORDER}
    toy_loop.score_all(tmp_path, ckpts, 4, "g", workers=1)
    assert calls[0][0] == "checks_start" and calls[1] == ("checks_end",)
    names = [c[1] for c in calls if c[0] == "eval_start"]
    assert names[0] == "cascade" and names[-2:] == ["naive", "real"]
    assert all(c[2] == "MainThread" and c[3] is None for c in calls if c[0] == "eval_start")
    # strictly one after another
    assert all(calls[i][0] == "eval_start" and calls[i + 1][0] == "eval_end" for i in range(2, len(calls), 2))
