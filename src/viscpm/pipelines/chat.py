"""VisCPMChat: talk about images in Chinese or English. A thin pipeline with no model math:
check inputs → build the structured prompt → encode the image → decode → text.

The seed API matches the official one, so VisCPM users can switch::

    chat = VisCPMChat("viscpm_chat_zhplus_checkpoint.pt", vocab_path="vocab.txt")
    answer, context, vision_hidden_states = chat.chat(image, "图片里有什么？")
    answer, context, _ = chat.chat(image, "What colour is it?", context, vision_hidden_states)

Beyond it: greedy/sampled decoding with a seed, streaming (``stream_chat``), stop strings,
batches of (image, question) pairs (``batch_chat``), text-only turns (``image=None``) and a new
image in the middle of a conversation (pass it with ``vision_hidden_states=None``).

Input images pass an image safety checker (:mod:`viscpm.safety`; by default NudeNet when
``viscpm[safety]`` is installed, else none); a flagged image raises :class:`RefusedImage` and no
answer is given. The checker is chosen at construction and can be switched per call.

Text conventions: ``context`` (None or "" for a new conversation) is in the prompt's own markup, where a literal ``<`` is
written ``<<``; questions and answers are escaped into it here. Returned answers are plain text.
(The official code escapes neither, so a ``<`` in a question crashed it and answers could show
``<<``.)
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..answer_language import AnswerLanguage
from ..checkpoints import save_folder
from ..generation import AnswerTokens, GenerationCancelled, beam_search, group_by_slot, stream_tokens
from ..image_processing import DEFAULT_MAX_PIXELS, ImageInput, ImageTransform, load_image
from ..models.chat import ChatModel
from ..placement import dispatch, place
from ..prompt import (
    IGNORE_INDEX, GenerationPrompt, append_turn, collate_for_forward, convert_data_to_id, make_generation_dict,
    pack_for_generation,
)
from ..quantization import refuse_quantized
from ..safety import ImageChecker, Refused, load_image_checker, verdict
from ..tokenization import CPMBeeTokenizer
from .chat_options import ChatOptions, StopText, cut_at_stop
from .defaults import default_model_path
from .loading import check_vocab, load_chat
from .switches import resolve_switch

logger = logging.getLogger(__name__)

# The context budget: prompt tokens (image queries included) + the longest answer asked for. The KV
# cache and the prefill's attention scale with it, so it is checked before any of them is allocated.
# 4096 fits everything the official model accepts (a 3000-token max_inp_length prompt + its default
# max_length=512 answer of up to 514 tokens = 3514), and a 3000-token prompt with the server's longest
# answer (1024 tokens); longer contexts are refused, never truncated.
DEFAULT_MAX_CONTEXT_TOKENS = 4096


class RefusedImage(Refused):
    """The image safety checker flagged the input image; no answer was given. ``reason`` says why."""


class ContextTooLong(ValueError):
    """A conversation's context (prompt + image queries + the longest answer asked for) is over the
    pipeline's ``max_context_tokens``; nothing was computed. The counts are attributes, so a server
    can word its own message."""

    def __init__(self, prompt_tokens: int, image_tokens: int, answer_tokens: int, budget: int):
        self.prompt_tokens, self.image_tokens, self.answer_tokens = prompt_tokens, image_tokens, answer_tokens
        self.tokens, self.budget = prompt_tokens + answer_tokens, budget
        super().__init__(
            f"the conversation needs {self.tokens:,} tokens of context ({prompt_tokens:,} of prompt, "
            f"{image_tokens} of them image queries, + up to {answer_tokens:,} new tokens) but the context budget "
            f"is {budget:,}; start a new conversation (or shorten this one), ask for fewer new tokens "
            "(max_new_tokens), or raise the budget (max_context_tokens; --max-context-tokens on the command line)"
        )


def check_context_budget(max_context_tokens) -> None:
    if not (isinstance(max_context_tokens, int) and max_context_tokens >= 1):
        raise ValueError(f"max_context_tokens must be a positive number of tokens, got {max_context_tokens!r}")


class VisCPMChat:
    """Chat about images. ``model_path``: an official ``.pt``, our saved folder, or None for the
    model shipped with the package.

    ``image_safety_checker``: ``None`` (default) NudeNet when ``viscpm[safety]`` is installed,
    else off (logged); ``True`` NudeNet or an error; a folder: the official Stable Diffusion
    safety checker; ``False`` off (the official default); or a callable ``(PIL.Image) -> bool |
    SafetyResult``. Every method that takes images also takes ``image_safety_checker=`` for one
    call (None keeps this one, False turns it off, True turns it on, a callable replaces it).

    ``max_context_tokens``: the most tokens one conversation may hold, counting the prompt (the
    context so far, the question and the image's query tokens) and the longest answer asked for
    (``max_new_tokens``, or ``max_length + 2``). Longer conversations raise :class:`ContextTooLong`
    before the image is encoded or any cache is allocated. Memory grows with it: the KV cache holds
    ``2 × layers × d_model`` values per token and per row (a row per beam), e.g. 0.75 MiB per token
    in bf16 for the 10B model.

    ``quant``: ``"int8"`` or ``"int4"`` stores the linear layers' weights in 8/4 bits (see
    :mod:`viscpm.quantization`): faster decoding on CPU and a quarter (an eighth) of fp32's memory.

    ``device_map`` (``"auto"`` or ``{module: device | "disk"}``), ``max_memory``, ``offload_folder``:
    spread the layers over GPUs, CPU and disk with accelerate (see :func:`viscpm.placement.dispatch`);
    ``device`` is then where inputs go and attention runs."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        config_path: str | os.PathLike | None = None,
        vocab_path: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        image_safety_checker: bool | str | os.PathLike | ImageChecker | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
        quant: str | None = None,
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
        offload_folder: str | os.PathLike | None = None,
    ):
        check_context_budget(max_context_tokens)
        checker = load_image_checker(image_safety_checker)  # first, so a wrong switch fails before loading
        if model_path is None:  # the packaged model is stored in fp16 to stay small; run it in fp32
            model_path, dtype = default_model_path("chat"), dtype or torch.float32
        on_cpu = torch.device(device).type == "cpu"  # CPU: quantized while loading; CUDA: by bitsandbytes
        parts = load_chat(model_path, config_path, vocab_path, quant=quant if on_cpu else None)
        # int8/int4 (``quant``) covers the LLM on CPU: every decoded token reads all of it.
        # The vision encoder and mapping run once per image (compute-bound, no gain from 8 bits) and
        # were most of int8's logit error on bench/decode.py's model (3.1 of 5.4 %), so they stay float.
        model = place(parts.model, device, dtype or (torch.float32 if quant else None), quant)
        if device_map is not None:
            model = dispatch(model, device_map, max_memory=max_memory, offload_folder=offload_folder)
        self._setup(model, parts.tokenizer, device, checker, max_image_pixels, max_context_tokens, quant)

    @classmethod
    def from_components(
        cls,
        model: ChatModel,
        tokenizer: CPMBeeTokenizer,
        *,
        image_safety_checker: ImageChecker | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
        device: str | torch.device | None = None,
        quant: str | None = None,
    ) -> VisCPMChat:
        """A pipeline over a model and tokenizer you already hold (e.g. from
        :func:`viscpm.pipelines.loading.load_chat`, or built in a test), as diffusers' pipelines take
        their components. They are used as given: no checker unless one is passed; ``device`` (where
        inputs go) defaults to the model's; ``quant``: how the model was quantized, if it was."""
        check_context_budget(max_context_tokens)
        check_vocab(tokenizer, model)
        pipeline = cls.__new__(cls)
        device = device if device is not None else next(model.parameters()).device
        pipeline._setup(model, tokenizer, device, image_safety_checker, max_image_pixels, max_context_tokens, quant)
        return pipeline

    def _setup(self, model: ChatModel, tokenizer: CPMBeeTokenizer, device: str | torch.device,
               image_safety_checker: ImageChecker | None, max_image_pixels: int, max_context_tokens: int,
               quant: str | None) -> None:
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model.config
        self.vocab_path = tokenizer.vocab_path
        self.device = torch.device(device)
        self.image_safety_checker = image_safety_checker
        self._default_checker = cache(lambda: load_image_checker(True))  # what a call's True turns on
        self.transform = ImageTransform(self.config.vision.image_size)
        self.max_image_pixels, self.max_context_tokens, self.quant = max_image_pixels, max_context_tokens, quant

    # -- inputs ------------------------------------------------------------------------------

    def _load(self, image: ImageInput, checker: ImageChecker | None) -> Image.Image:
        image = load_image(image, max_pixels=self.max_image_pixels)
        if checker is not None:
            result = verdict(checker(image), "image safety checker")
            if result:
                raise RefusedImage(f"the input image was refused: {result.reason}; no answer is given",
                                   result.reason, result.checker)
        return image

    @torch.no_grad()
    def encode_image(self, image: ImageInput, *, image_safety_checker=None) -> torch.Tensor:
        """Vision hidden states (1, Q, d) of one image, to reuse over several turns."""
        return self.encode_images([image], image_safety_checker=image_safety_checker)

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput], *, image_safety_checker=None) -> torch.Tensor:
        checker = resolve_switch("image_safety_checker", image_safety_checker, self.image_safety_checker,
                                 self._default_checker)
        pixel_values = self.transform([self._load(image, checker) for image in images]).to(self.device)
        return self.model.encode_images(pixel_values)  # the encoder casts to its own dtype

    def _pack(self, questions: Sequence[str], contexts: Sequence[str], has_image: Sequence[bool],
              answer_tokens: int) -> GenerationPrompt:
        """The prompt batch, refused when a conversation is over the context budget. Tokenizing only:
        no image is encoded and no cache allocated before this check."""
        for question in questions:
            if not isinstance(question, str) or not question.strip():
                raise ValueError("the question is empty; ask something about the image")
        query_nums = [self.config.query_num if image else 0 for image in has_image]
        prompt = pack_for_generation(
            self.tokenizer,
            [{"context": c or "", "question": CPMBeeTokenizer.escape(q)} for c, q in zip(contexts, questions)],
            query_nums,
        )
        for length, queries in zip(prompt.inputs.length.tolist(), query_nums):
            if length + answer_tokens > self.max_context_tokens:
                raise ContextTooLong(length, queries, answer_tokens, self.max_context_tokens)
        return prompt

    def check_context(self, question: str, context: str | None = "", *, has_image: bool = True,
                      options: ChatOptions | None = None, **generation_options) -> int:
        """The context tokens one turn needs (prompt + image queries + the longest answer the options
        ask for); raises :class:`ContextTooLong` over the budget. Cheap: it only tokenizes, so a
        server can refuse a request before encoding its image."""
        answer_tokens = ChatOptions.build(options, **generation_options).last_step + 1
        prompt = self._pack([question], [context], [has_image], answer_tokens)
        return int(prompt.inputs.length[0]) + answer_tokens

    def _prepare(
        self,
        images: Sequence[ImageInput | None],
        questions: Sequence[str],
        contexts: Sequence[str],
        vision_hidden_states: Sequence[torch.Tensor | None],
        image_safety_checker=None,
        answer_tokens: int = 0,
    ) -> tuple[GenerationPrompt, torch.Tensor, list[torch.Tensor | None]]:
        """Pack the prompts (``answer_tokens``: the longest answer, counted against the context budget),
        encode the images that have no states yet, inject them."""
        states: list[torch.Tensor | None] = list(vision_hidden_states)
        has_image = [s is not None or image is not None for image, s in zip(images, states)]
        prompt = self._pack(questions, contexts, has_image, answer_tokens).to(self.device)
        to_encode = [i for i, (image, s) in enumerate(zip(images, states)) if s is None and image is not None]
        if to_encode:
            encoded = self.encode_images([images[i] for i in to_encode], image_safety_checker=image_safety_checker)
            for row, i in enumerate(to_encode):
                states[i] = encoded[row : row + 1]
        image_states = [s.to(self.device) for s in states if s is not None]
        vision = torch.cat(image_states) if image_states else None
        embeds = self.model.embed(prompt.inputs, vision)
        return prompt, embeds, states

    def _answer_text(self, prompt: GenerationPrompt, sample: int, tokens: AnswerTokens) -> str:
        ids = group_by_slot(tokens, self.tokenizer.eos_id).get(1, [])
        return CPMBeeTokenizer.unescape(self.tokenizer.decode(ids, prompt.rev_ext_tables[sample]))

    # -- public API --------------------------------------------------------------------------

    def _language(self, options: ChatOptions, questions: Sequence[str]) -> AnswerLanguage | None:
        """The decoding-time answer-language constraint, or None for the official behaviour."""
        return None if options.language is None else AnswerLanguage(self.tokenizer, options.language, list(questions))

    def _generate(self, images, questions, contexts, vision_hidden_states, options: ChatOptions,
                  image_safety_checker=None, should_stop=None) -> tuple[list[str], list]:
        prompt, embeds, states = self._prepare(images, questions, contexts, vision_hidden_states, image_safety_checker,
                                               options.last_step + 1)
        constraint = self._language(options, questions)
        if options.do_sample or options.num_beams == 1:
            answers: list[AnswerTokens] = [[] for _ in questions]
            for step, produced in enumerate(stream_tokens(self.model.llm, prompt, options, embeds, constraint)):
                if should_stop is not None and should_stop():
                    raise GenerationCancelled(f"decoding stopped by the caller after step {step}")
                for sample, token, slot in produced:
                    answers[sample].append((token, slot))
        else:
            answers = beam_search(self.model.llm, prompt, options, embeds, should_stop, constraint)
        texts = [cut_at_stop(self._answer_text(prompt, i, a), options.stop) for i, a in enumerate(answers)]
        return texts, states

    @torch.no_grad()
    def chat(
        self,
        image: ImageInput | None,
        question: str,
        context: str | None = "",
        vision_hidden_states: torch.Tensor | None = None,
        *,
        options: ChatOptions | None = None,
        image_safety_checker=None,
        should_stop=None,
        **generation_options,
    ) -> tuple[str, str, torch.Tensor | None]:
        """One turn. Returns ``(answer, context with this turn appended, vision_hidden_states)``.

        Decoding: ``options`` (a :class:`ChatOptions`; default the official ones) and keyword options
        that override it, e.g. ``max_new_tokens=N`` (caps the answer at N tokens; ``max_length=N``
        reproduces the official answers for the same N, up to N + 2 tokens), ``stop="..."``,
        ``language="auto"`` (answer in the question's language; ``"zh"``/``"en"`` force one; None,
        the default, leaves the model free, as the official code does). ``should_stop=callable`` is
        asked before every decoding step and cancels (``GenerationCancelled``) when it returns True
        (servers use it to stop work for a client that left or timed out).
        """
        options = ChatOptions.build(options, **generation_options)
        answers, states = self._generate([image], [question], [context], [vision_hidden_states], options,
                                         image_safety_checker, should_stop)
        return answers[0], append_turn(context or "", question, answers[0]), states[0]

    @torch.no_grad()
    def batch_chat(
        self,
        images: Sequence[ImageInput | None],
        questions: Sequence[str],
        contexts: Sequence[str | None] | None = None,
        vision_hidden_states: Sequence[torch.Tensor | None] | None = None,
        *,
        options: ChatOptions | None = None,
        image_safety_checker=None,
        should_stop=None,
        **generation_options,
    ) -> list[str]:
        """Answer many (image, question) pairs in one padded batch; equals one-at-a-time answers.
        Options as in :meth:`chat`; ``language="auto"`` follows each question's own language."""
        n = len(questions)
        contexts = list(contexts) if contexts is not None else [""] * n
        vision_hidden_states = list(vision_hidden_states) if vision_hidden_states is not None else [None] * n
        if not len(images) == len(contexts) == len(vision_hidden_states) == n:
            raise ValueError("images, questions, contexts and vision_hidden_states must have the same length")
        options = ChatOptions.build(options, **generation_options)
        return self._generate(images, questions, contexts, vision_hidden_states, options, image_safety_checker,
                              should_stop)[0]

    @torch.no_grad()
    def stream_chat(
        self,
        image: ImageInput | None,
        question: str,
        context: str | None = "",
        vision_hidden_states: torch.Tensor | None = None,
        *,
        options: ChatOptions | None = None,
        image_safety_checker=None,
        **generation_options,
    ) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (greedy unless ``do_sample``).

        Beam search cannot stream, so ``num_beams`` is ignored here. Use ``append_turn`` with the
        joined pieces to continue the conversation. Options as in :meth:`chat`.
        """
        options = ChatOptions.build(options, **generation_options)
        prompt, embeds, _ = self._prepare([image], [question], [context], [vision_hidden_states], image_safety_checker,
                                          options.last_step + 1)
        table = prompt.rev_ext_tables[0]
        cutter = StopText(options.stop)
        tokens = stream_tokens(self.model.llm, prompt, options, embeds, self._language(options, [question]))
        try:
            for produced in tokens:
                for _, token, slot in produced:
                    if slot != 1 or token == self.tokenizer.eos_id:
                        continue
                    piece = cutter.feed(CPMBeeTokenizer.unescape(self.tokenizer.decode([token], table)))
                    if piece:
                        yield piece
                    if cutter.stopped:
                        return
            tail = cutter.flush()
            if tail:
                yield tail
        finally:
            tokens.close()

    @torch.no_grad()
    def answer_logprob(self, images: Sequence[ImageInput], question: str, answer: str, *,
                       image_safety_checker=None) -> list[float]:
        """How likely the model finds ``answer`` as its reply to ``question`` about each image: the
        mean log-probability per answer token, teacher-forced in the training prompt format (the
        negated training loss). Paint's self-reranking scores its candidates with it."""
        data = make_generation_dict({"context": "", "question": CPMBeeTokenizer.escape(question),
                                     "<ans>": CPMBeeTokenizer.escape(answer)}, self.config.query_num)
        prompt = convert_data_to_id(self.tokenizer, data)
        inputs = collate_for_forward([prompt] * len(images), self.tokenizer).to(self.device)
        vision = self.encode_images(images, image_safety_checker=image_safety_checker)
        log_probs = F.log_softmax(self.model(inputs, vision_hidden_states=vision).logits.float(), dim=-1)  # (B, L, V+E)
        learn = inputs.target != IGNORE_INDEX  # (B, L): where the next token is the answer's
        picked = log_probs.gather(-1, inputs.target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L)
        return ((picked * learn).sum(1) / learn.sum(1)).tolist()

    def save_pretrained(self, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        max_shard_size: int | str | None = None) -> Path:
        """Write config.json + weights + vocab.txt (loadable with ``VisCPMChat(folder)``); big models
        in shards of ``max_shard_size`` (e.g. "2GB"), floats cast to ``dtype`` on the way."""
        refuse_quantized(self.quant)
        return save_folder(self.model, self.config, folder, self.vocab_path, dtype=dtype, max_shard_size=max_shard_size)
