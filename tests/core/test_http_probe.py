"""The one reachability probe: what counts as an answer, and what as a healthy one."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf_pipeline.http_probe import probe

seen_authorization: list[str | None] = []


@pytest.fixture()
def server():
    """A server answering GET /<status> with that status (the Authorization headers it saw: `seen_authorization`)."""
    seen_authorization.clear()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen_authorization.append(self.headers.get("Authorization"))
            self.send_response(int(self.path.strip("/")))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("status, healthy", [(200, True), (401, True), (403, True), (404, False), (503, False)])
def test_any_status_is_an_answer(server, status, healthy):
    answer = probe(f"{server}/{status}")
    assert answer.reachable and answer.status == status and answer.healthy is healthy


def test_nothing_listening_is_no_answer_with_a_reason():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answer = probe(f"http://127.0.0.1:{port}/health", timeout=2)
    assert not answer.reachable and not answer.healthy and answer.reason


def test_a_malformed_url_is_no_answer():
    answer = probe("http://bad host/health", timeout=2)
    assert not answer.reachable and answer.reason


def test_a_server_that_does_not_speak_http_is_no_answer():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def reply_garbage() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")

        threading.Thread(target=reply_garbage, daemon=True).start()
        answer = probe(f"http://127.0.0.1:{listener.getsockname()[1]}/health", timeout=2)
    assert not answer.reachable and answer.reason


def test_credentials_in_the_url_go_in_a_basic_auth_header_not_the_host(server):
    """`http://user:p%40ss@host` is how users write a tracking URI behind basic auth: the probe reaches the host
    (urllib alone would fail with "Name or service not known") and sends what MLflow's client would send."""
    import base64

    with_userinfo = server.replace("http://", "http://alice:p%40ss@") + "/200"
    answer = probe(with_userinfo)
    assert answer.status == 200
    assert seen_authorization == ["Basic " + base64.b64encode(b"alice:p@ss").decode()]
    probe(f"{server}/200")
    assert seen_authorization[-1] is None  # no header without credentials
