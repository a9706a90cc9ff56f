"""The training loop every stage shares, on Hugging Face accelerate.

One script runs as a single CPU process, as DDP over several processes or GPUs, or under FSDP /
DeepSpeed from an accelerate config (``accelerate launch --config_file … -m viscpm.cli train …``).

Exactness, which the tests check:
* a step's global batch depends only on (seed, step) (``GlobalBatches``); each process takes a
  strided share;
* each process's loss is its *sum* over tokens (or samples) divided by the count over the whole
  global batch, times the number of processes (DDP averages gradients), so N processes compute the
  same gradient as one;
* checkpoints hold weights, optimizer, scheduler and RNG states plus the step, in safetensors and
  JSON (never pickle: ``state.py``); they are written to ``step-N.tmp`` and renamed when complete,
  so a run killed mid-save resumes from the last complete checkpoint;
* each checkpoint records the run's fingerprint: a new run refuses a directory that holds another
  one (unless ``overwrite``), ``resume`` refuses another run's checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints import describe_write_error
from ..models.cpmbee import CPMBee
from .config import TrainConfig, TrainSection
from .data import BadRecord, GlobalBatches, shard_for_process
from .state import (CHECKPOINTS, TrainerState, TrainingStateError, check_output_dir, load_training_state,
                    replace_checkpoint, rotate_checkpoints, run_fingerprint,
                    save_training_state, start_run)

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
KEEP_CHECKPOINTS = 2
MIN_RECORDS_BEFORE_SKIP_CHECK = 50  # a bad record early on must not stop a run by itself


@dataclass
class Recipe:
    """What a stage plugs into the shared loop.

    * ``examples[i]`` loads record i as a training example or raises ``BadRecord``;
    * ``collate`` batches examples; ``count`` is what the loss is averaged over (target tokens or
      samples); ``loss`` returns the *sum* of per-item losses of a batch;
    * ``save`` writes the final model where ``VisCPMChat``/``VisCPMPaint`` can load it.
    """

    name: str
    model: nn.Module
    examples: Sequence[Any]
    collate: Callable[[list[Any]], Any]
    count: Callable[[Any], int]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    save: Callable[[nn.Module, Path], None]
    malformed: int = 0  # records already dropped while reading the files


def parameter_report(model: nn.Module) -> str:
    """Trainable / frozen parameter counts per top-level module."""
    lines = []
    for name, module in model.named_children():
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        lines.append(f"  {name:<12} trainable {trainable:>13,}  frozen {frozen:>13,}")
    own = list(model.parameters(recurse=False))
    if own:
        trainable = sum(p.numel() for p in own if p.requires_grad)
        lines.append(f"  {'(own)':<12} trainable {trainable:>13,}  frozen {sum(p.numel() for p in own) - trainable:>13,}")
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"  {'total':<12} trainable {total:>13,}  frozen {sum(p.numel() for p in model.parameters()) - total:>13,}")
    return "\n".join(lines)


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    warmup, total, schedule = config.train.warmup_steps, config.train.max_steps, config.train.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _save_checkpoint(accelerator, output_dir: Path, model, optimizer, scheduler, state: TrainerState) -> None:
    folder = output_dir / CHECKPOINTS
    final = folder / f"step-{state.step:08d}"
    tmp = folder / f"step-{state.step:08d}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        save_training_state(tmp, accelerator, model, optimizer, scheduler, state)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint must not take up the space left
        raise TrainingStateError(f"cannot save the checkpoint {final}: {describe_write_error(error)}; the last "
                                 f"complete checkpoint is kept, continue with --resume") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_checkpoint(tmp, final)
        rotate_checkpoints(output_dir, state.run, KEEP_CHECKPOINTS)
    accelerator.wait_for_everyone()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics written after the checkpoint we resume from (the killed run's tail)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def parameter_groups(model: nn.Module, t: TrainSection) -> list[dict]:
    """The trainable parameters as optimizer groups: CPM-Bee's own weights at ``llm_learning_rate``
    when one is set (LoRA adapters inside it are standard layers and keep ``learning_rate``)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    llm = set() if t.llm_learning_rate is None else {
        id(p) for module in model.modules() if isinstance(module, CPMBee)
        for name, p in module.named_parameters() if "lora_" not in name}
    groups = [{"params": [p for p in trainable if id(p) not in llm]},
              {"params": [p for p in trainable if id(p) in llm], "lr": t.llm_learning_rate}]
    return [g for g in groups if g["params"]]


_FINISHED_DISTRIBUTED_RUNS: list = []  # kept alive on purpose: see the end of train()


def train(recipe: Recipe, config: TrainConfig, resume: bool = False, overwrite: bool = False) -> TrainerState:
    """Run ``recipe`` to ``config.train.max_steps``; returns the final trainer state.

    ``resume`` continues the run in ``output_dir`` from its last complete checkpoint (it must be
    the same run: same stage, settings and data); ``overwrite`` replaces the run there. Without
    either, ``output_dir`` must be empty or absent."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = config.train
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    set_seed(t.seed)
    output_dir = t.output_dir
    metrics_path = output_dir / METRICS_NAME
    fingerprint = run_fingerprint(recipe.name, config)
    checkpoint = check_output_dir(output_dir, fingerprint, resume=resume, overwrite=overwrite)
    if resume and checkpoint is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from step 0", output_dir / CHECKPOINTS)
    accelerator.wait_for_everyone()  # every process has checked before the main one writes

    model = recipe.model
    logger.info("stage %s — parameters:\n%s", recipe.name, parameter_report(model))
    groups = parameter_groups(model, t)
    trainable = [p for group in groups for p in group["params"]]
    if not trainable:
        raise ValueError(f"stage {recipe.name} has no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
    # not prepared: accelerate would step it once per process; our steps are global steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    model, optimizer = accelerator.prepare(model, optimizer)

    state = TrainerState(run=fingerprint)
    if checkpoint is not None:
        state = load_training_state(checkpoint, accelerator, model, optimizer, scheduler)
        logger.info("resumed from %s (step %d)", checkpoint, state.step)
    if accelerator.is_main_process:
        start_run(output_dir, fingerprint, overwrite=overwrite)
        _truncate_metrics(metrics_path, state.step)
        (output_dir / "train_config.json").write_text(json.dumps(_plain(config), indent=2, ensure_ascii=False))
    accelerator.wait_for_everyone()

    batches = GlobalBatches(len(recipe.examples), t.batch_size, t.seed)
    micro = t.micro_batch_size or math.ceil(t.batch_size / world)
    progress = tqdm(total=t.max_steps, initial=state.step, desc=recipe.name, disable=not accelerator.is_main_process,
                    dynamic_ncols=True)
    started, count_since, items_since = time.perf_counter(), 0, 0
    model.train()
    while state.step < t.max_steps:
        # 1. this process's examples of the global batch; bad records are skipped and counted
        examples = []
        for index in shard_for_process(batches.indices(state.step), rank, world):
            try:
                examples.append(recipe.examples[index])
            except BadRecord as bad:
                state.skipped[bad.reason] += 1
        state.seen += t.batch_size
        _check_skipped(accelerator, state, recipe, config)
        chunks = [recipe.collate(examples[i : i + micro]) for i in range(0, len(examples), micro)]
        local_count = sum(recipe.count(chunk) for chunk in chunks)
        global_count = accelerator.reduce(torch.tensor(float(local_count), device=accelerator.device), "sum").item()

        # 2. forward/backward; gradients sync once, on the last chunk
        loss_sum = torch.zeros((), device=accelerator.device)
        for number, chunk in enumerate(chunks):
            sync = number == len(chunks) - 1
            with accelerator.no_sync(model) if not sync else nullcontext():
                loss = recipe.loss(model, chunk)
                accelerator.backward(loss * world / max(global_count, 1.0))
            loss_sum += loss.detach()
        if not chunks:  # every example of this share was bad: still join the gradient sync
            accelerator.backward(sum(p.sum() * 0.0 for p in trainable))
        if t.max_grad_norm is not None:
            accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        # 3. log, save
        step_loss = accelerator.reduce(loss_sum, "sum").item() / max(global_count, 1.0)
        count_since += global_count
        items_since += t.batch_size
        if state.step % t.log_every == 0 or state.step == t.max_steps:
            elapsed = time.perf_counter() - started
            record = {"step": state.step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                      "items_per_s": items_since / elapsed, "count_per_s": count_since / elapsed,
                      "skipped": sum(state.skipped.values())}
            if len(groups) > 1:
                record["llm_lr"] = scheduler.get_last_lr()[-1]
            if accelerator.is_main_process:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            progress.set_postfix(loss=f"{step_loss:.4f}", per_s=f"{count_since / elapsed:.0f}")
            started, count_since, items_since = time.perf_counter(), 0, 0
        progress.update(1)
        if state.step % t.save_every == 0 and state.step < t.max_steps:
            _save_checkpoint(accelerator, output_dir, model, optimizer, scheduler, state)
    progress.close()

    accelerator.wait_for_everyone()
    skipped = sum(state.skipped.values()) + recipe.malformed
    if skipped:
        logger.warning("stage %s skipped %d bad records: %s", recipe.name, skipped,
                       dict(state.skipped) | ({"malformed": recipe.malformed} if recipe.malformed else {}))
    if accelerator.is_main_process:
        recipe.save(accelerator.unwrap_model(model), output_dir / "final")
        logger.info("stage %s done: final weights in %s", recipe.name, output_dir / "final")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        # Never free a finished distributed run: freeing the DDP model tears gloo's process group
        # down, whose destructor joins gloo's worker thread while holding the GIL, and that thread
        # may still be releasing the last barrier's Python-owned tensors, which needs the GIL: a
        # deadlock, seen at the exit of 2-process CPU runs. `viscpm train` then ends the process
        # with os._exit (cli.train.run_train), so no destructor runs.
        _FINISHED_DISTRIBUTED_RUNS.append(accelerator)
    return state


def _check_skipped(accelerator, state: TrainerState, recipe: Recipe, config: TrainConfig) -> None:
    skipped = sum(state.skipped.values())
    skipped = accelerator.reduce(torch.tensor(float(skipped), device=accelerator.device), "sum").item()
    skipped += recipe.malformed
    seen = state.seen + recipe.malformed
    if seen >= MIN_RECORDS_BEFORE_SKIP_CHECK and skipped / seen > config.data.max_skipped_fraction:
        raise ValueError(
            f"stage {recipe.name}: {skipped:.0f} of {seen} records were unusable "
            f"({dict(state.skipped)}, malformed {recipe.malformed}), more than max_skipped_fraction="
            f"{config.data.max_skipped_fraction}; fix the data or raise the limit"
        )


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
