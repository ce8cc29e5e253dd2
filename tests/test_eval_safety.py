"""Evaluation that cannot go silently wrong (issue 13): one generator per output folder (fingerprint + lock),
ranks that fail together, reports and timings written atomically."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as pymp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fixtures_eval as fx
import pytest
import torch

from evaluation.fingerprint import FINGERPRINT_NAME, GeneratorMismatchError, OutputDirBusyError
from evaluation.runner import run_evaluation

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class FileKeyedGenerator(fx.PatternGenerator):
    """Test generator whose videos depend on the bytes of a 'weights' file (as a trained model's would)."""

    def __init__(self, weights: str, num_frames: int = 16, name: str = "file-keyed") -> None:
        super().__init__(num_frames=num_frames, name=name)
        self.offset = sum(Path(weights).read_bytes()) % 9973

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return super().generate(prompts, [s + self.offset for s in seeds])


class RankFailingGenerator(fx.PatternGenerator):
    """Raises (``mode: raise``) or dies without a word (``mode: exit``) on one rank at its first batch."""

    def __init__(self, fail_rank: int = 1, mode: str = "raise", num_frames: int = 16) -> None:
        super().__init__(num_frames=num_frames)
        self.fail_rank, self.mode = fail_rank, mode

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        if int(os.environ.get("RANK", "0")) == self.fail_rank:
            if self.mode == "exit":
                os._exit(17)
            raise RuntimeError("boom: a corrupt input on this rank")
        return super().generate(prompts, seeds)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsafety")
    ucf = fx.make_ucf101(root / "ucf", num_frames=20)
    conf = root / "conf"
    fx.write_tiny_metrics_conf(conf)
    (conf / "generator").mkdir(parents=True, exist_ok=True)
    (conf / "generator" / "pattern.yaml").write_text("_target_: fixtures_eval.PatternGenerator\nnum_frames: 16\n")
    (conf / "generator" / "filekeyed.yaml").write_text("_target_: test_eval_safety.FileKeyedGenerator\nweights: ???\n")
    (conf / "generator" / "failing.yaml").write_text(
        "_target_: test_eval_safety.RankFailingGenerator\nfail_rank: 1\nmode: raise\n"
    )
    return {"root": root, "ucf": ucf, "conf": conf}


def _compose(env, out: Path, *extra: str):
    return fx.compose_eval(env, out, *extra)


def _videos(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "videos").glob("*.mp4"))}


# ---------------------------------------------------------------------------- one generator per folder


def test_two_generators_into_one_folder_never_mix(env, tmp_path):
    out = tmp_path / "shared"
    assert run_evaluation(_compose(env, out, "stop_after=1")) is None  # model A, "killed" after one video
    first = _videos(out)
    assert len(first) == 1 and (out / FINGERPRINT_NAME).is_file()
    # Model B (another config) into the same folder: refused, naming what differs; A's videos untouched.
    with pytest.raises(GeneratorMismatchError, match=r"(?s)another generator.*generator\.height: '<absent>' -> 32"):
        run_evaluation(_compose(env, out, "+generator.height=32"))
    assert _videos(out) == first
    # A again (a new display name does not make another model): resumes, reports A's fingerprint.
    report = run_evaluation(_compose(env, out, "+generator.name=renamed"))
    assert report["run"]["found_on_disk"] == 1 and report["run"]["generated_this_run"] == 5
    assert report["generator"]["fingerprint"] == json.loads((out / FINGERPRINT_NAME).read_text())["fingerprint"]
    # Every number is model A's: equal to A evaluated alone, and different from B evaluated alone.
    alone_a = run_evaluation(_compose(env, tmp_path / "a"))
    alone_b = run_evaluation(_compose(env, tmp_path / "b", "+generator.height=32"))
    assert report["metrics"] == alone_a["metrics"]
    assert alone_b["metrics"] != alone_a["metrics"]
    fingerprints = [r["generator"]["fingerprint"] for r in (report, alone_a, alone_b)]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_changed_weights_under_the_same_path_are_refused_moved_weights_are_not(env, tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"first weights")
    out = tmp_path / "out"
    args = ("generator=filekeyed", "stop_after=2")
    assert run_evaluation(_compose(env, out, f"generator.weights={weights}", *args)) is None
    weights.write_bytes(b"retrained weights")  # same path, another model
    with pytest.raises(GeneratorMismatchError, match=r"generator\.weights: file sha256 \w+ -> file sha256 \w+"):
        run_evaluation(_compose(env, out, f"generator.weights={weights}", "generator=filekeyed"))
    moved = tmp_path / "elsewhere" / "model.bin"
    moved.parent.mkdir()
    moved.write_bytes(b"first weights")  # the first model, copied elsewhere: the same generator
    report = run_evaluation(_compose(env, out, f"generator.weights={moved}", "generator=filekeyed"))
    assert report["run"]["found_on_disk"] == 2
    assert report["generator"]["weights"] == {str(moved.resolve()): hashlib.sha256(b"first weights").hexdigest()}


def test_precision_is_part_of_the_generator(env, tmp_path):
    out = tmp_path / "fp32"
    assert run_evaluation(_compose(env, out, "stop_after=1")) is None
    with pytest.raises(GeneratorMismatchError, match=r"precision: 'fp32' -> 'bf16'"):
        run_evaluation(_compose(env, out, "precision=bf16"))
    # bf16 autocast wraps the generator only: in its own folder, the same numbers as fp32 (pattern generator).
    bf16 = run_evaluation(_compose(env, tmp_path / "bf16", "precision=bf16"))
    fp32 = run_evaluation(_compose(env, out))
    assert bf16["metrics"] == fp32["metrics"]


def test_unrecorded_videos_are_refused_but_can_be_scored_in_place(env, tmp_path):
    out = tmp_path / "old"
    full = run_evaluation(_compose(env, out))
    (out / FINGERPRINT_NAME).unlink()  # a folder from before fingerprints, or copied without its record
    with pytest.raises(GeneratorMismatchError, match="no generator.json"):
        run_evaluation(_compose(env, out))
    # Scoring the folder's own videos with the folder generator cannot mix models: allowed.
    rescored = run_evaluation(_compose(env, out, "generator=folder", f"generator.root={out / 'videos'}"))
    assert rescored["run"]["generated_this_run"] == 0 and rescored["metrics"] == full["metrics"]
    assert rescored["run"]["generator_record"] == "in place"


def test_a_second_job_on_a_locked_folder_is_refused(env, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom evaluation.fingerprint import claim_output_dir\n"
            f"with claim_output_dir({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirBusyError, match=rf"another evaluation is writing .*pid {holder.pid}"):
            run_evaluation(_compose(env, out))
        assert not (out / "videos").exists()  # nothing written by the refused job
    finally:
        holder.kill()
        holder.wait()
    assert run_evaluation(_compose(env, out))["run"]["generated_this_run"] == 6  # lock released with its holder


# ---------------------------------------------------------------------------- partial files


class _Killed(BaseException):
    """Stands for SIGKILL in the middle of a write."""


def _kill_on_write_to(name: str):
    """A profile hook raising _Killed when a file whose name contains ``name`` is written to."""

    def target(obj) -> str:
        fname = getattr(obj, "name", None)
        if isinstance(fname, int):
            try:
                fname = os.readlink(f"/proc/self/fd/{fname}")
            except OSError:
                return ""
        return os.path.basename(str(fname)) if fname is not None else ""

    def hook(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", "") == "write":
            if name in target(getattr(arg, "__self__", None)):
                raise _Killed(name)

    return hook


@pytest.mark.parametrize("name", ["report.json", "report.md"])
def test_a_kill_while_writing_the_report_keeps_the_previous_one(env, tmp_path, name, monkeypatch):
    import evaluation.report as report_mod  # the report assembly calls weight_files

    out = tmp_path / "r"
    run_evaluation(_compose(env, out))
    before = (out / name).read_text()
    assert before.strip()
    weight_files = report_mod.weight_files

    def arm_then_weight_files(*args, **kwargs):  # called while the report is assembled, just before writing
        sys.setprofile(_kill_on_write_to(name))
        return weight_files(*args, **kwargs)

    monkeypatch.setattr(report_mod, "weight_files", arm_then_weight_files)
    try:
        with pytest.raises(_Killed):
            run_evaluation(_compose(env, out))
    finally:
        sys.setprofile(None)
    assert (out / name).read_text() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_kill_while_writing_timings_keeps_the_previous_file(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    import generate
    from show1_lightning.pipelines.cascade import CascadeResult, StageReport

    class FakeCascade:
        def __init__(self, **kwargs):
            pass

        def __call__(self, prompts, seeds):
            video = torch.zeros(len(prompts), 3, 2, 8, 8)
            reports = [StageReport("keyframe", 0.1, 1, tuple(video.shape))]
            return CascadeResult(video=video, intermediates={}, reports=reports)

    monkeypatch.setattr(generate, "Show1Cascade", FakeCascade)
    cfg = OmegaConf.create(
        {
            "prompts": ["a", "b"],
            "seeds": None,
            "seed": 0,
            "batch_size": 1,
            "stages": {"keyframe": "x"},
            "sampling": {},
            "device": "cpu",
            "precision": "32",
            "fps": 8,
            "save_intermediates": False,
            "logger": {"wandb": False},
            "output_dir": str(tmp_path / "gen"),
        }
    )
    generate.generate(cfg)
    timings = tmp_path / "gen" / "timings.json"
    before = timings.read_text()
    assert json.loads(before)[0]["name"] == "keyframe"
    sys.setprofile(_kill_on_write_to("timings.json"))
    try:
        with pytest.raises(_Killed):
            generate.generate(cfg)
    finally:
        sys.setprofile(None)
    assert timings.read_text() == before


# ---------------------------------------------------------------------------- distributed failure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, env: dict, out: str, res_dir: str, extra: list[str]) -> None:
    """One evaluation rank. The process group is made here and kept alive after a failure (as an NCCL rank
    that raised would be, until its launcher notices), so a peer stuck in a collective stays stuck."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    if "report" in extra:  # rank 0 (the store's host) fails while it assembles the report
        import evaluation.report as report_mod  # the report assembly calls weight_files

        def broken(*a, **k):
            raise OSError("disk full")

        if rank == 0:
            report_mod.weight_files = broken
        extra = [e for e in extra if e != "report"]
    t0 = time.monotonic()
    try:
        run_evaluation(_compose(env, Path(out), *extra))
        rec = {"ok": True}
    except BaseException as e:  # noqa: BLE001
        rec = {"ok": False, "type": type(e).__name__, "msg": str(e)}
    rec["seconds"] = time.monotonic() - t0
    Path(res_dir, f"{rank}.json").write_text(json.dumps(rec))
    deadline = time.monotonic() + 150  # stay alive (process group up) until the test has every answer
    while time.monotonic() < deadline and not Path(res_dir, "done").exists():
        time.sleep(0.2)
    os._exit(0)  # no process-group teardown: it could block on a peer that never finished


def _run_ranks(env, tmp_path, extra: list[str], world: int = 2) -> dict[int, dict]:
    res = tmp_path / "results"
    res.mkdir()
    ctx = pymp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_dist_worker, args=(r, world, port, env, str(tmp_path / "out"), str(res), extra))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # every rank answered, or exited without answering
        if all((res / f"{r}.json").exists() or not p.is_alive() for r, p in enumerate(procs)):
            break
        time.sleep(0.2)
    (res / "done").touch()
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return {int(f.stem): json.loads(f.read_text()) for f in res.glob("*.json")}


def test_one_rank_raising_stops_the_others_at_once(env, tmp_path):
    results = _run_ranks(env, tmp_path, ["generator=failing"])
    assert results[1]["type"] == "RuntimeError" and "boom" in results[1]["msg"]
    r0 = results[0]
    assert r0["type"] == "PeerFailedError", r0
    assert "rank 1 failed during 'generation'" in r0["msg"] and "boom" in r0["msg"]
    assert r0["seconds"] < 60  # not the 120 s collective timeout


def test_rank_zero_failing_late_stops_the_others(env, tmp_path):
    results = _run_ranks(env, tmp_path, ["report"])
    assert results[0]["type"] == "OSError" and "disk full" in results[0]["msg"]
    assert results[1]["type"] == "PeerFailedError" and "rank 0 failed during 'report'" in results[1]["msg"]


def test_a_rank_that_dies_silently_is_noticed_by_its_heartbeat(env, tmp_path):
    results = _run_ranks(env, tmp_path, ["generator=failing", "generator.mode=exit", "dist_peer_timeout_s=3"])
    assert 1 not in results  # died without a word
    r0 = results[0]
    assert r0["type"] == "PeerLostError" and "rank 1 sent no heartbeat" in r0["msg"], r0
    assert r0["seconds"] < 60
