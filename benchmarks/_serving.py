"""What the serving benchmarks share: wait until a server answers, and return the model id it serves.

from _serving import wait_ready      # benchmarks run as `python benchmarks/NAME.py`, so this folder is on sys.path
model = wait_ready(proc, "http://127.0.0.1:8000")
"""

import subprocess
import time

import httpx


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> str:
    """Poll /health (chatstack) or /v1/models (llama-server, vLLM) until the server answers; the served model's id.
    Raises with the server's last stderr lines if it exits, and stops it if it is not ready in `timeout` s."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            err = proc.stderr.read()[-2000:] if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err}")
        for path in ("/health", "/v1/models"):
            try:
                if httpx.get(url + path, timeout=2).status_code == 200:
                    return httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"server at {url} not ready in {timeout:.0f} s")
