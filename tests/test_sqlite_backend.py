"""The SQLite backend's write turn: writers wait for the lock in turn, and always give it back.

Transactions here take SQLite's write lock at BEGIN (IMMEDIATE). Within a process they queue
on a lock of the backend's; the one at the head retries BEGIN while another process (here:
a plain sqlite3 connection) holds SQLite's lock. These tests hold the lock the way another
process would and check that writers wait rather than fail, fail clearly once the timeout
has passed, and that no path out of a transaction (commit, rollback, a closed connection,
a failed BEGIN) keeps the turn from the next writer.
"""

import sqlite3
import threading
from contextlib import contextmanager

import pytest
from django.db import OperationalError, connection, transaction
from django.db import connections as all_connections

from comfyproxy.models import QueueSettings

pytestmark = pytest.mark.django_db(transaction=True)

JOIN_TIMEOUT = 30


@pytest.fixture(autouse=True)
def sqlite_only():
    if connection.vendor != "sqlite":
        pytest.skip("the write turn belongs to the SQLite backend")


@contextmanager
def lock_held_elsewhere():
    """SQLite's write lock, held by another connection as another process would hold it."""
    other = sqlite3.connect(connection.settings_dict["NAME"], timeout=30, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield other
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()


@contextmanager
def timeout_of(seconds: float):
    options = connection.settings_dict["OPTIONS"]
    before = options.get("timeout")
    options["timeout"] = seconds
    try:
        yield
    finally:
        options["timeout"] = before


def set_cap(value: int) -> None:
    with transaction.atomic():
        QueueSettings.objects.update_or_create(pk=1, defaults={"max_concurrent_override": value})


def in_thread(function):
    """Run `function` on a thread of its own (its own connection); (thread, outcome dict)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function()
        except Exception as error:  # reported to the test, which asserts on it
            outcome["error"] = error
        finally:
            all_connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_writer_waits_for_a_lock_held_elsewhere_and_writes_once_it_is_released():
    started = threading.Event()

    def write():
        started.set()
        set_cap(7)
        return QueueSettings.load().max_concurrent_override

    with lock_held_elsewhere() as other:
        thread, outcome = in_thread(write)
        assert started.wait(JOIN_TIMEOUT)
        # The other writer commits its own change; ours must land after it, not fail.
        other.execute(f"UPDATE {QueueSettings._meta.db_table} SET paused = 1 WHERE id = 1")
        other.execute("COMMIT")
    thread.join(JOIN_TIMEOUT)
    assert outcome == {"value": 7}
    assert QueueSettings.load().max_concurrent_override == 7


def test_a_writer_that_never_gets_the_lock_fails_clearly_and_the_next_one_writes():
    QueueSettings.load()
    with timeout_of(0.2), lock_held_elsewhere(), pytest.raises(OperationalError, match="locked"):
        set_cap(3)
    set_cap(4)  # the failed BEGIN gave the turn back
    assert QueueSettings.load().max_concurrent_override == 4


def test_writers_on_threads_of_one_process_take_turns_and_none_fails():
    QueueSettings.load()
    errors = []
    with lock_held_elsewhere():
        threads = [in_thread(lambda n=n: set_cap(n)) for n in range(1, 9)]
    for thread, outcome in threads:
        thread.join(JOIN_TIMEOUT)
        errors.append(outcome.get("error"))
    assert errors == [None] * 8
    assert QueueSettings.load().max_concurrent_override in range(1, 9)


def test_the_turn_is_given_back_after_a_commit_a_rollback_and_a_close():
    QueueSettings.load()
    with transaction.atomic():
        QueueSettings.objects.filter(pk=1).update(paused=True)
    assert not connection.holds_write_turn

    def failing_view():
        with transaction.atomic():
            QueueSettings.objects.filter(pk=1).update(paused=False)
            raise RuntimeError("the view failed")

    with pytest.raises(RuntimeError):
        failing_view()
    assert not connection.holds_write_turn
    assert QueueSettings.load().paused is True

    with transaction.atomic():
        QueueSettings.objects.filter(pk=1).update(paused=False)
        assert connection.holds_write_turn
        connection.close()
    assert not connection.holds_write_turn

    # Another thread gets the turn (it would wait for ever if one of the above kept it).
    thread, outcome = in_thread(lambda: set_cap(5))
    thread.join(JOIN_TIMEOUT)
    assert outcome == {"value": None}
    assert QueueSettings.load().max_concurrent_override == 5
