"""The store: switch, rollback, usage, GC under a cap, recovery and invariants, on a real filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.store.store import Store
from agent.wire.durable import TMP_PREFIX
from agent.wire.errors import StoreError
from agent.wire.manifest import ManifestFile
from testkit.store import adopt_files, install, manifest_for, model_files

SHARED = b"tokenizer" * 100  # 900 bytes shared by every version


def _install_versions(store: Store, versions: range, size: int = 4096) -> dict[int, Path]:
    dirs = {}
    for v in versions:
        files = model_files(v, size=size, shared=SHARED)
        dirs[v] = install(store, manifest_for("m", v, files), files)
        # Distinct, increasing assembly times whatever the clock resolution.
        os.utime(dirs[v], ns=(v * 10**9, v * 10**9))
    return dirs


def test_switch_and_rollback(tmp_path: Path) -> None:
    store = Store(tmp_path)
    d = _install_versions(store, range(1, 3))
    with pytest.raises(StoreError, match="no previous model"):
        store.rollback()
    store.switch_current(d[1])
    store.switch_current(d[2])
    assert (store.current(), store.previous()) == (d[2], d[1])
    assert store.rollback() == d[1]
    assert (store.current(), store.previous()) == (d[1], None)
    assert store.check_invariants() == []
    with pytest.raises(StoreError, match="no previous model"):
        store.rollback()


def test_disk_usage_counts_hard_links_once(tmp_path: Path) -> None:
    store = Store(tmp_path)
    d = _install_versions(store, range(1, 3), size=10_000)
    manifests = sum((d[v] / "manifest.json").stat().st_size for v in (1, 2))
    configs = sum((d[v] / "genai_config.json").stat().st_size for v in (1, 2))
    # Two weights files, one shared tokenizer, two configs, two manifests; links are not counted again.
    assert store.disk_usage_bytes() == 2 * 10_000 + len(SHARED) + configs + manifests


def test_gc_keeps_exactly_current_previous_and_work_in_progress(tmp_path: Path) -> None:
    store = Store(tmp_path)
    d = _install_versions(store, range(1, 7))  # v1..v6, oldest first
    store.switch_current(d[4])
    store.switch_current(d[5])  # current v5, previous v4
    # Work in progress: v6 is being activated, and a partial download sits in staging.
    partial = store.staging_file("deadbeef.part")
    partial.write_bytes(b"x" * 3000)
    junk = store.staging_file("old-update.part")  # staging of an abandoned update: not kept
    junk.write_bytes(b"y" * 2000)
    orphan_files = model_files(99, size=5000)
    orphan_manifest = manifest_for("m", 99, orphan_files)
    install(store, orphan_manifest, orphan_files)
    os.utime(store.model_dir("m", 99), ns=(0, 0))  # the oldest model of all
    # Drop the v99 dir but keep its blobs: blobs no model links any more.
    import shutil
    shutil.rmtree(store.model_dir("m", 99))

    def model_bytes(v: int) -> int:
        return sum(p.stat().st_size for p in d[v].iterdir())  # weights + config + manifest (+ shared)

    keep_only = (sum(model_bytes(v) - len(SHARED) for v in (4, 5, 6)) + len(SHARED) + 3000)
    # Room for exactly one more model (v3) on top of what must stay: v1 and v2 (oldest) go.
    cap = keep_only + model_bytes(3) - len(SHARED)
    report = store.gc(cap, keep={d[6], partial})
    assert report.is_within_cap and report.after_bytes == store.disk_usage_bytes() <= cap
    assert [v for v in range(1, 7) if store.has_model("m", v)] == [3, 4, 5, 6]
    assert partial.is_file() and not junk.exists()
    assert not any(store.has_blob(f.sha256) for f in orphan_manifest.files)
    assert "staging/old-update.part" in report.removed and "models/m/1" in report.removed
    assert store.check_invariants() == []

    # A cap below what must stay: nothing protected goes, and the report says the cap is not met.
    report = store.gc(1, keep={d[6], partial})
    assert not report.is_within_cap
    assert [v for v in range(1, 7) if store.has_model("m", v)] == [4, 5, 6]
    assert partial.is_file() and store.current() == d[5] and store.previous() == d[4]
    assert store.has_blob(manifest_for("m", 6, model_files(6, shared=SHARED)).files[1].sha256)
    assert store.check_invariants() == []


def test_gc_within_cap_removes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _install_versions(store, range(1, 4))
    report = store.gc(10**9)
    assert report.removed == [] and report.before_bytes == report.after_bytes
    assert all(store.has_model("m", v) for v in range(1, 4))


def test_recover_removes_leftovers_and_dangling_links(tmp_path: Path) -> None:
    store = Store(tmp_path)
    d = _install_versions(store, range(1, 2))
    store.switch_current(d[1])
    half = store.models_dir / "m" / ".tmp-2.1234"
    half.mkdir()
    (half / "model.onnx.data").write_bytes(b"half")
    os.symlink("models/m/1", store.root / ".tmp-current.999")
    (store.root / ".tmp-state.json.77").write_text("{")
    os.symlink("models/m/7", store.previous_link)  # points at nothing
    problems = store.check_invariants()
    assert any("half-written model dir models/m/.tmp-2.1234" in p for p in problems)
    assert any("leftover .tmp-current.999" in p for p in problems)
    assert any(p.startswith("previous: ") for p in problems)
    removed = store.recover()
    assert sorted(removed) == sorted([".tmp-current.999", ".tmp-state.json.77", "models/m/.tmp-2.1234", "previous"])
    assert store.check_invariants() == [] and store.current() == d[1]


def test_check_invariants_finds_corruption(tmp_path: Path) -> None:
    store = Store(tmp_path)
    d = _install_versions(store, range(1, 3))
    store.switch_current(d[2])
    # A model file that is a copy, not a link to its blob.
    weights = d[1] / "model.onnx.data"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)
    # A blob of the current model flipped in place (same size): only the hash shows it.
    cur_weights = d[2] / "model.onnx.data"
    with open(cur_weights, "r+b") as f:
        f.write(b"\x00")
    problems = store.check_invariants()
    assert any("models/m/1: model.onnx.data is not a hard link to blob" in p for p in problems), problems
    assert any(p.startswith("current: ") and "does not match its sha256" in p for p in problems), problems


def test_a_state_dir_that_cannot_be_written_is_a_clear_error() -> None:
    """As under systemd's ProtectSystem=strict without a ReadWritePaths= for a moved state_dir
    (/sys refuses a mkdir even for root, as a read-only path does)."""
    with pytest.raises(StoreError, match=r"state_dir /sys/edge-agent-test cannot be written .*ReadWritePaths="):
        Store(Path("/sys/edge-agent-test")).ensure_layout()


def test_an_assembly_that_fails_leaves_no_half_assembled_dir(tmp_path: Path) -> None:
    """A manifest from before the wire refused `a` beside `a/b` (built here without validation):
    the assembly fails with a StoreError and deletes its `.tmp-` dir at once."""
    store = Store(tmp_path)
    files = {"a": b"file a", "b": b"file b"}
    valid = manifest_for("m", 1, files)
    adopt_files(store, valid, files)
    clash = valid.model_copy(update={"files": [valid.files[0], ManifestFile(path="a/b", size=6,
                                                                            sha256=valid.files[1].sha256)]})
    with pytest.raises(StoreError, match="cannot assemble m v1"):
        store.assemble_model(clash, b"{}")
    assert [p.name for p in (tmp_path / "models" / "m").iterdir()] == []
    assert not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.rglob("*"))
    assert store.check_invariants() == []
    assert store.assemble_model(valid, valid.model_dump_json().encode()) == store.model_dir("m", 1)
