"""Benchmarks beyond ShapesWorld: the paper's tables for any checkpoint.

* :mod:`.llava_bench` — LLaVA-Bench (COCO), English and VisCPM's Chinese translation, scored by any
  OpenAI-compatible judge (:mod:`.judge`), resumable;
* :mod:`.paint_scores` — CLIP score and FID of painted images with local weights, time per image;
* :mod:`.compare` — the per-category difference of two reports;
* :mod:`.commands` — the ``viscpm eval llava-bench | paint | compare`` command lines.

Every report is a JSON file with a ``scores`` mapping ``{group: {metric: number}}``, which is
what ``viscpm eval compare`` reads.
"""
