"""A real S3-compatible server on 127.0.0.1 (moto in server mode), for tests.

``with MotoS3(bucket="b") as s3: s3.env`` gives the environment a datagen process
needs to reach it: fake credentials in the standard AWS variables (never stored by
datagen) and ``AWS_ENDPOINT_URL`` pointing at the server. Needs ``moto[server]`` (the
``dev`` extra).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    def __init__(self, *, bucket: str = "datagen-test", secret: str = "test-secret-never-stored"):
        self.bucket = bucket
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": secret,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> MotoS3:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("moto server did not start (is moto[server] installed?)") from None
                time.sleep(0.1)
        self.filesystem().create_dir(self.bucket)
        return self

    def filesystem(self) -> Any:
        from pyarrow import fs as pafs

        return pafs.S3FileSystem(access_key=self.env["AWS_ACCESS_KEY_ID"],
                                 secret_key=self.env["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                                 endpoint_override=f"127.0.0.1:{self.port}", scheme="http",
                                 allow_bucket_creation=True)

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def __exit__(self, *exc: Any) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

