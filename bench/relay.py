"""A TCP relay that can be cut and resumed: an outage of a server for one client only (the tests' Milvus
outages, bench/reconnect.py)."""
from __future__ import annotations

import socket
import threading


class Relay:
    """A TCP relay to a server (`target`: "host:port" or a URI) that can be cut (listener and every
    connection closed: the client sees the server gone) and resumed on the same port: a real outage without
    stopping a shared server. `cut()` returns the function that resumes it."""

    def __init__(self, target: str) -> None:
        host, port = target.split("://", 1)[-1].rsplit(":", 1)
        self.target = (host, int(port))
        self.conns: list[socket.socket] = []
        self._listen(0)
        self.uri = f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> None:
        self.lsock = socket.create_server(("127.0.0.1", port))
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.lsock,), daemon=True).start()

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                down, _ = lsock.accept()
                up = socket.create_connection(self.target)
            except OSError:
                return
            self.conns += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for x in (a, b):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.lsock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone would not)
        self.lsock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()
        return lambda: self._listen(self.port)

    def close(self) -> None:
        """Cut it for good (a relay already cut stays cut)."""
        try:
            self.cut()
        except OSError:
            pass
