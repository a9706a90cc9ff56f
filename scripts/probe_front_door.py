"""What a newcomer meets first: one shape drawn with PIL, asked about in everyday wording, and the
README's own image. Prints a JSON summary (issue #20's probe; docs/shapesworld.md has the numbers).

    python scripts/probe_front_door.py [CHAT_MODEL]      # default: the packaged chat model
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from viscpm import VisCPMChat
from viscpm.shapes.evaluate import invents_or_repeats
from viscpm.shapes.language import answer_language, extract_answer
from viscpm.shapes.variation import drawn_alone
from viscpm.shapes.world import COLOURS, SHAPES, Scene, ShapeObject

QUESTIONS = {"colour": ("What color is the shape?", "What colour is the shape?", "WHAT COLOUR IS THE SHAPE?",
                        "what color is it", "这个图形是什么颜色？", "图片里的东西是什么颜色?"),
             "shape": ("What shape is this?", "What is the shape?", "what shape do you see", "这是什么形状？",
                       "图中是什么图形")}
SIDES = (16, 24, 32)  # a small, a large and an over-large shape on the 64 px canvas
README_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"


def main(model: str | None = None) -> dict:
    chat = VisCPMChat(model, image_safety_checker=False)
    right = {kind: {side: 0 for side in SIDES} for kind in QUESTIONS}
    per_side = len(SHAPES) * len(COLOURS)
    described = invented = 0
    follows = {"zh after en": 0, "en after zh": 0}
    for shape in SHAPES:
        for colour in COLOURS:
            for side in SIDES:
                image = drawn_alone(shape, colour, side)
                for kind, questions in QUESTIONS.items():
                    answers = chat.batch_chat([image] * len(questions), list(questions), max_new_tokens=24)
                    truth = colour if kind == "colour" else shape
                    right[kind][side] += sum(extract_answer(a, kind) == truth for a in answers)
            image, scene = drawn_alone(shape, colour), Scene((ShapeObject(shape, colour, "large", 1, 1),))
            for question in ("Describe the picture.", "描述一下这张图片。"):
                described += 1
                invented += invents_or_repeats(chat.chat(image, question, max_new_tokens=48)[0], scene)[0]
            for first, second, key, lang in (("What colour is the shape?", "它是什么形状？", "zh after en", "zh"),
                                             ("图形是什么颜色？", "What shape is it?", "en after zh", "en")):
                _, context, vision = chat.chat(image, first, max_new_tokens=24)
                follows[key] += answer_language(chat.chat(image, second, context, vision, max_new_tokens=24)[0]) == lang
    n = {kind: per_side * len(questions) for kind, questions in QUESTIONS.items()}
    return {
        "model": model or "packaged",
        "pil_drawn_right": {kind: {f"{side}px": round(v / n[kind], 3) for side, v in sides.items()}
                            for kind, sides in right.items()},
        "describe_invents_a_shape": round(invented / described, 3),
        "second_turn_in_its_own_language": {k: round(v / per_side, 3) for k, v in follows.items()},
        "readme_image": {q: chat.chat(str(README_IMAGE), q)[0] for q in
                         ("What is in the picture?", "图片里有什么？", "圆形是什么颜色？", "What color is the circle?")},
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:2]), ensure_ascii=False, indent=1))
