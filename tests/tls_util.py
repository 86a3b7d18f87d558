"""Tiny in-process TLS and plain-TCP servers on 127.0.0.1 for certificate checks."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[int]:
    """Accepts connections and completes TLS handshakes until closed; yields the port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    with _serving(lambda conn: _handshake(context, conn)) as port:
        yield port


@contextlib.contextmanager
def plain_server() -> Iterator[int]:
    """Answers every connection with plain HTTP, as a SuperLink started with --insecure."""
    def answer(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    with _serving(answer) as port:
        yield port


def _handshake(context: ssl.SSLContext, conn: socket.socket) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        context.wrap_socket(conn, server_side=True).close()


@contextlib.contextmanager
def _serving(handle) -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                handle(conn)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def tls_handshake(paths: dict[str, Path], *, ca: Path) -> str:
    """'ok' if a client trusting ``ca`` completes a handshake with the server in ``paths``."""
    with tls_server(paths["server_cert"], paths["server_key"]) as port:
        context = ssl.create_default_context(cafile=str(ca))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                with context.wrap_socket(sock, server_hostname="127.0.0.1"):
                    return "ok"
        except ssl.SSLError as err:
            return str(err)
