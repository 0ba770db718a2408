"""pipeline.data.images: every refusal (with its code) and the stored form of accepted images."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from bench.synthetic import COLOURS, write_png
from pipeline.data import images as im
from pipeline.data.images import ImageLimits, ImageRefused, decode_png, load_image

LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=4096 * 4096, max_side=224)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    write_png(str(r / "a" / "wide.png"), 300, 150, COLOURS["red"], seed=1)
    return str(r)


def refused(root, rel, limits=LIMITS) -> ImageRefused:
    with pytest.raises(ImageRefused) as info:
        load_image(root, rel, limits)
    return info.value


def test_accepted_image_is_shrunk_rgb_png(root):
    stored = load_image(root, "a/wide.png", LIMITS)
    assert (stored.width, stored.height) == (224, 112)
    assert stored.png.startswith(b"\x89PNG\r\n\x1a\n")
    pil = decode_png(stored.png)
    assert pil.mode == "RGB" and pil.size == (224, 112)
    # the coloured square survives the resize
    assert pil.getpixel((112, 56)) == COLOURS["red"]


def test_small_image_is_not_enlarged_and_bytes_are_deterministic(tmp_path):
    write_png(str(tmp_path / "s.png"), 40, 30, COLOURS["blue"], seed=2)
    a = load_image(str(tmp_path), "s.png", LIMITS)
    b = load_image(str(tmp_path), "s.png", LIMITS)
    assert (a.width, a.height) == (40, 30)
    assert a.png == b.png


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
def test_other_modes_become_rgb(tmp_path, mode):
    Image.new("RGB", (20, 10), (10, 200, 30)).convert(mode).save(
        tmp_path / "m.png" if mode != "CMYK" else tmp_path / "m.jpg"
    )
    stored = load_image(str(tmp_path), "m.png" if mode != "CMYK" else "m.jpg", LIMITS)
    assert decode_png(stored.png).mode == "RGB"


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "t.png")
    pil = decode_png(load_image(str(tmp_path), "t.png", LIMITS).png)
    assert pil.getpixel((0, 0)) == (255, 255, 255)


def test_refuses_dotdot(root, tmp_path):
    write_png(str(tmp_path / "outside.png"), 10, 10, COLOURS["red"], seed=3)
    err = refused(root, "../outside.png")
    assert err.code == im.PATH_ESCAPES and "'../outside.png'" in str(err)


def test_refuses_absolute_path(root):
    err = refused(root, os.path.join(root, "a", "wide.png"))
    assert err.code == im.PATH_ABSOLUTE and "relative" in str(err)


def test_refuses_symlink_leaving_the_root(root, tmp_path):
    write_png(str(tmp_path / "secret.png"), 10, 10, COLOURS["red"], seed=4)
    os.symlink(tmp_path / "secret.png", os.path.join(root, "a", "link.png"))
    err = refused(root, "a/link.png")
    assert err.code == im.PATH_ESCAPES and "outside its root" in str(err)


def test_symlink_inside_the_root_is_fine(root):
    os.symlink(os.path.join(root, "a", "wide.png"), os.path.join(root, "alias.png"))
    assert load_image(root, "alias.png", LIMITS).width == 224


def test_refuses_missing_file_and_missing_root(root):
    assert refused(root, "a/nope.png").code == im.MISSING
    assert refused("", "a/wide.png").code == im.PATH_INVALID


def test_refuses_corrupt_and_truncated_files(root):
    with open(os.path.join(root, "junk.jpg"), "wb") as fh:
        fh.write(b"this is not an image at all" * 10)
    assert refused(root, "junk.jpg").code == im.CORRUPT
    data = open(os.path.join(root, "a", "wide.png"), "rb").read()
    with open(os.path.join(root, "half.png"), "wb") as fh:
        fh.write(data[: len(data) // 2])
    err = refused(root, "half.png")
    assert err.code == im.CORRUPT and "half.png" in str(err)


def test_refuses_file_over_the_byte_limit(root):
    size = os.path.getsize(os.path.join(root, "a", "wide.png"))
    err = refused(root, "a/wide.png", ImageLimits(size - 1, LIMITS.max_pixels, 224))
    assert err.code == im.TOO_LARGE and "max_image_bytes" in str(err)


def test_refuses_too_many_pixels_from_the_header_before_decoding(root, make_bomb):
    # The file has a header only: had it been decoded, it would be refused as corrupt, not as too big.
    make_bomb(os.path.join(root, "bomb.png"), 3000, 3000)  # under PIL's own limit: our check decides
    err = refused(root, "bomb.png", ImageLimits(LIMITS.max_bytes, 1000 * 1000, 224))
    assert err.code == im.TOO_MANY_PIXELS and "3000x3000" in str(err)


def test_pil_decompression_bomb_guard_is_a_refusal_too(root, make_bomb):
    # A configured limit above PIL's own: PIL's DecompressionBombError must still become a refusal.
    make_bomb(os.path.join(root, "bomb.png"), 20000, 20000)
    err = refused(root, "bomb.png", ImageLimits(LIMITS.max_bytes, 10**12, 224))
    assert err.code == im.TOO_MANY_PIXELS and "decompression-bomb" in str(err)
