"""OpenAI backend throughput against the fake server, as a fraction of the ideal.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_openai.py                 # 256 in flight, 100 ms
    PYTHONPATH=. .venv/bin/python benchmarks/bench_openai.py --requests 5000 --fixed

The fake server (``datagen.testing.fake_openai``) runs in its own process and answers
every request after ``--latency`` seconds. One ``OpenAICompatibleTeacher`` (one replica,
``max_concurrency`` = ``--inflight``) is fed as the runner feeds an actor: batches of
``--batch-size`` rows, ``--batches`` of them outstanding at a time. With ``L`` seconds
per request and ``C`` in flight, no client can beat ``C / L`` requests/s; the figure
printed is measured requests/s divided by that ideal (target >= 0.90 on 2 cores).

The client runs on uvloop when it is installed, as Ray's async actors do.
A warm-up of ``2 x --inflight`` requests runs first (untimed): it opens the connections
and, with adaptive concurrency on (the default), lets the limiter ramp from its slow
start to the ceiling. ``--fixed`` turns adaptive concurrency off instead. Figures only,
no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datagen.config import OpenAITeacher  # noqa: E402
from datagen.teachers.openai_api import OpenAICompatibleTeacher  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "datagen.testing.fake_openai", "--port", str(port),
                             "--latency", str(latency)], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/models", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("fake server did not start")


async def drive(teacher: OpenAICompatibleTeacher, n: int, batch_size: int, batches: int, offset: int) -> int:
    """Keep ``batches`` generate() calls of ``batch_size`` rows outstanding, like the runner."""
    reqs = [{"row_id": f"r{offset + i}", "messages": [{"role": "user", "content": f"order {offset + i} for a lamp"}],
             "seed": offset + i} for i in range(n)]
    chunks = [reqs[i:i + batch_size] for i in range(0, n, batch_size)]
    errors = 0
    pending: set[asyncio.Task] = set()
    while chunks or pending:
        while chunks and len(pending) < batches:
            pending.add(asyncio.ensure_future(teacher.generate(chunks.pop(0))))
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        errors += sum(g.error is not None for t in done for g in t.result())
    return errors


async def bench(args: argparse.Namespace, url: str) -> None:
    cfg = OpenAITeacher.model_validate({
        "name": "bench", "backend": "openai", "model": "fake", "base_url": url,
        "max_concurrency": args.inflight, "adaptive_concurrency": not args.fixed, "timeout_s": 30,
        "sampling": {"temperature": 0.0, "max_tokens": 32},
    })
    teacher = OpenAICompatibleTeacher(cfg)
    try:
        await drive(teacher, 2 * args.inflight, args.batch_size, args.batches, offset=10**9)
        t0, c0 = time.perf_counter(), time.process_time()
        errors = await drive(teacher, args.requests, args.batch_size, args.batches, offset=0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        await teacher.aclose()
    ideal = args.inflight / args.latency
    rate = args.requests / wall
    lim = teacher.limiter
    print(f"requests            {args.requests} ({errors} errors)")
    print(f"in flight (ceiling) {args.inflight}, adaptive {'off' if args.fixed else 'on'}, "
          f"final limit {lim.limit:.0f}, cuts {dict(lim.cuts) or 'none'}")
    print(f"server latency      {args.latency * 1000:.0f} ms")
    print(f"wall                {wall:.2f} s")
    print(f"client CPU          {cpu / args.requests * 1e3:.3f} ms/request")
    print(f"requests/s          {rate:.0f}")
    print(f"ideal requests/s    {ideal:.0f}")
    print(f"ratio               {rate / ideal:.3f}")


def new_loop() -> asyncio.AbstractEventLoop:
    """The loop a teacher actor gets: Ray runs async actors on uvloop when it is installed."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--inflight", type=int, default=256)
    p.add_argument("--latency", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--fixed", action="store_true", help="adaptive concurrency off")
    args = p.parse_args()
    proc, url = start_server(args.latency)
    try:
        loop = new_loop()
        print(f"event loop          {type(loop).__module__}.{type(loop).__name__}")
        try:
            loop.run_until_complete(bench(args, url))
        finally:
            loop.close()
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
