"""Image loading (every PIL mode, every bad input) and the eval transform against the golden pixels."""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from viscpm.image_processing import DEFAULT_MAX_PIXELS, ImageError, ImageTransform, load_image, open_image


@pytest.fixture(scope="module")
def golden_pixels(reference: Path) -> torch.Tensor:
    return load_file(reference / "chat" / "tiny_viscpm_chat_golden.safetensors")["pixel_values"]


@pytest.fixture(scope="module")
def case1(reference: Path) -> Path:
    return reference / "data" / "figures" / "vlu_case1.png"


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def _png_bytes(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, followed by garbage pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"junk") + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------
# The eval transform


def test_pixel_values_match_golden_exactly(case1: Path, golden_pixels: torch.Tensor) -> None:
    pixel_values = ImageTransform()(case1)
    assert pixel_values.shape == (1, 3, 224, 224) and pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values, golden_pixels)


def test_pixel_values_from_pil_input_and_batch(case1: Path, golden_pixels: torch.Tensor) -> None:
    image = Image.open(case1).convert("RGB")
    pixel_values = ImageTransform()([image, case1])
    assert pixel_values.shape == (2, 3, 224, 224)
    assert torch.equal(pixel_values[0], golden_pixels[0])
    assert torch.equal(pixel_values[1], golden_pixels[0])


def test_golden_comparison_detects_small_deviation(case1: Path, golden_pixels: torch.Tensor) -> None:
    pixel_values = ImageTransform()(case1)
    pixel_values[0, 1, 100, 100] += 1e-3
    assert not torch.allclose(pixel_values, golden_pixels, rtol=0, atol=1e-6)


def test_transform_other_size_and_range() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 91, 3), dtype=np.uint8))
    pixel_values = ImageTransform(image_size=96)([image, image.convert("RGBA")])
    assert pixel_values.shape == (2, 3, 96, 96)
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1


def test_transform_normalisation_formula() -> None:
    image = Image.new("RGB", (8, 8), (0, 51, 255))
    pixel_values = ImageTransform(image_size=8)(image)
    expected = torch.tensor([0 / 255, 51 / 255, 255 / 255]).sub(0.5).div(0.5)
    assert torch.equal(pixel_values[0, :, 3, 3], expected)


def test_transform_rejects_empty_list() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        ImageTransform()([])


# ------------------------------------------------------------------------------------------------
# Modes


def test_rgb_pil_is_returned_unchanged() -> None:
    image = Image.new("RGB", (4, 3), (1, 2, 3))
    assert load_image(image) is image


def test_rgb_from_path_equals_pil_convert(case1: Path) -> None:
    assert np.array_equal(_pixels(load_image(case1)), np.asarray(Image.open(case1).convert("RGB")))


def test_rgba_is_composited_on_white() -> None:
    pixels = np.array(
        [[[0, 0, 0, 0], [255, 0, 0, 255], [255, 0, 0, 128], [10, 20, 30, 255]]], dtype=np.uint8
    )
    out = _pixels(load_image(Image.fromarray(pixels, "RGBA")))
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> background
    assert out[0, 1].tolist() == [255, 0, 0]  # opaque -> unchanged
    assert out[0, 2, 0] == 255 and 120 <= out[0, 2, 1] <= 135  # half red over white -> pink
    assert out[0, 3].tolist() == [10, 20, 30]


def test_rgba_custom_background_and_official_drop() -> None:
    pixels = np.array([[[40, 50, 60, 0], [1, 2, 3, 255]]], dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    assert _pixels(load_image(image, background=(0, 128, 0)))[0, 0].tolist() == [0, 128, 0]
    dropped = _pixels(load_image(image, background=None))
    assert np.array_equal(dropped, np.asarray(image.convert("RGB")))  # the official behaviour


def test_reference_rgba_figure(reference: Path) -> None:
    path = reference / "data" / "figures" / "vlu_case4.png"
    raw = np.asarray(Image.open(path))
    assert raw.shape[-1] == 4
    out = _pixels(load_image(path))
    transparent = raw[..., 3] == 0
    assert transparent.any()
    assert (out[transparent] == 255).all()
    opaque = raw[..., 3] == 255
    assert np.array_equal(out[opaque], raw[opaque][:, :3])
    official = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(_pixels(load_image(path, background=None)), official)


def test_la_is_composited_on_white() -> None:
    image = Image.fromarray(np.array([[[0, 0], [80, 255]]], dtype=np.uint8), "LA")
    out = _pixels(load_image(image))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [80, 80, 80]


def test_premultiplied_modes() -> None:
    assert load_image(Image.new("RGBa", (2, 2), (10, 20, 30, 255))).getpixel((0, 0)) == (10, 20, 30)
    assert load_image(Image.new("La", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_from_file(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL "convert to RGBA" warning may escape
        out = _pixels(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 10, 10]


def test_palette_without_transparency_and_pa() -> None:
    image = Image.new("P", (1, 1))
    image.putpalette([7, 8, 9] + [0] * 765)
    assert load_image(image).getpixel((0, 0)) == (7, 8, 9)
    transparent = Image.new("RGBA", (1, 1), (7, 8, 9, 0)).convert("PA")
    assert load_image(transparent).getpixel((0, 0)) == (255, 255, 255)


def test_grey_with_transparency_key(tmp_path: Path) -> None:
    path = tmp_path / "grey_trns.png"
    Image.fromarray(np.array([[0, 90]], dtype=np.uint8), "L").save(path, transparency=0)
    out = _pixels(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [90, 90, 90]


@pytest.mark.parametrize(
    ("mode", "colour"),
    [
        ("L", 77),
        ("1", 1),
        ("CMYK", (0, 255, 255, 0)),
        ("YCbCr", (81, 90, 240)),
        ("HSV", (0, 255, 255)),
        ("RGBX", (1, 2, 3, 0)),
    ],
)
def test_plain_modes_follow_pil_convert(mode: str, colour) -> None:
    image = Image.new(mode, (3, 2), colour)
    out = load_image(image)
    assert out.mode == "RGB" and out.size == (3, 2)
    assert np.array_equal(np.asarray(out), np.asarray(image.convert("RGB")))


def test_cmyk_and_one_bit_values() -> None:
    assert load_image(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_scaled_not_clipped(mode: str) -> None:
    values = [0, 1000, 257 * 100, 40000, 65535]
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    out = _pixels(load_image(image))[0, :, 0]
    assert out.tolist() == [0, 4, 100, 156, 255]  # round(v / 257); PIL's convert("L") would give 255s


def test_16_bit_png_from_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(path)
    out = _pixels(load_image(path))[0, :, 0]
    assert out.tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 100, 255], [0, 100, 255]),  # fits 8 bits: unchanged
        ([0, 1000, 65535], [0, 4, 255]),  # fits 16 bits: scaled by 255/65535
        ([-100, 0, 300], [0, 64, 255]),  # outside every range: min..max stretched
        ([0, 100000, 200000], [0, 128, 255]),
    ],
)
def test_32_bit_integer(values: list[int], expected: list[int]) -> None:
    image = Image.fromarray(np.array([values], dtype=np.int32), "I")
    assert _pixels(load_image(image))[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # 0..1 float convention
        ([0.0, 2.0, 255.0], [0, 2, 255]),  # 0..255
        ([-1.0, 0.0, 1.0], [0, 128, 255]),  # stretched
        ([3e5, 3e5, 3e5], [0, 0, 0]),  # constant outside every range
    ],
)
def test_float(values: list[float], expected: list[int]) -> None:
    image = Image.fromarray(np.array([values], dtype=np.float32), "F")
    assert _pixels(load_image(image))[0, :, 0].tolist() == expected


def test_float_with_nan_is_rejected() -> None:
    image = Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32), "F")
    with pytest.raises(ImageError, match="NaN"):
        load_image(image)


# ------------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello, I am text", encoding="utf-8")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(str(path))


@pytest.mark.parametrize("name", ["vlu_case1.png", "vlu_case2.jpeg"])
def test_truncated_file(reference: Path, tmp_path: Path, name: str) -> None:
    data = (reference / "data" / "figures" / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(path)


def test_corrupt_pixel_data(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.png"
    path.write_bytes(_png_bytes(4, 4))  # valid header, garbage IDAT
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(path)


def test_zero_size_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    path = tmp_path / "zero.png"
    path.write_bytes(_png_bytes(0, 5))
    with pytest.raises(ImageError):  # PIL refuses to identify a zero-width PNG at all
        load_image(path)


@pytest.mark.parametrize(
    "size",
    [
        (9000, 9000),  # 81 MP: below PIL's bomb threshold, above our 64 MP default
        (10000, 10000),  # 100 MP: PIL would warn (DecompressionBombWarning)
        (20000, 20000),  # 400 MP: PIL raises DecompressionBombError
    ],
)
def test_oversized_file_rejected_before_decoding(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_bytes(*size))  # the pixel data is garbage: decoding would fail differently
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bomb warning must not escape
        with pytest.raises(ImageError, match="too large|above the limit"):
            load_image(path)


def test_max_pixels_argument(case1: Path) -> None:
    with pytest.raises(ImageError, match="above the limit of 1,000"):
        load_image(case1, max_pixels=1000)
    with pytest.raises(ImageError, match="above the limit"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=9999)
    assert load_image(Image.new("RGB", (100, 100)), max_pixels=10000).size == (100, 100)
    assert DEFAULT_MAX_PIXELS == 64_000_000


def test_wrong_type() -> None:
    with pytest.raises(ImageError, match="expected an image path"):
        load_image(123)  # type: ignore[arg-type]


def test_error_is_a_value_error() -> None:
    assert issubclass(ImageError, ValueError)


def test_lazy_pil_image_truncated(reference: Path) -> None:
    data = (reference / "data" / "figures" / "vlu_case2.jpeg").read_bytes()
    image = Image.open(io.BytesIO(data[: len(data) // 3]))  # opened lazily, not yet decoded
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(image)


# ------------------------------------------------------------------------------------------------
# Allowed formats: PNG, JPEG, WebP, GIF only, whatever a file is called


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n"


@pytest.fixture
def postscript_parsed(monkeypatch) -> list:
    """Records every time PIL's EPS reader (which hands the file to Ghostscript) touches a file."""
    from PIL import EpsImagePlugin

    calls = []
    original = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: (calls.append(1), original(self))[1])
    return calls


def test_postscript_named_png_is_refused_unparsed(tmp_path: Path, postscript_parsed: list) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(EPS)
    with pytest.raises(ImageError, match="PNG, JPEG, WebP or GIF"):
        load_image(path)
    with pytest.raises(ImageError, match="PNG, JPEG, WebP or GIF"):
        open_image(io.BytesIO(EPS), "upload")
    assert postscript_parsed == []


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "PPM"])
def test_formats_outside_the_allow_list_are_refused(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"image.{fmt.lower()}"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path, format=fmt)
    with pytest.raises(ImageError, match="not one of the formats read here"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_allowed_formats_open(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"image.{fmt.lower()}"
    Image.new("RGB", (4, 4), (200, 0, 0)).save(path, format=fmt)
    assert load_image(path).size == (4, 4)


def test_training_records_refuse_postscript(tmp_path: Path, postscript_parsed: list) -> None:
    from viscpm.train.data import BadRecord, Record

    path = tmp_path / "cat.png"
    path.write_bytes(EPS)
    shard = tmp_path / "shard.tar"
    shard.write_bytes(b"\0" * 16 + EPS)
    for record in (Record({}, path), Record({}, (shard, 16, len(EPS)))):
        with pytest.raises(BadRecord, match="corrupt image"):
            record.open_image()
    assert postscript_parsed == []
