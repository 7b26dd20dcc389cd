"""A loopback port that carries each connection to a pod's port through one tunnel, as `kubectl port-forward` does.

Knows sockets only: the tunnel (a pods/portforward WebSocket, kube.py) is opened by the function it is given, once
per accepted connection. Listens on 127.0.0.1 only, and only while the command that opened it runs.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

log = logging.getLogger(__name__)


class Tunnel(Protocol):
    """The pod's end, as the kubernetes client's PortForward hands it over: a connected socket-like object."""

    def recv(self, size: int, /) -> bytes: ...
    def sendall(self, data: bytes, /) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int: ...
    def setblocking(self, flag: bool, /) -> None: ...


def _pump(a: socket.socket, b: Tunnel) -> None:
    """Copies both ways until either side closes; then closes both."""
    sel = selectors.DefaultSelector()
    try:
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b.fileno(), selectors.EVENT_READ, a)
        sources = {a.fileno(): a, b.fileno(): b}
        while True:
            for key, _ in sel.select():
                data = sources[key.fd].recv(65536)
                if not data:
                    return
                key.data.sendall(data)
    except OSError:
        return
    finally:
        sel.close()
        with contextlib.suppress(OSError):
            a.close()
        # What the pod sent after our side stopped reading is read away first: closing a socket with unread
        # data resets it, and the client's forwarding thread would print that reset as a traceback.
        with contextlib.suppress(OSError):
            b.setblocking(False)
            while b.recv(65536):
                pass
        with contextlib.suppress(OSError):
            b.close()


@contextlib.contextmanager
def local_port(open_tunnel: Callable[[], Tunnel]) -> Iterator[str]:
    """`with local_port(open) as address:` connect to `address` ("127.0.0.1:N") to reach the pod's port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)  # closing a socket does not wake a thread blocked in accept(): poll the stop flag
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            try:
                tunnel = open_tunnel()
            except Exception as e:  # the command sees a closed connection; the reason goes to the log
                log.warning("port-forward failed: %s", e)
                conn.close()
                continue
            threading.Thread(target=_pump, args=(conn, tunnel), name="port-forward", daemon=True).start()

    acceptor = threading.Thread(target=accept, name="port-forward-accept", daemon=True)
    acceptor.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        acceptor.join(5)
