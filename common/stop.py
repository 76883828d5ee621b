"""How a command's process stops: a signal, or a stop another thread finds, becomes one exception in the main
thread, and the command's `main()` turns it into the exit status and one line. Standard library only, so that a
command installs it before it loads anything else:

    with modules_loading(__name__ == "__main__"):  # first in a command, around its other imports
        import torch  # a signal while the modules load: its exit status and line

    def main(argv=None) -> int:
        with CommandExit() as command:
            try:
                ...  # the command
            except RunStopped as stop:
                return command.stopped(stop)  # the line (main process only) and the exit status

Exit statuses of the signals: 128 + the signal's number, as shells report a process a signal ended: SIGINT (Ctrl-C)
130, SIGUSR1 (SLURM's requeue signal) 138, SIGTERM (a scheduler's preemption, `kill`) 143. While they are handled
(`stop_signals`, entered by `CommandExit` and by the work that runs, e.g. a margin run's watchdog), each raises
`RunStopped` in the main thread, after the innermost work's reaction (`reaction(signum) -> RunStopped`: a
multi-process run writes its stop file there, so that every process stops). A thread that finds that the run must
stop calls `request_stop`: the reason is recorded and the main thread interrupted (SIGINT to itself), whose handler
raises it. The first stop of a process wins; further signals are ignored while it ends. Work whose processes
must stop together (a multi-process training run) defers them (`stop_signals(defer=True)`): a stop is recorded (the
reaction keeps it for the work), not raised, and the work raises it where all its processes meet; a nested block
that does not defer (a margin measurement inside the run) raises a pending stop as it starts and any stop as usual.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

EXIT_SIGINT = 128 + signal.SIGINT  # 130: Ctrl-C
EXIT_SIGUSR1 = 128 + signal.SIGUSR1  # 138: SLURM's requeue signal
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143: a scheduler's preemption, kill
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
GRACE = 10.0  # seconds main() has to end the process after a stop, before CommandExit's last resort does
RERUN = "run the same command again"


class RunStopped(SystemExit):
    """This process ends because its run stops: exit status `code`; `message` says why, in one line."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.code, self.message = code, message

    def line(self) -> str:
        """What the main process prints: an `error: ...` message as it is, any other as `stopped: ...`."""
        return self.message if self.message.startswith("error:") else f"stopped: {self.message}"


def env_rank() -> int:
    """This process's global rank from its launcher's environment, before any process group exists: torchrun
    (RANK), SLURM (SLURM_PROCID), Lightning's own launcher (NODE_RANK, LOCAL_RANK); 0 for a single process."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    if "LOCAL_RANK" in os.environ or "NODE_RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", 0))
        return int(os.environ.get("NODE_RANK", 0)) * int(os.environ.get("LOCAL_WORLD_SIZE", 1)) + local
    return 0


def signal_stop(signum: int, resume: str = RERUN, when: str = "") -> RunStopped:
    """The stop of this process for signal `signum`: exit status 128 + its number, "rank R received NAME; resume"."""
    return RunStopped(128 + signum, f"rank {env_rank()} received {signal.Signals(signum).name}{when}; {resume}")


Reaction = Callable[[int], RunStopped]


class _Handling:
    """This process's handling of the stop signals: the handlers it replaced, the running work's reactions, the
    stop once there is one, and the command that owns the exit."""

    def __init__(self) -> None:
        self.depth = 0
        self.previous: dict[int, Any] = {}
        self.reactions: list[Reaction] = []
        self.stop: RunStopped | None = None
        self.raised = False
        self.ignore_sigint = False
        self.command: CommandExit | None = None
        self.pid = os.getpid()
        self.deferring: list[bool] = []  # per nested block: whether its stops wait for the work (`defer`)


_HANDLING = _Handling()


def _handler(signum: int, frame: Any) -> None:
    state = _HANDLING
    if os.getpid() != state.pid:  # a forked process (a DataLoader worker) inherited it: the signal's own action
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if state.raised:
        return  # the main thread is already ending (a second Ctrl-C while it unwinds)
    if state.stop is None:
        if signum == signal.SIGINT and state.ignore_sigint:
            return  # started with Ctrl-C ignored (a background job of a shell script): it stays ignored
        reaction = state.reactions[-1] if state.reactions else signal_stop
        _record(reaction(signum))
    if _deferred():
        return  # recorded: the work raises it where its processes meet (its reaction kept it)
    state.raised = True
    raise state.stop


def _deferred() -> bool:
    """Whether the innermost block defers its stops."""
    return bool(_HANDLING.deferring) and _HANDLING.deferring[-1]


def stop_handled(stop: RunStopped) -> None:
    """The work caught `stop` and goes on (a training run's margin measurement that another rank's failure stopped,
    skipped by its settings): it no longer stops this process, and the command's last resort is disarmed."""
    state = _HANDLING
    if state.stop is stop:
        state.stop, state.raised = None, False
        if state.command is not None:
            state.command._disarm()


def _record(stop: RunStopped) -> bool:
    """Keep the first stop of this process and arm its command's last resort; whether `stop` was the first."""
    state = _HANDLING
    if state.stop is not None:
        return False
    state.stop = stop
    if state.command is not None:
        state.command._arm(stop)
    return True


def request_stop(stop: RunStopped) -> None:
    """From a thread other than the main one (a watchdog): the run stops with `stop`. While the stop signals are
    handled here, the main thread raises it as soon as it runs Python (a SIGINT to itself interrupts a sleep);
    elsewhere the main thread is left alone (its collectives time out)."""
    first = _record(stop)
    main = threading.current_thread() is threading.main_thread()
    if first and _HANDLING.depth and not _deferred() and not main:
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def _quiet_swallowed_stops() -> None:
    """Python reports an exception it cannot propagate (raised in a weakref callback or a `__del__`, e.g. importlib's
    module-lock cleanup while the modules load) with "Exception ignored in" and a traceback, on every rank. A stop
    raised there is recorded and still ends the process (`CommandExit` raises it as main() starts or ends, its last
    resort in between): its report would only add a traceback to the one line. Other reports are Python's own."""
    previous = sys.unraisablehook
    if getattr(previous, "quiet_stops", False):
        return

    def hook(unraisable: Any) -> None:
        stop = unraisable.exc_value
        if not (isinstance(stop, RunStopped) and stop in (_LOADING.stop, _HANDLING.stop)):
            previous(unraisable)

    hook.quiet_stops = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def install_stop_handlers() -> None:
    """This module's handlers for the stop signals again, after a library replaced them (a Lightning trainer does)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


@contextlib.contextmanager
def stop_signals(reaction: Reaction | None = None, defer: bool = False) -> Iterator[None]:
    """Inside: SIGTERM, SIGUSR1 and SIGINT raise `RunStopped` in the main thread, the stop `reaction(signum)` returns
    (default `signal_stop`); with `defer` they are recorded only, for the work to raise. Nests: the
    innermost reaction acts, a block that does not defer inside one that does raises a pending stop at once; the
    outermost block restores the handlers it found and starts afresh (a Python session may run several commands).
    Only the main thread can handle signals: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = _HANDLING
    if state.depth == 0:
        state.previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        state.ignore_sigint = state.previous[signal.SIGINT] == signal.SIG_IGN
        state.stop, state.raised, state.pid = None, False, os.getpid()
        _quiet_swallowed_stops()
    install_stop_handlers()
    if state.stop is not None and not defer and not state.raised and _deferred():
        state.raised = True
        raise state.stop  # deferred so far: this block cannot wait for it
    state.depth += 1
    state.deferring.append(defer)
    if reaction is not None:
        state.reactions.append(reaction)
    try:
        yield
    finally:
        if reaction is not None:
            state.reactions.remove(reaction)
        state.deferring.pop()
        state.depth -= 1
        if state.depth == 0:
            for sig, previous in state.previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


class CommandExit:
    """What a command's main() enters first: the stop signals are handled for the whole command (`stop_signals`),
    and main() turns a stop into the exit (`stopped`). The last resort, for a main thread that cannot: Python runs
    a signal handler only between bytecodes, so a main thread stuck in a C call (a collective waiting for a process
    that is gone) never raises its stop; `grace` seconds after a stop that main() has not turned into the exit by
    then, this object prints the line and ends the process itself, with the stop's exit status. A stop whose raise
    Python ignored (a signal handled inside a weakref callback or a `__del__`) and that main() outlived is raised
    as main() leaves this block, after its line: the exit status is the stop's, never 0."""

    def __init__(self, grace: float = GRACE):
        self.grace = grace
        self._said = threading.Lock()  # held by whoever printed the line: it is printed once
        self._timer: threading.Timer | None = None
        self._signals = contextlib.ExitStack()

    def __enter__(self) -> CommandExit:
        if _LOADING.stop is not None:  # a stop while the modules loaded whose raise Python swallowed: its line is out
            raise _LOADING.stop
        self._signals.enter_context(stop_signals())
        _HANDLING.command = self
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        swallowed = _HANDLING.stop if _HANDLING.raised and not self._said.locked() else None
        _HANDLING.command = None
        if self._timer is not None:
            self._timer.cancel()
        self._signals.close()
        if kind is None and swallowed is not None:  # raised where Python ignored it, and the command went on
            self._say(swallowed)
            raise swallowed

    def stopped(self, stop: RunStopped) -> int:
        """The exit status for main() to return: `stop`'s, after its line (on the main process only)."""
        self._say(stop)
        return stop.code

    def _arm(self, stop: RunStopped) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self.grace, self._last_resort, args=(stop,))
            self._timer.daemon = True
            self._timer.start()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _last_resort(self, stop: RunStopped) -> None:
        # main() has not ended the process `grace` seconds after the stop: its main thread is stuck where Python
        # cannot interrupt it (a C call, a collective waiting for a lost process). Ending the process here is the
        # only way left to keep the promise that every process of a stopped run ends within a bounded time.
        self._say(stop)
        os._exit(stop.code)

    def _say(self, stop: RunStopped) -> None:
        if self._said.acquire(blocking=False) and env_rank() == 0:
            print(stop.line(), file=sys.stderr, flush=True)


class _Loading:
    """The stop received while the command's modules loaded (`stop_while_loading`), once there is one."""

    stop: RunStopped | None = None


_LOADING = _Loading()


@contextlib.contextmanager
def modules_loading(command: bool, resume: str = RERUN) -> Iterator[None]:
    """Around a command's imports (`command`: the file runs as a command, `__name__ == "__main__"`): a signal while
    they load ends the process with the signal's exit status and its line (`stop_while_loading`), also where the code
    it landed in turned the stop into an exception of its own (a C extension's import: numpy's "PyCapsule_Import
    could not import module datetime", seen with a SIGTERM during rank 1's start on a busy machine)."""
    if command:
        stop_while_loading(resume)
    try:
        yield
    except BaseException as err:
        if _LOADING.stop is not None and err is not _LOADING.stop:
            raise _LOADING.stop from None
        raise


def stop_while_loading(resume: str = RERUN) -> None:
    """First in a command, before its other imports: a signal while its modules load (seconds) ends the process
    with the signal's exit status and its line (on the main process), before the command did anything. A Ctrl-C
    ignored from the start stays ignored. main()'s `CommandExit` takes over."""

    def handler(signum: int, frame: Any) -> None:
        stop = signal_stop(signum, resume, " while starting")
        if _LOADING.stop is not None:
            raise _LOADING.stop  # already stopped (the first raise was swallowed): no second line
        _LOADING.stop = stop
        if env_rank() == 0:
            print(stop.line(), file=sys.stderr, flush=True)
        # a SystemExit: the imports unwind and the interpreter ends with its code. Python ignores an exception
        # raised where it cannot propagate (a weakref callback, `__del__`, e.g. importlib's module-lock cleanup;
        # its report is silenced): then CommandExit raises the recorded stop as main() starts
        raise stop

    _quiet_swallowed_stops()
    for sig in reversed(STOP_SIGNALS):  # SIGTERM's last: once it is handled, all are
        if sig != signal.SIGINT or signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, handler)
