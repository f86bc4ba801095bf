"""Django's SQLite backend, waiting for the write lock in turn instead of in long sleeps.

Web workers and the dispatcher write to one SQLite file, so a transaction often finds the
write lock taken for a millisecond or two. SQLite's own busy handler (what the `timeout`
option sets) then sleeps 1, 2, 5, 10, 15, 20, 25, 25... ms between attempts: a writer that
waited 3 ms for the lock slept 8, one that waited 10 ms slept 18. In a class's burst those
sleeps were most of a submission's p99 and of the dispatcher's slowest hand-offs.

Transactions here are IMMEDIATE (settings.py): they take the lock at BEGIN and never wait
for it afterwards. So:

- within a process, writers queue on a lock of ours, and the next one starts the moment
  the last one commits (no sleep, and no crowd of threads retrying for the CPU that the
  lock holder needs to finish);
- the one at the head of that queue retries BEGIN every 0.25-1 ms while another process
  holds the lock, for as long as the `timeout` option allows.

Statements outside a transaction keep SQLite's busy handler.
"""

import sqlite3
import threading
import time

from django.db.backends.sqlite3 import base

LOCKING_MODES = ("IMMEDIATE", "EXCLUSIVE")
FIRST_PAUSE_SECONDS = 0.00025
LONGEST_PAUSE_SECONDS = 0.001

# One writer per process at a time; connections are per thread, this lock is shared by all.
_write_turn = threading.Lock()


class DatabaseWrapper(base.DatabaseWrapper):
    holds_write_turn = False

    def _start_transaction_under_autocommit(self):
        if self.transaction_mode not in LOCKING_MODES:
            super()._start_transaction_under_autocommit()
            return
        timeout = float(self.settings_dict["OPTIONS"].get("timeout", 5))
        deadline = time.monotonic() + timeout
        raw = self.connection
        with self.wrap_database_errors:
            if not _write_turn.acquire(timeout=timeout):
                raise sqlite3.OperationalError("database is locked")
            self.holds_write_turn = True
            try:
                raw.execute("PRAGMA busy_timeout = 0")
                try:
                    self._begin_when_unlocked(raw, deadline=deadline)
                finally:
                    raw.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            except BaseException:
                self._end_write_turn()
                raise

    def _begin_when_unlocked(self, raw, *, deadline: float) -> None:
        pause = FIRST_PAUSE_SECONDS
        while True:
            try:
                raw.execute(f"BEGIN {self.transaction_mode}")
                return
            except sqlite3.OperationalError as error:
                if error.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE_SECONDS)

    def _end_write_turn(self) -> None:
        if self.holds_write_turn:
            self.holds_write_turn = False
            _write_turn.release()

    def _end_write_turn_unless_open(self) -> None:
        # A COMMIT that failed leaves the transaction open: the turn ends with its rollback.
        if self.connection is None or not self.connection.in_transaction:
            self._end_write_turn()

    def _commit(self):
        try:
            return super()._commit()
        finally:
            self._end_write_turn_unless_open()

    def _rollback(self):
        try:
            return super()._rollback()
        finally:
            self._end_write_turn_unless_open()

    def _close(self):
        try:
            return super()._close()
        finally:
            self._end_write_turn()
