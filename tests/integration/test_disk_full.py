"""A full disk, for real (a small tmpfs filled to its last page): every write of ours fails
cleanly, keeps what was there, and leaves nothing behind that would hold the space a retry needs."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
from pathlib import Path

import pytest

from agent.link.outbox import Outbox
from agent.store.store import Store
from agent.update.download import Downloader, ExpectedFile
from agent.update.journal import Journal
from agent.update.statemachine import Phase
from agent.update.updater import TEST_STOP_AT_ENV, TEST_STOP_SIGNAL_ENV
from agent.wire.durable import TMP_PREFIX, atomic_write_bytes
from agent.wire.errors import StoreError
from agent.wire.mqtt import DeviceEvent
from testkit.agents import Agent, Release
from testkit.artifacts import serving
from testkit.brokers import Mosquitto, Recorder
from testkit.disks import fill, small_tmpfs
from testkit.store import adopt_files, manifest_for, model_files


def test_an_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", 256 * 1024) as disk:
        target = disk / "journal.json"
        atomic_write_bytes(target, b'{"old": true}')
        fill(disk)
        with pytest.raises(OSError) as raised:
            atomic_write_bytes(target, b'{"new": true}' * 1000)
        assert raised.value.errno == errno.ENOSPC
        assert target.read_bytes() == b'{"old": true}'
        assert [p.name for p in disk.iterdir() if p.name.startswith(TMP_PREFIX)] == []
        # The space is really free again once the filler goes: the same write then lands.
        (disk / "filler").unlink()
        atomic_write_bytes(target, b'{"new": true}')
        assert target.read_bytes() == b'{"new": true}'


def test_a_model_assembly_on_a_full_disk_fails_clearly_and_leaves_no_half_assembled_dir(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", 512 * 1024) as disk:
        store = Store(disk / "store")
        files = model_files(1, size=64 * 1024)
        manifest = manifest_for("m", 1, files)
        adopt_files(store, manifest, files)  # the download is done; only the assembly is left
        filler = fill(disk)
        with pytest.raises(StoreError, match="cannot assemble m v1.*check free disk space"):
            store.assemble_model(manifest, manifest.model_dump_json().encode())
        assert not any(p.name.startswith(TMP_PREFIX) for p in (disk / "store").rglob("*"))
        assert store.check_invariants() == []
        filler.unlink()
        model = store.assemble_model(manifest, manifest.model_dump_json().encode())
        assert store.check_model_dir(model, verify_hashes=True) == []


def test_the_outbox_on_a_full_disk_refuses_appends_clearly_and_reuses_no_seq(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", 256 * 1024) as disk:
        outbox = Outbox(disk / "outbox")
        for _ in range(2):
            outbox.append(_event)
        filler = fill(disk)

        with pytest.raises(StoreError, match="check free disk space"):
            outbox.append(_event)
        # The broker's PUBACK for seq 1 arrives (paho's thread): saving next_seq fails, which
        # must neither raise into paho nor drop a file whose seq could then be issued again.
        outbox.remove(1)
        assert [p.name for p in (disk / "outbox" / "events").iterdir() if p.name.startswith(TMP_PREFIX)] == []

        filler.unlink()
        reopened = Outbox(disk / "outbox")
        assert [e.seq for e in reopened.pending()] == [1, 2]  # seq 1 is delivered again: at least once
        assert reopened.append(_event).seq == 3


def _event(seq: int) -> DeviceEvent:
    return DeviceEvent(device_id="box-1", seq=seq, kind="info")


def test_a_download_that_fills_the_disk_stops_and_gives_the_space_back(tmp_path: Path) -> None:
    """The free-space check before the first byte passed, then something else took the room."""
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(1024 * 1024)
    (www / "blob.bin").write_bytes(data)
    with small_tmpfs(tmp_path / "disk", 512 * 1024) as disk, serving(www) as (url, _):
        store = Store(disk / "state")
        store.ensure_layout()
        expected = ExpectedFile(url=f"{url}/blob.bin", length=len(data),
                                hashes={"sha256": hashlib.sha256(data).hexdigest()})
        with pytest.raises(StoreError, match="disk full while downloading .* free space under"):
            Downloader().fetch_blob(expected, store)
        assert list(store.staging_dir.iterdir()) == []
        assert not store.has_blob(expected.sha256)
        # The space is back: the agent's own records can be written again.
        atomic_write_bytes(disk / "state" / "state.json", b"{}" * 10_000)


def test_a_daemon_whose_disk_fills_up_keeps_serving_says_why_and_updates_once_there_is_room(
        tiny_raw: Path, release: Release, tmp_path: Path, mosquitto: Mosquitto) -> None:
    release.publish(tiny_raw, "tiny", 1)
    with small_tmpfs(tmp_path / "a" / "state", 48 * 1024 * 1024) as state:
        agent = Agent(tmp_path / "a", release, broker_url=mosquitto.url)
        recorder = Recorder(mosquitto.port, ["edgefleet/test/devices/box-1/#"])
        try:
            agent.start()
            agent.wait_serving("tiny", 1)
            log = tmp_path / "a" / "agent.log"
            # Probation ends by deleting its record, which would free a page of the full disk.
            agent.wait(lambda: "event=probation_passed" in log.read_text(), 60, "v1's probation to end")
            filler = fill(state)
            release.publish(tiny_raw, "tiny", 2, extra_files={"notes.bin": os.urandom(256 * 1024)})
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait(lambda: "event=update_pass_failed" in log.read_text(), 60, "the check to fail on the full disk")
            failure = next(line for line in log.read_text().splitlines() if "event=update_pass_failed" in line)
            assert "No space left on device" in failure and "check free disk space" in failure, failure
            assert "Traceback" not in log.read_text()  # a foreseen failure: one line that says what to do
            assert agent.chat().status_code == 200 and agent.health() == {"status": "ok", "model": "tiny", "version": 1}
            assert agent.phase() is Phase.ACTIVE
            assert [p.name for p in state.rglob(f"{TMP_PREFIX}*")] == []

            filler.unlink()  # the operator frees space: the next check installs v2, nothing was lost
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait_serving("tiny", 2)
            assert agent.proc.poll() is None
            # MQTT stayed up throughout: events flow again once the outbox can store them, and no
            # status ever said offline (the will is only sent when the connection drops).
            recorder.wait_for(lambda ms: any(b'"to_state":"ACTIVE"' in m.payload and b'"version":2' in m.payload
                                             for m in ms), 30, "v2's ACTIVE event")
            statuses = recorder.payloads("/status")
            assert statuses and all(status["online"] for status in statuses), statuses
        finally:
            agent.stop()
            recorder.close()


@pytest.mark.parametrize("phase", [Phase.INSTALLING, Phase.ACTIVATING], ids=lambda p: p.value)
def test_a_disk_that_fills_in_the_middle_of_an_update_is_resumed_once_there_is_room(
        tiny_raw: Path, release: Release, tmp_path: Path, phase: Phase) -> None:
    """The daemon freezes itself right after journaling `phase` (the test stop hook), the disk is
    filled, and it goes on: INSTALLING's assembly or ACTIVATING's probation record hits the full
    disk, then the journal cannot record the rollback. v1 keeps serving; once space is freed the
    next check resumes the update from the journal (it used to coalesce every check forever) and
    a good release is never refused for a full disk."""
    import psutil

    release.publish(tiny_raw, "tiny", 1)
    with small_tmpfs(tmp_path / "a" / "state", 48 * 1024 * 1024) as state:
        agent = Agent(tmp_path / "a", release)
        log = tmp_path / "a" / "agent.log"
        try:
            agent.start()
            agent.wait_serving("tiny", 1)
            agent.wait(lambda: "event=probation_passed" in log.read_text(), 60, "v1's probation to end")
            agent.stop()
            release.publish(tiny_raw, "tiny", 2, extra_files={"notes.bin": os.urandom(256 * 1024)})
            agent.start(**{TEST_STOP_AT_ENV: phase.value, TEST_STOP_SIGNAL_ENV: "STOP"})
            assert agent.proc is not None
            daemon = psutil.Process(agent.proc.pid)
            agent.wait(lambda: daemon.status() == psutil.STATUS_STOPPED, 120, f"the daemon to stop at {phase.value}")
            filler = fill(state)
            daemon.resume()
            agent.wait(lambda: "event=update_pass_failed" in log.read_text().split("---- start ----")[-1], 120,
                       "the update pass to fail on the full disk")
            run_log = log.read_text().split("---- start ----")[-1]
            assert "No space left on device" in run_log and "Traceback" not in run_log, run_log[-3000:]
            assert agent.phase() is phase  # the journal could not record what came next: nothing past it ran
            if phase is Phase.ACTIVATING:  # v2 passed its canary: the record's failure does not fail v2
                assert "event=probation_record_failed" in run_log and "action=ACTIVATE" not in run_log, run_log[-3000:]
            assert agent.store.current() == agent.store.model_dir("tiny", 1).resolve()
            assert agent.chat().status_code == 200
            assert [p.name for p in state.rglob(f"{TMP_PREFIX}*")] == []

            filler.unlink()
            daemon.send_signal(signal.SIGHUP)
            agent.wait_serving("tiny", 2)
            agent.wait(lambda: agent.phase() in (Phase.ACTIVE, Phase.UP_TO_DATE)
                       and agent.store.current() == agent.store.model_dir("tiny", 2).resolve(), 60, "v2 current")
            assert Journal(agent.store.journal_path).load().refused == ()
            assert agent.store.check_invariants() == []
        finally:
            agent.stop()


def test_a_release_that_does_not_fit_the_free_disk_is_declined_in_readable_sizes_and_installed_later(
        tiny_raw: Path, release: Release, tmp_path: Path) -> None:
    release.publish(tiny_raw, "tiny", 1)
    with small_tmpfs(tmp_path / "a" / "state", 48 * 1024 * 1024) as state:
        agent = Agent(tmp_path / "a", release)
        try:
            agent.start()
            agent.wait_serving("tiny", 1)
            log = tmp_path / "a" / "agent.log"
            agent.wait(lambda: "event=probation_passed" in log.read_text(), 60, "v1's probation to end")
            filler = fill(state)
            with open(filler, "r+b") as f:  # room for the journal and metadata, not for the new file
                f.truncate(filler.stat().st_size - 128 * 1024)
            release.publish(tiny_raw, "tiny", 2, extra_files={"notes.bin": os.urandom(1024 * 1024)})
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait(lambda: agent.phase() is Phase.INCOMPATIBLE, 60, "v2 to be declined before downloading")
            reason = Journal(agent.store.journal_path).load().reason or ""
            # Sizes a person can compare (it read "needs 0.0 GiB free disk, this device has 0.0 GiB").
            assert re.search(r"needs [\d.]+ MiB free disk, this device has [\d.]+ KiB free", reason), reason
            assert release.artifact_gets("tiny", 2) == []
            assert agent.chat().status_code == 200 and agent.health() == {"status": "ok", "model": "tiny", "version": 1}

            filler.unlink()  # declined, not refused: the next check installs it
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait_serving("tiny", 2)
        finally:
            agent.stop()
