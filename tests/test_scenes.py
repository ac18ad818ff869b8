"""models.scenes: object photos pasted onto photos (the EfficientNet heal benchmark's data), and unpacking the
Debian package they come from. Synthetic images and a synthetic .deb: no download."""

import io
import lzma
import pathlib
import tarfile

import numpy as np
import pytest

from modelsurgeon.errors import UserError
from modelsurgeon.models import scenes


def _deb(files: dict[str, bytes]) -> bytes:
    """A Debian package (ar archive) whose data.tar.xz holds `files`."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")),
               ("data.tar.xz", lzma.compress(tar_bytes.getvalue()))]
    out = b"!<arch>\n"
    for name, payload in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode() + payload
        out += b"\n" if len(payload) % 2 else b""
    return out


def test_unpack_keeps_only_the_photo_stamps(tmp_path):
    root = scenes.STAMPS_ROOT
    deb = tmp_path / f"{scenes.STAMPS_PACKAGE}_1_all.deb"
    deb.write_bytes(_deb({root + "animals/birds/gull.png": b"gull", root + "animals/birds/gull.txt": b"text",
                          root + "animals/birds/cartoon/tweety.png": b"drawn", root + "symbols/math/plus.png": b"+",
                          root + "seasonal/christmas/tree.png": b"tree", root + "food/fruit/fig.png": b"fig",
                          "usr/share/doc/readme.png": b"doc"}))
    target = tmp_path / "objects"
    scenes._unpack_stamps(deb, target)
    got = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert got == ["animals/birds/gull.png", "food/fruit/fig.png"]
    assert (target / "food/fruit/fig.png").read_bytes() == b"fig"
    assert not (tmp_path / "objects.tmp").exists()


def test_a_broken_package_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSURGEON_CACHE", str(tmp_path))
    folder = tmp_path / "data" / "scenes"
    folder.mkdir(parents=True)
    (folder / f"{scenes.STAMPS_PACKAGE}_1_all.deb").write_bytes(b"not a package")
    scenes.scene_objects.cache_clear()
    with pytest.raises(UserError, match="not a usable .*delete it and run again"):
        scenes.scene_objects()
    assert not (folder / "objects").exists()


def _stamp(tmp_path: pathlib.Path, color=(255, 0, 0), name="red") -> pathlib.Path:
    """A 40x20 opaque rectangle of `color` in a 60x60 transparent PNG."""
    from PIL import Image

    rgba = np.zeros((60, 60, 4), np.uint8)
    rgba[20:40, 10:50] = (*color, 255)
    path = tmp_path / f"{name}.png"
    Image.fromarray(rgba).save(path)
    return path


def test_scenes_paste_the_object_over_the_background(tmp_path):
    background = np.zeros((300, 400, 3), np.uint8)
    background[..., 1] = 255  # pure green
    x = scenes.scenes([_stamp(tmp_path)], [background], 6, seed=0)
    assert x.shape == (6, 3, scenes.CROP, scenes.CROP) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    red = (x[:, 0] > 0.9) & (x[:, 1] < 0.1)
    green = (x[:, 1] > 0.9) & (x[:, 0] < 0.1)
    for i in range(6):
        # the opaque box (2:1, cropped to its bounding box) fills 40-90% of the crop's side; the rest is background
        rows, cols = np.nonzero(red[i])
        width = cols.max() - cols.min() + 1
        assert 0.38 * scenes.CROP <= width <= 0.92 * scenes.CROP
        assert abs(width / (rows.max() - rows.min() + 1) - 2.0) < 0.2
        assert red[i].sum() + green[i].sum() > 0.97 * scenes.CROP ** 2
    np.testing.assert_array_equal(x, scenes.scenes([_stamp(tmp_path)], [background], 6, seed=0))  # deterministic
    assert not np.array_equal(x, scenes.scenes([_stamp(tmp_path)], [background], 6, seed=1))


def test_scenes_put_the_objects_in_turn_on_top_of_up_to_max_objects(tmp_path):
    red, blue = _stamp(tmp_path), _stamp(tmp_path, (0, 0, 255), "blue")
    x = scenes.scenes([red, blue], [np.zeros((240, 240, 3), np.uint8)], 40, seed=0, max_objects=3)
    has_red, has_blue = ((x[:, 0] > 0.9).any((1, 2)), (x[:, 2] > 0.9).any((1, 2)))
    assert has_red[0::2].all() and has_blue[1::2].all()  # object i % 2 is always there (on top)
    assert 0 < (has_red & has_blue).sum() < 40  # sometimes another under it, sometimes none
    single = scenes.scenes([red, blue], [np.zeros((240, 240, 3), np.uint8)], 40, seed=0)
    assert not ((single[:, 0] > 0.9).any((1, 2)) & (single[:, 2] > 0.9).any((1, 2))).any()


def test_scenes_need_objects_and_backgrounds():
    with pytest.raises(UserError, match="at least one object and one background"):
        scenes.scenes([], [np.zeros((8, 8, 3), np.uint8)], 1)
