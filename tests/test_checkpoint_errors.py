"""Bad checkpoints and configs fail with a CheckpointError that names the problem, before any big
allocation: official .pt files with wrong keys, cut short, foreign or empty (the same checks for
chat and paint), wrong field types, absurd sizes, shard paths outside the folder, a full disk on save."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from viscpm import checkpoints
from viscpm.checkpoints import CONFIG_NAME, INDEX_NAME, CheckpointError, load_weights, save_folder
from viscpm.models.beit3 import BEiT3Config
from viscpm.models.chat import CHAT_KEY_RULES, CHAT_PRESETS, ChatConfig, ChatModel
from viscpm.models.cpmbee import CPMBeeConfig
from viscpm.models.paint import PAINT_KEY_RULES, PAINT_PRESETS, BridgeConfig, PaintConfig, PaintModel

from .models import chat_fixtures, paint_fixtures
from .pipelines.random_painter_fixtures import UNET

LLM = CPMBeeConfig(vocab_size=64, dim_model=32, dim_ff=64, num_layers=2, num_heads=2, dim_head=16)
KINDS = {
    "chat": (ChatConfig(LLM, BEiT3Config(image_size=32, patch_size=16, dim=32, num_heads=2, ffn_dim=64, num_layers=1),
                        query_num=4), ChatModel, CHAT_PRESETS, CHAT_KEY_RULES),
    "paint": (PaintConfig(LLM, UNET, BridgeConfig(32, 32)), PaintModel, PAINT_PRESETS, PAINT_KEY_RULES),
}


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    return {kind: save_folder(build(config), config, tmp_path_factory.mktemp(kind))
            for kind, (config, build, _, _) in KINDS.items()}


@pytest.fixture(params=sorted(KINDS))
def saved(request, saved_folders) -> tuple[str, Path]:
    return request.param, saved_folders[request.param]


# The tiny official-format .pt of each model: its state dict and the loader the model tests use
OFFICIAL = {"chat": chat_fixtures, "paint": paint_fixtures}


def changed_state(change):
    """Writes the official state, changed in place by ``change``, as a .pt."""
    def write(state: dict, path: Path) -> None:
        change(state)
        torch.save(state, path)
    return write


def cut_short(state: dict, path: Path) -> None:
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:100_000])


# Damage to the file itself, the same for both models
FILE_DAMAGES = [
    ("truncated", cut_short, "bad.pt"),
    ("foreign", lambda state, path: path.write_text("not a checkpoint"), "bad.pt"),
    ("missing", lambda state, path: None, "not found"),
    ("empty", lambda state, path: path.write_bytes(b""), "empty"),
]


@pytest.mark.parametrize("kind, damage, message", [
    pytest.param("chat", changed_state(lambda s: s.pop("llm.encoder.output_layernorm.weight")),
                 "missing keys .*llm.encoder.output_layernorm.weight", id="chat-missing-key"),
    pytest.param("chat", changed_state(lambda s: s.__setitem__("query", torch.zeros(9, 32))),
                 r"mis-shaped keys .*query: checkpoint \[9, 32\]", id="chat-mis-shaped-key"),
    pytest.param("chat", changed_state(lambda s: s.__setitem__("foo.bar", torch.zeros(1))),
                 r"unexpected keys \[foo.bar\]", id="chat-unexpected-key"),
    pytest.param("paint", changed_state(lambda s: s.pop("trans_block.layernorm.bias")),
                 r"missing keys \[trans_block.layernorm.bias\]", id="paint-missing-bridge-key"),
    pytest.param("paint", changed_state(lambda s: s.pop("unet.conv_out.weight")),
                 r"missing keys \[unet.conv_out.weight\]", id="paint-missing-unet-key"),
    pytest.param("paint", changed_state(lambda s: s.__setitem__("trans_block.w_out_res.weight", torch.zeros(32, 16))),
                 r"mis-shaped keys .*trans_block.w_out_res.weight: checkpoint \[32, 16\]", id="paint-mis-shaped-key"),
    pytest.param("paint", changed_state(lambda s: s.__setitem__("vae.decoder.conv_in.weight", torch.zeros(1))),
                 r"unexpected keys \[vae.decoder", id="paint-unexpected-key"),
    *(pytest.param(kind, damage, message, id=f"{kind}-{name}")
      for kind in sorted(OFFICIAL) for name, damage, message in FILE_DAMAGES),
])
def test_bad_official_checkpoints_give_one_clear_error(reference, tmp_path, kind, damage, message):
    path = tmp_path / "bad.pt"
    damage(OFFICIAL[kind].official_tiny_state(reference), path)
    with pytest.raises(CheckpointError, match=message):
        OFFICIAL[kind].load_tiny(reference, path)


def load(kind: str, folder: Path):
    config, build, presets, rules = KINDS[kind]
    return load_weights(folder, None, config_from_dict=type(config).from_dict, presets=presets, build=build, rules=rules)


def copy_with_config(folder: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).symlink_to(file)
    (copy / CONFIG_NAME).unlink()
    config = json.loads((folder / CONFIG_NAME).read_text())
    (copy / CONFIG_NAME).write_text(json.dumps(change(config)))
    return copy


def set_in(path: str, value):
    def change(config):
        *parents, last = path.split(".")
        target = config
        for key in parents:
            target = target[key]
        target[last] = value
        return config
    return change


def test_the_saved_folder_loads(saved):
    kind, folder = saved
    model, config, _ = load(kind, folder)
    assert config == KINDS[kind][0]


@pytest.mark.parametrize("change, named", [
    (set_in("llm.num_layers", "2"), r"llm.num_layers must be int, got str '2'"),
    (set_in("llm.num_layers", True), r"llm.num_layers must be int, got bool"),
    (set_in("llm.eps", "small"), r"llm.eps must be float, got str"),
    (set_in("llm.vocab_size", 1e12), r"llm.vocab_size must be int, got float"),
    (set_in("llm", "cpm-bee-10b"), r"llm must be a JSON object, got str"),
    (lambda config: [config], r"must be a JSON object, got list"),
])
def test_wrong_types_in_config_name_the_field(saved, tmp_path, change, named):
    kind, folder = saved
    with pytest.raises(CheckpointError, match=named):
        load(kind, copy_with_config(folder, tmp_path, change))


@pytest.mark.parametrize("kind, path, value, named", [
    ("chat", "query_num", "4", r"query_num must be int"),
    ("chat", "vision.num_layers", [1], r"vision.num_layers must be int, got list"),
    ("paint", "bridge.dim_out", "32", r"bridge.dim_out must be int"),
    ("paint", "unet", ["sample_size"], r"unet must be dict, got list"),
])
def test_wrong_types_in_each_models_own_fields(saved_folders, tmp_path, kind, path, value, named):
    with pytest.raises(CheckpointError, match=named):
        load(kind, copy_with_config(saved_folders[kind], tmp_path, set_in(path, value)))


@pytest.mark.parametrize("path, value, named", [
    ("llm.num_layers", 200_000, r"llm.num_layers = 200000 cannot fit the checkpoint"),
    ("llm.vocab_size", 10**12, r"mis-shaped keys .*1000000000000"),
])
def test_absurd_sizes_are_refused_before_building(saved, tmp_path, path, value, named):
    kind, folder = saved
    with pytest.raises(CheckpointError, match=named):
        load(kind, copy_with_config(folder, tmp_path, set_in(path, value)))


def test_absurd_unet_layers_are_refused(tmp_path, saved_folders):
    with pytest.raises(CheckpointError, match=r"unet.layers_per_block = 100000 cannot fit"):
        load("paint", copy_with_config(saved_folders["paint"], tmp_path, set_in("unet.layers_per_block", 100_000)))


@pytest.mark.parametrize("outside", ["../outside/{name}", "/{root}/outside/{name}", "sub/../../outside/{name}"])
def test_shard_paths_stay_inside_the_checkpoint_folder(saved, tmp_path, outside):
    kind, folder = saved
    config, build, _, _ = KINDS[kind]
    sharded = save_folder(build(config), config, tmp_path / "sharded", max_shard_size=20_000)
    index = json.loads((sharded / INDEX_NAME).read_text())
    name = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "outside").mkdir()
    (sharded / name).rename(tmp_path / "outside" / name)  # a real shard, just not in the folder
    moved = outside.format(name=name, root=str(tmp_path).strip("/"))
    index["weight_map"] = {k: moved if v == name else v for k, v in index["weight_map"].items()}
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside its folder"):
        load(kind, sharded)


def test_a_full_disk_during_save_says_so_and_leaves_no_partial_file(saved, tmp_path, monkeypatch):
    kind, folder = saved
    config, build, _, _ = KINDS[kind]
    target = save_folder(build(config), config, tmp_path / "model")
    before = (target / "model.safetensors").read_bytes()

    def disk_fills_up(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file got written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", disk_fills_up)
    with pytest.raises(CheckpointError, match="disk is full.*free some disk space"):
        save_folder(build(config), config, target)
    assert not list(target.glob("*.tmp"))
    assert (target / "model.safetensors").read_bytes() == before  # the previous save is intact
