"""OpenAI backend throughput against the fake server, as a fraction of the ideal.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_openai.py                 # 256 in flight, 100 ms
    PYTHONPATH=. .venv/bin/python benchmarks/bench_openai.py --replicas 1    # one teacher process
    PYTHONPATH=. .venv/bin/python benchmarks/bench_openai.py --replicas 0 --layers 2000

The fake server (``datagen.testing.fake_openai``) runs in its own process and answers
every request after ``--latency`` seconds. With ``L`` seconds per request and ``C`` in
flight, no client can beat ``C / L`` requests/s; the figure printed is measured
requests/s divided by that ideal (issue 3 (b): target >= 0.90 on 2 cores).

The teacher is deployed as ``datagen run`` deploys it: ``--replicas`` Ray actors (default:
one per core) through the run's own ``TeacherFleet`` and ``TeacherActor``, each with its
share of the teacher's ``max_concurrency`` = ``--inflight`` (``OpenAITeacher.for_replica``),
fed as the driver feeds them: batches of ``--batch-size`` rows (default: one replica's
share of the in-flight ceiling), at most ``--batches`` outstanding per actor (default:
as many as the driver keeps, ``teachers.fleet.slots``), each sent to the least-loaded actor. ``--replicas 0`` runs one
teacher in this process, without Ray: the client alone (uvloop when installed, as Ray's
async actors use).

A warm-up of ``2 x --inflight`` requests runs first (untimed): it opens the connections
and, with adaptive concurrency on (the default), lets each limiter ramp from its slow
start to its ceiling. ``--fixed`` turns adaptive concurrency off instead. CPU is read
from /proc per process: the teacher processes (the client), this driver, Ray's own
processes (GCS, raylet, idle workers) and the fake server. Figures only, no assertions.

Then (``--layers``) the client's CPU per request, layer by layer, against an instant
server in this process: aiohttp alone, the openai client's generic ``post``, its typed
``chat.completions.create``, and datagen's whole teacher. On 2 cores the ideal needs
every process together to spend under ~0.87 ms of CPU per request (2 cores / 2304
requests/s); these lines show which layer decides whether that is possible.
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
from datagen.teachers.base import collect_less  # noqa: E402
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
    """Keep ``batches`` generate() calls of ``batch_size`` rows outstanding, like the driver."""
    reqs = requests_for(n, offset)
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


def machine_busy() -> float:
    """CPU seconds every process on the machine has used (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, IndexError, ValueError):  # gone meanwhile
            pass
    return total


def teacher_config(args: argparse.Namespace, url: str, replicas: int) -> OpenAITeacher:
    return OpenAITeacher.model_validate({
        "name": "bench", "backend": "openai", "model": "fake", "base_url": url, "replicas": replicas,
        "max_concurrency": args.inflight, "adaptive_concurrency": not args.fixed, "timeout_s": 30,
        "batch_size": args.batch_size or -(-args.inflight // max(1, replicas)),
        "sampling": {"temperature": 0.0, "max_tokens": 32},
    })


def requests_for(n: int, offset: int) -> list[dict]:
    return [{"row_id": f"r{offset + i}", "messages": [{"role": "user", "content": f"order {offset + i} for a lamp"}],
             "seed": offset + i} for i in range(n)]


def report(args: argparse.Namespace, *, wall: float, errors: int, limits: str, cpu: dict[str, float],
           busy: float) -> None:
    """The figures; ``cpu`` maps a process group's name to its CPU seconds over the run,
    ``busy`` is the whole machine's."""
    n, ideal = args.requests, args.inflight / args.latency
    print(f"requests            {n} ({errors} errors)")
    print(f"in flight (ceiling) {args.inflight} for the teacher, adaptive {'off' if args.fixed else 'on'}; {limits}")
    print(f"server latency      {args.latency * 1000:.0f} ms")
    print(f"wall                {wall:.2f} s")
    for name, seconds in cpu.items():
        print(f"{name + ' CPU':20s}{seconds / n * 1e3:.3f} ms/request ({seconds / wall:.0%} of a core)")
    print(f"{'all of it CPU':20s}{sum(cpu.values()) / n * 1e3:.3f} ms/request "
          f"({sum(cpu.values()) / wall:.0%} of a core)")
    others = max(0.0, busy - sum(cpu.values()))
    print(f"other processes     {others / wall:.0%} of a core during the run (a shared machine: not ours)")
    print(f"machine load (1 min) {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"requests/s          {n / wall:.0f}")
    print(f"ideal requests/s    {ideal:.0f}")
    print(f"ratio               {n / wall / ideal:.3f}")


def bench_replicas(args: argparse.Namespace, url: str, server_pid: int) -> None:
    """The teacher as ``datagen run`` deploys it: Ray actors fed batches by a driver loop."""
    import ray

    from datagen.config import Runtime
    from datagen.run.cluster import init_ray
    from datagen.teachers.fleet import TeacherFleet

    cfg = teacher_config(args, url, args.replicas)
    started = init_ray(Runtime(num_cpus=os.cpu_count()))
    try:
        actors = TeacherFleet([cfg])
        actors.wait_started(300, lambda: False)
        replicas = actors.by_teacher[cfg.name]
        pids = ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in replicas])
        feed(actors, cfg, requests_for(2 * args.inflight, offset=10**9), args.batches)
        ray_pids = [p for p in descendants(os.getpid()) if p not in pids and p != server_pid]
        c0, d0, r0, s0 = cpu_of(pids), time.process_time(), cpu_of(ray_pids), cpu_seconds(server_pid)
        t0, m0 = time.perf_counter(), machine_busy()
        errors = feed(actors, cfg, requests_for(args.requests, offset=0), args.batches)
        wall, busy = time.perf_counter() - t0, machine_busy() - m0
        cpu = {f"client ({len(pids)} proc)": cpu_of(pids) - c0, "driver": time.process_time() - d0,
               "Ray daemons": cpu_of(ray_pids) - r0, "fake server": cpu_seconds(server_pid) - s0}
        states = ray.get([a.__ray_call__.remote(lambda self: (self.teacher.limiter.limit,
                                                               dict(self.teacher.limiter.cuts))) for a in replicas])
        limits = "final limits " + ", ".join(
            f"{lim:.0f}/{cfg.for_replica(i).max_concurrency}" + (f" cuts {cuts}" if cuts else "")
            for i, (lim, cuts) in enumerate(states))
    finally:
        if started:
            ray.shutdown()
    print(f"replicas            {args.replicas} Ray actors, batches of {cfg.batch_size}, {args.batches} per actor")
    report(args, wall=wall, errors=errors, limits=limits, cpu=cpu, busy=busy)


def feed(actors, cfg: OpenAITeacher, reqs: list[dict], slots: int) -> int:
    """The fleet's dispatch (``TeacherFleet``): a batch goes to the least-loaded actor
    with a free slot; wait for any batch; repeat. Returns the rows that came back failed."""
    import ray

    chunks = [reqs[i:i + cfg.batch_size] for i in range(0, len(reqs), cfg.batch_size)]
    inflight: dict = {}
    errors = 0
    while chunks or inflight:
        while chunks and (actor := actors.free(cfg.name, slots)) is not None:
            inflight[actor.generate.remote(chunks.pop(0))] = actor
            actors.load[actor] += 1
        done, _ = ray.wait(list(inflight), num_returns=1)
        for ref in done:
            actors.load[inflight.pop(ref)] -= 1
            errors += sum(g["error"] is not None for g in ray.get(ref))
    return errors


async def bench(args: argparse.Namespace, url: str, server_pid: int) -> None:
    """One teacher in this process, without Ray: the client alone."""
    cfg = teacher_config(args, url, 1)
    teacher = OpenAICompatibleTeacher(cfg)
    try:
        await drive(teacher, 2 * args.inflight, cfg.batch_size, args.batches, offset=10**9)
        t0, c0, s0, m0 = time.perf_counter(), time.process_time(), cpu_seconds(server_pid), machine_busy()
        errors = await drive(teacher, args.requests, cfg.batch_size, args.batches, offset=0)
        wall, cpu, busy = time.perf_counter() - t0, time.process_time() - c0, machine_busy() - m0
        server_cpu = cpu_seconds(server_pid) - s0
    finally:
        await teacher.aclose()
    lim = teacher.limiter
    print(f"replicas            0: one teacher in this process, batches of {cfg.batch_size}, {args.batches} at a time")
    report(args, wall=wall, errors=errors, cpu={"client": cpu, "fake server": server_cpu}, busy=busy,
           limits=f"final limit {lim.limit:.0f}, cuts {dict(lim.cuts) or 'none'}")


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

    async def post():  # the whole URL, as datagen's teacher calls it
        await client.post(url + "/chat/completions", body=body, cast_to=object)

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
    p.add_argument("--replicas", type=int, default=os.cpu_count(),
                   help="teacher Ray actors (default: one per core); 0: one teacher in this process, no Ray")
    p.add_argument("--batch-size", type=int, default=0, help="rows per batch (default: in-flight share of a replica)")
    p.add_argument("--batches", type=int, default=0,
                   help="batches outstanding per actor (default: teachers.fleet.slots at inflight_per_actor 2)")
    p.add_argument("--fixed", action="store_true", help="adaptive concurrency off")
    p.add_argument("--layers", type=int, default=3000, metavar="N",
                   help="then time N requests per client layer against an instant server (0: skip)")
    args = p.parse_args()
    if not args.batches:
        from datagen.teachers.fleet import slots

        args.batches = slots(teacher_config(args, "http://127.0.0.1:1/v1", max(1, args.replicas)), 2)
    collect_less()  # the teacher actor's garbage-collector settings, for the in-process figures too
    proc, url = start_server(args.latency)
    try:
        if args.replicas:
            bench_replicas(args, url, proc.pid)
        else:
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
