"""The engine's guarantees, with real processes: 2 CPU processes (gloo) equal one process with the
same global batch; a run killed by SIGKILL between checkpoints resumes to the same losses."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from viscpm.train.config import TrainConfig
from viscpm.train.engine import train
from viscpm.train.state import latest_checkpoint
from viscpm.train.recipes import build_recipe

from .train_fixtures import write_config, write_world

REPO = Path(__file__).resolve().parents[2]

# The child wraps the loss in a short sleep so a kill can land between two checkpoints.
SLOW_CHILD = """
import sys, time
from viscpm.train.config import TrainConfig
from viscpm.train.engine import train
from viscpm.train.recipes import build_recipe
config = TrainConfig.from_file(sys.argv[1])
recipe = build_recipe("lm", config)
loss = recipe.loss
recipe.loss = lambda model, batch: (time.sleep(0.15), loss(model, batch))[1]
train(recipe, config, resume="--resume" in sys.argv)
"""


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def lm_config(tmp_path, world, name, **options):
    train_options = dict(output_dir=tmp_path / name, max_steps=10, batch_size=4, learning_rate=1e-2, log_every=1,
                         save_every=4, lr_schedule="cosine", warmup_steps=2)
    train_options.update(options)
    return write_config(tmp_path / f"{name}.toml", {"config": world["lm"], "vocab": world["vocab"]},
                        {"train": world["texts"]}, train_options)


def run_in_process(path: Path):
    config = TrainConfig.from_file(path)
    train(build_recipe("lm", config), config)


def assert_same_run(tmp_path: Path, reference: str, other: str) -> None:
    """Two runs' logged losses (rel 1e-5) and final weights agree."""
    expected, got = losses(tmp_path / reference), losses(tmp_path / other)
    assert expected.keys() == got.keys() == set(range(1, 11))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    a = load_file(tmp_path / reference / "final" / "model.safetensors")
    b = load_file(tmp_path / other / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    world = write_world(tmp_path / "world")
    run_in_process(lm_config(tmp_path, world, "single", batch_size=6))
    two = lm_config(tmp_path, world, "double", batch_size=6)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "viscpm.cli", "train", "lm", "--config", str(two)],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path, "single", "double")


@pytest.mark.slow
def test_fsdp_config_runs_data_parallel_on_cpu_and_resumes(tmp_path):
    """The repository's FSDP accelerate config launched on a CPU-only machine: accelerate turns FSDP
    on only with accelerators, so the 2 processes run data parallel (gloo). Same losses and final
    weights as one process, and a run resumed from its step-8 checkpoint ends where the
    uninterrupted one did. (Sharded FSDP itself needs GPUs: not tested here.)"""
    world = write_world(tmp_path / "world")
    run_in_process(lm_config(tmp_path, world, "single", batch_size=6))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs" / "accelerate" / "fsdp_10b.yaml"), "--num_processes", "2", "--mixed_precision", "no",
              "-m", "viscpm.cli", "train", "lm", "--config"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launched = lm_config(tmp_path, world, "fsdp", batch_size=6)
    result = subprocess.run(launch + [str(launched)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path, "single", "fsdp")
    fsdp = losses(tmp_path / "fsdp")

    # the run as if killed after step 9: its last complete checkpoint is step 8
    shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "final")
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    kept = [json.loads(line) for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 9]
    kept[0]["loss"] = -1.0  # a marker: a resumed run keeps steps 1..8, a restarted one would rewrite them
    metrics.write_text("".join(json.dumps(record) + "\n" for record in kept))
    resumed = lm_config(tmp_path, world, "resumed", batch_size=6)
    result = subprocess.run(launch + [str(resumed), "--resume"], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "resumed") == pytest.approx(fsdp | {1: -1.0}, rel=1e-6)
    uninterrupted = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    resumed_weights = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    for key in uninterrupted:
        torch.testing.assert_close(resumed_weights[key], uninterrupted[key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_matches(tmp_path):
    world = write_world(tmp_path / "world")
    run_in_process(lm_config(tmp_path, world, "straight", max_steps=12))
    killed = lm_config(tmp_path, world, "killed", max_steps=12)
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, str(killed)], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if metrics.is_file() and max(losses(tmp_path / "killed"), default=0) >= 6:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    last_logged = max(losses(tmp_path / "killed"))
    assert 6 <= last_logged < 8, "the kill must land between the checkpoints at steps 4 and 8"
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000004"

    result = subprocess.run([sys.executable, "-m", "viscpm.cli", "train", "lm", "--config", str(killed), "--resume"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, straight = losses(tmp_path / "killed"), losses(tmp_path / "straight")
    assert sorted(resumed) == list(range(1, 13))  # the killed run's steps 5..7 were replaced
    for step in range(5, 13):
        assert resumed[step] == straight[step], step  # same arithmetic: exactly equal
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_save_leaves_no_checkpoint(tmp_path):
    """A .tmp folder (a save cut short) is never taken for a checkpoint."""
    (tmp_path / "checkpoints" / "step-00000008.tmp").mkdir(parents=True)
    assert latest_checkpoint(tmp_path) is None
    done = tmp_path / "checkpoints" / "step-00000004"
    done.mkdir()
    (done / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == done


def test_plot_writes_png(tmp_path):
    from viscpm.train.plot import plot_run

    world = write_world(tmp_path / "world")
    run_in_process(lm_config(tmp_path, world, "run", max_steps=3))
    png = plot_run(tmp_path / "run")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
