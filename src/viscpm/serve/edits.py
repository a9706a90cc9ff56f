"""``POST /v1/images/edits``: OpenAI's multipart form (``image``, ``mask``, ``prompt``, ``n``, ``size``,
``response_format``; VisCPM's extensions such as ``strength`` or ``seed`` as further form fields) read
into a checked request, the image and the mask.

One image per request (OpenAI's newer models take several as ``image[]``; VisCPM edits one). A
mask with an alpha channel follows OpenAI (fully transparent = repaint); one without follows
diffusers (white = repaint). The mask must have the image's size.
"""
from __future__ import annotations

from PIL import Image
from pydantic import Field, ValidationError
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request

from .errors import bad_request
from .images import DecodedImage, decode_image_bytes, decode_mask_bytes
from .schemas import PAINT_SWITCHES, ImageGenerationRequest
from .settings import ServeSettings

FILE_FIELDS = ("image", "mask")
MAX_FORM_FIELDS = 64
_FORM_CONSTANTS = {"true": True, "false": False, "null": None}  # switches arrive as text in a form


class ImageEditRequest(ImageGenerationRequest):
    # -- VisCPM extension: 0 keeps the image, 1 repaints it (default 0.8; with a mask 1)
    strength: float | None = Field(None, ge=0, le=1)


async def read_edit_form(request: Request,
                         settings: ServeSettings) -> tuple[ImageEditRequest, DecodedImage, Image.Image | None]:
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise bad_request("send the edit as multipart/form-data with the fields image, prompt and optionally mask "
                          "(as the openai client's images.edit does)", "invalid_content_type")
    try:
        form = await request.form(max_files=len(FILE_FIELDS) + 1, max_fields=MAX_FORM_FIELDS)
    except Exception as error:  # starlette raises its own parse errors; all mean a malformed form
        raise bad_request(f"the multipart form cannot be read: {error}", "invalid_form") from None
    files: dict[str, bytes] = {}
    fields: dict[str, object] = {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")
        if isinstance(value, UploadFile):
            if name not in FILE_FIELDS:
                raise bad_request(f"unexpected file field {key!r}; send image and optionally mask", "invalid_form", key)
            if name in files:
                raise bad_request(f"one {name} per request: VisCPM edits a single image", "unsupported_value", name)
            files[name] = await value.read()
        else:
            fields[name] = value
    if "image" not in files:
        raise bad_request("the image to edit is missing: send it as the file field 'image'", "missing_image", "image")
    try:
        body = ImageEditRequest.model_validate(
            {k: _FORM_CONSTANTS.get(str(v).strip().lower(), v) if k in PAINT_SWITCHES else v for k, v in fields.items()})
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
    image = await run_in_threadpool(decode_image_bytes, files["image"], settings)
    mask = None
    if "mask" in files:
        mask = await run_in_threadpool(decode_mask_bytes, files["mask"], settings)
        if mask.size != image.image.size:
            raise bad_request(f"the mask is {mask.width}x{mask.height} but the image is {image.image.width}x"
                              f"{image.image.height}; send a mask of the image's size", "invalid_mask", "mask")
    return body, image, mask
