"""Resumable training checkpoints that never unpickle, and the run fingerprint that keeps runs apart.

A checkpoint ``checkpoints/step-N/`` holds

    model.safetensors                the model's weights
    optimizer.safetensors + .json    the optimizer's tensors; its groups and scalars as JSON
    scheduler.json, scaler.json      learning-rate schedule (and fp16 loss scale) state
    rng_state_<rank>.json            Python, NumPy and torch generator states of each process
    trainer_state.json               step, skipped records, and the run fingerprint

Nothing in it is read with pickle, so a replaced file can at worst fail to load: accelerate's
``save_state`` pickles RNG states and loads registered objects with ``weights_only=False``, which
runs any code a tampered file carries. Sharded engines (FSDP, DeepSpeed) keep accelerate's own
formats, which only they can write; accelerate reads those with ``weights_only=True``.

The fingerprint is what makes a run *this* run: the stage, every setting that changes the
arithmetic, and the content digests of the data, config and vocab files. A new run refuses an output
directory that already holds one; ``--resume`` refuses a checkpoint with another fingerprint and
names the settings that differ; rotation deletes only the current run's old checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from .config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
RUN_NAME = "run.json"  # the fingerprint of the run that owns the output directory
MODEL_NAME = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_NAME = "optimizer.json"
SCHEDULER_NAME = "scheduler.json"
SCALER_NAME = "scaler.json"
# never read: in a checkpoint folder they mean an old format, another tool, or tampering
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth")
# what a run writes into its output directory (what --overwrite removes; anything else stays)
RUN_ARTIFACTS = ("checkpoints", "final", "metrics.jsonl", "train_config.json", RUN_NAME, "curves.png")
# settings a resumed run may change: they do not change the arithmetic of the steps taken, and
# max_steps extends (or shortens) a run; under the cosine schedule the remaining steps follow the
# new length's curve
NOT_FINGERPRINTED = {"source", "train.output_dir", "train.save_every", "train.log_every", "train.micro_batch_size",
                     "train.gradient_checkpointing", "train.max_steps"}
DIGESTED_FILES = ("data.train", "model.config", "model.vocab")  # compared by content, not path


class TrainingStateError(ValueError):
    """A checkpoint or output directory that this run must not use as it is."""


@dataclass
class TrainerState:
    step: int = 0
    skipped: Counter = field(default_factory=Counter)
    seen: int = 0
    run: dict[str, Any] = field(default_factory=dict)  # the run fingerprint

    def to_json(self) -> str:
        return json.dumps({"step": self.step, "skipped": dict(self.skipped), "seen": self.seen, "run": self.run},
                          indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        data = json.loads(text)
        return cls(data["step"], Counter(data["skipped"]), data["seen"], data.get("run", {}))


# ---------------------------------------------------------------------------------------------
# The run fingerprint


def _file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, sorted): data shards."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with file.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return "sha256:" + digest.hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if hasattr(value, "__dataclass_fields__"):
        value = {k: getattr(value, k) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, Path):
        value = str(value.resolve())
    elif isinstance(value, tuple | list):
        value = [str(v.resolve()) if isinstance(v, Path) else v for v in value]
    return {prefix.rstrip("."): value}


def run_fingerprint(stage: str, config: TrainConfig) -> dict[str, Any]:
    """A flat, JSON-plain description of the run: ``{"stage": …, "train.seed": 0, "data.train": [digest], …}``."""
    settings = {k: v for k, v in _flatten(config).items() if k not in NOT_FINGERPRINTED}
    for key in DIGESTED_FILES:
        paths = settings.get(key)
        if paths is not None:
            digest = lambda p: _file_digest(Path(p))
            settings[key] = [digest(p) for p in paths] if isinstance(paths, list) else digest(paths)
    return json.loads(json.dumps({"stage": stage, **settings}))  # the form it has once read back


def fingerprint_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """``["train.seed: 0 now, 1 before", …]`` for every setting that differs."""
    return [f"{key}: {expected.get(key)!r} now, {found.get(key)!r} before"
            for key in sorted(expected.keys() | found.keys()) if expected.get(key) != found.get(key)]


def _refuse_other_run(fingerprint: dict[str, Any], found: dict[str, Any], where: Path) -> None:
    if not found:
        raise TrainingStateError(f"{where} records no run fingerprint (written by an older viscpm?), so it cannot "
                                 f"be checked to belong to this run; start over with --overwrite")
    differences = fingerprint_differences(fingerprint, found)
    if differences:
        raise TrainingStateError(f"{where} belongs to a different run; it differs in " + "; ".join(differences) +
                                 ". Resume with the original settings, or start over with --overwrite "
                                 "(or another train.output_dir)")


# ---------------------------------------------------------------------------------------------
# The output directory


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    folder = output_dir / CHECKPOINTS
    return sorted(p for p in folder.glob("step-*") if not p.name.endswith(".tmp") and (p / STATE_NAME).is_file())


def latest_checkpoint(output_dir: Path) -> Path | None:
    complete = _complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def _read_state(checkpoint: Path) -> TrainerState:
    try:
        return TrainerState.from_json((checkpoint / STATE_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise TrainingStateError(f"{checkpoint / STATE_NAME} is not a trainer state: {error!r}") from None


def check_output_dir(output_dir: Path, fingerprint: dict[str, Any], *, resume: bool, overwrite: bool) -> Path | None:
    """Whether this run may use ``output_dir``; returns the checkpoint to resume from, if any.
    Only reads: every process calls it before anything is written."""
    if resume and overwrite:
        raise TrainingStateError("--resume continues a run and --overwrite starts over: pass one of them")
    if resume:
        run_file = output_dir / RUN_NAME
        if run_file.is_file():
            try:
                previous = json.loads(run_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise TrainingStateError(f"{run_file} is damaged ({error}); start over with --overwrite") from None
            _refuse_other_run(fingerprint, previous if isinstance(previous, dict) else {}, output_dir)
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is not None:
            _refuse_other_run(fingerprint, _read_state(checkpoint).run, checkpoint)
        return checkpoint
    if not overwrite and output_dir.is_dir() and any(output_dir.iterdir()):
        held = sorted(p.name for p in output_dir.iterdir())
        raise TrainingStateError(f"output directory {output_dir} is not empty ({', '.join(held[:5])}"
                                 f"{', …' if len(held) > 5 else ''}): pass --resume to continue the run in it, "
                                 f"--overwrite to start over (removes its checkpoints, final/ and metrics), or "
                                 f"choose another train.output_dir")
    return None


def start_run(output_dir: Path, fingerprint: dict[str, Any], *, overwrite: bool) -> None:
    """Main process: clear a previous run's outputs if told to, and claim the directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in RUN_ARTIFACTS:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    (output_dir / RUN_NAME).write_text(json.dumps(fingerprint, indent=1, ensure_ascii=False), encoding="utf-8")


def rotate_checkpoints(output_dir: Path, fingerprint: dict[str, Any], keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints *of this run*; another run's are left alone."""
    own = [p for p in _complete_checkpoints(output_dir) if _read_state(p).run == fingerprint]
    for old in own[:-keep]:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------
# Saving and loading


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), position, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as (tensors keyed ``"<param index>.<name>"``, everything else as JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def save_training_state(folder: Path, accelerator, model, optimizer, scheduler, state: TrainerState) -> None:
    """Every process writes its RNG state; the main process the rest (DDP replicas are identical)."""
    folder.mkdir(parents=True, exist_ok=True)
    if _sharded(accelerator):
        accelerator.save_state(str(folder))
    _write_json(folder / f"rng_state_{accelerator.process_index}.json", _rng_state())
    if not accelerator.is_main_process:
        return
    if not _sharded(accelerator):
        save_model(accelerator.unwrap_model(model), str(folder / MODEL_NAME))
        tensors, meta = _optimizer_parts(optimizer)
        save_file(tensors, folder / OPTIMIZER_TENSORS)
        _write_json(folder / OPTIMIZER_NAME, meta)
    _write_json(folder / SCHEDULER_NAME, scheduler.state_dict())
    if accelerator.scaler is not None:
        _write_json(folder / SCALER_NAME, accelerator.scaler.state_dict())
    (folder / STATE_NAME).write_text(state.to_json(), encoding="utf-8")


def load_training_state(folder: Path, accelerator, model, optimizer, scheduler) -> TrainerState:
    """The inverse of :func:`save_training_state`; a file that is not what it should be raises
    :class:`TrainingStateError` naming it. Pickle files are refused, never opened."""
    planted = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if planted and not _sharded(accelerator):
        raise TrainingStateError(
            f"checkpoint {folder} contains pickle files ({', '.join(planted)}): viscpm never loads pickled training "
            f"state (it can run code). It was written by an older viscpm or another tool, or tampered with; start "
            f"over with --overwrite")
    path = folder
    try:
        if _sharded(accelerator):
            accelerator.load_state(str(folder))
        else:
            path = folder / MODEL_NAME
            missing, unexpected = load_model(accelerator.unwrap_model(model), str(path), strict=False)
            if missing or unexpected:
                raise TrainingStateError(f"{path} does not fit the model: missing {sorted(missing)[:5]}, "
                                         f"unexpected {sorted(unexpected)[:5]}")
            path = folder / OPTIMIZER_TENSORS
            tensors = load_file(path)
            path = folder / OPTIMIZER_NAME
            optimizer.load_state_dict(_optimizer_state(tensors, json.loads(path.read_text(encoding="utf-8"))))
        path = folder / SCHEDULER_NAME
        scheduler.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
        if accelerator.scaler is not None:
            path = folder / SCALER_NAME
            accelerator.scaler.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
        path = folder / f"rng_state_{accelerator.process_index}.json"
        _set_rng_state(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise TrainingStateError(f"checkpoint {folder} is incomplete: {path.name} is missing") from None
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
            RuntimeError) as error:
        if isinstance(error, TrainingStateError):
            raise
        raise TrainingStateError(f"checkpoint file {path} is damaged or not viscpm's format ({error}); "
                                 f"start over with --overwrite") from None
    return _read_state(folder)


def replace_checkpoint(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
