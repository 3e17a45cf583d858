"""Upload checks of the web page: type, size, pixels, batch count, zips (no Gradio, no model)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from vmad.errors import VMADError
from vmad.web.limits import UploadLimits, check_image_file, expand_batch, format_bytes
from vmad_testing import save_random_image


def test_a_good_image_passes_and_its_size_comes_back(tmp_path: Path) -> None:
    path = save_random_image(tmp_path / "part.png", (20, 30, 3))
    assert check_image_file(path, UploadLimits()) == (20, 30)


def test_a_text_file_renamed_png_is_refused_by_its_content(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(VMADError, match=r"^notes\.png: not a readable image file$"):
        check_image_file(path, UploadLimits())


def test_wrong_type_too_large_and_too_many_pixels_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "report.txt"
    text.write_text("hello")
    with pytest.raises(VMADError, match=r"report\.txt: not an image type"):
        check_image_file(text, UploadLimits())
    big = save_random_image(tmp_path / "big.png", (64, 64, 3))  # ~12 KB of noise
    with pytest.raises(VMADError, match=r"big\.png: 12(\.\d)? KB is over the 1 KB limit per image"):
        check_image_file(big, UploadLimits(max_file_bytes=1024))
    with pytest.raises(VMADError, match=r"64 x 64 = 4,096 pixels is over the limit of 4,000 pixels"):
        check_image_file(big, UploadLimits(max_image_pixels=4000))
    # the message names the file as the user called it, not the server's path
    with pytest.raises(VMADError, match=r"^upload\.png: "):
        check_image_file(big, UploadLimits(max_image_pixels=4000), name="upload.png")


def test_limits_are_validated_and_described() -> None:
    with pytest.raises(VMADError, match="max_batch_files must be >= 1"):
        UploadLimits(max_batch_files=0).validate()
    limits = UploadLimits(max_file_bytes=20 * 1024 * 1024, max_zip_bytes=5 * 1024 * 1024)
    assert limits.max_upload_bytes == 20 * 1024 * 1024
    assert "up to 20 MB" in limits.describe() and "100 images" in limits.describe()
    sizes = (format_bytes(1536 * 1024), format_bytes(900 * 1024), format_bytes(12))
    assert sizes == ("1.5 MB", "900 KB", "12 bytes")


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_a_zip_is_unpacked_safely_and_bad_members_keep_their_error(tmp_path: Path) -> None:
    png = save_random_image(tmp_path / "src.png", (8, 8, 3)).read_bytes()
    archive = _zip(tmp_path / "parts.zip", {
        "a.png": png,
        "../../escape.png": png,  # a path out of the folder: skipped like hidden files
        "/abs/escape.png": png,  # extracted under its base name into the work folder
        "sub/b.PNG": png,
        "readme.txt": b"hi",
        "fake.png": b"not an image",
        "__MACOSX/._a.png": b"resource fork",
        ".hidden.png": png,
    })
    single = save_random_image(tmp_path / "single.jpg", (8, 8, 3))
    work = tmp_path / "work"
    items = expand_batch([archive, single], UploadLimits(), work)
    by_name = {item.name: item for item in items}
    assert set(by_name) == {"parts.zip/a.png", "parts.zip//abs/escape.png", "parts.zip/sub/b.PNG",
                            "parts.zip/readme.txt", "parts.zip/fake.png", "single.jpg"}
    ok = [i for i in items if i.error is None]
    assert {i.name for i in ok} == {"parts.zip/a.png", "parts.zip//abs/escape.png", "parts.zip/sub/b.PNG",
                                    "single.jpg"}
    for item in ok:
        assert item.path is not None and item.path.is_file()
        if item.name.startswith("parts.zip/"):
            assert item.path.parent == work and item.path.read_bytes() == png
    assert not (tmp_path / "escape.png").exists() and not Path("/abs/escape.png").exists()
    assert sorted(p.name for p in work.iterdir()) == ["0000_a.png", "0001_escape.png", "0002_b.PNG",
                                                       "0004_fake.png"]  # checked after extraction
    assert "not an image type" in by_name["parts.zip/readme.txt"].error
    assert by_name["parts.zip/fake.png"].error == "parts.zip/fake.png: not a readable image file"


def test_batch_counts_and_sizes_are_limited(tmp_path: Path) -> None:
    png = save_random_image(tmp_path / "src.png", (8, 8, 3)).read_bytes()
    archive = _zip(tmp_path / "many.zip", {f"{i}.png": png for i in range(4)})
    with pytest.raises(VMADError, match=r"many\.zip: holds 4 files; the limit is 3 per batch"):
        expand_batch([archive], UploadLimits(max_batch_files=3), tmp_path / "w1")
    images = [save_random_image(tmp_path / f"{i}.png", (8, 8, 3)) for i in range(3)]
    with pytest.raises(VMADError, match=r"the batch holds 5 files; the limit is 4 per batch"):
        expand_batch([archive, *images[:1]], UploadLimits(max_batch_files=4), tmp_path / "w2")
    items = expand_batch([archive], UploadLimits(max_file_bytes=len(png) - 1), tmp_path / "w3")
    assert all("limit per image" in item.error for item in items) and not (tmp_path / "w3").exists()
    with pytest.raises(VMADError, match=r"many\.zip: .* limit per zip"):
        expand_batch([archive], UploadLimits(max_zip_bytes=100), tmp_path / "w4")
    with pytest.raises(VMADError, match="the batch is empty"):
        expand_batch([], UploadLimits(), tmp_path / "w5")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK not really")
    with pytest.raises(VMADError, match=r"broken\.zip: not a readable zip file"):
        expand_batch([broken], UploadLimits(), tmp_path / "w6")
