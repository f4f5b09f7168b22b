"""The outbox on its own: order, numbering across restarts, bounds, batches, a bad file."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent.outbox import Outbox


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def body(name: str) -> dict[str, Any]:
    return {"name": name}


def test_events_come_back_in_order_with_their_numbers(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    first = outbox.append("t/a", body("a"), "boot-1")
    second = outbox.append("t/b", body("b"), "boot-1")
    assert second.seq == first.seq + 1
    pending = outbox.pending()
    assert [(e.seq, e.topic, e.body, e.boot_id) for e in pending] == [
        (first.seq, "t/a", {"name": "a"}, "boot-1"),
        (second.seq, "t/b", {"name": "b"}, "boot-1"),
    ]
    assert outbox.pending(after_seq=first.seq) == pending[1:]
    outbox.remove(first.seq)
    assert outbox.depth() == 1


def test_a_detection_is_committed_with_an_fsync_and_its_delete_without(tmp_path: Path) -> None:
    """Inserts wait for the disk (a detection survives a power cut); deletes after PUBACKs do not
    (one lost only sends an acknowledged event again), so they cannot hold up the next window."""
    outbox = Outbox(tmp_path / "o.db")
    statements: list[str] = []
    outbox._db.set_trace_callback(statements.append)
    first, second = outbox.append_many([("t", body("a")), ("t", body("b"))], "boot")
    insert = statements[:]
    statements.clear()
    outbox.remove(first.seq)
    assert not any("synchronous" in s for s in insert)  # FULL, set when the outbox was opened
    assert statements[0] == "PRAGMA synchronous=NORMAL" and statements[-1] == "PRAGMA synchronous=FULL"
    assert any(s.startswith("DELETE") for s in statements) and "COMMIT" in statements
    assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again for inserts
    assert [e.seq for e in outbox.pending()] == [second.seq]


def test_a_failed_delete_keeps_the_event_and_inserts_durable(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    event = outbox.append("t", body("a"), "boot")
    outbox._db.execute("CREATE TRIGGER refuse BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'no'); END")
    outbox.remove(event.seq)  # logged; it is sent again after a restart
    assert [e.seq for e in outbox.pending()] == [event.seq]
    assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert not outbox._db.in_transaction


def test_numbers_keep_increasing_across_a_restart_even_when_the_outbox_was_emptied(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    last = outbox.append_many([("t", body("a")), ("t", body("b"))], "boot-1")[-1]
    outbox.remove(*(event.seq for event in outbox.pending()))
    assert outbox.depth() == 0
    outbox.close()
    reopened = Outbox(tmp_path / "o.db")
    assert reopened.append("t", body("c"), "boot-2").seq == last.seq + 1


def test_a_batch_is_numbered_in_order_and_stored_whole(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    stored = outbox.append_many([("t", body(str(i))) for i in range(50)], "boot")
    assert [e.seq for e in stored] == list(range(stored[0].seq, stored[0].seq + 50))
    assert [e.body["name"] for e in outbox.pending(limit=100)] == [str(i) for i in range(50)]
    assert outbox.append_many([], "boot") == []


def test_a_batch_with_a_body_json_cannot_hold_stores_nothing_and_uses_no_numbers(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    before = outbox.append("t", body("before"), "boot").seq
    with pytest.raises(TypeError):
        outbox.append_many([("t", body("x")), ("t", {"name": object()})], "boot")
    assert outbox.depth() == 1
    assert outbox.append("t", body("after"), "boot").seq == before + 1


def test_the_count_bound_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", max_events=3)
    outbox.append_many([("t", body(str(i))) for i in range(5)], "boot")
    assert [e.body["name"] for e in outbox.pending()] == ["2", "3", "4"]
    assert outbox.dropped_this_run == 2 and outbox.dropped_total == 2
    outbox.close()
    assert Outbox(tmp_path / "o.db", max_events=3).dropped_total == 2  # kept on disk


def test_the_age_bound_drops_what_is_too_old(tmp_path: Path) -> None:
    clock = Clock()
    outbox = Outbox(tmp_path / "o.db", max_age_seconds=60, clock=clock)
    outbox.append("t", body("old"), "boot")
    clock.now += 30
    outbox.append("t", body("young"), "boot")
    clock.now += 45
    assert outbox.expire() == 1
    assert [e.body["name"] for e in outbox.pending()] == ["young"]


def test_what_is_committed_is_on_disk_for_another_connection(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    outbox.append_many([("t", body("a")), ("t", body("b"))], "boot")
    with sqlite3.connect(tmp_path / "o.db") as other:
        assert other.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2


def fill_disk(outbox: Outbox) -> None:
    """SQLite's own "database or disk is full", as on a full SD card: no page may be added."""
    pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
    outbox._db.execute(f"PRAGMA max_page_count = {pages}")


def free_disk(outbox: Outbox) -> None:
    outbox._db.execute("PRAGMA max_page_count = 1073741823")


def make_read_only(outbox: Outbox, read_only: bool = True) -> None:
    """Every write fails as on a file system remounted read-only (a failing SD card)."""
    outbox._db.execute(f"PRAGMA query_only = {int(read_only)}")


def test_a_read_only_file_holds_events_until_it_can_be_written(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    make_read_only(outbox)
    held = outbox.append("t", body("held"), "boot")
    assert outbox.write_error is not None and "readonly" in outbox.write_error
    assert outbox.pending() == [held]
    make_read_only(outbox, False)
    outbox.expire()
    assert outbox.write_error is None and outbox.unwritten == 0
    assert [e.seq for e in outbox.pending()] == [held.seq]


def test_a_full_disk_keeps_events_in_memory_numbered_and_in_order(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    first = outbox.append("t", body("stored"), "boot")
    fill_disk(outbox)
    held = outbox.append_many([("t", body(f"held{i}" + "x" * 5000)) for i in range(3)], "boot")
    assert outbox.write_error is not None and "full" in outbox.write_error
    assert [e.seq for e in held] == [first.seq + 1, first.seq + 2, first.seq + 3]
    assert outbox.unwritten == 3 and outbox.depth() == 4
    assert [e.seq for e in outbox.pending()] == [first.seq, *(e.seq for e in held)]
    assert [e.seq for e in outbox.pending(after_seq=held[0].seq)] == [held[1].seq, held[2].seq]
    outbox.remove(first.seq, held[0].seq)  # acknowledged while the disk is still full
    assert [e.seq for e in outbox.pending()] == [held[1].seq, held[2].seq]

    free_disk(outbox)
    later = outbox.append("t", body("later"), "boot")
    assert later.seq == held[2].seq + 1  # no number is given twice
    assert outbox.write_error is None and outbox.unwritten == 0
    outbox.close()
    reopened = Outbox(tmp_path / "o.db")  # the held events reached the file
    assert [e.body["name"][:5] for e in reopened.pending()] == ["held1", "held2", "later"]
    assert reopened.append("t", body("next"), "boot").seq == later.seq + 1


def test_held_events_are_written_by_the_periodic_expiry_too(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    fill_disk(outbox)
    outbox.append("t", body("x" * 8000), "boot")
    assert outbox.expire() == 0 and outbox.unwritten == 1  # still full
    free_disk(outbox)
    outbox.expire()
    assert outbox.unwritten == 0 and outbox.write_error is None
    with sqlite3.connect(tmp_path / "o.db") as other:
        assert other.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1


def test_held_events_are_bounded_like_stored_ones(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", max_events=2)
    fill_disk(outbox)
    outbox.append_many([("t", body(f"{i}" + "x" * 3000)) for i in range(5)], "boot")
    assert [e.body["name"][0] for e in outbox.pending()] == ["3", "4"]
    assert outbox.dropped_this_run == 3


def test_a_delete_that_cannot_begin_leaves_inserts_durable(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    event = outbox.append("t", body("a"), "boot")
    outbox._db.execute("PRAGMA busy_timeout=0")
    other = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer (a backup tool, a sqlite3 shell)
    try:
        outbox.remove(event.seq)  # BEGIN fails: logged, kept
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert [e.seq for e in outbox.pending()] == [event.seq]


def test_numbers_given_while_the_disk_was_full_are_not_given_again_after_a_crash(tmp_path: Path) -> None:
    """Five detections numbered but never stored (a full SD card), then the process dies: the
    next run must not number its first detection like one of them (receivers would drop it)."""
    outbox = Outbox(tmp_path / "o.db")
    first = outbox.append("t", body("stored"), "boot-1")
    fill_disk(outbox)
    lost = outbox.append_many([("t", body(f"lost{i}" + "x" * 5000)) for i in range(5)], "boot-1")
    assert outbox.unwritten == 5
    # A kill -9: nothing closes the file. The next run opens it as it is.
    after = Outbox(tmp_path / "o.db")
    given = {first.seq, *(e.seq for e in lost)}
    assert after.append("t", body("next"), "boot-2").seq > max(given)


def test_a_clean_close_keeps_numbering_dense(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    last = outbox.append_many([("t", body("a")), ("t", body("b"))], "boot-1")[-1]
    outbox.close()
    assert Outbox(tmp_path / "o.db").append("t", body("c"), "boot-2").seq == last.seq + 1


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_file_is_moved_aside_and_a_new_outbox_started(damage: str, tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    if damage == "garbage":
        path.write_bytes(b"this is not sqlite" * 100)
    else:
        good = Outbox(path)
        good.append_many([("t", body(str(i) * 500)) for i in range(20)], "boot")
        good.close()
        path.write_bytes(path.read_bytes()[:1500])
    outbox = Outbox(path)
    assert outbox.recovered is not None and "moved to" in outbox.recovered
    (aside,) = tmp_path.glob("o.db.corrupt-*")
    assert aside.stat().st_size > 0
    event = outbox.append("t", body("after"), "boot")
    assert [e.seq for e in outbox.pending()] == [event.seq] and outbox.write_error is None


def test_a_file_that_cannot_be_created_keeps_events_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the outbox's folder should be", encoding="utf-8")
    outbox = Outbox(blocker / "o.db")
    assert outbox.write_error is not None and "cannot open the outbox" in outbox.write_error
    event = outbox.append("t", body("kept"), "boot")
    assert [e.body for e in outbox.pending()] == [event.body]


def test_a_damaged_row_is_skipped_and_the_rest_delivered(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    first = outbox.append("t", body("first"), "boot")
    with outbox._lock:
        outbox._db.execute(
            "INSERT INTO events (seq, topic, body, created, boot_id) VALUES (?, ?, ?, ?, ?)",
            (first.seq + 1, "t", "{not json", first.created, "boot"),
        )
        outbox._db.execute(
            "INSERT INTO events (seq, topic, body, created, boot_id) VALUES (?, ?, ?, ?, ?)",
            (first.seq + 2, "", '{"name": "no topic"}', first.created, "boot"),
        )
        outbox._next_seq = first.seq + 3
    last = outbox.append("t", body("last"), "boot")
    assert [e.seq for e in outbox.pending()] == [first.seq, last.seq]
    assert outbox.skipped_rows == 2
    assert [e.seq for e in outbox.pending()] == [first.seq, last.seq] and outbox.skipped_rows == 2  # gone
