"""How much of a ShapesWorld scene a chat model's vision encoder makes linearly readable.

    python scripts/probe_vision.py runs/shapes/chat-align/final [more model folders] [--data data/shapes]

For each model: the query outputs of its BEiT-3 encoder (Q × d, flattened) on 4,000 training
images, labelled by the pixel analyser (exact on rendered images); a linear probe per grid cell
and attribute (empty or one of the values) trained on 3,000 images with Adam, scored on the other
1,000. Printed: the share of occupied cells whose colour / shape / size the probe reads right, and
the share of cells whose occupancy it gets right. A diagnostic for the vision side alone, before
the LLM has to use it: QA about colour or position cannot beat what the encoder lets through.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from viscpm import VisCPMChat
from viscpm.image_processing import load_image
from viscpm.shapes import analyse, read_jsonl
from viscpm.shapes.world import COLOURS, GRID, SHAPES, SIZES

ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}


def query_features(folder: Path, images: list[Path]) -> torch.Tensor:
    chat = VisCPMChat(folder, image_safety_checker=False)  # the project's loader: any saved or converted folder
    with torch.no_grad():
        features = [chat.model.vision(chat.transform(images[i : i + 200]), chat.model.queries).flatten(1).float()
                    for i in range(0, len(images), 200)]
    features = torch.cat(features)
    return (features - features.mean(0)) / (features.std(0) + 1e-5)


def cell_labels(scenes: list, attribute: str) -> torch.Tensor:
    """(N, cells): 0 for an empty cell, else 1 + the index of the object's value."""
    values = list(ATTRIBUTES[attribute])
    labels = torch.zeros(len(scenes), GRID * GRID, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            labels[i, obj.row * GRID + obj.col] = 1 + values.index(obj.attribute(attribute))
    return labels


def probe(features: torch.Tensor, labels: torch.Tensor, train: int, steps: int = 300) -> tuple[float, float]:
    classes = int(labels.max()) + 1
    cells = labels.shape[1]
    weight = torch.zeros(features.shape[1], cells * classes, requires_grad=True)
    bias = torch.zeros(cells * classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        logits = (features[:train] @ weight + bias).view(-1, classes)
        loss = torch.nn.functional.cross_entropy(logits, labels[:train].reshape(-1)) + 1e-4 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = (features[train:] @ weight + bias).view(-1, cells, classes).argmax(-1)
    truth = labels[train:]
    occupied = truth > 0
    return (predicted[occupied] == truth[occupied]).float().mean().item(), ((predicted > 0) == occupied).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="chat model folders (config.json + model.safetensors)")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"), help="a ShapesWorld corpus")
    parser.add_argument("--images", type=int, default=4000, help="images to probe on (3/4 train the probe)")
    args = parser.parse_args()
    torch.manual_seed(0)
    captions = args.data / "multimodal" / "captions.jsonl"
    images = [captions.parent / r["image"] for r in read_jsonl(captions)[: args.images]]
    scenes = [analyse(load_image(image)) for image in images]
    train = len(images) * 3 // 4
    for folder in args.models:
        features = query_features(folder, images)
        scores = {a: probe(features, cell_labels(scenes, a), train) for a in ATTRIBUTES}
        occupancy = sum(o for _, o in scores.values()) / len(scores)
        print(f"{folder}: occupied cells read right — " + ", ".join(f"{a} {s:.1%}" for a, (s, _) in scores.items())
              + f"; occupancy {occupancy:.1%}")


if __name__ == "__main__":
    main()
