"""Worker processes: ``key-evt-amqp serve --workers N``, and who a worker is.

With N > 1 the process that loaded the configuration becomes a **supervisor** that serves no
client: it forks N workers, each a whole proxy (:func:`proxy.server.run`, with its own
connections, event pipeline and, in a fleet, its own membership), restarts a worker that dies,
and passes SIGTERM or SIGINT on to every worker, then waits for them. With N == 1 none of this
runs: the process serves, as it always did.

**How the workers share the port.** Each worker binds host:port itself with ``SO_REUSEPORT``; the
kernel spreads new connections over the listening sockets by a hash of each connection's
addresses and ports. Chosen over one socket bound by the supervisor and inherited by every
worker because with a shared socket every worker's loop wakes for each connection and whichever
accepts first takes it (uvloop then accepts everything queued): connections pile onto one worker
in bursts, while the hash gives each worker an even share over many connections. The price, said
so: the share is by hash, not by load (a busy worker gets its share all the same), and the
connections a worker's socket had queued but not yet accepted are reset when that worker dies
(the others' sockets are not touched, nor are established connections).

**The port is still ours alone.** Linux lets a socket join an ``SO_REUSEPORT`` group only if it
sets the option too and belongs to the same user, so a port bound by an unrelated program already
fails; a second proxy with workers would join silently, though. So before forking, the supervisor
binds host:port once without ``SO_REUSEPORT``, as the single process does (:func:`check_port`):
any listener on it, with or without the option, fails the start with the usual
``cannot listen on`` line, exit 1. (A program that binds in the milliseconds between that check
and the workers' binds makes every worker fail to listen: each such exit counts as a crash, and
the restart backoff below keeps that from spinning.)

**Why fork, without exec.** A worker gets the configuration the supervisor loaded and validated,
the very object: a bad configuration has failed in the supervisor, exit 2, before any worker, and
a restarted worker runs with what the others run (a config file edited meanwhile takes effect when
the whole proxy restarts, never in one worker). Forking is safe because the supervisor never has
an event loop or a thread: it takes its signals synchronously (``sigtimedwait``, signals blocked),
and a worker unblocks them before anything else.

**Restarts.** A worker that exits while the supervisor is not stopping is restarted at once,
with its exit status or signal logged; one that exits more than :data:`BURST` times within
:data:`WINDOW_S` (it crashes at start, say) is restarted after a delay that doubles from
:data:`FIRST_DELAY_S` to :data:`MAX_DELAY_S`, until a run of :data:`STABLE_S` ends the backoff
(:class:`RestartPolicy`). A worker also gets SIGTERM when its supervisor dies, however it dies
(``PR_SET_PDEATHSIG``), so no worker outlives it holding the port.

**Stopping.** SIGTERM or SIGINT to the supervisor goes to every worker; each stops as the single
process does (clients get the replies they are owed, events are confirmed or stored), and the
supervisor waits for them up to the shutdown timeout plus :data:`STOP_MARGIN_S`, then sends
SIGKILL. Exit status 0 when every worker stopped by itself. SIGHUP keeps its default (it ends the
process, as for the single process; the workers then get SIGTERM): add it to
:data:`RELAYED_SIGNALS` once a configuration reload exists.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from proxy.config import Config

__all__ = ["RestartPolicy", "RunWorker", "Supervisor", "Worker", "check_port", "exit_text"]

log = logging.getLogger("key_evt_amqp.workers")

#: Exits within WINDOW_S that are restarted at once; the next ones wait.
BURST = 5
WINDOW_S = 30.0
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
#: A worker that ran this long before it exited starts a new count (its backoff is over).
STABLE_S = 30.0
#: What a worker may take after the client grace of the shutdown timeout: the event pipeline's
#: own bounded steps (2 s for confirms, 5 s to store the rest in the list: events/service.py),
#: and its exit. The supervisor waits shutdown_timeout + this before SIGKILL.
STOP_MARGIN_S = 10.0

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Signals passed on to every worker without stopping (none yet: SIGHUP once a reload exists).
RELAYED_SIGNALS: tuple[signal.Signals, ...] = ()
_WATCHED = (signal.SIGCHLD, *STOP_SIGNALS, *RELAYED_SIGNALS)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Worker:
    """Who this process is among the workers: ``index`` 1..N, and its supervisor's pid. The
    single process has none (``None`` wherever a Worker is expected)."""

    index: int
    supervisor_pid: int


#: What a worker runs: the proxy with the configuration, as this worker; returns its exit status.
RunWorker = Callable[[Config, Worker], int]


class RestartPolicy:
    """When to restart one worker after it exited: :meth:`exited` says how long to wait."""

    def __init__(self) -> None:
        self.exits: deque[float] = deque(maxlen=BURST + 1)  # the last exits' times: all it needs
        self.delay = 0.0
        self.unstable = 0  # exits in a row, each after a run shorter than STABLE_S

    def exited(self, now: float, ran_for: float) -> float:
        """The worker exited at ``now`` after running ``ran_for`` seconds: seconds to wait before
        starting it again (0: at once)."""
        if ran_for >= STABLE_S:
            self.exits.clear()
            self.delay = 0.0
            self.unstable = 0
        else:
            self.unstable += 1
        self.exits.append(now)
        recent = sum(1 for t in self.exits if now - t < WINDOW_S)
        if self.delay or recent > BURST:
            self.delay = min(max(self.delay * 2, FIRST_DELAY_S), MAX_DELAY_S)
        return self.delay


def exit_text(status: int) -> str:
    """A wait status in words: ``exited with status 1``, ``was killed by SIGKILL``."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def check_port(host: str, port: int) -> None:
    """Bind ``host``:``port`` (every address it resolves to) without ``SO_REUSEPORT``, as the
    single process would, and let go: raises OSError when anyone listens there already."""
    for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio's create_server: v6 only, v4 separately
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)


@dataclass
class _Slot:
    """One worker position: the process in it now, or when the next one starts."""

    index: int
    pid: int | None = None
    started: float = 0.0
    restart_at: float | None = None
    policy: RestartPolicy = field(default_factory=RestartPolicy)


class Supervisor:
    """Runs ``config.workers`` workers until SIGTERM or SIGINT; :meth:`run` returns the exit
    status. The calling process must have no other thread and no running event loop (it forks)."""

    def __init__(self, config: Config, run_worker: RunWorker,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.run_worker = run_worker
        self.clock = clock
        self.pid = os.getpid()
        self.slots = [_Slot(index) for index in range(1, config.workers + 1)]
        self._mask: set[int | signal.Signals] = set()  # the signal mask to give workers

    def run(self) -> int:
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        try:
            log.info("supervising %d workers on %s:%d (SO_REUSEPORT)", len(self.slots),
                     self.config.listen_host, self.config.listen_port)
            for slot in self.slots:
                self._start(slot)
            return self._stop(self._supervise())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)

    # -- running ----------------------------------------------------------------------------------

    def _supervise(self) -> signal.Signals:
        """Restart workers until a stop signal arrives; returns that signal."""
        while True:
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            info = self._wait(min(due) - self.clock() if due else None)
            if info is None:
                self._start_due()
                continue
            signum = signal.Signals(info.si_signo)
            if signum in STOP_SIGNALS:
                return signum
            if signum == signal.SIGCHLD:
                for slot, status in self._reap():
                    self._exited(slot, status)
            else:
                self._send(signum)

    def _wait(self, timeout: float | None) -> signal.struct_siginfo | None:
        if timeout is None:
            return signal.sigwaitinfo(_WATCHED)
        return signal.sigtimedwait(_WATCHED, max(timeout, 0.0))

    def _start_due(self) -> None:
        now = self.clock()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)

    def _exited(self, slot: _Slot, status: int) -> None:
        now = self.clock()
        ran_for = now - slot.started
        delay = slot.policy.exited(now, ran_for)
        when = "now" if not delay else (
            f"in {delay:g}s ({slot.policy.unstable} exits in a row, each before {STABLE_S:g}s)")
        log.warning("worker %d (pid %s) %s after %.1fs; restarting it %s", slot.index,
                    slot.pid, exit_text(status), ran_for, when)
        slot.pid = None
        if delay:
            slot.restart_at = now + delay
        else:
            self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.restart_at = None
        slot.started = self.clock()
        try:
            pid = os.fork()
        except OSError as exc:  # out of memory or processes: try again later, as after a crash
            delay = max(slot.policy.exited(slot.started, 0.0), FIRST_DELAY_S)
            log.error("worker %d: cannot fork (%s); trying again in %gs", slot.index, exc, delay)
            slot.restart_at = slot.started + delay
            return
        if pid == 0:
            self._be_worker(slot.index)
        slot.pid = pid
        log.info("worker %d started, pid %d", slot.index, pid)

    def _be_worker(self, index: int) -> NoReturn:
        """In the child: run the proxy as worker ``index``, then exit (never return into the
        supervisor's code)."""
        code = 1
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            _die_with(self.pid)
            code = self.run_worker(self.config, Worker(index, self.pid))
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - whatever it is, it is this worker's exit status 1
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

    def _reap(self) -> list[tuple[_Slot, int]]:
        """Every worker that has exited, with its wait status."""
        done: list[tuple[_Slot, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return done
            if pid == 0:
                return done
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is not None:
                done.append((slot, status))

    def _send(self, signum: int) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                try:
                    os.kill(slot.pid, signum)
                except ProcessLookupError:
                    pass  # exited; its SIGCHLD is on the way

    # -- stopping ---------------------------------------------------------------------------------

    def _stop(self, signum: signal.Signals) -> int:
        """Pass ``signum`` on, wait (bounded) for every worker, SIGKILL the late; exit status."""
        limit = self.config.shutdown_timeout + STOP_MARGIN_S
        log.info("%s: stopping the workers (at most %.0fs)", signum.name, limit)
        for slot in self.slots:
            slot.restart_at = None
        self._send(signum)
        clean = True
        deadline = self.clock() + limit
        while self._running() and (left := deadline - self.clock()) > 0:
            self._wait(left)  # a SIGCHLD, a repeated stop signal, or the deadline: reap and see
            for slot, status in self._reap():
                stopped = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 or (
                    os.WIFSIGNALED(status) and os.WTERMSIG(status) == signum)  # before its handler
                if not stopped:
                    clean = False
                    log.warning("worker %d (pid %d) %s while stopping", slot.index, slot.pid,
                                exit_text(status))
                slot.pid = None
        for slot in self._running():
            assert slot.pid is not None
            log.error("worker %d (pid %d) did not stop within %.0fs: SIGKILL", slot.index,
                      slot.pid, limit)
            clean = False
            os.kill(slot.pid, signal.SIGKILL)
            os.waitpid(slot.pid, 0)
            slot.pid = None
        log.info("stopped")
        return 0 if clean else 1

    def _running(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.pid is not None]


def _die_with(supervisor_pid: int) -> None:
    """Have the kernel send this process SIGTERM when its supervisor dies (Linux; elsewhere,
    nothing); exit now if it is gone already."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor_pid:
        raise SystemExit(0)
