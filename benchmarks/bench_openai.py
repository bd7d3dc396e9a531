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

Then (``--layers``) the client's CPU per request, layer by layer, against an instant
server: aiohttp alone, the openai client's generic ``post``, its typed
``chat.completions.create``, and datagen's whole teacher. On 2 cores the ideal needs
the client to spend under ~0.4 ms of CPU per request (the server needs some too);
these lines show which layer decides whether that is possible.
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


def start_server(latency: float, *extra: str) -> tuple[subprocess.Popen, str]:
    """The fake server in its own process (``extra``: more of its CLI arguments)."""
    port = free_port()
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "datagen.testing.fake_openai", "--port", str(port),
                             "--latency", str(latency), *extra], env=env, stdout=subprocess.DEVNULL)
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


def cpu_seconds(pid: int) -> float:
    """utime + stime of another process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(args: argparse.Namespace, url: str, server_pid: int) -> None:
    cfg = OpenAITeacher.model_validate({
        "name": "bench", "backend": "openai", "model": "fake", "base_url": url,
        "max_concurrency": args.inflight, "adaptive_concurrency": not args.fixed, "timeout_s": 30,
        "sampling": {"temperature": 0.0, "max_tokens": 32},
    })
    teacher = OpenAICompatibleTeacher(cfg)
    try:
        await drive(teacher, 2 * args.inflight, args.batch_size, args.batches, offset=10**9)
        t0, c0, s0 = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
        errors = await drive(teacher, args.requests, args.batch_size, args.batches, offset=0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        server_cpu = cpu_seconds(server_pid) - s0
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
    print(f"client CPU          {cpu / args.requests * 1e3:.3f} ms/request ({cpu / wall:.0%} of a core)")
    print(f"fake server CPU     {server_cpu / args.requests * 1e3:.3f} ms/request ({server_cpu / wall:.0%} of a core)")
    print(f"machine load (1 min) {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
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


async def layers(url: str, n: int) -> None:
    """Client CPU per request, layer by layer, against an instant server: what one core
    can drive at most, and how much of it is datagen's own (limiter, retries, parsing)."""
    import aiohttp
    import openai
    from openai._constants import DEFAULT_CONNECTION_LIMITS

    body = {"model": "fake", "messages": [{"role": "user", "content": "order 1 for a lamp"}],
            "max_tokens": 32, "temperature": 0.0, "top_p": 1.0, "seed": 1}

    async def cpu_per_request(one) -> float:
        sem = asyncio.Semaphore(64)

        async def bounded():
            async with sem:
                await one()

        await asyncio.gather(*(bounded() for _ in range(256)))  # connections up
        c = time.process_time()
        await asyncio.gather(*(bounded() for _ in range(n)))
        return (time.process_time() - c) / n * 1e3

    async with aiohttp.ClientSession() as session:
        async def raw():
            async with session.post(url + "/chat/completions", json=body) as r:
                await r.json()
        figures = [("aiohttp alone", await cpu_per_request(raw))]
    limits = type(DEFAULT_CONNECTION_LIMITS)(max_connections=256, max_keepalive_connections=256)
    client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0,
                                http_client=openai.DefaultAioHttpClient(limits=limits))

    async def post():
        await client.post("/chat/completions", body=body, cast_to=object)

    async def create():
        await client.chat.completions.create(**body)

    figures.append(("openai client.post (aiohttp)", await cpu_per_request(post)))
    figures.append(("openai chat.completions.create", await cpu_per_request(create)))
    await client.close()
    teacher = OpenAICompatibleTeacher(OpenAITeacher.model_validate({
        "name": "bench", "backend": "openai", "model": "fake", "base_url": url, "max_concurrency": 64,
        "adaptive_concurrency": False, "sampling": {"temperature": 0.0, "max_tokens": 32}}))
    req = [{"row_id": "r", "messages": body["messages"], "seed": 1}]

    async def datagen():
        await teacher.generate(req)

    figures.append(("datagen teacher (all of it)", await cpu_per_request(datagen)))
    await teacher.aclose()
    print("client CPU per request against an instant server (one process, one core at most):")
    for name, ms in figures:
        print(f"  {name:32s} {ms:.3f} ms  -> at most {1000 / ms:.0f} requests/s per core")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--inflight", type=int, default=256)
    p.add_argument("--latency", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--fixed", action="store_true", help="adaptive concurrency off")
    p.add_argument("--layers", type=int, default=3000, metavar="N",
                   help="then time N requests per client layer against an instant server (0: skip)")
    args = p.parse_args()
    proc, url = start_server(args.latency)
    try:
        loop = new_loop()
        print(f"event loop          {type(loop).__module__}.{type(loop).__name__}")
        try:
            loop.run_until_complete(bench(args, url, proc.pid))
        finally:
            loop.close()
    finally:
        proc.terminate()
        proc.wait(10)
    if args.layers:
        proc, url = start_server(0.0)
        try:
            loop = new_loop()
            try:
                loop.run_until_complete(layers(url, args.layers))
            finally:
                loop.close()
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
