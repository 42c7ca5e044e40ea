"""A real S3 API server for tests: moto's server app on 127.0.0.1 (a free port) in a thread of the test
process, as s3fs's own tests run it (moto's decorator does not reach s3fs's async client), behind a
middleware that can fail requests (fault injection) and counts them.

Subprocesses (the console script) reach it through the environment the fixture sets:
``AWS_ENDPOINT_URL`` (botocore and so s3fs read it) and dummy credentials. Nothing leaves the machine.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

BUCKET = "mmpretrain-test"


def _quiet_handler():
    from moto.moto_server.threaded_moto_server import MotoRequestHandler

    class Quiet(MotoRequestHandler):
        def log_request(self, *args, **kwargs) -> None:  # one line a request would drown the test's output
            pass

    return Quiet


class FaultyS3:
    """moto's S3 app, served on 127.0.0.1. ``fail_every=N``: every N-th request matching ``fail_match``
    (a regex on ``METHOD path?query``) is answered 503 SlowDown-free ServiceUnavailable; ``dead``: every
    request matching ``fail_match`` is answered 503 (a server that went away). ``requests`` counts
    requests by method (HEAD, GET, GET-range, PUT, ...)."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.app = DomainDispatcherApplication(create_backend_app)
        self.fail_every, self.fail_match, self.dead = 0, ".", False
        self.requests: Counter[str] = Counter()
        self.log: list[str] = []
        self.failed = 0
        self._n = 0
        self._lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, self._wsgi, threaded=True, request_handler=_quiet_handler())
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _wsgi(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        what = f"{method} {environ.get('PATH_INFO', '')}?{environ.get('QUERY_STRING', '')}"
        kind = "GET-range" if method == "GET" and environ.get("HTTP_RANGE") else method
        with self._lock:
            self.requests[kind] += 1
            self.log.append(f"{what} {environ.get('HTTP_RANGE', '')}".strip())
            fail = False
            if re.search(self.fail_match, what) is not None:
                self._n += 1
                fail = self.dead or bool(self.fail_every and self._n % self.fail_every == 0)
            if fail:
                self.failed += 1
        if fail:
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            body = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
            start_response("503 Service Unavailable", [("Content-Type", "application/xml")])
            return [body]
        return self.app(environ, start_response)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.log.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()


@pytest.fixture
def s3(monkeypatch, tmp_path) -> Iterator[FaultyS3]:
    """A fresh S3 server with the bucket :data:`BUCKET`, and the environment pointing s3fs at it."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    server = FaultyS3()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": server.endpoint,
        "MMPRETRAIN_CACHE": str(tmp_path / "cache"),
        "MMPRETRAIN_STORAGE_ATTEMPTS": os.environ.get("MMPRETRAIN_STORAGE_ATTEMPTS", "6"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    try:
        yield server
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        from moto.s3.models import s3_backends

        s3_backends.reset()  # moto's state is per process: the next test starts with no bucket
