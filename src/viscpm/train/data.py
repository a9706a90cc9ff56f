"""Training data: records from files, turned into examples by a stage, batched deterministically.

Record files (``[data] train =``):
* ``*.jsonl`` — one JSON object per line: caption pairs ``{"image", "caption"}``, LLaVA-style
  conversations ``{"image"?, "conversations": [{"from": "human", "value": "<image>\\n…"}, …]}``,
  or text prompts (a CPM-Bee structured dict whose ``<ans>`` holds the target);
* ``*.json`` — a JSON list of the same (LLaVA-150K and its Chinese translation ship this way);
* ``*.tar`` / a folder of ``*.tar`` — WebDataset shards: files grouped by key (``0001.png`` +
  ``0001.json`` or ``0001.txt``). Shards are indexed once (tar headers only) and read by offset, so
  a run can sample them like any other source and resume exactly.

Records that cannot be used (missing or corrupt image, no ``<image>`` placeholder, over-long,
malformed) raise ``BadRecord`` when loaded; the engine skips and counts them.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..image_processing import load_image, open_image

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")  # the formats image_processing opens


class BadRecord(ValueError):
    """A record that cannot become a training example; ``reason`` is a short category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One raw record: its JSON fields, and where its image bytes come from (if any)."""

    fields: dict[str, Any]
    image: Path | tuple[Path, int, int] | None  # a file, or (tar shard, offset, size)

    def image_bytes(self) -> bytes:
        if self.image is None:
            raise BadRecord("missing image", "the record names no image")
        if isinstance(self.image, Path):
            try:
                return self.image.read_bytes()
            except OSError as error:
                raise BadRecord("missing image", str(error)) from None
        shard, offset, size = self.image
        with open(shard, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    def open_image(self) -> Image.Image:
        """The record's image as RGB; any problem becomes a ``BadRecord``."""
        try:
            if isinstance(self.image, Path):
                if not self.image.is_file():
                    raise BadRecord("missing image", str(self.image))
                return load_image(self.image)
            return load_image(open_image(io.BytesIO(self.image_bytes()), f"{self.image[0]} at byte {self.image[1]}"))
        except BadRecord:
            raise
        except (ValueError, OSError) as error:  # ImageError, PIL's UnidentifiedImageError
            raise BadRecord("corrupt image", str(error)) from None


class RecordSource:
    """All records of one or more data files (or shard folders), addressable by index."""

    @classmethod
    def concat(cls, paths: Sequence[Path], image_root: Path | None = None) -> "RecordSource":
        sources = [cls(path, image_root) for path in paths]
        joined = sources[0]
        for other in sources[1:]:
            joined.records = joined.records + other.records
            joined.malformed += other.malformed
        return joined

    def __init__(self, path: Path, image_root: Path | None = None):
        self.path = Path(path)
        self.malformed = 0  # lines that are not JSON objects, counted as skipped records
        if not self.path.exists():
            raise ValueError(f"training data not found: {self.path}")
        root = image_root or (self.path if self.path.is_dir() else self.path.parent)
        if self.path.is_dir() or self.path.suffix == ".tar":
            self.records = self._read_shards()
        else:
            self.records = [self._record(fields, root) for fields in self._read_json()]
        if not self.records:
            raise ValueError(f"no usable records in {self.path}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    @staticmethod
    def _record(fields: dict[str, Any], root: Path) -> Record:
        image = fields.get("image")
        return Record(fields, (root / image) if isinstance(image, str) and image else None)

    def _read_json(self) -> list[dict[str, Any]]:
        text = self.path.read_text(encoding="utf-8")
        if self.path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.path} is not valid JSON: {error}") from None
            if not isinstance(data, list):
                raise ValueError(f"{self.path} must hold a JSON list of records")
            items = data
        else:
            items = []
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError:
                    items.append(None)
        good = [item for item in items if isinstance(item, dict)]
        self.malformed = len(items) - len(good)
        if self.malformed:
            logger.warning("%s: %d malformed lines skipped", self.path, self.malformed)
        return good

    def _read_shards(self) -> list[Record]:
        shards = sorted(self.path.glob("*.tar")) if self.path.is_dir() else [self.path]
        records = []
        for shard in shards:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    groups.setdefault(key, {})[ext.lower()] = member
                for key, members in groups.items():
                    if "json" in members:
                        raw = tar.extractfile(members["json"]).read()
                        try:
                            fields = json.loads(raw)
                        except json.JSONDecodeError:
                            self.malformed += 1
                            continue
                    elif "txt" in members:
                        fields = {"caption": tar.extractfile(members["txt"]).read().decode("utf-8")}
                    else:
                        self.malformed += 1
                        continue
                    image = next((m for ext, m in members.items() if "." + ext in IMAGE_SUFFIXES), None)
                    location = (shard, image.offset_data, image.size) if image is not None else None
                    records.append(Record(fields, location))
        return records


def conversation_turns(record: Record, escape: Callable[[str], str]) -> list[dict[str, str]]:
    """The (context, question, answer) of every assistant turn of a LLaVA-style conversation.

    Context is the official ``User: …\\nAI: …\\n`` text of the earlier turns, escaped into the
    prompt markup. ``<image>`` must appear in the first human turn when (and only when) the record
    has an image.
    """
    from ..prompt import append_turn

    turns = record.fields.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("malformed", "no conversations list")
    has_placeholder = any(IMAGE_PLACEHOLDER in str(t.get("value", "")) for t in turns if isinstance(t, dict))
    if record.image is not None and not has_placeholder:
        raise BadRecord("no image placeholder", f"{IMAGE_PLACEHOLDER} missing from the conversation")
    if record.image is None and has_placeholder:
        raise BadRecord("missing image", f"{IMAGE_PLACEHOLDER} used but the record names no image")
    samples, context, question = [], "", None
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or not isinstance(turn.get("value"), str):
            raise BadRecord("malformed", "a turn is not {'from': 'human'|'gpt', 'value': str}")
        text = turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        if turn["from"] == "human":
            question = text
        elif question is not None:
            samples.append({"context": context, "question": escape(question), "<ans>": escape(text)})
            context = append_turn(context, question, text)
            question = None
    if not samples:
        raise BadRecord("malformed", "no human turn followed by a gpt answer")
    return samples


class GlobalBatches:
    """Which records form global batch ``step``: a fresh seeded permutation per epoch, walked in
    order. A step's batch depends only on (seed, step), so any process count and any resume point
    see the same data."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator).tolist()
        return self._order

    def indices(self, step: int) -> list[int]:
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, self.size)
            out.append(self._permutation(epoch)[offset])
        return out


def shard_for_process(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's share of a global batch (strided, so shares differ by at most one)."""
    return list(indices[rank::world])
