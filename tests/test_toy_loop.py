"""scripts/toy_loop.py: reading evaluate.py's report (the loop died there once, after 29 minutes of training)."""

import pytest
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
    assert toy_loop.saved_folder(tmp_path, label, 2) is None  # nothing saved (e.g. a resumed evaluation)
    (folder / "manifest.jsonl").write_text("")
    (folder / "000000.mp4").write_bytes(b"")
    assert toy_loop.saved_folder(tmp_path, label, 2) is None  # one of two
    (folder / "000001.mp4").write_bytes(b"")
    gen = toy_loop.saved_folder(tmp_path, label, 2)
    assert gen == ["generator=folder", f"generator.root={folder}", f"generator.name={label}", "generator.fps=16"]
    with initialize_config_dir(config_dir=str(toy_loop.ROOT / "conf"), version_base=None):
        cfg = compose("eval", overrides=toy_loop.evaluate_args(tmp_path, label, gen, (29, 16, 24), 2, "g"))
    assert cfg.generator.root == str(folder) and cfg.generator.fps == 16
    with initialize_config_dir(config_dir=str(toy_loop.ROOT / "conf"), version_base=None):
        cfg = compose(
            "eval", overrides=["save_intermediates=true", "generator=cascade", "generator.baseline_branch=true"]
        )
    assert cfg.save_intermediates is True and cfg.generator.baseline_branch is True
    # The naive cascade: from the branch the cascade's evaluation saved beside its stages.
    naive = tmp_path / "eval" / "cascade" / "intermediates" / "naive"
    naive.mkdir()
    assert toy_loop.saved_folder(tmp_path, "naive", 1) is None
    (naive / "manifest.jsonl").write_text("")
    (naive / "000000.mp4").write_bytes(b"")
    assert toy_loop.saved_folder(tmp_path, "naive", 1) == [
        "generator=folder",
        f"generator.root={naive}",
        "generator.name=naive",
        "generator.fps=16",
    ]


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
        calls.append(("start", name, threading.current_thread().name, threads, extra))
        time.sleep(0.05 if name != "cascade" else 0.3)
        calls.append(("end", name))
        return {"fvd": 1.0, "color_adherence": 1.0, "motion_adherence": 1.0}

    def fake_check(out, stages, name, num_samples):
        import torch

        calls.append(("start", "stage_" + name, threading.current_thread().name, torch.get_num_threads(), ()))
        time.sleep(0.1)
        calls.append(("end", "stage_" + name))
        return {"psnr": 2.0, "psnr_baseline": 1.0, "seconds": 0.1}

    size = (29, 64, 96)
    monkeypatch.setattr(toy_loop, "load_stage", lambda path: path)
    monkeypatch.setattr(toy_loop, "stage_output_size", lambda stages, name: size)
    monkeypatch.setattr(toy_loop, "evaluate", fake_evaluate)
    monkeypatch.setattr(toy_loop, "score_stage", fake_check)
    monkeypatch.setattr(toy_loop, "_log_wandb", lambda *a, **k: None)


def _max_running(calls: list) -> int:
    running = peak = 0
    for c in calls:
        running += 1 if c[0] == "start" else -1
        peak = max(peak, running)
    return peak


def test_scoring_runs_two_jobs_at_once_cascade_first_prefixes_after_it(tmp_path, monkeypatch) -> None:
    calls: list = []
    _fake_scoring(monkeypatch, calls)
    monkeypatch.setattr(toy_loop.os, "cpu_count", lambda: 4)
    ckpts = {n: tmp_path / f"{n}.ckpt" for n in toy_loop.STAGE_ORDER}
    stages, scores, seconds = toy_loop.score_all(tmp_path, ckpts, 4, "g", workers=2)
    assert list(scores) == list(toy_loop.generators(ckpts, {n: (29, 64, 96) for n in ckpts}))  # the report's order
    assert list(stages) == list(toy_loop.STAGE_ORDER[1:])
    starts = [c for c in calls if c[0] == "start"]
    # The cascade first (saving its stages' outputs), the latent SR check (the next longest) beside it.
    assert starts[0][1] == "cascade" and starts[0][4] == ("save_intermediates=true", "generator.baseline_branch=true")
    assert starts[1][1] == "stage_latent_sr" and calls.index(starts[1]) < calls.index(("end", "cascade"))
    # Every prefix and the naive cascade start after the cascade ended (scored from the cascade's saved outputs).
    end_cascade = calls.index(("end", "cascade"))
    assert all(calls.index(c) > end_cascade for c in starts if c[1].startswith("prefix_") or c[1] == "naive")
    assert {c[3] for c in starts} == {2}  # every job with cores / workers threads (stage checks: torch's setting)
    assert _max_running(calls) == 2
    assert {c[1] for c in starts} == set(seconds["jobs"]) and len(starts) == len(seconds["jobs"])
    assert seconds["stage_checks"] > 0 and seconds["scoring"] >= 0.3


def test_one_worker_scores_one_thing_at_a_time_with_all_threads(tmp_path, monkeypatch) -> None:
    import torch

    calls: list = []
    _fake_scoring(monkeypatch, calls)
    ckpts = {n: tmp_path / f"{n}.ckpt" for n in toy_loop.STAGE_ORDER}
    toy_loop.score_all(tmp_path, ckpts, 4, "g", workers=1)
    starts = [c for c in calls if c[0] == "start"]
    assert starts[0][1] == "cascade" and _max_running(calls) == 1
    evals = [c for c in starts if not c[1].startswith("stage_")]
    assert all(c[3] is None for c in evals)  # evaluate.py with torch's default threads
    assert all(c[3] == torch.get_num_threads() for c in starts if c[1].startswith("stage_"))


def test_run_jobs_order_dependencies_and_failures() -> None:
    import threading
    import time

    lock = threading.Lock()
    log: list = []

    def job(name: str, after: tuple[str, ...] = (), sleep: float = 0.05, fail: bool = False):
        def run():
            with lock:
                log.append(("start", name))
            time.sleep(sleep)
            if fail:
                raise RuntimeError(f"{name} broke")
            with lock:
                log.append(("end", name))
            return name.upper()

        return toy_loop.Job(name, run, after)

    jobs = [job("a", sleep=0.2), job("b"), job("c", after=("a",)), job("d"), job("e")]
    results, seconds = toy_loop.run_jobs(jobs, workers=2)
    assert results == {n: n.upper() for n in "abcde"} and set(seconds) == set("abcde")
    starts = [n for kind, n in log if kind == "start"]
    assert starts[:2] == ["a", "b"]  # list order decides while nothing waits
    assert log.index(("start", "c")) > log.index(("end", "a"))  # c waits for a, d and e go on meanwhile
    assert log.index(("start", "d")) < log.index(("end", "a"))
    assert _max_running([(k, n) for k, n in log]) <= 2
    with pytest.raises(RuntimeError, match="b broke"):
        toy_loop.run_jobs([job("a"), job("b", fail=True), job("c", after=("b",))], workers=1)
    with pytest.raises(ValueError, match="unknown jobs: \\['z'\\]"):
        toy_loop.run_jobs([job("a", after=("z",))], workers=1)
    with pytest.raises(ValueError, match="unique"):
        toy_loop.run_jobs([job("a"), job("a")], workers=1)
    log.clear()
    with pytest.raises(RuntimeError, match="a broke"):
        toy_loop.run_jobs([job("a", fail=True), job("b", sleep=0.2), job("c")], workers=2)
    assert ("end", "b") in log and ("start", "c") not in log  # b finished beside it, c never started
