"""CIFAR-10/100 data: loading, Dirichlet (LDA) client split, normalisation, augmentation.

Look-up order of ``load_cifar(dataset, data_dir, download)`` — the first hit wins:

1. ``data_dir`` (the run config's data folder), if given. It may hold
   ``cifar-10-batches-py/`` or ``cifar-100-python/`` (the official python
   folders; CIFAR-100 uses the FINE labels) or ``cifar10-jpeg.npz`` (the
   bundled pack, CIFAR-10 only), or be one of those itself. When a folder holds
   both CIFAR-10 forms, the official one wins because it is lossless.
2. The environment variable ``FEDFINN_DATA`` (same rules as ``data_dir``).
3. The bundled pack ``../shared/data/cifar10-jpeg.npz`` beside the repository
   root (CIFAR-10 only; JPEG re-encoded, see that folder's README).
4. The cache folder ``$FEDFINN_CACHE`` or ``~/.cache/fedfinn``: an official
   folder extracted there earlier, or an official archive downloaded there
   earlier (md5-checked, then extracted).
5. Download of the official archive into the cache folder, only if
   ``download=True``. The base URL can be replaced with ``$FEDFINN_CIFAR_URL``
   (the archive's file name is appended to it); the expected md5 sums live in
   ``ARCHIVE_MD5`` so tests can serve and check a small archive of their own.

If all of these fail, ``DataError`` lists every place looked at.

The bundled pack takes 6-18 s to decode (machine-dependent), so its decoded arrays are cached as
``.npy`` files in the cache folder, in a sub-folder named after a hash of the
pack's size, offsets and labels (a changed pack is never served stale).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

# Per-channel statistics of the training images on a 0..1 scale. The std is the
# std over all pixels (the widely copied 0.2023... is not).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

PACK_NAME = "cifar10-jpeg.npz"
# The repository root is the parent of training/; the shared data sits beside it.
BUNDLED_PACK = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / PACK_NAME
DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/"
# Expected md5 of each official archive. A module-level dict so tests can
# replace an entry with the md5 of a small archive they serve themselves.
ARCHIVE_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}


class DataError(RuntimeError):
    """The data set could not be found, fetched or read; the message says what to do."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing/hashing big arrays makes no sense
class CifarData:
    train_x: np.ndarray  # uint8 (N, 32, 32, 3), NHWC
    train_y: np.ndarray  # int64 (N,)
    test_x: np.ndarray  # uint8 (M, 32, 32, 3)
    test_y: np.ndarray  # int64 (M,)
    num_classes: int
    source: str  # where the arrays came from, for logs and run records
    mean: tuple
    std: tuple


@dataclass(frozen=True)
class _Spec:
    name: str
    num_classes: int
    archive: str  # official archive file name
    folder: str  # folder the archive extracts to
    train_files: tuple
    test_file: str
    label_key: bytes
    mean: tuple
    std: tuple


_SPECS = {
    "cifar10": _Spec("CIFAR-10", 10, "cifar-10-python.tar.gz", "cifar-10-batches-py",
                     tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels",
                     CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": _Spec("CIFAR-100", 100, "cifar-100-python.tar.gz", "cifar-100-python",
                      ("train",), "test", b"fine_labels", CIFAR100_MEAN, CIFAR100_STD),
}


def dataset_stats(dataset: str) -> tuple[tuple, tuple]:
    """(mean, std) per channel on a 0..1 scale of ``cifar10`` or ``cifar100`` (what ``normalize`` uses)."""
    if dataset not in _SPECS:
        raise ValueError(f"dataset must be one of {sorted(_SPECS)}, got {dataset!r}")
    return _SPECS[dataset].mean, _SPECS[dataset].std


# ----------------------------------------------------------------------------- look-up

def load_cifar(dataset: str = "cifar10", data_dir: str | os.PathLike | None = None,
               download: bool = True) -> CifarData:
    """Load CIFAR-10 or CIFAR-100 following the look-up order in the module docstring."""
    if dataset not in _SPECS:
        raise ValueError(f"dataset must be one of {sorted(_SPECS)}, got {dataset!r}")
    spec = _SPECS[dataset]
    cache = cache_dir()
    looked = []

    for label, folder in (("data_dir", data_dir), ("$FEDFINN_DATA", os.environ.get("FEDFINN_DATA"))):
        if folder:  # an empty env var counts as unset
            found = _find_in(Path(folder).expanduser(), spec)
            if found is not None:
                return _load_found(found, spec, cache)
            looked.append(f"{label} = {folder}: {_wanted(spec)} not there")

    if dataset == "cifar10":
        if BUNDLED_PACK.is_file():
            return _load_pack(BUNDLED_PACK, cache)
        looked.append(f"bundled pack {BUNDLED_PACK}: missing")

    if _is_official(cache / spec.folder, spec):
        return _read_official(cache / spec.folder, spec)
    archive = cache / spec.archive
    looked.append(f"cache folder {cache}: no complete {spec.folder}/")
    try:
        if archive.is_file():  # downloaded earlier but not (fully) extracted
            _check_md5(archive, ARCHIVE_MD5[spec.archive])
            return _read_official(_extract(archive, cache, spec), spec)
        if download:
            _download(_archive_url(spec), archive, ARCHIVE_MD5[spec.archive])
            return _read_official(_extract(archive, cache, spec), spec)
    except (DataError, OSError, ValueError, tarfile.TarError) as e:  # ValueError: bad URL
        raise DataError(_not_found(spec, looked, f"fetching {archive.name} failed: {e}")) from e
    raise DataError(_not_found(spec, looked, "download=False, so nothing was downloaded"))


def cache_dir() -> Path:
    """The cache folder: $FEDFINN_CACHE or ~/.cache/fedfinn (not created here)."""
    return Path(os.environ.get("FEDFINN_CACHE") or Path.home() / ".cache" / "fedfinn").expanduser()


def _wanted(spec: _Spec) -> str:
    extra = f" or {PACK_NAME}" if spec.name == "CIFAR-10" else ""
    return f"{spec.folder}/{extra}"


def _not_found(spec: _Spec, looked: list, why: str) -> str:
    places = "\n".join(f"  - {p}" for p in looked)
    return (f"{spec.name} not found ({why}). Looked at:\n{places}\n"
            f"Fix: pass data_dir (or set $FEDFINN_DATA) to a folder holding {_wanted(spec)}, "
            f"or put the official {spec.archive} into {cache_dir()}, "
            f"or call with download=True on a machine that can reach {_archive_url(spec)}.")


def _find_in(path: Path, spec: _Spec) -> Path | None:
    """The data inside `path` (or `path` itself), official folder first because it is lossless."""
    for cand in (path, path / spec.folder):
        if cand.name == spec.folder and _is_official(cand, spec):
            return cand
    if spec.name == "CIFAR-10":
        for cand in (path, path / PACK_NAME):
            if cand.name.endswith(".npz") and cand.is_file():
                return cand
    return None


def _load_found(path: Path, spec: _Spec, cache: Path) -> CifarData:
    return _load_pack(path, cache) if path.suffix == ".npz" else _read_official(path, spec)


# ----------------------------------------------------------------------------- official format

def _is_official(folder: Path, spec: _Spec) -> bool:
    return all((folder / f).is_file() for f in (*spec.train_files, spec.test_file))


def _read_batch(path: Path, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    # Pickle is unavoidable: it is the official CIFAR python format. We only ever
    # unpickle the named files inside the official folder names (cifar-10-batches-py,
    # cifar-100-python), i.e. data the user chose or an md5-verified download.
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    # Rows are channel-planar (1024 R, 1024 G, 1024 B), hence NCHW -> NHWC.
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.asarray(d[spec.label_key], dtype=np.int64)
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels; the file is damaged")
    return x, y


def _read_official(folder: Path, spec: _Spec) -> CifarData:
    try:
        train = [_read_batch(folder / f, spec) for f in spec.train_files]
        test_x, test_y = _read_batch(folder / spec.test_file, spec)
    except (KeyError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"{folder} is not a readable official {spec.name} folder ({e!r}); "
                        f"delete it and fetch it again") from e
    return CifarData(
        train_x=np.ascontiguousarray(np.concatenate([x for x, _ in train])),
        train_y=np.concatenate([y for _, y in train]),
        test_x=np.ascontiguousarray(test_x), test_y=test_y,
        num_classes=spec.num_classes, source=f"official {spec.name} python folder {folder}",
        mean=spec.mean, std=spec.std)


# ----------------------------------------------------------------------------- bundled JPEG pack

_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def _load_pack(npz: Path, cache: Path) -> CifarData:
    """Decode the JPEG pack, or load its decoded arrays from the .npy cache."""
    with np.load(npz, allow_pickle=False) as pack:
        keys = {f"{s}_{k}" for s in ("train", "test") for k in ("jpeg", "offsets", "labels")}
        if not keys <= set(pack.files):
            raise DataError(f"{npz} is not a CIFAR-10 JPEG pack: it lacks {sorted(keys - set(pack.files))}")
        labels = {s: pack[f"{s}_labels"].astype(np.int64) for s in ("train", "test")}
        offsets = {s: pack[f"{s}_offsets"] for s in ("train", "test")}
        # Key on content that changes whenever the pack does (not on mtime, so a
        # copied pack still hits the cache); reading these ~1 MB is quick.
        h = hashlib.sha256(str(npz.stat().st_size).encode())
        for s in ("train", "test"):
            h.update(offsets[s].tobytes())
            h.update(labels[s].tobytes())
        slot = cache / f"cifar10-jpeg-{h.hexdigest()[:16]}"
        arrays = _load_cached(slot, labels)
        source = f"bundled pack {npz} (decoded arrays from cache {slot})"
        if arrays is None:
            arrays = {}
            for s in ("train", "test"):
                arrays[f"{s}_x"] = _decode(pack[f"{s}_jpeg"], offsets[s], f"decoding {s} JPEGs")
                arrays[f"{s}_y"] = labels[s]
            _save_cached(slot, arrays)
            source = f"bundled pack {npz} (decoded now, cached in {slot})"
    return CifarData(**arrays, num_classes=10, source=source, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def _decode(jpeg: np.ndarray, offsets: np.ndarray, desc: str) -> np.ndarray:
    out = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    view = memoryview(jpeg)
    for i in tqdm(range(len(out)), desc=desc, unit="img", mininterval=1.0):
        img = np.asarray(Image.open(io.BytesIO(view[offsets[i]:offsets[i + 1]])).convert("RGB"))
        if img.shape != (32, 32, 3):
            raise DataError(f"image {i} of the pack decodes to {img.shape}, not (32, 32, 3)")
        out[i] = img
    return out


def _load_cached(slot: Path, labels: dict) -> dict | None:
    """Cached arrays if present and consistent with the pack's labels, else None."""
    if not slot.is_dir():
        return None
    try:
        arrays = {k: np.load(slot / f"{k}.npy", allow_pickle=False) for k in _ARRAYS}
        for s in ("train", "test"):
            x, y = arrays[f"{s}_x"], arrays[f"{s}_y"]
            if x.shape != (len(labels[s]), 32, 32, 3) or x.dtype != np.uint8 \
                    or not np.array_equal(y, labels[s]):
                raise ValueError("arrays do not match the pack")
        return arrays
    except (OSError, ValueError) as e:
        # Slots are renamed into place whole, so a bad one is damaged, not half-written:
        # drop it so that the fresh decode can take its place.
        log.warning("dropping bad cache %s (%s); decoding again", slot, e)
        shutil.rmtree(slot, ignore_errors=True)
        return None


def _save_cached(slot: Path, arrays: dict) -> None:
    # Write into a temp folder and rename it into place, so a crash or a
    # concurrent run never leaves (or reads) a half-written cache.
    try:
        slot.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=slot.name + ".tmp-", dir=slot.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared $FEDFINN_CACHE should stay readable
        for k, a in arrays.items():
            np.save(tmp / f"{k}.npy", a)
        try:
            tmp.rename(slot)
        except OSError:  # another process got there first (or a stale slot): keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a read-only cache only costs time, not correctness
        log.warning("could not cache decoded arrays in %s: %s", slot, e)


# ----------------------------------------------------------------------------- download

def _archive_url(spec: _Spec) -> str:
    base = os.environ.get("FEDFINN_CIFAR_URL") or DEFAULT_URL
    return base.rstrip("/") + "/" + spec.archive


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _check_md5(path: Path, expected: str) -> None:
    got = _md5(path)
    if got != expected:
        path.unlink(missing_ok=True)  # never keep (or later trust) a bad archive
        raise DataError(f"md5 of {path.name} is {got}, expected {expected}; the file was deleted")


def _download(url: str, dest: Path, expected_md5: str) -> None:
    """Stream `url` to a temp file beside `dest`; rename it to `dest` only once complete and verified."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        _check_md5(tmp, expected_md5)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful rename


def _extract(archive: Path, cache: Path, spec: _Spec) -> Path:
    """Safely extract `archive` into a temp folder, then move its official folder into `cache`."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:  # check everything before writing anything
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                    raise DataError(f"{archive} has an unsafe member {m.name!r}; refusing to extract it")
            tar.extractall(tmp, members=members, filter="data")  # the stdlib's own guard, too
        if not _is_official(tmp / spec.folder, spec):
            raise DataError(f"{archive} does not contain a complete {spec.folder}/ folder")
        target = cache / spec.folder
        if target.exists():  # an incomplete earlier extraction
            shutil.rmtree(target)
        os.replace(tmp / spec.folder, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- client split

def lda_split(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Seeded Dirichlet (LDA) split into equal-sized, disjoint clients.

    Every client gets floor(N / num_clients) samples. Its class mix is drawn from
    Dir(alpha * 1); its samples are drawn class by class from that mix, without
    replacement from what the earlier clients left. When a class runs out, the
    client's mix is renormalised over the classes that still have samples (uniform
    over them if the mix has no mass left there). Returns sorted int64 index arrays.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if not (float(num_clients).is_integer() and 1 <= num_clients <= len(labels)):
        raise ValueError(f"num_clients must be between 1 and len(labels)={len(labels)}, got {num_clients}")
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    # One shuffled pool per class; taking from its front = sampling without replacement.
    pools = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(len(classes))]
    taken = np.zeros(len(classes), dtype=np.int64)
    left = np.array([len(p) for p in pools], dtype=np.int64)
    per_client = len(labels) // int(num_clients)

    clients = []
    for _ in range(int(num_clients)):
        mix = rng.dirichlet(np.full(len(classes), float(alpha)))
        counts = np.zeros(len(classes), dtype=np.int64)
        need = per_client
        # Drawing `need` labels at once and capping each class at what is left is the
        # same as drawing one by one and renormalising whenever a class runs out: the
        # surplus is simply redrawn from the classes that still have samples.
        while need > 0:
            avail = left > 0
            p = np.where(avail, mix, 0.0)
            p = p / p.sum() if p.sum() > 0 else avail / avail.sum()
            got = np.minimum(rng.multinomial(need, p), left)
            counts += got
            left -= got
            need -= int(got.sum())
        parts = [pools[c][taken[c]:taken[c] + k] for c, k in enumerate(counts) if k]
        taken += counts
        clients.append(np.sort(np.concatenate(parts)).astype(np.int64))
    return clients


# ----------------------------------------------------------------------------- tensors

def normalize(x_uint8_nhwc: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 NHWC images -> float32 NCHW tensor, scaled to 0..1 then standardised per channel."""
    x = x_uint8_nhwc
    if isinstance(x, np.ndarray):  # torch cannot wrap negative strides (e.g. x[:, ::-1])
        x = np.ascontiguousarray(x)
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        # Guard against normalising twice or passing NCHW by mistake.
        raise ValueError(f"expected uint8 NHWC images with 3 channels, got {x.dtype} {tuple(x.shape)}")
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = x.permute(0, 3, 1, 2).to(torch.float32).contiguous()
    return x.div_(255.0).sub_(m).div_(s)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding `pad`, per-image offsets) and random horizontal flip, batched.

    Works on a normalised float NCHW batch, so the zeros that come in are the mean colour.
    One gather does both: per image, the source pixel of output (i, j) in the padded image
    is (oy + i, ox + j), or (oy + i, ox + w - 1 - j) when the image is flipped.
    """
    n, c, h, w = x.shape
    dev = generator.device  # draw on the generator's device, then move to the batch
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev).to(x.device)
    flip = (torch.rand(n, generator=generator, device=dev) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + ox[:, None]  # (n, w)
    rows = torch.arange(h, device=x.device) + oy[:, None]  # (n, h)
    # Flat index into each padded channel plane; gather on a flat view is ~4x faster
    # than 4-D advanced indexing.
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w)
    return padded.view(n, c, -1).gather(2, flat.expand(n, c, h * w)).view(n, c, h, w)
