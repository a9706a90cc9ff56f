"""Loading apart from the pipelines (viscpm.pipelines.loading), pipelines built from components,
the library's defaults in one diffusers-free module, and the one per-call switch helper. On the
packaged models, which every install has."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from viscpm.checkpoints import CheckpointError
from viscpm.pipelines.chat import VisCPMChat
from viscpm.pipelines.defaults import default_model_path
from viscpm.pipelines.loading import load_chat
from viscpm.pipelines.switches import resolve_switch
from viscpm.tokenization import CPMBeeTokenizer


@pytest.fixture(scope="module")
def short_vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "short.txt"
    lines = (default_model_path("chat") / "vocab.txt").read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:100]) + "\n", encoding="utf-8")
    return path


def open_paint(*args, **kwargs):
    from viscpm.pipelines.paint import VisCPMPaint

    return VisCPMPaint(*args, **kwargs)


@pytest.mark.parametrize("kind", ["chat", "paint"])
def test_a_wrong_vocab_is_the_same_error_for_both_models(kind, short_vocab):
    folder = default_model_path(kind)
    build = VisCPMChat if kind == "chat" else lambda *a, **k: open_paint(*a, False, False, False, **k)
    with pytest.raises(CheckpointError, match="has 100 tokens but the model expects"):
        build(folder, vocab_path=short_vocab)


def test_chat_from_components_answers_as_the_path_constructor(short_vocab):
    folder = default_model_path("chat")
    by_path = VisCPMChat(folder, image_safety_checker=False)
    parts = load_chat(folder)
    built = VisCPMChat.from_components(parts.model, parts.tokenizer)
    assert built.image_safety_checker is None and built.vocab_path == by_path.vocab_path
    image = Image.new("RGB", (64, 64), (220, 30, 30))
    question = "What colour is the background?"
    assert built.chat(image, question, num_beams=1, max_new_tokens=6)[0] == \
        by_path.chat(image, question, num_beams=1, max_new_tokens=6)[0]
    with pytest.raises(CheckpointError, match="has 100 tokens"):
        VisCPMChat.from_components(parts.model, CPMBeeTokenizer(short_vocab))


def test_paint_from_components_paints_as_the_path_constructor():
    from viscpm.pipelines.loading import load_paint
    from viscpm.pipelines.paint import VisCPMPaint

    folder = default_model_path("paint")
    by_path = VisCPMPaint(folder, False, False, False, progress_bar=False)
    parts = load_paint(folder)  # the packaged weights are stored in fp16; the pipeline runs them in fp32
    built = VisCPMPaint.from_components(parts.model.float(), parts.vae.float(), parts.tokenizer,
                                        defaults=parts.defaults, progress_bar=False)
    assert built.ranker is None and built.default_size == by_path.default_size
    ours, theirs = (p.paint("a red circle", seed=3, num_inference_steps=2)[0] for p in (built, by_path))
    assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['flip'\]; its advanced options are"):
        built.paint("a red circle", flip=True)


def test_defaults_need_no_diffusers():
    """The CLI and the server read scheduler and preset names without importing diffusers."""
    code = ("import sys; from viscpm.pipelines.defaults import SAMPLING_PRESETS, SCHEDULERS, sampling_preset; "
            "assert set(SCHEDULERS) >= {s for s, _ in SAMPLING_PRESETS.values()}; "
            "assert sampling_preset('fast', None, 7) == ('dpm++-sde', 7); "
            "assert 'diffusers' not in sys.modules, 'diffusers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_meaning_for_a_per_call_switch():
    built, default = object(), object()
    mine = lambda value: True  # noqa: E731
    assert resolve_switch("x", None, built, lambda: default) is built
    assert resolve_switch("x", True, built, lambda: default) is built
    assert resolve_switch("x", True, None, lambda: default) is default
    assert resolve_switch("x", False, built, lambda: default) is None
    assert resolve_switch("x", mine, built, lambda: default) is mine
    for value in ("lexicon", "some/folder", 3):  # names and folders are resolved once, when the pipeline is built
        with pytest.raises(ValueError, match="x: per call, pass true or false"):
            resolve_switch("x", value, built, lambda: default)


def test_the_server_maps_refusals_by_type_not_by_name():
    from viscpm.safety import Refused
    from viscpm.serve.app import as_api_error

    class Blocked(Refused):
        pass

    assert as_api_error(Blocked("no", "a reason", "mine")).code == "content_policy_violation"
    impostor = type("RefusedPrompt", (RuntimeError,), {})("a bug, not a refusal")
    assert as_api_error(impostor).status == 500
