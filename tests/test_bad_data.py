"""Bad files in a data folder: what the .beton writer and the imagefolder backend do with each, on tiny files
written here in their real formats, with the pixels every convertible mode must give (known answers)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import DataConfig, build_loader, write_beton, writer
from train.data.imagefolder_backend import check_image_folder
from train.write_beton import main as write_beton_main

SIZE = 16  # 16 x 16 images: two 8 x 8 JPEG blocks a side, so flat quadrants survive JPEG almost exactly
QUADRANTS = (
    (slice(0, 8), slice(0, 8)),
    (slice(0, 8), slice(8, 16)),
    (slice(8, 16), slice(0, 8)),
    (slice(8, 16), slice(8, 16)),
)


def quadrants(values: list) -> np.ndarray:
    """A SIZE x SIZE array whose four 8 x 8 quadrants hold `values` (scalars or channel tuples)."""
    depth = np.shape(values[0])
    out = np.zeros((SIZE, SIZE, *depth), dtype=np.asarray(values).dtype)
    for (rows, cols), value in zip(QUADRANTS, values, strict=True):
        out[rows, cols] = value
    return out


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def make_good_images(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    """One image per mode in `folder`: name -> (the RGB pixels it must give, tolerance in grey levels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    want: dict[str, tuple[np.ndarray, int]] = {}

    rgb = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "00_rgb.png")
    want["00_rgb.png"] = rgb, 0

    # CMYK JPEG (Pillow writes Adobe's inverted CMYK and reads it back). Oracle: the plain formula
    # R = 255 (1 - C/255)(1 - K/255), and so on; JPEG may move a flat block by a grey level or two.
    cmyk = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 128, 0, 0), (0, 0, 64, 255)]
    Image.fromarray(quadrants(cmyk).astype(np.uint8), "CMYK").save(folder / "01_cmyk.JPEG", quality=100)
    c = np.asarray(cmyk, dtype=float) / 255
    rgb_of_cmyk = [tuple(np.floor(255 * (1 - c[i, :3]) * (1 - c[i, 3]) + 0.5).astype(int)) for i in range(4)]
    assert rgb_of_cmyk == [(255, 255, 255), (0, 255, 255), (255, 127, 255), (0, 0, 0)]
    want["01_cmyk.JPEG"] = quadrants(rgb_of_cmyk).astype(np.uint8), 2

    grey_jpeg = quadrants([0, 60, 180, 255]).astype(np.uint8)
    Image.fromarray(grey_jpeg, "L").save(folder / "02_grey.JPEG", quality=100)
    want["02_grey.JPEG"] = grey_rgb(grey_jpeg), 1

    grey_png = rng.integers(0, 256, size=(SIZE, SIZE), dtype=np.uint8)
    Image.fromarray(grey_png, "L").save(folder / "03_grey.png")
    want["03_grey.png"] = grey_rgb(grey_png), 0

    # 16-bit grey PNG: 8-bit value = 16-bit value // 256 (4660 = 0x1234 -> 0x12 = 18), not Pillow's clip at 255.
    sixteen = rng.integers(0, 65536, size=(SIZE, SIZE), dtype=np.uint16)
    sixteen[0, :6] = [0, 255, 256, 4660, 32768, 65535]
    Image.fromarray(sixteen).save(folder / "04_16bit.png")
    want["04_16bit.png"] = grey_rgb(sixteen // 256), 0
    assert (sixteen[0, :6] // 256).tolist() == [0, 0, 1, 18, 128, 255]

    rgba = rng.integers(0, 256, size=(SIZE, SIZE, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # fully transparent: its colour is kept (alpha dropped, not blended)
    Image.fromarray(rgba, "RGBA").save(folder / "05_rgba.png")
    want["05_rgba.png"] = rgba[..., :3], 0

    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, size=(SIZE, SIZE), dtype=np.uint8)
    paletted = Image.fromarray(indices, "P")
    paletted.putpalette(palette.flatten().tolist())
    paletted.save(folder / "06_palette.png")
    want["06_palette.png"] = palette[indices], 0

    (folder / "README.txt").write_text("not an image, and not named like one: ignored\n")
    return want


def noisy_jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def make_unreadable(folder: Path) -> dict[str, str]:
    """Empty, non-image and truncated files named like images: name -> a word of the reason expected."""
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "text.JPEG").write_text("a text file renamed .JPEG\n")
    (folder / "truncated.JPEG").write_bytes(noisy_jpeg_bytes()[:1500])  # header intact, scan cut short
    return {"empty.JPEG": "cannot identify", "text.JPEG": "cannot identify", "truncated.JPEG": "truncated"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """clean/val/modes: every convertible mode; dirty/val/modes: the same plus three unreadable files."""
    root = tmp_path_factory.mktemp("bad")
    want = make_good_images(root / "clean" / "val" / "modes")
    (root / "clean" / "val" / "README.txt").write_text("a file beside the class folders: not a class\n")
    shutil.copytree(root / "clean", root / "dirty")
    unreadable = make_unreadable(root / "dirty" / "val" / "modes")
    return {"root": root, "want": want, "unreadable": unreadable}


def test_pillow_clips_16_bit_so_we_scale(folders: dict) -> None:
    # Why to_rgb does not simply call convert("RGB"): Pillow clips 16-bit values at 255.
    path = folders["root"] / "clean" / "val" / "modes" / "04_16bit.png"
    with Image.open(path) as image:
        assert image.mode == "I;16"
        assert np.asarray(image.convert("RGB"))[0, 3].tolist() == [255, 255, 255]  # 4660 clipped
    assert np.asarray(writer.load_rgb(str(path)))[0, 3].tolist() == [18, 18, 18]


def test_to_rgb_gives_the_known_pixels_of_every_mode(folders: dict) -> None:
    folder = folders["root"] / "clean" / "val" / "modes"
    for name, (want, tolerance) in folders["want"].items():
        got = np.asarray(writer.load_rgb(str(folder / name)))
        assert got.shape == (SIZE, SIZE, 3) and got.dtype == np.uint8, name
        assert np.abs(got.astype(int) - want).max() <= tolerance, name


def test_to_rgb_refuses_float_and_out_of_range_integer_images() -> None:
    with pytest.raises(ValueError, match="mode F"):
        writer.to_rgb(Image.fromarray(np.ones((4, 4), dtype=np.float32)))
    with pytest.raises(ValueError, match="outside the 16-bit range"):
        writer.to_rgb(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)))


def test_writer_skips_counts_and_lists_unreadable_files_and_converts_the_rest(folders: dict, tmp_path: Path) -> None:
    report = write_beton(folders["root"] / "dirty", "val", tmp_path / "val.beton", write_mode="raw", progress=False)
    assert report.num_written == len(folders["want"]) == 7  # README.txt files ignored
    skipped = {Path(s.path).name: s.reason for s in report.skipped}
    assert skipped.keys() == folders["unreadable"].keys()
    for name, word in folders["unreadable"].items():
        assert word in skipped[name], skipped[name]
    assert report.source_modes == {"RGB": 1, "CMYK": 1, "L": 2, "I;16": 1, "RGBA": 1, "P": 1}
    summary = report.summary()
    assert "3 skipped" in summary and "truncated.JPEG" in summary
    assert "1 RGBA (alpha dropped)" in summary and "1 I;16 (16-bit, scaled by 1/256)" in summary


def test_both_paths_give_the_same_known_pixels_for_every_mode(folders: dict, tmp_path: Path) -> None:
    # .beton (raw pixels, original size) read by the ffcv backend, and the imagefolder backend on the clean
    # folder: the val transform at img_size 16 and crop_pct 1 is the identity, so batches are the decoded pixels.
    write_beton(
        folders["root"] / "dirty", "val", tmp_path / "val.beton", write_mode="raw", max_resolution=None, progress=False
    )

    def val(backend: str, path: Path) -> torch.Tensor:
        config = DataConfig(backend=backend, path=path, img_size=SIZE, crop_pct=1.0, batch_size=3, num_workers=1)
        return torch.cat([images for images, _ in build_loader(config, "val")])

    from_beton = val("ffcv", tmp_path)
    with pytest.warns(UserWarning, match=r"converted to RGB: .*1 RGBA \(alpha dropped\)"):
        from_folder = val("imagefolder", folders["root"] / "clean")
    assert torch.equal(from_beton, from_folder)
    for image, (name, (want, tolerance)) in zip(from_folder, sorted(folders["want"].items()), strict=True):
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - want).max() <= tolerance, name


@pytest.mark.parametrize("split", ["train", "val"])
def test_imagefolder_backend_refuses_empty_and_non_image_files_up_front(
    folders: dict, tmp_path: Path, split: str
) -> None:
    root = tmp_path / "data"
    shutil.copytree(folders["root"] / "clean" / "val", root / split)
    (root / split / "modes" / "empty.JPEG").write_bytes(b"")
    (root / split / "modes" / "text.JPEG").write_text("hello\n")
    config = DataConfig(backend="imagefolder", path=root, img_size=SIZE, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="2 of 9 image files") as error:
        build_loader(config, split)
    assert str(root / split / "modes" / "empty.JPEG") in str(error.value)
    assert str(root / split / "modes" / "text.JPEG") in str(error.value)


def test_imagefolder_backend_names_a_truncated_file_when_it_reads_it(folders: dict, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(folders["root"] / "clean" / "val", root / "val")
    truncated = root / "val" / "modes" / "zz_truncated.JPEG"
    truncated.write_bytes(noisy_jpeg_bytes()[:1500])
    config = DataConfig(backend="imagefolder", path=root, img_size=SIZE, crop_pct=1.0, batch_size=2, num_workers=0)
    loader = build_loader(config, "val")  # the header is fine: not found up front
    with pytest.raises(OSError, match="zz_truncated.JPEG.*truncated"):
        list(loader)
    with pytest.raises(ValueError, match="zz_truncated.JPEG"):  # the full check finds it before any compute
        check_image_folder(root / "val", decode=True)
    check_image_folder(root / "val")  # header only: passes


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("content", ["nothing", "only a README.txt"])
def test_an_empty_class_folder_is_named_before_any_decoding(
    folders: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: str, content: str
) -> None:
    root = tmp_path / "data"
    shutil.copytree(folders["root"] / "clean" / "val", root / split)
    empty = root / split / "b_empty"
    empty.mkdir()
    if content != "nothing":
        (empty / "README.txt").write_text("no images here\n")

    def no_decoding(path: str) -> None:
        raise AssertionError(f"decoded {path} before refusing the empty class folder")

    monkeypatch.setattr(writer, "check_image", no_decoding)
    monkeypatch.setattr(writer, "header_check", no_decoding)
    with pytest.raises(FileNotFoundError, match=f"class folder.*{empty}"):
        write_beton(root, split, tmp_path / "out.beton", progress=False)
    config = DataConfig(backend="imagefolder", path=root, img_size=SIZE, batch_size=2, num_workers=0)
    with pytest.raises(FileNotFoundError, match=f"class folder.*{empty}"):
        build_loader(config, split)


def test_writer_names_a_class_folder_none_of_whose_images_decodes(folders: dict, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(folders["root"] / "clean" / "val", root / "val")
    (root / "val" / "b_broken").mkdir()
    (root / "val" / "b_broken" / "only.JPEG").write_bytes(b"")
    with pytest.raises(ValueError, match=f"no image in class folder.*{root / 'val' / 'b_broken'}"):
        write_beton(root, "val", tmp_path / "val.beton", progress=False)
    assert not (tmp_path / "val.beton").exists()


def test_writer_skips_a_float_image_with_its_reason(folders: dict, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(folders["root"] / "clean" / "val", root / "val")
    Image.fromarray(np.ones((SIZE, SIZE), dtype=np.float32)).save(root / "val" / "modes" / "float.tif")
    report = write_beton(root, "val", tmp_path / "val.beton", write_mode="raw", progress=False)
    assert [(Path(s.path).name, "mode F" in s.reason) for s in report.skipped] == [("float.tif", True)]
    config = DataConfig(backend="imagefolder", path=root, img_size=SIZE, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="float.tif: mode F"):
        build_loader(config, "val")


def test_write_beton_command_names_an_empty_class_folder_before_writing_any_split(
    folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "data"
    shutil.copytree(folders["root"] / "clean" / "val", root / "train")
    shutil.copytree(folders["root"] / "clean" / "val", root / "val")
    (root / "val" / "b_empty").mkdir()
    with pytest.raises(SystemExit):
        write_beton_main(["--data", str(root), "--out", str(tmp_path / "out"), "--num-workers", "1"])
    assert str(root / "val" / "b_empty") in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.beton").exists()  # train (first, fine) was not written either
