"""Safe image loading for the shard builder: resolve under a root, check, decode once, store as PNG.

    stored = load_image(root, "val2014/COCO_val2014_000000016240.jpg", ImageLimits(...))
    stored.png, stored.width, stored.height          # what an environment row keeps
    pil = decode_png(stored.png)                       # what the edit engine feeds the model

Every refusal raises `ImageRefused` with a short `code` (counted in the manifest) and a message naming the
path and the fix; the shard builder turns it into a quarantine reason, so a bad image never stops a job.
The checks run cheapest first and *before* decoding pixels:

1. the path is relative, has no `..`, and its real path (symlinks resolved) stays inside the real root;
2. the file exists and is at most `max_bytes` long;
3. the header's width x height is at most `max_pixels` (PIL's own decompression-bomb guard is turned into an
   error as well, in case its limit is the lower one);
4. `verify()` (checksums, structure), then a full decode: truncated or corrupt files are refused here.

The decoded image is converted to RGB, shrunk so its longer side is at most `max_side` (never enlarged) and
encoded once as PNG; the bytes are deterministic for a given Pillow/zlib, so shards are reproducible.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

from odedit.records import check_relative_path

PNG_COMPRESS_LEVEL = 6  # zlib level of stored PNGs: Pillow's default, a size/speed middle ground

# Refusal codes, counted in the manifest's quarantine summary.
PATH_ABSOLUTE = "image_path_absolute"
PATH_ESCAPES = "image_path_escapes_root"
PATH_INVALID = "image_path_invalid"
MISSING = "image_missing"
TOO_LARGE = "image_too_large"
TOO_MANY_PIXELS = "image_too_many_pixels"
CORRUPT = "image_corrupt"


class ImageRefused(ValueError):
    """An image that may not be used; `code` is one of this module's refusal codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be: file size, header pixel count, and the stored longer side."""

    max_bytes: int
    max_pixels: int
    max_side: int

    @classmethod
    def from_config(cls, data_cfg: Any) -> ImageLimits:
        return cls(data_cfg.max_image_bytes, data_cfg.max_image_pixels, data_cfg.stored_image_size)


@dataclass(frozen=True)
class StoredImage:
    """An image as environment rows keep it: PNG bytes and the stored size."""

    png: bytes
    width: int
    height: int


def resolve_under_root(root: str, rel: str) -> str:
    """The real path of `rel` under `root`, refusing anything that could leave the root.

    Raises:
        ImageRefused: absolute path, `..`, or a path whose real location (symlinks resolved) is outside
            the real root.
    """
    problem = check_relative_path(rel) if isinstance(rel, str) else "is not a string"
    if problem:
        code = PATH_ABSOLUTE if "absolute" in problem else PATH_ESCAPES if ".." in problem else PATH_INVALID
        raise ImageRefused(code, f"image path {rel!r} {problem}")
    if not root:
        raise ImageRefused(
            PATH_INVALID,
            f"image path {rel!r} has no image root; set data.image_root (or the rephrase/locality root) in the config",
        )
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root:
        raise ImageRefused(
            PATH_ESCAPES,
            f"image path {rel!r} resolves to {real!r}, outside its root "
            f"{real_root!r} (a symlink?); copy the file under the root",
        )
    return real


def load_image(root: str, rel: str, limits: ImageLimits) -> StoredImage:
    """Resolve, check, decode, convert to RGB, shrink and PNG-encode one image (see the module docstring).

    Raises:
        ImageRefused: with the refusal code and a message naming the path.
    """
    path = resolve_under_root(root, rel)
    if not os.path.isfile(path):
        raise ImageRefused(
            MISSING,
            f"image {rel!r} does not exist under {root!r}; check the image root in "
            "the config or the path in the record",
        )
    check_size(os.path.getsize(path), rel, limits)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageRefused(MISSING, f"image {rel!r} cannot be read ({exc.strerror})") from None
    return decode_checked(data, rel, limits)


def load_image_bytes(data: bytes, name: str, limits: ImageLimits) -> StoredImage:
    """`load_image` for an image given as bytes (a `datasets.Image` cell): the same size, pixel and decode
    checks, then the same stored form. `name` is what messages call it (the cell's path or a content name).

    Raises:
        ImageRefused: with the refusal code and a message naming the image.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageRefused(CORRUPT, f"image {name!r} is {type(data).__name__}, not bytes; re-encode the dataset")
    check_size(len(data), name, limits)
    return decode_checked(bytes(data), name, limits)


def check_size(size: int, name: str, limits: ImageLimits) -> None:
    """Refuse an image of more than `limits.max_bytes` bytes (before anything reads or decodes it)."""
    if size > limits.max_bytes:
        raise ImageRefused(
            TOO_LARGE,
            f"image {name!r} is {size} bytes, over data.max_image_bytes="
            f"{limits.max_bytes}; shrink the file or raise the limit",
        )


def decode_checked(data: bytes, name: str, limits: ImageLimits) -> StoredImage:
    """Header pixel count, `verify()`, full decode, then `encode_image` (checks 3 and 4 of the module docstring).

    Raises:
        ImageRefused: too many pixels, or not a decodable / convertible image.
    """
    from PIL import Image

    with warnings.catch_warnings():
        # PIL warns (and above twice its limit raises) on huge images; both become refusals here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            header = Image.open(io.BytesIO(data))
            width, height = header.size
            if width * height > limits.max_pixels:
                raise ImageRefused(
                    TOO_MANY_PIXELS,
                    f"image {name!r} declares {width}x{height} = "
                    f"{width * height} pixels, over data.max_image_pixels="
                    f"{limits.max_pixels} (a decompression bomb?)",
                )
            header.verify()
            image = Image.open(io.BytesIO(data))
            image.load()
        except ImageRefused:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRefused(
                TOO_MANY_PIXELS, f"image {name!r} refused by PIL's decompression-bomb guard ({exc})"
            ) from None
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) on bad data
            raise ImageRefused(
                CORRUPT, f"image {name!r} is not a decodable image ({type(exc).__name__}: {exc}); replace the file"
            ) from None
    try:
        return encode_image(image, limits.max_side)
    except Exception as exc:  # a decodable image in a mode PIL cannot convert (e.g. "La")
        raise ImageRefused(
            CORRUPT, f"image {name!r} cannot be converted to RGB ({type(exc).__name__}: {exc}); re-save it as RGB"
        ) from None


def encode_image(image: Any, max_side: int) -> StoredImage:
    """RGB-convert, shrink so the longer side is at most `max_side`, and PNG-encode a PIL image."""
    from PIL import Image

    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Composite transparency onto white instead of letting convert() drop alpha to black.
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            image = background
        else:
            image = image.convert("RGB")
    width, height = image.size
    longer = max(width, height)
    if longer > max_side:
        scale = max_side / longer
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return StoredImage(buf.getvalue(), image.size[0], image.size[1])


def decode_png(data: bytes) -> Any:
    """The RGB PIL image stored in a row's `image` bytes (fully loaded, detached from the buffer)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image
