"""Test-only fault injection through the engine's hooks (``gissl.engine.HOOKS``).

Importing this module installs the fault that ``GISSL_FAULT`` describes (nothing when it is
unset). Run a script under it with ``python tests/faults.py SCRIPT ARGS...``; a worker that
imports it (tests/ddp_faults.py) gets the same. The production loop knows nothing of faults.
"""
import os
import runpy
import signal
import sys

from gissl import dist, engine


class Fault:
    """Crash injection for tests/test_reliability.py, read from ``GISSL_FAULT``.

    ``kill_after_step:N[:SIG]``  send SIG (``KILL`` by default; ``TERM``, ``INT``) to this
                                 process after optimiser step N (counted over the whole run)
    ``raise_after_step:N``       raise RuntimeError after optimiser step N
    ``kill_in_save:N``           in this process's N-th checkpoint write, cut the temporary
                                 file to half its length and SIGKILL the process before the rename
    ``<fault>@R``                only on rank R
    """

    def __init__(self, action, n, sig):
        self.action, self.n, self.sig, self.saves = action, n, sig, 0

    @classmethod
    def from_env(cls):
        spec = os.environ.get("GISSL_FAULT")
        if not spec:
            return None
        spec, _, rank = spec.partition("@")
        if rank and int(rank) != dist.get_rank():
            return None
        action, n, *sig = spec.split(":")
        return cls(action, int(n), sig[0] if sig else "KILL")

    def after_step(self, global_step):
        if global_step != self.n:
            return
        if self.action == "kill_after_step":
            os.kill(os.getpid(), getattr(signal, "SIG" + self.sig))
        elif self.action == "raise_after_step":
            raise RuntimeError(f"injected fault (GISSL_FAULT) on rank {dist.get_rank()} "
                               f"after step {global_step}")

    def before_replace(self, tmp):
        self.saves += 1
        if self.action == "kill_in_save" and self.saves == self.n:
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)


_FAULT = []


def _fault():
    # read at the first hook call, when torchrun's process group (and so the rank) is set up
    if not _FAULT:
        _FAULT.append(Fault.from_env())
    return _FAULT[0]


def install():
    """Register the ``GISSL_FAULT`` fault (if any) on the engine's hooks."""
    if os.environ.get("GISSL_FAULT"):
        engine.HOOKS["after_step"].append(lambda step: _fault() and _fault().after_step(step))
        engine.HOOKS["before_replace"].append(lambda tmp: _fault() and _fault().before_replace(tmp))


install()

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
