"""Runs a script of steps against a real Orthanc, inside a private network namespace.

    unshare -n python3 tests/pacs_orthanc.py JOB.json

The caller (tests/test_pacs.py) starts this under `unshare -n`, so the namespace has only a
loopback interface: Orthanc 1.10 listens on every interface, and here there is no other one.
The job file names a work folder, Orthanc settings to change ("orthanc": {...}) and a list of
steps; the results (exit codes, output, files
Orthanc accepted, how many instances were staged when Orthanc was killed) go to
WORK/results.json for the test to assert on. Steps:

    {"op": "start"}                      start Orthanc (its database survives a restart)
    {"op": "stop"}                       kill Orthanc (SIGKILL: a crash, not a shutdown)
    {"op": "upload", "files": [...]}     POST each file to /instances; results["accepted"]
    {"op": "tls_proxy", "cert": C, "key": K, "port": P}   HTTPS on P in front of Orthanc
    {"op": "pull", "name": N, "args": [...], "env": {...}, "staging": DIR,
     "kill_orthanc_at_staged": K | "kill_pull_at_staged": K}
                                         run `pgjax pull ARGS`; kill Orthanc (or the pull)
                                         once K instances are staged in DIR
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC = "/usr/sbin/Orthanc"
PLUGINS = "/usr/share/orthanc/plugins"
HTTP_PORT, DICOM_PORT, AET = 8042, 4242, "ORTHANC"
USER, PASSWORD = "pgjax", "test-password-not-secret"
OUR_AET, SCP_PORT = "PGJAX", 11113


def orthanc_config(work: Path) -> dict:
    return {
        "Name": "pgjax-test",
        "StorageDirectory": str(work / "orthanc-db"),
        "IndexDirectory": str(work / "orthanc-db"),
        "HttpPort": HTTP_PORT,
        "DicomPort": DICOM_PORT,
        "DicomAet": AET,
        "DicomCheckCalledAet": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        # Our Storage SCP, the C-MOVE destination.
        "DicomModalities": {"pgjax": [OUR_AET, "127.0.0.1", SCP_PORT]},
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        # Unknown AE titles may query and C-GET but not C-MOVE (pgjax's C-GET fallback).
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "Plugins": [f"{PLUGINS}/libOrthancDicomWeb.so", f"{PLUGINS}/libOrthancGdcm.so"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StorageCompression": False,
        "OverwriteInstances": False,
        "SaveJobs": False,
        "DicomScuTimeout": 10,
        "StableAge": 1,
    }


class Orthanc:
    def __init__(self, work: Path, overrides: dict | None = None):
        self.work, self.proc = work, None
        self.config = work / "orthanc.json"
        config = {**orthanc_config(work), **(overrides or {})}
        self.config.write_text(json.dumps(config, indent=1))

    def request(self, method: str, path: str, data: bytes | None = None):
        url = f"http://127.0.0.1:{HTTP_PORT}{path}"
        req = urllib.request.Request(url, data, method=method)
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def start(self) -> None:
        log = open(self.work / "orthanc.log", "ab")
        # TCP_NODELAY=1: DCMTK (Orthanc's DICOM layer) then turns Nagle's algorithm off; with it
        # on, every DIMSE answer waits ~40 ms for a delayed ACK (measured: C-ECHO 45 ms vs 3 ms).
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}); see orthanc.log")
            try:
                self.request("GET", "/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer in 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def upload(self, files: list[str]) -> list[str]:
        accepted = []
        for f in files:
            try:
                answer = self.request("POST", "/instances", Path(f).read_bytes())
            except urllib.error.HTTPError:
                continue  # Orthanc refused it: not part of what a pull can find
            if answer.get("Status") == "Success":
                accepted.append(f)
        return accepted


class TlsProxy:
    """HTTPS in front of Orthanc's HTTP port. Orthanc's own TLS (SslEnabled) crashes the Debian
    build 1.10.1 on the first connection here, and what the tests check is pgjax's TLS client.
    """

    def __init__(self, cert: str, key: str, port: int):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._serve, args=(server, context), daemon=True).start()

    def _serve(self, server, context):
        while True:
            client, _ = server.accept()
            threading.Thread(target=self._handle, args=(client, context), daemon=True).start()

    @staticmethod
    def _handle(client, context):
        try:
            tls = context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):  # a client that refused our certificate
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", HTTP_PORT))

        def pump(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(upstream, tls), daemon=True).start()
        pump(tls, upstream)


def _count_staged(staging: Path) -> int:
    try:
        return sum(1 for p in staging.iterdir() if p.suffix == ".dcm")
    except FileNotFoundError:
        return 0


def run_pull(step: dict, orthanc: Orthanc) -> dict:
    env = {**os.environ, **step.get("env", {})}
    cmd = [sys.executable, "-m", "pgjax.cli", "pull", *step["args"]]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = {"name": step.get("name", "")}
    kill_at = step.get("kill_orthanc_at_staged") or step.get("kill_pull_at_staged")
    if kill_at:
        staging = Path(step["staging"])
        while proc.poll() is None and _count_staged(staging) < kill_at:
            time.sleep(0.01)
        out["staged_at_kill"] = _count_staged(staging)
        if step.get("kill_pull_at_staged"):
            proc.send_signal(signal.SIGKILL)
        else:
            orthanc.stop()
    stdout, stderr = proc.communicate(timeout=step.get("timeout", 300))
    if "staging" in step:
        out["staged_after"] = _count_staged(Path(step["staging"]))
    out.update(
        rc=proc.returncode,
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace"),
        seconds=round(time.monotonic() - t0, 2),
    )
    return out


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    work = Path(job["work"])
    work.mkdir(parents=True, exist_ok=True)
    results = {"steps": [], "accepted": []}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    orthanc = Orthanc(work, job.get("orthanc"))
    try:
        for step in job["steps"]:
            op = step["op"]
            if op == "start":
                orthanc.start()
            elif op == "stop":
                orthanc.stop()
            elif op == "upload":
                results["accepted"] += orthanc.upload(step["files"])
            elif op == "tls_proxy":
                TlsProxy(step["cert"], step["key"], step["port"])
            elif op == "pull":
                results["steps"].append(run_pull(step, orthanc))
            else:
                raise ValueError(f"unknown step {op!r}")
    except Exception as e:  # reported to the test, which shows it
        results["error"] = f"{type(e).__name__}: {e}"
    finally:
        orthanc.stop()
        (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
