"""VisCPM's training recipe as named stages. Each stage function reads top to bottom:
load the model and set what trains → build the examples → say how to batch and score them.
The loop itself (accelerate, checkpoints, logging) is shared: ``engine.train``.

    lm          CPM-Bee on structured text prompts (loss on the answer): a bilingual LLM from text
    chat-align  stage 1: LLM frozen; vision encoder, queries and mapping learn from captions
    chat-sft    stage 2: everything (or LoRA on the LLM) on instruction conversations
    vae         an AutoencoderKL for worlds without a pretrained VAE (small models)
    paint-bridge  Paint stage 1: LLM and UNet frozen; the bridge learns (diffusion loss)
    paint-xattn   Paint stage 2: also the UNet's cross-attention (or all of it, or LoRA on it)
"""
from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import VAE_FOLDER, find_vocab, load_vae, save_folder
from ..image_processing import ImageTransform
from ..models.chat import ChatConfig, ChatModel
from ..models.cpmbee import CPMBee, CPMBeeConfig, CPMBeeInputs
from ..models.paint import PaintConfig, PaintModel
from ..pipelines.loading import CHAT, LM, paint_kind
from ..prompt import IGNORE_INDEX, ConvertedPrompt, collate_for_forward, convert_data_to_id
from ..tokenization import UNK_TOKEN, CPMBeeTokenizer
from .config import ModelSection, TrainConfig
from .data import BadRecord, Record, RecordSource, conversation_turns
from .engine import Recipe
from .lora import add_lora, merge_lora

logger = logging.getLogger(__name__)

# Stage 1 asks for a caption with one of these (English: the multimodal data is English-only).
CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "What is in the picture?",
    "Give a short caption for this image.",
    "Summarize the image in one sentence.",
)


# ---------------------------------------------------------------------------------------------
# Models in and out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"model config not found: {path}") from None


def load_lm(section: ModelSection) -> tuple[CPMBee, CPMBeeConfig, Path]:
    """A CPM-Bee from a saved folder (``init``) or fresh from ``config`` + ``vocab``."""
    if section.init is not None:
        model, config, weights = LM.load(section.init)
        return model.float().requires_grad_(True), config, find_vocab(weights, section.vocab)
    if section.config is None or section.vocab is None:
        raise ValueError("[model] needs init = a saved model, or config = … and vocab = … for a fresh one")
    config = CPMBeeConfig.from_dict(_read_json(section.config))
    return CPMBee(config), config, section.vocab


def _load_llm_into(model: nn.Module, section: ModelSection, llm_config: CPMBeeConfig) -> Path | None:
    """Replace ``model.llm`` by an ``lm`` run's weights; returns that run's vocab."""
    if section.llm_init is None:
        return None
    llm, config, weights = load_lm(ModelSection(init=section.llm_init))
    if config != llm_config:
        raise ValueError(f"the LLM in {section.llm_init} ({config}) does not match the model config's ({llm_config})")
    model.llm.load_state_dict(llm.state_dict())
    return find_vocab(weights, None)


def load_chat(section: ModelSection, *, vision_trainable: bool, llm_trainable: bool) -> tuple[ChatModel, ChatConfig, Path]:
    """A chat model from ``init`` (saved folder or official .pt) or fresh from ``config``, with
    the LLM optionally taken from an ``lm`` run (``llm_init``)."""
    flags = {"vision_trainable": vision_trainable, "llm_trainable": llm_trainable}
    if section.init is not None:
        model, config, weights = CHAT.load(section.init, **flags)
        vocab = find_vocab(weights, section.vocab)
        model = model.float()
    else:
        if section.config is None:
            raise ValueError("[model] needs init = a saved chat model, or config = a chat config JSON")
        config = ChatConfig.from_dict(_read_json(section.config))
        model = ChatModel(config, **flags)
        vocab = section.vocab
    llm_vocab = _load_llm_into(model, section, config.llm)
    vocab = section.vocab or llm_vocab or vocab
    if vocab is None:
        raise ValueError("[model] needs vocab = … (or a saved model with vocab.txt beside it)")
    return model, config, Path(vocab)


def _save_with(config, vocab: Path) -> Callable[[nn.Module, Path], None]:
    def save(model: nn.Module, folder: Path) -> None:
        save_folder(merge_lora(model), config, folder, vocab)
    return save


# ---------------------------------------------------------------------------------------------
# Examples and batches for CPM-Bee prompts


@dataclass
class PromptExample:
    prompt: ConvertedPrompt
    pixel_values: torch.Tensor | None = None  # (3, H, W) for a prompt with an image


def _escape_leaves(data, escape: Callable[[str], str]):
    if isinstance(data, dict):
        return {k: _escape_leaves(v, escape) for k, v in data.items()}
    return escape(data) if isinstance(data, str) else data


class PromptExamples:
    """Records → converted CPM-Bee prompts (+ image tensors), checked for length and target."""

    def __init__(self, items: list[tuple[Record, dict]], tokenizer: CPMBeeTokenizer, max_tokens: int,
                 query_num: int = 0, transform: ImageTransform | None = None):
        self.items, self.tokenizer, self.max_tokens = items, tokenizer, max_tokens
        self.query_num, self.transform = query_num, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PromptExample:
        record, data = self.items[index]
        with_image = record.image is not None and self.transform is not None
        if with_image:
            data = {"image": UNK_TOKEN * self.query_num, **data}
        try:
            prompt = convert_data_to_id(self.tokenizer, data)
        except (ValueError, TypeError) as error:
            raise BadRecord("malformed", str(error)) from None
        if len(prompt.input_ids) > self.max_tokens:
            raise BadRecord("over-long", f"{len(prompt.input_ids)} tokens > max_tokens={self.max_tokens}")
        if not (prompt.context == 0).any():
            raise BadRecord("malformed", "no answer to learn (empty '<ans>')")
        pixels = self.transform(record.open_image())[0] if with_image else None
        return PromptExample(prompt, pixels)


@dataclass
class PromptBatch:
    inputs: CPMBeeInputs
    pixel_values: torch.Tensor | None  # one row per prompt with an image


def collate_prompts(tokenizer: CPMBeeTokenizer, examples: list[PromptExample]) -> PromptBatch:
    inputs = collate_for_forward([e.prompt for e in examples], tokenizer)
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    return PromptBatch(inputs, torch.stack(pixels) if pixels else None)


def count_targets(batch: PromptBatch) -> int:
    return int((batch.inputs.target != IGNORE_INDEX).sum())


def _token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def lm_loss(model: nn.Module, batch: PromptBatch) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = batch.inputs.to(device)
    return _token_loss(model(inputs).logits, inputs.target)


def chat_loss(model: nn.Module, batch: PromptBatch) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = batch.inputs.to(device)
    pixels = batch.pixel_values.to(device) if batch.pixel_values is not None else None
    return _token_loss(model(inputs, pixel_values=pixels).logits, inputs.target)


def _source(config: TrainConfig) -> RecordSource:
    return RecordSource.concat(config.data.train, config.data.image_root)


# ---------------------------------------------------------------------------------------------
# Stages


def lm(config: TrainConfig) -> Recipe:
    """Text-only: every record is a structured prompt whose ``<ans>`` is the target."""
    model, model_config, vocab = load_lm(config.model)
    model.gradient_checkpointing = config.train.gradient_checkpointing
    if config.lora is not None:
        add_lora(model, config.lora)
    tokenizer = CPMBeeTokenizer(vocab)
    source = _source(config)
    items = [(Record(r.fields, None), _escape_leaves(r.fields, tokenizer.escape)) for r in source.records]
    return Recipe("lm", model, PromptExamples(items, tokenizer, config.data.max_tokens),
                  partial(collate_prompts, tokenizer), count_targets, lm_loss, _save_with(model_config, vocab),
                  malformed=source.malformed)


def chat_align(config: TrainConfig) -> Recipe:
    """Stage 1: captions; the LLM is frozen, the vision side learns to speak its language."""
    model, model_config, vocab = load_chat(config.model, vision_trainable=True, llm_trainable=False)
    tokenizer = CPMBeeTokenizer(vocab)
    source = _source(config)
    items, malformed = [], source.malformed
    for record in source.records:
        caption = record.fields.get("caption")
        if not isinstance(caption, str) or not caption.strip() or record.image is None:
            malformed += 1
            continue
        # a fixed instruction per record (a hash of the image name as written in the data, not of
        # where the data lives), so runs are reproducible
        instruction = CAPTION_INSTRUCTIONS[zlib.crc32(str(record.fields.get("image", "")).encode()) % len(CAPTION_INSTRUCTIONS)]
        items.append((record, {"context": "", "question": instruction, "<ans>": tokenizer.escape(caption)}))
    examples = PromptExamples(items, tokenizer, config.data.max_tokens, model_config.query_num,
                              ImageTransform(model_config.vision.image_size))
    return Recipe("chat-align", model, examples, partial(collate_prompts, tokenizer), count_targets, chat_loss,
                  _save_with(model_config, vocab), malformed=malformed)


def chat_sft(config: TrainConfig) -> Recipe:
    """Stage 2: multi-turn instructions; all parameters train, or LoRA on the LLM (the vision
    side then still trains in full: it is small, and VisCPM's stage 2 tunes it too)."""
    lora = config.lora is not None
    model, model_config, vocab = load_chat(config.model, vision_trainable=True, llm_trainable=not lora)
    model.llm.gradient_checkpointing = config.train.gradient_checkpointing
    if lora:
        add_lora(model.llm, config.lora)
    tokenizer = CPMBeeTokenizer(vocab)
    source = _source(config)
    items, malformed = [], source.malformed
    for record in source.records:
        try:
            items += [(record, turn) for turn in conversation_turns(record, tokenizer.escape)]
        except BadRecord:
            malformed += 1
    examples = PromptExamples(items, tokenizer, config.data.max_tokens, model_config.query_num,
                              ImageTransform(model_config.vision.image_size))
    return Recipe("chat-sft", model, examples, partial(collate_prompts, tokenizer), count_targets, chat_loss,
                  _save_with(model_config, vocab), malformed=malformed)


# ---------------------------------------------------------------------------------------------
# Images: the VAE


VAE_KL_WEIGHT = 1e-6  # Stable Diffusion's autoencoder setting: reconstruction first, a light prior


class VAETraining(nn.Module):
    """The autoencoder with its training objective as ``forward`` (so DDP sees every parameter):
    per-image mean squared reconstruction error plus a small KL to the unit Gaussian, summed."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        mse = (reconstruction.float() - images.float()).pow(2).flatten(1).mean(1)
        return (mse + VAE_KL_WEIGHT * posterior.kl()).sum()


class ImageExamples:
    """Records with an image → tensors in [-1, 1] at ``size`` × ``size``."""

    def __init__(self, records: list[Record], size: int):
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> torch.Tensor:
        return image_to_tensor(self.records[index].open_image(), self.size)


def image_to_tensor(image, size: int) -> torch.Tensor:
    """RGB PIL image → (3, size, size) float in [-1, 1] (bicubic resize), the diffusers convention."""
    from PIL import Image

    pixels = torch.frombuffer(bytearray(image.resize((size, size), Image.BICUBIC).tobytes()), dtype=torch.uint8)
    return pixels.view(size, size, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def build_vae(section: ModelSection):
    """A diffusers AutoencoderKL from a local folder (``init``) or a config JSON (fresh)."""
    from diffusers import AutoencoderKL

    if section.init is not None:
        return load_vae(section.init)
    if section.config is None:
        raise ValueError("[model] needs init = a diffusers VAE folder, or config = an AutoencoderKL config JSON")
    return AutoencoderKL.from_config(_read_json(section.config))


def vae(config: TrainConfig) -> Recipe:
    """An image autoencoder for a world with no pretrained VAE (small sizes: no GAN or
    perceptual loss, which large photographic VAEs need)."""
    autoencoder = build_vae(config.model)
    source = _source(config)
    records = [r for r in source.records if r.image is not None]
    examples = ImageExamples(records, autoencoder.config.sample_size)

    def save(model: nn.Module, folder: Path) -> None:
        model.vae.save_pretrained(folder)

    return Recipe("vae", VAETraining(autoencoder), examples, torch.stack, len,
                  lambda model, images: model(images.to(next(model.parameters()).device)), save,
                  malformed=source.malformed + len(source.records) - len(records))


# ---------------------------------------------------------------------------------------------
# Paint: the bridge, then the UNet's cross-attention (or all of the UNet, for a new world)


def load_paint(section: ModelSection, *, unet_trainable: bool | str) -> tuple[PaintModel, PaintConfig, Path, nn.Module]:
    """(model, config, vocab, vae) from ``init`` (saved folder / official .pt, VAE beside it or
    ``vae =``) or fresh from ``config`` (+ ``llm_init``, ``vae``, ``vocab``). The LLM stays frozen."""
    flags = {"llm_trainable": False, "bridge_trainable": True, "unet_trainable": unet_trainable}
    if section.init is not None:
        model, config, weights = paint_kind().load(section.init, **flags)
        model = model.float()
        vocab = find_vocab(weights, section.vocab)
        vae_path = section.vae or weights.parent / VAE_FOLDER
    else:
        if section.config is None or section.vae is None:
            raise ValueError("[model] needs init = a saved paint model, or config = … and vae = … for a fresh one")
        config = PaintConfig.from_dict(_read_json(section.config))
        model, vocab, vae_path = PaintModel(config, **flags), section.vocab, section.vae
    llm_vocab = _load_llm_into(model, section, config.llm)
    vocab = section.vocab or llm_vocab or vocab
    if vocab is None:
        raise ValueError("[model] needs vocab = … (or llm_init = an lm run with vocab.txt beside it)")
    autoencoder = load_vae(vae_path).requires_grad_(False).eval()
    return model, config, Path(vocab), autoencoder


@dataclass
class PaintExample:
    prompt: ConvertedPrompt
    image: torch.Tensor  # (3, S, S) in [-1, 1]


class PaintExamples:
    def __init__(self, items: list[tuple[Record, str]], tokenizer: CPMBeeTokenizer, size: int, max_tokens: int):
        self.items, self.tokenizer, self.size, self.max_tokens = items, tokenizer, size, max_tokens

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PaintExample:
        record, caption = self.items[index]
        prompt = paint_prompt(self.tokenizer, caption)
        if len(prompt.input_ids) > self.max_tokens:
            raise BadRecord("over-long", f"{len(prompt.input_ids)} tokens > max_tokens={self.max_tokens}")
        return PaintExample(prompt, image_to_tensor(record.open_image(), self.size))


def paint_prompt(tokenizer: CPMBeeTokenizer, caption: str) -> ConvertedPrompt:
    """The official Paint prompt form."""
    return convert_data_to_id(tokenizer, {"caption": tokenizer.escape(caption), "objects": ""})


def _paint_recipe(name: str, config: TrainConfig, unet_trainable: bool | str) -> Recipe:
    lora = config.lora is not None
    model, model_config, vocab, autoencoder = load_paint(config.model, unet_trainable=False if lora else unet_trainable)
    if lora:
        add_lora(model.unet, config.lora)
    tokenizer = CPMBeeTokenizer(vocab)
    empty = paint_prompt(tokenizer, "")
    latent_size = model_config.unet["sample_size"]
    size = latent_size * 2 ** (len(autoencoder.config.block_out_channels) - 1)
    source = _source(config)
    items, malformed = [], source.malformed
    for record in source.records:
        caption = record.fields.get("caption")
        if not isinstance(caption, str) or record.image is None:
            malformed += 1
        else:
            items.append((record, caption))
    noise_schedule = _training_noise_schedule(model_config.scheduler)
    loss_weights = _diffusion_loss_weights(noise_schedule, config.train.snr_gamma)
    dropout = config.data.caption_dropout

    def collate(examples: list[PaintExample]):
        # a share of empty captions teaches the unconditional prediction that guidance needs
        drop = torch.rand(len(examples)) < dropout
        prompts = [empty if d else e.prompt for d, e in zip(drop.tolist(), examples)]
        return collate_for_forward(prompts, tokenizer), torch.stack([e.image for e in examples])

    def loss(model: nn.Module, batch) -> torch.Tensor:
        inputs, images = batch
        device = next(model.parameters()).device
        autoencoder.to(device)
        with torch.no_grad():
            latents = autoencoder.encode(images.to(device)).latent_dist.sample() * autoencoder.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(latents),), device=device)
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        prediction = model(noisy, timesteps, inputs.to(device))
        per_sample = (prediction.float() - noise.float()).pow(2).flatten(1).mean(1)
        return (per_sample * loss_weights(timesteps)).sum()

    def save(model: nn.Module, folder: Path) -> None:
        save_folder(merge_lora(model), model_config, folder, vocab)
        autoencoder.save_pretrained(folder / VAE_FOLDER)

    return Recipe(name, model, PaintExamples(items, tokenizer, size, config.data.max_tokens), collate,
                  lambda batch: len(batch[1]), loss, save, malformed=malformed)


def _training_noise_schedule(scheduler_config: dict):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config)


def _diffusion_loss_weights(noise_schedule, snr_gamma: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-sample weights of the noise-prediction loss: 1, or Min-SNR-γ (Hang et al. 2023), which
    caps how much the nearly clean timesteps count so the model spends its capacity on the noisy
    ones where the layout is decided. The weights are diffusers' train_text_to_image ones."""
    if snr_gamma is None:
        return lambda timesteps: torch.ones(len(timesteps), device=timesteps.device)
    from diffusers.training_utils import compute_snr

    if noise_schedule.config.prediction_type != "epsilon":  # the loss above targets the noise
        raise ValueError(f"snr_gamma needs an epsilon-prediction scheduler, not {noise_schedule.config.prediction_type!r}")

    def weights(timesteps: torch.Tensor) -> torch.Tensor:
        snr = compute_snr(noise_schedule, timesteps)
        return snr.clamp(max=snr_gamma) / snr

    return weights


def paint_bridge(config: TrainConfig) -> Recipe:
    """Paint stage 1: LLM and UNet frozen; the bridge learns to speak the UNet's language."""
    return _paint_recipe("paint-bridge", config, unet_trainable=False)


def paint_xattn(config: TrainConfig) -> Recipe:
    """Paint stage 2: the bridge plus the UNet's cross-attention (``[model] unet = "all"``
    trains the whole UNet, for a world with no pretrained one; ``[lora]`` trains adapters on it)."""
    return _paint_recipe("paint-xattn", config, unet_trainable=True if config.model.unet == "all" else "cross_attention")


STAGES: dict[str, Callable[[TrainConfig], Recipe]] = {
    "lm": lm,
    "chat-align": chat_align,
    "chat-sft": chat_sft,
    "vae": vae,
    "paint-bridge": paint_bridge,
    "paint-xattn": paint_xattn,
}


def build_recipe(stage: str, config: TrainConfig) -> Recipe:
    """Seed every RNG from the config, then build the stage, so a fresh model's initial weights
    are the same in every process and every run."""
    from accelerate.utils import set_seed

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)}")
    set_seed(config.train.seed)
    return STAGES[stage](config)
