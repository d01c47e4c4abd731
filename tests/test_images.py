"""Tests of delf_pipeline.formats.images: listing (folder, Kaggle layout, CSV) and robust decoding.

Every image here is made by the test (PIL), with hand-worked expected pixels and sizes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from delf_pipeline.formats.images import (
    MIN_SIDE,
    ImageError,
    ImageRecord,
    decode_bytes,
    iter_decoded,
    kaggle_path,
    list_images,
    load_image,
)


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def ids(records) -> list[str]:
    return [r.id for r in records]


# ---------------------------------------------------------------- listing


def test_folder_is_searched_recursively_and_ids_are_relative_paths(tmp_path):
    save(tmp_path / "place" / "sub" / "b.JPG", noise(20, 20))
    save(tmp_path / "a.png", noise(20, 20))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.jpg").mkdir()  # a directory with an image suffix is not an image
    records, errors = list_images(tmp_path)
    assert ids(records) == ["a", "place/sub/b"]
    assert records[1].path == tmp_path / "place" / "sub" / "b.JPG"
    assert records[0].label is None and errors == []


def test_empty_folder_lists_nothing(tmp_path):
    assert list_images(tmp_path) == ([], [])


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="image source not found"):
        list_images(tmp_path / "nowhere")


def kaggle_root(tmp_path: Path) -> Path:
    root = tmp_path / "kaggle"
    root.mkdir()
    write_csv(root / "train.csv", ["id,landmark_id", "abc123,7", "f00d42,9", "badrow,"])
    for image_id in ("abc123", "f00d42"):
        save(kaggle_path(root, "train", image_id), noise(20, 20))
    save(root / "test" / "x" / "y" / "z" / "xyz789.jpg", noise(20, 20))
    return root


def test_kaggle_train_split_reads_ids_and_labels_from_train_csv(tmp_path):
    root = kaggle_root(tmp_path)
    records, errors = list_images(root, "train")
    assert [(r.id, r.label) for r in records] == [("abc123", "7"), ("f00d42", "9")]
    assert records[0].path == root / "train" / "a" / "b" / "c" / "abc123.jpg"
    assert [(e.id, e.reason) for e in errors] == [("badrow", "malformed CSV row at train.csv line 4")]


def test_kaggle_test_split_takes_ids_from_file_stems(tmp_path):
    root = kaggle_root(tmp_path)
    records, errors = list_images(root, "test")
    assert [(r.id, r.label) for r in records] == [("xyz789", None)]
    assert records[0].path == root / "test" / "x" / "y" / "z" / "xyz789.jpg"
    assert errors == []


def test_csv_paths_are_relative_to_the_csv_folder(tmp_path):
    absolute = save(tmp_path / "elsewhere" / "b.jpg", noise(20, 20))
    listing = write_csv(tmp_path / "list.csv", ["id,path,landmark_id", "a, photos/a.jpg ,3", f"b,{absolute},"])
    records, errors = list_images(listing)
    assert [(r.id, r.path, r.label) for r in records] == [
        ("a", tmp_path / "photos" / "a.jpg", "3"),
        ("b", absolute, None),
    ]
    assert errors == []


def test_csv_duplicate_and_malformed_rows_become_error_records(tmp_path):
    listing = write_csv(tmp_path / "list.csv", [
        "id,path",
        "a,a.jpg",
        "a,other.jpg",  # duplicate id: the first row wins
        "b",  # no path
        ",c.jpg",  # no id
        "d,d.jpg,extra",  # one field too many
        "e,e.jpg",
    ])
    records, errors = list_images(listing)
    assert [(r.id, r.path.name) for r in records] == [("a", "a.jpg"), ("e", "e.jpg")]
    assert [(e.id, e.reason) for e in errors] == [
        ("b", "malformed CSV row at list.csv line 4"),
        ("<line 5>", "malformed CSV row at list.csv line 5"),
        ("d", "malformed CSV row at list.csv line 6"),
        ("a", f"duplicate id (first seen at {tmp_path / 'a.jpg'})"),
    ]
    assert errors[3].path == str(tmp_path / "other.jpg")


def test_csv_without_a_path_column_is_refused(tmp_path):
    listing = write_csv(tmp_path / "list.csv", ["id,file", "a,a.jpg"])
    with pytest.raises(ValueError, match=r"missing column\(s\) path"):
        list_images(listing)


def test_header_only_csv_lists_nothing(tmp_path):
    assert list_images(write_csv(tmp_path / "list.csv", ["id,path"])) == ([], [])


# ---------------------------------------------------------------- decoding


def test_exif_orientation_6_is_turned_upright(tmp_path):
    stored = np.zeros((24, 48, 3), np.uint8)  # stored landscape; orientation 6 = rotate 90 deg clockwise
    stored[:8, :8] = (255, 0, 0)  # red mark at the stored top-left corner
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    path = save(tmp_path / "rotated.jpg", image, exif=exif, quality=95)
    upright, factors = load_image(path)
    assert upright.shape == (48, 24, 3)
    assert upright[2:6, -6:-2, 0].min() > 200  # the mark is now top-right
    assert upright[2:6, 2:6, 0].max() < 50
    assert np.array_equal(factors, [1.0, 1.0])


def palette_image() -> Image.Image:
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    return image


@pytest.mark.parametrize(
    "name, image, pixel",
    [
        ("grey.png", Image.new("L", (32, 32), 77), (77, 77, 77)),
        ("grey_alpha.png", Image.new("LA", (32, 32), (77, 10)), (77, 77, 77)),
        ("rgba.png", Image.new("RGBA", (32, 32), (10, 20, 30, 0)), (10, 20, 30)),
        ("palette.png", palette_image(), (12, 34, 56)),
        ("bilevel.png", Image.new("1", (32, 32), 1), (255, 255, 255)),
        ("rgb.bmp", Image.new("RGB", (32, 32), (1, 2, 3)), (1, 2, 3)),
    ],
)
def test_every_mode_decodes_to_rgb_uint8(tmp_path, name, image, pixel):
    decoded, _ = load_image(save(tmp_path / name, image))
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8
    assert tuple(decoded[5, 5]) == pixel


def test_cmyk_jpeg_decodes_to_its_rgb_colours(tmp_path):
    rgb = np.zeros((40, 64, 3), np.uint8)
    rgb[:, :32] = (200, 30, 30)
    path = save(tmp_path / "cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
    assert Image.open(path).mode == "CMYK"
    decoded, _ = load_image(path)
    assert np.abs(decoded[20, 10].astype(int) - (200, 30, 30)).max() <= 6
    assert decoded[20, 50].max() <= 6


def test_16_bit_png_spans_the_full_8_bit_range(tmp_path):
    levels = np.array([0, 257, 32768, 65535], np.uint16)
    ramp = np.repeat(np.repeat(levels, 8)[None, :], 16, axis=0)  # 16 x 32, four bands
    path = save(tmp_path / "deep.png", Image.fromarray(ramp))
    assert Image.open(path).mode.startswith("I;16")
    decoded, _ = load_image(path)
    # v / 65535 * 255, rounded: 0 -> 0, 257 -> 1, 32768 -> 128, 65535 -> 255 (not all white)
    assert decoded[0, ::8, 0].tolist() == [0, 1, 128, 255]


def test_resize_keeps_the_longest_side_and_gives_per_axis_factors(tmp_path):
    path = save(tmp_path / "photo.png", noise(401, 600))
    small, factors = load_image(path, max_image_size=100)
    assert small.shape == (67, 100, 3)  # 401 / 6 = 66.8 rounds to 67
    assert factors == pytest.approx([401 / 67, 6.0])
    assert [round(n * f) for n, f in zip(small.shape, factors)] == [401, 600]


@pytest.mark.parametrize("max_image_size", [0, 600, 1000])
def test_no_resize_when_the_image_already_fits(tmp_path, max_image_size):
    image, factors = load_image(save(tmp_path / "photo.png", noise(401, 600)), max_image_size)
    assert image.shape == (401, 600, 3)
    assert np.array_equal(factors, [1.0, 1.0])


def test_tall_thin_image_loads_at_full_size_but_not_once_shrunk(tmp_path):
    path = save(tmp_path / "strip.png", noise(16, 3000))
    assert load_image(path)[0].shape == (16, 3000, 3)
    with pytest.raises(ImageError, match=r"degenerate aspect ratio 3000x16: under 16 px once resized"):
        load_image(path, max_image_size=512)


def broken_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """{name: (path, expected reason pattern)} of files no decoder can use."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    good = save(folder / "good.jpg", noise(64, 64))
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    save(folder / "tiny.png", Image.new("RGB", (1, 1)))
    save(folder / "small.png", Image.new("RGB", (MIN_SIDE - 1, 40)))
    return {
        "empty": (folder / "empty.jpg", r"empty file \(0 bytes\)"),
        "truncated": (folder / "truncated.jpg", "cannot decode image: image file is truncated"),
        "text": (folder / "text.jpg", "cannot decode image: cannot identify image file"),
        "tiny": (folder / "tiny.png", r"degenerate size 1x1 \(min side 16 px\)"),
        "small": (folder / "small.png", r"degenerate size 15x40"),
        "missing": (folder / "missing.jpg", "missing file"),
    }


@pytest.mark.parametrize("name", ["empty", "truncated", "text", "tiny", "small", "missing"])
def test_unusable_files_raise_image_error_with_a_reason(tmp_path, name):
    path, reason = broken_files(tmp_path)[name]
    with pytest.raises(ImageError, match=reason):
        load_image(path)


def test_iter_decoded_keeps_order_and_reports_errors_in_place(tmp_path):
    broken = broken_files(tmp_path / "broken")
    records = []
    for i in range(5):
        records.append(ImageRecord(f"good{i}", save(tmp_path / f"good{i}.png", noise(20 + i, 30))))
        records.append(ImageRecord(f"bad{i}", broken[list(broken)[i]][0]))
    out = list(iter_decoded(records, max_image_size=0, workers=2, lookahead=1))
    assert [r.id for r, *_ in out] == [r.id for r in records]
    for record, image, factors, error in out:
        if record.id.startswith("good"):
            assert error is None and image.shape == (20 + int(record.id[-1]), 30, 3)
        else:
            assert image is None and error
        assert np.array_equal(factors, [1.0, 1.0])


def test_iter_decoded_of_nothing_is_empty():
    assert list(iter_decoded([], max_image_size=0)) == []


def photo(height: int, width: int) -> Image.Image:
    """A smooth test photo (skimage astronaut) of any size."""
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BILINEAR)


def reference(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Full decode, EXIF transpose, then resize to ``size`` (width, height): the path without drafting."""
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB").resize(size, Image.BILINEAR), np.int16)


@pytest.mark.parametrize("orientation, upright", [(1, (1200, 900)), (6, (900, 1200))])
def test_large_jpeg_decoded_at_reduced_scale_matches_the_full_decode(tmp_path, orientation, upright):
    image = photo(900, 1200)  # stored 1200 wide x 900 high
    exif = image.getexif()
    exif[0x0112] = orientation
    path = save(tmp_path / "large.jpg", image, exif=exif, quality=95)
    small, factors = load_image(path, max_image_size=200)  # the decoder may work at 1/4 scale
    width, height = upright
    size = (round(width * 200 / 1200), round(height * 200 / 1200))
    assert small.shape == (size[1], size[0], 3)
    assert factors == pytest.approx([height / size[1], width / size[0]])
    assert np.abs(small.astype(np.int16) - reference(path, size)).mean() < 3.0


def test_jpeg_drafted_to_exactly_the_target_needs_no_resize(tmp_path):
    path = save(tmp_path / "double.jpg", photo(600, 800), quality=95)
    half, factors = load_image(path, max_image_size=400)
    assert half.shape == (300, 400, 3) and np.array_equal(factors, [2.0, 2.0])
    assert np.abs(half.astype(np.int16) - reference(path, (400, 300))).mean() < 3.0


# ---------------------------------------------------------------- grey decoding (mode="L")


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of RGB pixels [..., 3], as JPEG and PIL define it."""
    return rgb.astype(np.float64) @ [0.299, 0.587, 0.114]


@pytest.mark.parametrize("orientation, upright", [(1, (1200, 900)), (6, (900, 1200))])
@pytest.mark.parametrize("max_image_size", [0, 200])
def test_grey_jpeg_decode_is_the_luma_of_the_colour_decode(tmp_path, orientation, upright, max_image_size):
    image = photo(900, 1200)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = save(tmp_path / "large.jpg", image, exif=exif, quality=95)
    with Image.open(path) as opened:
        opened.draft("L", opened.size)
        assert opened.mode == "L"  # the decoder reads the luma plane only
    grey, grey_factors = load_image(path, max_image_size, mode="L")
    rgb, rgb_factors = load_image(path, max_image_size)
    assert grey.dtype == np.uint8 and grey.shape == rgb.shape[:2]
    assert (grey.shape[1], grey.shape[0]) == (upright if not max_image_size else tuple(
        round(side * 200 / 1200) for side in upright))
    assert np.array_equal(grey_factors, rgb_factors)
    assert np.abs(grey - luma(rgb)).mean() < 1.0  # only rounding (the colour path rounds twice)


@pytest.mark.parametrize(
    "name, image",
    [
        ("grey.png", Image.new("L", (32, 32), 77)),
        ("rgba.png", Image.new("RGBA", (32, 32), (10, 20, 30, 0))),
        ("palette.png", palette_image()),
        ("bilevel.png", Image.new("1", (32, 32), 1)),
        ("rgb.bmp", Image.new("RGB", (32, 32), (1, 2, 3))),
        ("cmyk.jpg", Image.new("RGB", (32, 32), (200, 30, 30)).convert("CMYK")),
    ],
)
def test_every_mode_decodes_to_grey_uint8(tmp_path, name, image):
    path = save(tmp_path / name, image)
    grey, _ = load_image(path, mode="L")
    rgb, _ = load_image(path)
    assert grey.shape == (32, 32) and grey.dtype == np.uint8
    assert abs(int(grey[5, 5]) - luma(rgb[5, 5])) <= 1


def test_16_bit_png_decodes_to_grey_over_the_full_range(tmp_path):
    levels = np.array([0, 257, 32768, 65535], np.uint16)
    path = save(tmp_path / "deep.png", Image.fromarray(np.repeat(np.repeat(levels, 8)[None, :], 16, axis=0)))
    grey, _ = load_image(path, mode="L")
    assert grey[0, ::8].tolist() == [0, 1, 128, 255]


def test_unknown_decode_mode_is_refused(tmp_path):
    path = save(tmp_path / "grey.png", Image.new("L", (32, 32), 77))
    with pytest.raises(ValueError, match="decode mode must be RGB or L"):
        load_image(path, mode="CMYK")


def test_iter_decoded_in_grey(tmp_path):
    records = [ImageRecord("a", save(tmp_path / "a.png", noise(40, 60))), ImageRecord("b", tmp_path / "gone.png")]
    (first, image, _, error), (second, missing, _, reason) = iter_decoded(records, 30, mode="L")
    assert (first.id, image.shape, error) == ("a", (20, 30), None)
    assert (second.id, missing, reason) == ("b", None, "missing file")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decode_bytes_is_load_image_in_memory(tmp_path, mode):
    path = save(tmp_path / "photo.jpg", noise(300, 200))
    from_file, factors_file = load_image(path, 128, mode)
    from_bytes, factors_bytes = decode_bytes(path.read_bytes(), 128, mode)
    np.testing.assert_array_equal(from_file, from_bytes)
    np.testing.assert_array_equal(factors_file, factors_bytes)


@pytest.mark.parametrize("data, reason", [
    (b"", r"empty file \(0 bytes\)"),
    (b"plain text", r"cannot identify image file \(not an image"),
])
def test_decode_bytes_reasons_name_no_path(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_bytes(data)


def test_decode_bytes_refuses_more_pixels_than_allowed_before_decoding(tmp_path):
    data = save(tmp_path / "wide.png", Image.new("L", (3000, 2000))).read_bytes()
    with pytest.raises(ImageError, match=r"image too large: 3000x2000 pixels \(limit 5 megapixels\)"):
        decode_bytes(data, max_pixels=5_000_000)
    assert decode_bytes(data, max_pixels=6_000_000)[0].shape == (2000, 3000, 3)
