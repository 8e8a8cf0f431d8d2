"""Bounded loopback load test of ``tbps serve``.

    python benchmarks/bench_serve.py --index INDEX [--clients 32] [--seconds 30]

Starts ``tbps serve INDEX`` on 127.0.0.1 (a free port), waits for /api/health, then runs
``--clients`` concurrent httpx clients that send text searches (k=20, descriptions drawn from a
fixed list) back to back for ``--seconds``; reports requests served, errors (any non-200 or
transport error), throughput and p50 / p95 / max latency. The server is stopped afterwards.
Nothing leaves the machine: the server binds to and the clients talk to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

QUERIES = [
    "a man in a blue jacket with a black backpack",
    "a woman wearing a red dress and white shoes",
    "a young man with short black hair, grey t-shirt, blue jeans",
    "a person carrying a yellow handbag, wearing glasses",
    "a girl in a green coat and black trousers with a pink backpack",
    "a man wearing an orange hat, black boots and a white shirt",
    "the woman has long brown hair and holds a suitcase",
    "a man in shorts and sneakers walking",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def client(http: httpx.AsyncClient, deadline: float, seed: int, latencies: list[float], errors: list[str]) -> None:
    rng = random.Random(seed)
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            response = await http.get("/api/search", params={"q": rng.choice(QUERIES), "k": 20})
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:100]}")
                continue
        except httpx.HTTPError as error:
            errors.append(f"{type(error).__name__}: {error}")
            continue
        latencies.append(time.perf_counter() - started)


async def load(base_url: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60.0) as http:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(http, deadline, seed, latencies, errors) for seed in range(clients)))
        elapsed = time.perf_counter() - started
    values = np.array(latencies) * 1000
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests_ok": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(values, 50)), 1) if len(values) else None,
        "p95_ms": round(float(np.percentile(values, 95)), 1) if len(values) else None,
        "max_ms": round(float(values.max()), 1) if len(values) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args()
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 300:
        parser.error("keep the test bounded: 1..256 clients, at most 300 seconds")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tbps", "serve", str(args.index), "--host", "127.0.0.1", "--port", str(port)])
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if server.poll() is not None:
                raise SystemExit(f"tbps serve exited with code {server.returncode}")
            try:
                if httpx.get(base_url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("tbps serve did not come up")
            time.sleep(0.2)
        images = httpx.get(base_url + "/api/health").json()["images"]
        result = asyncio.run(load(base_url, args.clients, args.seconds))
        print(json.dumps({"index_images": images, **result}))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
