"""What the emulated nodes compute, and how long the real ones take on the recorded 2-core CPU machine.

There are no tensors: an image is its size, batch and (solid) colour, which is enough to write a real
PNG, to time a node and to answer PreviewAny. The nodes of the recorded workflows and a few close
relatives have a behaviour here; every other node of object_info runs as an instant pass-through that
produces opaque values of its declared output types.

Timings (PROTOCOL.md section 7): ImageBlur is a 2-D convolution, about 1.55 s for 1024x1024 at radius 31,
so its cost grows with pixels x (2r+1)^2; writing a PNG grows with pixels; tiny nodes take ~0 s.
"""

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .catalog import NodeClass
from .files import InstanceFiles
from .png import png_size, solid_png
from .validation import CustomValidation

# Seconds per unit of work, fitted to the recorded runs (slow_blur_chain 2.9-3.4 s, big_4096_scale ~2 s).
_BLUR_SECONDS_PER_PIXEL_TAP = 3.73e-10
_FILL_SECONDS_PER_PIXEL = 6e-9
_SCALE_SECONDS_PER_PIXEL = 3e-8
_PNG_SECONDS_PER_PIXEL = 5e-8
_INVERT_SECONDS_PER_PIXEL = 2e-9

# RAM of the recorded machine (system_stats); a float32 RGB tensor beyond it fails as torch does.
_RAM_BYTES = 25276063744
_LOADED_IMAGE_COLOUR = (128, 128, 128)
_PREVIEW_PREFIX_LETTERS = "abcdefghijklmnopqrstupvxyz"  # sic: ComfyUI's alphabet


@dataclass(frozen=True)
class ImageBatch:
    width: int
    height: int
    batch: int
    rgb: tuple[int, int, int]

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.batch

    def resized(self, width: int, height: int) -> "ImageBatch":
        _check_allocation(width, height, self.batch)
        return ImageBatch(width, height, self.batch, self.rgb)

    def __str__(self) -> str:
        return f"tensor of shape [{self.batch}, {self.height}, {self.width}, 3]"


@dataclass(frozen=True)
class OpaqueValue:
    """The output of a node the emulator does not compute (a MODEL, a LATENT...)."""

    type_name: str

    def __str__(self) -> str:
        return f"<{self.type_name}>"


@dataclass
class NodeContext:
    node_id: str
    prompt: dict
    extra_pnginfo: dict | None
    files: InstanceFiles
    # State of the node object, which ComfyUI keeps between prompts (PreviewImage's random prefix).
    state: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NodeResult:
    outputs: tuple
    ui: dict | None = None


@dataclass(frozen=True)
class NodeBehavior:
    run: Callable[..., NodeResult]
    seconds: Callable[[dict, NodeResult], float] = lambda inputs, result: 0.0
    # Extra cache key, like ComfyUI's IS_CHANGED (a loaded file that changed on disk must run again).
    is_changed: Callable[[InstanceFiles, dict], object] | None = None


def _check_allocation(width: int, height: int, batch: int) -> None:
    size = width * height * batch * 3 * 4
    if size > _RAM_BYTES:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
            f"you tried to allocate {size} bytes."
        )


def _pixels(value) -> int:
    return value.pixels if isinstance(value, ImageBatch) else 0


def _as_image(value) -> ImageBatch:
    # Images from nodes the emulator does not compute are shown as a small grey square.
    return value if isinstance(value, ImageBatch) else ImageBatch(64, 64, 1, _LOADED_IMAGE_COLOUR)


def empty_image(ctx: NodeContext, width, height, batch_size=1, color=0) -> NodeResult:
    _check_allocation(width, height, batch_size)
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    return NodeResult((ImageBatch(width, height, batch_size, rgb),))


def image_invert(ctx: NodeContext, image) -> NodeResult:
    image = _as_image(image)
    return NodeResult(
        (ImageBatch(image.width, image.height, image.batch, tuple(255 - c for c in image.rgb)),)
    )


def image_blur(ctx: NodeContext, image, blur_radius, sigma) -> NodeResult:
    # A blurred solid colour is the same solid colour (the padding reflects it).
    return NodeResult((image,))


def _blur_seconds(inputs: dict, result: NodeResult) -> float:
    taps = (2 * inputs["blur_radius"] + 1) ** 2
    return _BLUR_SECONDS_PER_PIXEL_TAP * _pixels(inputs["image"]) * taps


def image_scale(ctx: NodeContext, image, upscale_method, width, height, crop) -> NodeResult:
    image = _as_image(image)
    if width == 0 and height == 0:
        return NodeResult((image,))
    if width == 0:
        width = max(1, round(image.width * height / image.height))
    elif height == 0:
        height = max(1, round(image.height * width / image.width))
    return NodeResult((image.resized(width, height),))


def image_scale_by(ctx: NodeContext, image, upscale_method, scale_by) -> NodeResult:
    image = _as_image(image)
    return NodeResult((image.resized(round(image.width * scale_by), round(image.height * scale_by)),))


def _scale_seconds(inputs: dict, result: NodeResult) -> float:
    return _SCALE_SECONDS_PER_PIXEL * (_pixels(inputs["image"]) + _pixels(result.outputs[0]))


def _save_png_files(
    ctx: NodeContext, images, filename_prefix: str, base_dir: str, kind: str, compress_level: int
) -> NodeResult:
    images = _as_image(images)
    folder, filename, counter, subfolder = ctx.files.save_image_path(
        filename_prefix, base_dir, images.width, images.height
    )
    text = {"prompt": json.dumps(ctx.prompt)}
    for key, value in (ctx.extra_pnginfo or {}).items():
        text[key] = json.dumps(value)
    png = solid_png(images.width, images.height, images.rgb, text, compress_level)
    results = []
    for batch_number in range(images.batch):
        file = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        with open(os.path.join(folder, file), "wb") as output:
            output.write(png)
        results.append({"filename": file, "subfolder": subfolder, "type": kind})
        counter += 1
    return NodeResult((), {"images": results})


def save_image(ctx: NodeContext, images, filename_prefix="ComfyUI") -> NodeResult:
    return _save_png_files(ctx, images, filename_prefix, ctx.files.output_dir, "output", compress_level=4)


def preview_image(ctx: NodeContext, images) -> NodeResult:
    suffix = ctx.state.setdefault(
        "prefix_append", "_temp_" + "".join(random.choice(_PREVIEW_PREFIX_LETTERS) for _ in range(5))
    )
    return _save_png_files(ctx, images, "ComfyUI" + suffix, ctx.files.temp_dir, "temp", compress_level=1)


def _png_seconds(inputs: dict, result: NodeResult) -> float:
    return _PNG_SECONDS_PER_PIXEL * _pixels(inputs["images"])


def preview_any(ctx: NodeContext, source=None) -> NodeResult:
    text = "None"
    if isinstance(source, str):
        text = source
    elif isinstance(source, int | float | bool):
        text = str(source)
    elif source is not None:
        try:
            text = json.dumps(source)
        except (TypeError, ValueError):
            text = str(source)
    return NodeResult((), {"text": [text]})


def string_concatenate(ctx: NodeContext, string_a, string_b, delimiter="") -> NodeResult:
    return NodeResult((delimiter.join((string_a, string_b)),))


def regex_replace(
    ctx: NodeContext,
    string,
    regex_pattern,
    replace,
    case_insensitive=True,
    multiline=False,
    dotall=False,
    count=0,
) -> NodeResult:
    flags = (
        (re.IGNORECASE if case_insensitive else 0)
        | (re.MULTILINE if multiline else 0)
        | (re.DOTALL if dotall else 0)
    )
    return NodeResult((re.sub(regex_pattern, replace, string, count=count, flags=flags),))


def load_image(ctx: NodeContext, image) -> NodeResult:
    width, height = png_size(ctx.files.input_file_path(image)) or (512, 512)
    return NodeResult((ImageBatch(width, height, 1, _LOADED_IMAGE_COLOUR), OpaqueValue("MASK")))


def _loaded_file_version(files: InstanceFiles, inputs: dict) -> object:
    try:
        stat = files.input_file_path(inputs["image"]).stat()
    except (OSError, KeyError, TypeError):
        return None
    return (stat.st_mtime_ns, stat.st_size)


BEHAVIORS: dict[str, NodeBehavior] = {
    "EmptyImage": NodeBehavior(
        empty_image,
        lambda inputs, result: _FILL_SECONDS_PER_PIXEL * _pixels(result.outputs[0]),
    ),
    "ImageInvert": NodeBehavior(
        image_invert, lambda inputs, result: _INVERT_SECONDS_PER_PIXEL * _pixels(inputs["image"])
    ),
    "ImageBlur": NodeBehavior(image_blur, _blur_seconds),
    "ImageScale": NodeBehavior(image_scale, _scale_seconds),
    "ImageScaleBy": NodeBehavior(image_scale_by, _scale_seconds),
    "SaveImage": NodeBehavior(save_image, _png_seconds),
    "PreviewImage": NodeBehavior(preview_image, _png_seconds),
    "PreviewAny": NodeBehavior(preview_any),
    "StringConcatenate": NodeBehavior(string_concatenate),
    "RegexReplace": NodeBehavior(regex_replace),
    "LoadImage": NodeBehavior(load_image, is_changed=_loaded_file_version),
}


def behavior_for(node_class: NodeClass) -> NodeBehavior:
    behavior = BEHAVIORS.get(node_class.name)
    if behavior is not None:
        return behavior
    outputs = tuple(
        OpaqueValue(kind if isinstance(kind, str) else "COMBO") for kind in node_class.return_types
    )
    return NodeBehavior(lambda ctx, **inputs: NodeResult(outputs))


def custom_validations(files: InstanceFiles) -> dict[str, CustomValidation]:
    """The VALIDATE_INPUTS checks of the loaders: the named file must exist in the input directory."""

    def image_file_exists(image=None):
        if image is None or not files.input_file_exists(image):
            return f"Invalid image file: {image}"
        return True

    check = CustomValidation(input_names=("image",), check=image_file_exists)
    return {"LoadImage": check, "LoadImageMask": check}
