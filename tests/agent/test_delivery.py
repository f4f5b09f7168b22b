"""Delivery: the window of outbox events awaiting their PUBACK, driven by explicit pumps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent.delivery import Delivery
from edge_agent.agent.outbox import Outbox, StoredEvent


class RecordingLink:
    """The delivery's one I/O seam: ``publish(event, replayed) -> mid``. Records what it was
    handed; the test plays the broker's PUBACKs."""

    def __init__(self) -> None:
        self.handed: list[int] = []  # seqs, in the order handed over
        self.replayed: list[bool] = []
        self.mids: dict[int, int] = {}  # seq -> mid
        self.threads: dict[int, int] = {}  # seq -> thread that handed it over
        self.failing = False
        self.lock = threading.Lock()

    def publish(self, event: StoredEvent, replayed: bool) -> int:
        if self.failing:
            raise RuntimeError("the link broke")
        with self.lock:
            self.handed.append(event.seq)
            self.replayed.append(replayed)
            self.mids[event.seq] = len(self.handed)
            self.threads[event.seq] = threading.get_ident()
            return len(self.handed)

    def count(self) -> int:
        with self.lock:
            return len(self.handed)


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def body(name: str) -> dict[str, Any]:
    return {"name": name}


@pytest.fixture()
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    store = Outbox(tmp_path / "outbox.db")
    yield store
    store.close()


def make(
    outbox: Outbox,
    link: RecordingLink,
    window: int,
    connected: Callable[[], bool] = lambda: True,
    **options: Any,
) -> Delivery:
    return Delivery(outbox, link.publish, connected, "boot", window=lambda: window, **options)


def returns_without_waiting(call: Callable[[], None]) -> bool:
    """Whether ``call`` returns while the test still holds the lock it might wait for."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(5.0)
    return not thread.is_alive()


@pytest.mark.parametrize("window", [20, 3])
def test_the_window_stays_full_and_acknowledged_events_are_deleted_after_the_next_hand_over(
    window: int, tmp_path: Path
) -> None:
    link = RecordingLink()
    handed_at_delete: list[int] = []

    class WatchedOutbox(Outbox):
        def remove(self, *seqs: int) -> None:
            handed_at_delete.append(link.count())
            super().remove(*seqs)

    outbox = WatchedOutbox(tmp_path / "outbox.db")
    stored = outbox.append_many([("t", body(f"e{i}")) for i in range(2 * window + 1)], "boot")
    delivery = make(outbox, link, window)
    assert delivery.pump() == window
    assert delivery.pump() == 0 and link.count() == window  # no more than the broker accepts
    for seq in link.handed[:2]:
        delivery.acknowledged(link.mids[seq])
    delivery.pump()
    assert link.count() == window + 2  # each PUBACK makes room for one more
    assert outbox.depth() == len(stored) - 2
    # The window was refilled before the acknowledged events were deleted (an fsync).
    assert handed_at_delete == [window + 2]
    for seq in list(link.handed[2:]):
        delivery.acknowledged(link.mids[seq])
    delivery.pump()
    assert link.count() == len(stored)
    for seq in link.handed[window + 2 :]:
        delivery.acknowledged(link.mids[seq])
    delivery.pump()
    assert outbox.depth() == 0
    assert link.handed == [event.seq for event in stored]  # in order, each once
    assert delivery.published == len(stored)
    outbox.close()


def test_nothing_is_handed_over_while_disconnected_and_everything_after(outbox: Outbox) -> None:
    link = RecordingLink()
    connected = threading.Event()
    delivery = make(outbox, link, 5, connected.is_set)
    stored = outbox.append_many([("t", body(f"e{i}")) for i in range(3)], "boot")
    assert delivery.pump() == 0 and link.count() == 0
    assert not delivery.wait_handed_over(stored[0].seq, timeout=0)
    connected.set()
    delivery.pump()
    assert delivery.wait_handed_over(stored[-1].seq, timeout=0)
    assert link.handed == [event.seq for event in stored]


def test_waiting_for_a_hand_over_ends_when_another_thread_hands_it_over(outbox: Outbox) -> None:
    link = RecordingLink()
    delivery = make(outbox, link, 2)
    stored = outbox.append_many([("t", body(f"e{i}")) for i in range(3)], "boot")
    delivery.pump()
    assert delivery.wait_handed_over(stored[1].seq, timeout=0)
    assert not delivery.wait_handed_over(stored[2].seq, timeout=0)  # the window is two
    done = threading.Event()
    waiter = threading.Thread(target=lambda: delivery.wait_handed_over(stored[2].seq, 10) and done.set())
    waiter.start()
    delivery.acknowledged(link.mids[stored[0].seq])
    delivery.refill()  # as the network thread does after reading the PUBACK
    waiter.join(10)
    assert done.is_set()


def test_events_of_another_boot_or_stored_long_ago_go_out_as_replays(outbox: Outbox) -> None:
    link = RecordingLink()
    now = [1_000.0]
    old = outbox.append("t", body("old boot"), "earlier-boot")
    fresh = outbox.append("t", body("fresh"), "boot")
    delivery = make(outbox, link, 5, clock=lambda: now[0], live_window_seconds=2.0)
    now[0] = fresh.created + 1.0
    delivery.pump()
    assert link.replayed == [True, False]
    late = outbox.append("t", body("late"), "boot")
    now[0] = late.created + 2.5
    delivery.pump()
    assert link.handed[-1] == late.seq and link.replayed[-1] is True
    assert old.seq < fresh.seq < late.seq


def test_the_reading_thread_refills_the_window_itself_without_waiting(outbox: Outbox) -> None:
    """refill() runs where the PUBACKs were read (the network thread): the next event is handed
    over before it returns, on that thread, and the driving thread is not woken for it."""
    link = RecordingLink()
    wakes = Wakes()
    stored = outbox.append_many([("t", body(f"e{i}")) for i in range(6)], "boot")
    delivery = make(outbox, link, 3, wake=wakes)
    delivery.pump()
    delivery.acknowledged(link.mids[stored[0].seq])
    assert wakes.count == 1  # nobody refills yet: the driving thread is asked to
    delivery.refill()
    assert link.count() == 4 and link.threads[stored[3].seq] == threading.get_ident()
    delivery.refill()  # no new PUBACK: nothing to do
    assert link.count() == 4
    delivery.acknowledged(link.mids[stored[1].seq])
    assert wakes.count == 1  # a reader refills now: no wake-up per PUBACK
    # The driving thread busy handing over: refill() leaves the PUBACK to it, at once.
    with delivery._handing:
        assert returns_without_waiting(delivery.refill) and link.count() == 4
    assert wakes.count == 2
    delivery.pump()  # the woken driving thread takes it, and deletes the two acknowledged
    assert link.count() == 5 and outbox.depth() == 4 and delivery.published == 2
    assert link.handed == [event.seq for event in stored[:5]]


def test_a_failing_refill_never_raises_into_the_network_thread(outbox: Outbox) -> None:
    link = RecordingLink()
    wakes = Wakes()
    stored = outbox.append_many([("t", body(f"e{i}")) for i in range(3)], "boot")
    delivery = make(outbox, link, 1, wake=wakes)
    delivery.pump()
    link.failing = True
    delivery.acknowledged(link.mids[stored[0].seq])
    delivery.refill()  # logged, not raised; the driving thread is asked to retry
    assert wakes.count >= 1
    link.failing = False
    delivery.pump()
    assert link.handed == [stored[0].seq, stored[1].seq]


def test_refill_never_waits_for_a_busy_outbox_and_does_nothing_once_closed(outbox: Outbox) -> None:
    """The network thread must not wait while another thread holds the file (an insert waiting
    for its fsync): refill() leaves the room to the driving thread. After close(), nothing."""
    link = RecordingLink()
    wakes = Wakes()
    stored = outbox.append_many([("t", body(f"e{i}")) for i in range(4)], "boot")
    delivery = make(outbox, link, 1, wake=wakes)
    delivery.pump()
    delivery.acknowledged(link.mids[stored[0].seq])
    with outbox._lock:
        assert returns_without_waiting(delivery.refill) and link.count() == 1
    assert wakes.count >= 1
    delivery.pump()
    assert link.count() == 2
    delivery.close()
    delivery.acknowledged(link.mids[stored[1].seq])
    delivery.refill()
    assert link.count() == 2


def test_a_new_session_hands_over_again_what_the_last_one_left_unacknowledged(outbox: Outbox) -> None:
    """The client of a dead connection resends nothing: the events in flight go out again,
    from the oldest, decided afresh; acknowledged ones never."""
    link = RecordingLink()
    stored = outbox.append_many([("t", body(f"e{i}")) for i in range(4)], "boot")
    delivery = make(outbox, link, 3)
    delivery.pump()
    delivery.acknowledged(link.mids[stored[0].seq])  # read just before the connection died
    delivery.new_session()
    delivery.pump()
    assert link.handed == [
        stored[0].seq,
        stored[1].seq,
        stored[2].seq,
        stored[1].seq,
        stored[2].seq,
        stored[3].seq,
    ]
    assert outbox.depth() == 3


def test_a_quiet_link_is_probed_before_events_go_out(outbox: Outbox) -> None:
    link = RecordingLink()
    heard = [0.0]
    probes: list[int] = []

    def probe() -> int:
        probes.append(1000 + len(probes))
        return probes[-1]

    delivery = make(outbox, link, 5, last_heard=lambda: heard[0], probe=probe)
    stored = outbox.append("t", body("wake"), "boot")
    delivery.pump()
    assert link.handed == [] and probes == [1000]  # nothing heard from the broker lately
    delivery.pump()
    assert probes == [1000]  # one probe at a time
    delivery.acknowledged(1000)  # the broker is alive
    delivery.pump()
    assert link.handed == [stored.seq]


def test_a_broker_that_acknowledges_nothing_is_noticed(outbox: Outbox) -> None:
    import edge_agent.agent.delivery as module

    link = RecordingLink()
    stored = outbox.append_many([("t", body("a")), ("t", body("b"))], "boot")
    delivery = make(outbox, link, 5)
    assert delivery.stalled() is None  # nothing awaits an acknowledgement
    delivery.pump()
    handed = time.monotonic()
    assert delivery.stalled(now=handed + module.STALL_SECONDS - 0.5) is None
    assert delivery.stalled(now=handed + module.STALL_SECONDS + 1) is not None
    delivery.acknowledged(link.mids[stored[0].seq])
    delivery.pump()
    # Something came back: the broker works, the other event is simply on its way.
    assert delivery.stalled(now=time.monotonic() + module.STALL_SECONDS - 0.5) is None
