"""Tests for training/data.py: look-up order, the three formats, download, split, tensors."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import pickle
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training import data as D
from training.data import (CIFAR10_MEAN, CIFAR10_STD, CifarData, DataError, augment, lda_split,
                           load_cifar, normalize)

REPO = Path(__file__).resolve().parents[1]
PACK = REPO.parent / "shared" / "data" / "cifar10-jpeg.npz"
TRAIN_LABELS_SHA = "2b7cd2f24487317614016b72ffd53071c3062f592f0eb300c18a770d41ae1253"
TEST_LABELS_SHA = "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5"
NO_PACK = f"bundled pack not found at {PACK} (it should sit in ../shared/data beside the repo)"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Every test gets its own cache and ignores the user's data settings and proxies."""
    monkeypatch.delenv("FEDFINN_DATA", raising=False)
    monkeypatch.delenv("FEDFINN_CIFAR_URL", raising=False)
    monkeypatch.setenv("FEDFINN_CACHE", str(tmp_path / "cache"))
    for var in ("no_proxy", "NO_PROXY"):  # the local test server must not go through a proxy
        monkeypatch.setenv(var, "127.0.0.1,localhost")


# ----------------------------------------------------------------------------- helpers

def write_official(root: Path, dataset: str = "cifar10", seed: int = 0, n_train: int = 30,
                   n_test: int = 10) -> tuple[Path, dict]:
    """Write a tiny data set in the exact official python format; return its folder and arrays."""
    spec = D._SPECS[dataset]
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "train_y": rng.integers(0, spec.num_classes, n_train),
        "test_x": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "test_y": rng.integers(0, spec.num_classes, n_test),
    }
    folder = root / spec.folder
    folder.mkdir(parents=True)

    def dump(name, x, y):
        d = {b"batch_label": name.encode(), b"filenames": [b"img.png"] * len(x),
             b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072)}  # channel-planar rows
        if dataset == "cifar10":
            d[b"labels"] = [int(v) for v in y]
        else:
            d[b"fine_labels"] = [int(v) for v in y]
            d[b"coarse_labels"] = [int(v) // 5 for v in y]
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)

    splits = np.array_split(np.arange(n_train), len(spec.train_files))
    for name, idx in zip(spec.train_files, splits):
        dump(name, arrays["train_x"][idx], arrays["train_y"][idx])
    dump(spec.test_file, arrays["test_x"], arrays["test_y"])
    return folder, arrays


def make_archive(tmp_path: Path, dataset: str = "cifar10") -> tuple[Path, dict]:
    folder, arrays = write_official(tmp_path / "src", dataset)
    out = tmp_path / "served"
    out.mkdir()
    archive = out / D._SPECS[dataset].archive
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive, arrays


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(folder: Path):
    """Serve `folder` over HTTP on a free local port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def assert_same(loaded: CifarData, arrays: dict) -> None:
    for k, v in arrays.items():
        got = getattr(loaded, k)
        assert got.dtype == (np.uint8 if k.endswith("_x") else np.int64), k
        np.testing.assert_array_equal(got, v, err_msg=k)


# ----------------------------------------------------------------------------- bundled pack

@pytest.fixture(scope="module")
def pack_load(tmp_path_factory):
    """Decode the real pack once per session (~18 s) into a private cache."""
    if not PACK.is_file():
        pytest.skip(NO_PACK)
    cache = tmp_path_factory.mktemp("pack-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FEDFINN_DATA", raising=False)
        mp.setenv("FEDFINN_CACHE", str(cache))
        t = time.perf_counter()
        d = load_cifar("cifar10", download=False)
        seconds = time.perf_counter() - t
    print(f"\ndecoded the bundled pack in {seconds:.1f} s")
    return d, cache, seconds


def test_bundled_pack_path_matches_repo_layout():
    assert D.BUNDLED_PACK == PACK


def test_bundled_pack_contents(pack_load):
    d, _, _ = pack_load
    assert d.train_x.shape == (50_000, 32, 32, 3) and d.train_x.dtype == np.uint8
    assert d.test_x.shape == (10_000, 32, 32, 3) and d.test_x.dtype == np.uint8
    assert d.train_y.dtype == np.int64 and d.test_y.dtype == np.int64
    assert d.train_y[0] == 6 and d.test_y[0] == 3
    assert (np.bincount(d.train_y, minlength=10) == 5_000).all()
    assert (np.bincount(d.test_y, minlength=10) == 1_000).all()
    assert hashlib.sha256(d.train_y.astype(np.uint8).tobytes()).hexdigest() == TRAIN_LABELS_SHA
    assert hashlib.sha256(d.test_y.astype(np.uint8).tobytes()).hexdigest() == TEST_LABELS_SHA
    assert d.num_classes == 10 and str(PACK) in d.source and "decoded now" in d.source
    assert (d.mean, d.std) == (CIFAR10_MEAN, CIFAR10_STD)
    # The constants must describe this data (JPEG noise moves them by < 0.01).
    sample = d.train_x[::10].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(sample.mean(0), CIFAR10_MEAN, atol=0.01)
    np.testing.assert_allclose(sample.std(0), CIFAR10_STD, atol=0.01)


def test_bundled_pack_second_load_uses_npy_cache(pack_load, monkeypatch):
    first, cache, _ = pack_load
    monkeypatch.setenv("FEDFINN_CACHE", str(cache))
    t = time.perf_counter()
    d = load_cifar("cifar10", download=False)
    seconds = time.perf_counter() - t
    print(f"\ncached load took {seconds:.2f} s")
    assert seconds < 2.0
    assert "from cache" in d.source
    np.testing.assert_array_equal(d.train_x, first.train_x)
    np.testing.assert_array_equal(d.test_y, first.test_y)
    slots = [p for p in cache.iterdir()]
    assert len(slots) == 1 and ".tmp" not in slots[0].name  # written atomically, no leftovers
    assert sorted(p.name for p in slots[0].iterdir()) == sorted(f"{k}.npy" for k in D._ARRAYS)


def write_pack(path: Path, labels_train, labels_test) -> dict:
    """A tiny pack in the bundled format, of flat-colour images (JPEG keeps them almost exact)."""
    out = {}
    for split, labels in (("train", labels_train), ("test", labels_test)):
        imgs = np.repeat(np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * 20,
                         32 * 32 * 3).reshape(-1, 32, 32, 3)
        blobs = []
        for img in imgs:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            blobs.append(buf.getvalue())
        out[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        out[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        out[f"{split}_labels"] = np.asarray(labels, dtype=np.uint8)
        out[f"{split}_images"] = imgs
    np.savez(path, **{k: v for k, v in out.items() if not k.endswith("_images")})
    return out


def test_small_pack_in_data_dir_and_cache_not_stale(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    ref = write_pack(folder / D.PACK_NAME, [1, 2, 3, 4, 5, 6], [7, 8])
    d = load_cifar("cifar10", data_dir=folder, download=False)
    assert d.train_x.shape == (6, 32, 32, 3) and "decoded now" in d.source
    assert np.abs(d.train_x.astype(int) - ref["train_images"]).max() <= 2
    np.testing.assert_array_equal(d.test_y, [7, 8])
    assert "from cache" in load_cifar("cifar10", data_dir=folder, download=False).source

    slot = next((tmp_path / "cache").iterdir())
    (slot / "train_x.npy").write_bytes(b"garbage")  # a damaged cache is dropped and rebuilt
    assert "decoded now" in load_cifar("cifar10", data_dir=folder, download=False).source
    assert "from cache" in load_cifar("cifar10", data_dir=folder, download=False).source

    write_pack(folder / D.PACK_NAME, [0, 0, 0, 0, 0, 9], [7, 8])  # a changed pack
    d = load_cifar("cifar10", data_dir=folder / D.PACK_NAME, download=False)  # the file itself
    assert "decoded now" in d.source
    np.testing.assert_array_equal(d.train_y, [0, 0, 0, 0, 0, 9])
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one slot per pack version


# ----------------------------------------------------------------------------- official format

def test_official_cifar10_reader(tmp_path):
    folder, arrays = write_official(tmp_path, "cifar10")
    for where in (tmp_path, folder):  # the parent folder, or the official folder itself
        d = load_cifar("cifar10", data_dir=where, download=False)
        assert_same(d, arrays)
        assert d.num_classes == 10 and str(folder) in d.source
    # Pixel layout spelled out on the raw row: 1024 R, then 1024 G, then 1024 B values.
    with open(folder / "data_batch_1", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][0]
    assert tuple(d.train_x[0, 0, 0]) == (row[0], row[1024], row[2048])
    assert d.train_x[0, 0, 1, 0] == row[1] and d.train_x[0, 1, 0, 0] == row[32]
    assert d.train_x.flags.c_contiguous


def test_official_cifar100_reader_uses_fine_labels(tmp_path):
    folder, arrays = write_official(tmp_path, "cifar100")
    d = load_cifar("cifar100", data_dir=tmp_path, download=False)
    assert_same(d, arrays)
    assert d.num_classes == 100 and (d.mean, d.std) == (D.CIFAR100_MEAN, D.CIFAR100_STD)
    assert d.train_y.max() >= 20  # coarse labels would all be < 20


# ----------------------------------------------------------------------------- look-up order

def test_data_dir_wins_over_env(tmp_path, monkeypatch):
    _, from_arg = write_official(tmp_path / "arg", seed=1)
    _, from_env = write_official(tmp_path / "env", seed=2)
    monkeypatch.setenv("FEDFINN_DATA", str(tmp_path / "env"))
    assert_same(load_cifar("cifar10", data_dir=tmp_path / "arg", download=False), from_arg)
    assert_same(load_cifar("cifar10", download=False), from_env)
    # A data_dir without data falls through to the next place.
    assert_same(load_cifar("cifar10", data_dir=tmp_path / "nothing", download=False), from_env)


def test_nothing_found_lists_places(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFINN_DATA", str(tmp_path / "env-dir"))
    monkeypatch.setattr(D, "BUNDLED_PACK", tmp_path / "no-pack.npz")
    for dataset, names in (("cifar100", ["cifar-100-python"]),
                           ("cifar10", ["no-pack.npz", "cifar-10-batches-py"])):
        with pytest.raises(DataError) as e:
            load_cifar(dataset, data_dir=tmp_path / "arg-dir", download=False)
        msg = str(e.value)
        for part in ("arg-dir", "env-dir", str(tmp_path / "cache"), "download=False", *names):
            assert part in msg, (part, msg)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="cifar10.*cifar100"):
        load_cifar("mnist")


# ----------------------------------------------------------------------------- download

def test_download_verifies_extracts_and_reads(tmp_path, monkeypatch):
    archive, arrays = make_archive(tmp_path)
    monkeypatch.setitem(D.ARCHIVE_MD5, archive.name, md5(archive))
    cache = tmp_path / "cache"
    with serve(archive.parent) as url:
        monkeypatch.setenv("FEDFINN_CIFAR_URL", url)
        monkeypatch.setattr(D, "BUNDLED_PACK", tmp_path / "no-pack.npz")
        d = load_cifar("cifar10", download=True)
    assert_same(d, arrays)
    assert str(cache / "cifar-10-batches-py") in d.source
    assert md5(cache / archive.name) == md5(archive)
    assert sorted(p.name for p in cache.iterdir()) == sorted([archive.name, "cifar-10-batches-py"])
    # The extracted folder is found again without the server.
    assert_same(load_cifar("cifar10", download=False), arrays)


def test_download_with_wrong_md5_leaves_nothing(tmp_path, monkeypatch):
    archive, _ = make_archive(tmp_path, "cifar100")
    monkeypatch.setitem(D.ARCHIVE_MD5, archive.name, "0" * 32)
    with serve(archive.parent) as url:
        monkeypatch.setenv("FEDFINN_CIFAR_URL", url)
        with pytest.raises(DataError, match="md5"):
            load_cifar("cifar100")
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreachable_server_raises_data_error(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FEDFINN_CIFAR_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(DataError, match="fetching cifar-100-python.tar.gz failed"):
        load_cifar("cifar100")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_archive_is_rejected(tmp_path, monkeypatch, kind):
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / "cifar-100-python.tar.gz"  # as if downloaded earlier
    with tarfile.open(archive, "w:gz") as tar:
        payload = b"evil"
        info = tarfile.TarInfo({"dotdot": "../evil", "absolute": str(tmp_path / "evil"),
                                "symlink": "cifar-100-python/train"}[kind])
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, str(tmp_path / "evil")
            tar.addfile(info)
        else:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    monkeypatch.setitem(D.ARCHIVE_MD5, archive.name, md5(archive))
    with pytest.raises(DataError, match="unsafe member"):
        load_cifar("cifar100", download=False)
    assert not (tmp_path / "evil").exists()
    assert not (cache / "cifar-100-python").exists()


# ----------------------------------------------------------------------------- lda_split

LABELS = np.repeat(np.arange(10), 5_000)


def largest_shares(split):
    return np.array([np.bincount(LABELS[i], minlength=10).max() / len(i) for i in split])


def test_lda_split_seeded_disjoint_equal():
    a = lda_split(LABELS, 10, 0.5, seed=1)
    b = lda_split(LABELS, 10, 0.5, seed=1)
    c = lda_split(LABELS, 10, 0.5, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(x.dtype == np.int64 for x in a)
    assert {len(x) for x in a} == {5_000}
    joined = np.concatenate(a)
    assert len(np.unique(joined)) == len(joined)  # pairwise disjoint
    uneven = lda_split(LABELS[:997], 7, 1.0, seed=0)  # floor(997 / 7) = 142 each
    assert {len(x) for x in uneven} == {142}
    assert len(np.unique(np.concatenate(uneven))) == 7 * 142


def test_lda_split_alpha_controls_skew():
    assert largest_shares(lda_split(LABELS, 10, 100.0, seed=0)).max() < 0.2
    assert np.median(largest_shares(lda_split(LABELS, 20, 0.1, seed=0))) > 0.5


def test_lda_split_is_fast():
    t = time.perf_counter()
    lda_split(LABELS, 10, 0.1, seed=0)
    lda_split(LABELS, 10, 100.0, seed=0)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("num_clients, alpha", [(10, 0.0), (10, -1.0), (10, float("nan")),
                                                 (0, 0.5), (2.5, 0.5), (50_001, 0.5)])
def test_lda_split_rejects_bad_args(num_clients, alpha):
    with pytest.raises(ValueError):
        lda_split(LABELS, num_clients, alpha, seed=0)


# ----------------------------------------------------------------------------- normalize / augment

def test_normalize():
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    out = normalize(x, CIFAR10_MEAN, CIFAR10_STD)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    expected = (x.transpose(0, 3, 1, 2) / 255.0 - np.array(CIFAR10_MEAN)[:, None, None]) \
        / np.array(CIFAR10_STD)[:, None, None]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    torch.testing.assert_close(normalize(torch.from_numpy(x), CIFAR10_MEAN, CIFAR10_STD), out)
    torch.testing.assert_close(normalize(x[:, :, ::-1], CIFAR10_MEAN, CIFAR10_STD), out.flip(-1))
    mean_img = np.broadcast_to(np.round(np.array(CIFAR10_MEAN) * 255), (1, 32, 32, 3)).astype(np.uint8)
    assert normalize(mean_img, CIFAR10_MEAN, CIFAR10_STD).abs().max() < 0.01
    with pytest.raises(ValueError):
        normalize(x.astype(np.float32), CIFAR10_MEAN, CIFAR10_STD)  # already scaled
    with pytest.raises(ValueError):
        normalize(x.transpose(0, 3, 1, 2), CIFAR10_MEAN, CIFAR10_STD)  # NCHW by mistake


def test_augment_deterministic_given_seed():
    x = torch.randn(32, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.dtype == torch.float32
    torch.testing.assert_close(a, augment(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(6)))


def test_augment_flips_an_asymmetric_image():
    x = torch.zeros(64, 3, 32, 32)
    x[..., :8] = 1.0  # a bar on the left edge only
    out = augment(x, torch.Generator().manual_seed(0), pad=0)  # flips alone
    flipped = [torch.equal(o, x[0].flip(-1)) for o in out]
    kept = [torch.equal(o, x[0]) for o in out]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is one or the other
    assert 16 < sum(flipped) < 48


def crop(padded_img, oy, ox, flip):
    c = padded_img[:, oy:oy + 32, ox:ox + 32]
    return c.flip(-1) if flip else c


def test_augment_is_a_shifted_crop_with_zeros_coming_in():
    x = torch.rand(64, 3, 32, 32) + 1.0  # no zeros, so every zero comes from the padding
    out = augment(x, torch.Generator().manual_seed(0))
    padded = F.pad(x, (4, 4, 4, 4))
    found = []
    for i in range(len(x)):
        hits = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (False, True)
                if torch.equal(out[i], crop(padded[i], oy, ox, f))]
        assert len(hits) == 1, f"image {i} is not a single crop/flip of its input"
        oy, ox, _ = hits[0]
        zero_cols = (out[i] == 0).all(dim=(0, 1)).sum().item()
        zero_rows = (out[i] == 0).all(dim=(0, 2)).sum().item()
        assert (zero_rows, zero_cols) == (abs(oy - 4), abs(ox - 4))
        found.append(hits[0])
    assert {f for *_, f in found} == {False, True}
    assert len({(oy, ox) for oy, ox, _ in found}) > 20  # offsets really vary


def test_augment_is_fast():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, g = torch.randn(20, 3, 32, 32), torch.Generator().manual_seed(0)
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(100):
                augment(x, g)
            best = max(best, 100 * 20 / (time.perf_counter() - t))
    finally:
        torch.set_num_threads(threads)
    assert best >= 20_000, f"{best:.0f} images/s"
