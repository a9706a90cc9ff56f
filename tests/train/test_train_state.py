"""Training checkpoints never unpickle, and runs do not mix: a new run refuses a used output
directory, --resume refuses another run's checkpoint (naming what differs), rotation keeps other
runs' checkpoints."""
from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import pytest

from viscpm.train.config import TrainConfig
from viscpm.train.engine import train
from viscpm.train.recipes import build_recipe
from viscpm.train.state import (STATE_NAME, TrainerState, TrainingStateError, check_output_dir, latest_checkpoint,
                                rotate_checkpoints, run_fingerprint)

from .train_fixtures import write_config, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"))


def lm_config(tmp_path: Path, world, name: str = "run", **options) -> TrainConfig:
    train_options = dict(output_dir=tmp_path / name, max_steps=4, batch_size=4, learning_rate=1e-2, log_every=1,
                         save_every=2)
    train_options.update(options)
    path = write_config(tmp_path / f"{name}.toml", {"config": world["lm"], "vocab": world["vocab"]},
                        {"train": world["texts"]}, train_options)
    return TrainConfig.from_file(path)


def run(config: TrainConfig, **flags) -> TrainerState:
    return train(build_recipe("lm", config), config, **flags)


class RunsCode:
    """A pickle payload: unpickling it creates ``marker`` (as an attacker's ``os.system`` would run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.safetensors",
                                     "model.safetensors", "scheduler.json"])
def test_resume_never_unpickles_a_planted_file(tmp_path, world, planted):
    payload = pickle.dumps(RunsCode(tmp_path / "proof"))
    pickle.loads(payload)
    assert (tmp_path / "proof").exists(), "the payload must really run code when unpickled"

    config = lm_config(tmp_path, world, max_steps=3)
    run(config)
    checkpoint = latest_checkpoint(config.train.output_dir)
    marker = tmp_path / "marker"
    (checkpoint / planted).write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(TrainingStateError, match=r"pickle files|damaged or not viscpm's format") as error:
        run(config, resume=True)
    assert planted in str(error.value)
    assert not marker.exists()


def test_checkpoint_files_are_safetensors_and_json(tmp_path, world):
    config = lm_config(tmp_path, world, max_steps=3)
    run(config)
    checkpoint = latest_checkpoint(config.train.output_dir)
    assert {p.suffix for p in checkpoint.iterdir()} == {".safetensors", ".json"}


def test_a_new_run_refuses_a_used_output_dir_and_overwrite_starts_over(tmp_path, world):
    config = lm_config(tmp_path, world)
    run(config)
    output = config.train.output_dir
    metrics = (output / "metrics.jsonl").read_text()
    with pytest.raises(TrainingStateError, match="not empty.*--resume.*--overwrite"):
        run(config)
    assert (output / "metrics.jsonl").read_text() == metrics  # nothing lost
    (output / "notes.txt").write_text("mine")
    (output / "checkpoints" / "step-00000099").mkdir()  # a stale folder of the old run
    run(config, overwrite=True)
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000002"]
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (output / "notes.txt").read_text() == "mine"  # not the run's: left alone
    with pytest.raises(TrainingStateError, match="pass one of them"):
        run(config, resume=True, overwrite=True)


@pytest.mark.parametrize("change, named", [
    (dict(learning_rate=2e-2), "train.learning_rate"),
    (dict(seed=1, batch_size=2), "train.batch_size.*train.seed"),
    (dict(lr_schedule="constant"), "train.lr_schedule"),
])
def test_resume_refuses_another_runs_checkpoint_and_names_the_setting(tmp_path, world, change, named):
    original = lm_config(tmp_path, world, max_steps=4, save_every=2, lr_schedule="cosine")
    fingerprint = run_fingerprint("lm", original)
    output = original.train.output_dir
    _fake_checkpoint(output, 2, fingerprint)
    assert check_output_dir(output, fingerprint, resume=True, overwrite=False) == output / "checkpoints" / "step-00000002"
    other = lm_config(tmp_path, world, **{"lr_schedule": "cosine", "save_every": 2, **change})
    with pytest.raises(TrainingStateError, match=f"different run.*{named}"):
        check_output_dir(output, run_fingerprint("lm", other), resume=True, overwrite=False)
    with pytest.raises(TrainingStateError, match="different run.*stage"):
        check_output_dir(output, run_fingerprint("chat-sft", original), resume=True, overwrite=False)


def test_resume_accepts_settings_that_do_not_change_the_run(tmp_path, world):
    original = lm_config(tmp_path, world)
    _fake_checkpoint(original.train.output_dir, 2, run_fingerprint("lm", original))
    longer = lm_config(tmp_path, world, max_steps=8, save_every=4, log_every=2, micro_batch_size=2,
                       gradient_checkpointing=True, output_dir=original.train.output_dir)
    assert check_output_dir(longer.train.output_dir, run_fingerprint("lm", longer), resume=True, overwrite=False)


def test_resume_refuses_changed_data(tmp_path, world):
    data = tmp_path / "texts.jsonl"
    shutil.copy(world["texts"], data)
    config = lm_config(tmp_path, dict(world, texts=data))
    fingerprint = run_fingerprint("lm", config)
    _fake_checkpoint(config.train.output_dir, 2, fingerprint)
    data.write_text(data.read_text() + json.dumps({"context": "", "question": "x?", "<ans>": "y"}) + "\n")
    with pytest.raises(TrainingStateError, match="different run.*data.train"):
        check_output_dir(config.train.output_dir, run_fingerprint("lm", config), resume=True, overwrite=False)


def test_resume_refuses_a_checkpoint_without_fingerprint(tmp_path, world):
    config = lm_config(tmp_path, world)
    _fake_checkpoint(config.train.output_dir, 2, {})
    with pytest.raises(TrainingStateError, match="no run fingerprint.*--overwrite"):
        check_output_dir(config.train.output_dir, run_fingerprint("lm", config), resume=True, overwrite=False)


def test_rotation_deletes_only_this_runs_old_checkpoints(tmp_path):
    ours, theirs = {"stage": "lm", "train.seed": 0}, {"stage": "lm", "train.seed": 1}
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step, ours)
    _fake_checkpoint(tmp_path, 40, theirs)  # sorts after ours: the old rotation deleted ours for it
    rotate_checkpoints(tmp_path, ours, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000004", "step-00000006", "step-00000040"]


def _fake_checkpoint(output_dir: Path, step: int, fingerprint: dict) -> Path:
    folder = output_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / STATE_NAME).write_text(TrainerState(step=step, run=fingerprint).to_json())
    return folder


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_last_one(tmp_path, world, monkeypatch):
    from viscpm.train import state as state_module

    saves = []
    real_save_file = state_module.save_file

    def disk_fills_up_on_the_second_save(tensors, filename, metadata=None):
        saves.append(filename)
        if len(saves) == 2:
            Path(filename).write_bytes(b"\0" * 1000)  # part of the file got written
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save_file(tensors, filename, metadata)

    monkeypatch.setattr(state_module, "save_file", disk_fills_up_on_the_second_save)
    config = lm_config(tmp_path, world, max_steps=5, save_every=2)
    with pytest.raises(TrainingStateError, match="step-00000004.*disk is full.*--resume"):
        run(config)
    checkpoints = config.train.output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]  # no partial step-4.tmp
    monkeypatch.setattr(state_module, "save_file", real_save_file)
    assert run(config, resume=True).step == 5


def test_cli_refuses_a_used_output_dir_before_loading_the_model(tmp_path, world, capsys, monkeypatch):
    from viscpm import cli
    from viscpm.train import recipes

    config = lm_config(tmp_path, world, max_steps=2)
    assert cli.main(["train", "lm", "--config", str(config.source)]) == 0
    monkeypatch.setattr(recipes, "build_recipe", lambda *a: pytest.fail("the model must not be loaded"))
    assert cli.main(["train", "lm", "--config", str(config.source)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["train", "lm", "--config", str(config.source), "--set", "train.seed=5", "--resume"]) == 2
    assert "train.seed: 5 now, 0 before" in capsys.readouterr().err.replace("\n", " ")
