"""datagen's vLLM backend against bare vLLM, and the size of stored logprobs. Prints figures.

    .venv/bin/python benchmarks/bench_vllm.py                  # embedded SmolLM2-135M on CPU
    .venv/bin/python benchmarks/bench_vllm.py --model Qwen/Qwen2.5-1.5B-Instruct --gpus 1
    .venv/bin/python benchmarks/bench_vllm.py --eager --modes async --layers --cpu-split --repeat 3  # where the gap is

(a) throughput: completion tokens/s of
      bare     ``vllm.LLM.generate`` on every prompt at once (vLLM's own best case: one
               call, the whole workload in its scheduler), engine start and warm-up excluded;
      datagen  the same prompts, seeds and sampling through ``datagen run``'s path (Ray
               actor, batches of ``--batch`` rows, filters, Parquet commits), from teachers
               ready to the last commit, for ``engine.batching: async`` and ``offline``.
    The ratio datagen/bare is the cost of the product around the engine. The prompts ask
    for answers of very different lengths, so a batch-at-a-time engine waits on its
    longest sequence while the async engine keeps refilling.
    ``--layers`` first times bare vLLM again with an idle local Ray beside it (what Ray's
    daemons cost an engine that shares their cores), then the async backend by itself,
    fed the run's batches all at once: in this process (no Ray, no driver), then in its
    Ray actor as the run deploys it (driver only collecting). Each layer's ratio shows
    what that layer costs; "datagen / bare beside idle Ray" is the run's own cost, Ray's
    daemons taken out (on a GPU they share no compute with the engine).
    Run to run, bare alone varies by ~5% on a small shared machine; ``--repeat N`` runs
    the whole set N times, alternating, and prints the median of each ratio.
``--cpu-split`` adds, for bare and each layer, the CPU each process used over the timed
    window (in % of one core): the engine's worker, its scheduler, the teacher actor, Ray's
    daemons, the rest; and the tokens the worker made per CPU-second it used. On a machine
    whose cores the engine's threads fill, a worker that gets nearly the same CPU but makes
    fewer tokens per CPU-second is waiting on a thread that another process preempted.
``--watchdog N`` instead times only the backend in its Ray actor, N times each with the
    hung-engine watchdog off (``engine.stall_timeout_s: null``) and on (its default),
    alternating, and prints both medians: what the watchdog's per-step beat costs.
(c) storage: on-disk bytes per generated token of the KD columns (token ids, sampled
    logprob, top-k ids and logprobs) in the datagen run's shards, and the max absolute
    error of the stored log-probs against the float values bare vLLM returned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LENGTHS = ["in one word", "in one short sentence", "in three sentences", "in a detailed paragraph",
           "as a numbered list of ten items"]
TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bicycles", "owls", "glass", "tea", "maps",
          "clocks", "salt", "bridges", "honey", "comets", "paper", "wolves", "tides", "copper", "lanterns"]


class CpuSplit:
    """CPU time of every process on the machine over a timed window (``--cpu-split``)."""

    def __init__(self) -> None:
        self.on = False
        self.last: dict[str, float] = {}

    @staticmethod
    def _label(p, me: int) -> str:
        title = " ".join(p.info["cmdline"] or []) or p.info["name"] or ""
        if p.pid == me:
            return "benchmark process"
        if title.startswith("VLLM::"):
            return title.split()[0]
        if title.startswith("ray::TeacherActor"):
            return "teacher actor"
        if title.startswith("ray::"):
            return "Ray " + title.split()[0][5:]
        program = title.split(" --")[0]
        for daemon in ("raylet", "gcs_server", "log_monitor", "monitor.py", "dashboard.py"):
            if f"/{daemon}" in program:
                return "Ray " + daemon.removesuffix(".py")
        return "other"

    def _times(self) -> dict[int, tuple[str, float]]:
        import psutil

        me, out = os.getpid(), {}
        for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
            t = p.info["cpu_times"]
            if t is not None:
                out[p.pid] = (self._label(p, me), t.user + t.system)
        return out

    def __enter__(self) -> "CpuSplit":
        if self.on:
            self._t, self._before = time.perf_counter(), self._times()
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            secs, after = time.perf_counter() - self._t, self._times()
            split: dict[str, float] = {}
            for pid, (label, cpu) in after.items():
                was = self._before.get(pid)
                used = cpu - (was[1] if was else 0.0)  # same pid, same process (its title may change)
                split[label] = split.get(label, 0.0) + 100 * used / secs
            self.last = split

    def report(self, name: str, tokens: int, secs: float) -> None:
        if not self.on:
            return
        s = dict(sorted(self.last.items(), key=lambda kv: -kv[1]))
        ray = sum(v for k, v in s.items() if k.startswith("Ray "))
        worker = s.get("VLLM::Worker", 0.0)
        shown = ", ".join(f"{k} {v:.1f}" for k, v in s.items() if v >= 0.1)
        per = f"{tokens / (worker / 100 * secs):.1f}" if worker else "n/a"
        print(f"    cpu, % of a core, {name}: {shown} (Ray's processes {ray:.1f}); "
              f"worker tokens per CPU-second {per}")


SPLIT = CpuSplit()


def seeds(n: int) -> list[dict]:
    return [{"id": f"s{i}", "topic": TOPICS[i % len(TOPICS)], "how": LENGTHS[i % len(LENGTHS)], "i": i}
            for i in range(n)]


def teacher_cfg(args, batching: str, **engine) -> dict:
    return {
        "name": "t", "backend": "vllm", "model": args.model, "license": "Apache-2.0",
        "num_gpus": args.gpus, "num_cpus": 1, "batch_size": args.batch,
        "engine": {"max_model_len": 1024, "enforce_eager": args.eager, "batching": batching, **engine},
        "sampling": {"temperature": 0.8, "max_tokens": args.max_tokens, "logprobs": args.k},
    }


def write_job(d: Path, args, batching: str) -> Path:
    import yaml

    (d / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds(args.prompts)))
    (d / "t.yaml").write_text(yaml.safe_dump({
        "id": "bench-vllm", "version": "1", "license": "Apache-2.0",
        "user": "Describe {{ topic }} {{ how }}. (#{{ i }})",
        "seeds": {"path": "seeds.jsonl", "license": "Apache-2.0"}}))
    path = d / f"job-{batching}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"bench-{batching}", "seed": 1, "prompts": {"template": "t.yaml"},
        "teachers": [teacher_cfg(args, batching)], "filters": ["nonempty"],
        "output": {"path": f"out-{batching}"},
        "runtime": {"inflight_per_actor": args.inflight},
    }))
    return path


def bare(args, job_path: Path) -> tuple[float, int, list]:
    """vllm.LLM.generate over the job's own requests (same token prompts, seeds, sampling)."""
    from datagen import run as runner
    from datagen.config import VLLMTeacher, load_job
    from datagen.teachers.vllm_engine import VLLMEngineTeacher

    job = load_job(job_path)
    stream, _ = runner.prepare(job)
    cfg = VLLMTeacher.model_validate(teacher_cfg(args, "offline"))
    teacher = VLLMEngineTeacher(cfg)  # the offline engine: this *is* vllm.LLM
    try:
        reqs = list(stream)
        asyncio.run(teacher.warmup())  # as the datagen actor does before it reports ready
        prompts = [{"prompt_token_ids": teacher.prompt_ids(r.messages)} for r in reqs]
        params = [teacher._params(r.seed) for r in reqs]
        with SPLIT:
            t = time.perf_counter()
            outs = teacher.llm.generate(prompts, params, use_tqdm=False)
            secs = time.perf_counter() - t
    finally:
        teacher.close()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    floats = [lp.logprob for o in outs for pos in o.outputs[0].logprobs for lp in pos.values()
              if math.isfinite(lp.logprob)]  # -inf (impossible tokens) saturate by design
    return secs, tokens, floats


def bare_beside_ray(args, job_path: Path) -> tuple[float, int]:
    """Bare vLLM again, with a local Ray instance (as ``datagen run`` starts one) up and idle
    beside it: what Ray's daemons alone cost an engine that shares their cores."""
    from datagen.config import Runtime
    from datagen.run.cluster import init_ray

    import ray

    started = init_ray(Runtime(num_cpus=os.cpu_count()))
    try:
        secs, tokens, _ = bare(args, job_path)
    finally:
        if started:
            ray.shutdown()
    return secs, tokens


def batches_of(args, job_path: Path) -> list[list[dict]]:
    """The run's requests, cut into the batches the driver sends."""
    from datagen import run as runner
    from datagen.config import load_job

    stream, _ = runner.prepare(load_job(job_path))
    reqs = [{"row_id": r.row_id, "messages": r.messages, "seed": r.seed} for r in stream]
    return [reqs[i:i + args.batch] for i in range(0, len(reqs), args.batch)]


def backend_in_process(args, job_path: Path) -> tuple[float, int]:
    """The async backend class alone (no Ray, no driver): every batch at once, as the run sends them."""
    from datagen.config import VLLMTeacher
    from datagen.teachers.vllm_engine import VLLMEngineTeacher

    batches = batches_of(args, job_path)
    teacher = VLLMEngineTeacher(VLLMTeacher.model_validate(teacher_cfg(args, "async")))
    loop = asyncio.new_event_loop()  # the engine's output handler lives on the loop that first awaits it
    try:
        loop.run_until_complete(teacher.warmup())

        async def every_batch() -> list:
            return await asyncio.gather(*(teacher.generate(b) for b in batches))

        with SPLIT:
            t = time.perf_counter()
            outs = loop.run_until_complete(every_batch())
            secs = time.perf_counter() - t
    finally:
        async def close() -> None:  # on the loop, so the engine's cancelled output handler ends there
            teacher.close()
            await asyncio.sleep(0)

        loop.run_until_complete(close())
        loop.close()
    return secs, sum(g.completion_tokens or 0 for b in outs for g in b)


def backend_in_actor(args, job_path: Path, **engine) -> tuple[float, int]:
    """The same, in its Ray actor as the run deploys it (TeacherFleet), the driver only collecting."""
    import ray

    from datagen.config import Runtime, VLLMTeacher
    from datagen.run.cluster import init_ray
    from datagen.teachers.fleet import TeacherFleet

    batches = batches_of(args, job_path)
    cfg = VLLMTeacher.model_validate(teacher_cfg(args, "async", **engine))
    started = init_ray(Runtime(num_cpus=os.cpu_count()))
    try:
        actors = TeacherFleet([cfg])
        actors.wait_started(600, lambda: False)  # engine start and warm-up, excluded
        actor = actors.by_teacher[cfg.name][0]
        with SPLIT:
            t = time.perf_counter()
            outs = ray.get([actor.generate.remote(b) for b in batches])
            secs = time.perf_counter() - t
    finally:
        if started:
            ray.shutdown()
    return secs, sum(g["completion_tokens"] or 0 for b in outs for g in b)


def through_datagen(job_path: Path) -> tuple[float, int, Path, float]:
    from datagen import run as runner
    from datagen.config import load_job
    from datagen.storage import create_store

    job = load_job(job_path)
    stream, fp = runner.prepare(job)
    store = create_store(job.output.path, job.output, job_meta=runner.job_meta(job, fp, job_path))
    try:
        stats = runner.execute(job, store, stream)
    finally:
        store.close()
    return stats.generating_s, stats.completion_tokens, job.output.path, stats.startup_s


def kd_bytes(out: Path) -> tuple[dict[str, float], int]:
    import pyarrow.parquet as pq

    from datagen.storage import open_store

    store = open_store(out)
    cols = ("token_ids", "token_logprobs_q", "top_ids", "top_logprobs_q")
    size = dict.fromkeys(cols, 0)
    tokens = 0
    for stream in ("accepted", "rejected"):
        for path in store.manifest.files(stream):
            md = pq.ParquetFile(path).metadata
            for rg in range(md.num_row_groups):
                for c in range(md.num_columns):
                    col = md.row_group(rg).column(c)
                    top = col.path_in_schema.split(".")[0]
                    if top in size:
                        size[top] += col.total_compressed_size
            tokens += sum(len(t or []) for t in pq.read_table(path, columns=["token_ids"]).column(0).to_pylist())
    return size, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--gpus", type=float, default=0.0)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="rows per batch sent to the actor")
    p.add_argument("--inflight", type=int, default=4, help="batches queued per actor")
    p.add_argument("--k", type=int, default=20, help="top-k logprobs")
    p.add_argument("--eager", action="store_true", help="enforce_eager (faster start, slower decode on CPU)")
    p.add_argument("--modes", default="async,offline")
    p.add_argument("--repeat", type=int, default=1,
                   help="run bare and datagen this many times, alternating, and print each ratio's median")
    p.add_argument("--layers", action="store_true",
                   help="also time the async backend alone, in this process and in its Ray actor (where a gap is)")
    p.add_argument("--cpu-split", action="store_true",
                   help="print each process's CPU over bare's and each layer's timed window")
    p.add_argument("--watchdog", type=int, default=0, metavar="N",
                   help="only time the backend in its actor, N times each with the hung-engine watchdog off and on")
    args = p.parse_args()
    SPLIT.on = args.cpu_split
    if args.watchdog:
        return watchdog_cost(args)
    print(f"python {sys.version.split()[0]}, cpus {len(os.sched_getaffinity(0))}, model {args.model}, "
          f"{args.prompts} prompts, max_tokens {args.max_tokens}, batch {args.batch} x {args.inflight} in flight, "
          f"top-{args.k}")
    with tempfile.TemporaryDirectory() as d:
        ratios: dict[str, list[float]] = {}
        for rep in range(args.repeat):
            rd = Path(d) / f"rep{rep}"  # fresh outputs: a run into an existing one would resume it
            rd.mkdir()
            jobs = {m: write_job(rd, args, m) for m in args.modes.split(",")}
            secs, tokens, rep_floats = bare(args, next(iter(jobs.values())))
            base = tokens / secs
            at = f" #{rep + 1}" if args.repeat > 1 else ""
            print(f"(a) bare vllm.LLM.generate{at:<6s}  {tokens:7d} tokens  {secs:7.1f} s  {base:8.1f} tokens/s")
            SPLIT.report("bare", tokens, secs)
            if args.layers:
                for name, layer in (("bare beside idle Ray", bare_beside_ray),
                                    ("backend in process", backend_in_process),
                                    ("backend in Ray actor", backend_in_actor)):
                    s, n = layer(args, jobs.get("async") or write_job(rd, args, "async"))
                    ratios.setdefault(name, []).append(n / s / base)
                    print(f"(a) {name + at:<30s} {n:7d} tokens  {s:7.1f} s  {n / s:8.1f} tokens/s  "
                          f"ratio {n / s / base:.3f}")
                    SPLIT.report(name, n, s)
            rep_outs = {}
            for mode, path in jobs.items():
                s, n, out, startup = through_datagen(path)
                rep_outs[mode] = out
                ratios.setdefault(f"datagen batching={mode}", []).append(n / s / base)
                print(f"(a) datagen batching={mode:<8}{at:<6s}{n:7d} tokens  {s:7.1f} s  {n / s:8.1f} tokens/s  "
                      f"ratio {n / s / base:.3f}  (engine start {startup:.0f} s, excluded)")
                if args.layers:  # datagen's own cost: against bare vLLM with Ray beside it too
                    beside = ratios["bare beside idle Ray"][-1]
                    ratios.setdefault(f"datagen {mode} / beside Ray", []).append(n / s / base / beside)
                    print(f"(a) datagen batching={mode} / bare beside idle Ray{at}: {n / s / base / beside:.3f}")
            if rep == 0:
                outs, floats = rep_outs, rep_floats
        if args.repeat > 1:
            for name, rs in ratios.items():
                print(f"(a) median of {len(rs)} ratios, {name:<29s} {statistics.median(rs):.3f}  "
                      f"({', '.join(f'{r:.3f}' for r in rs)})")
        size, ntok = kd_bytes(next(iter(outs.values())))
        per = {c: b / ntok for c, b in size.items()}
        print(f"(c) stored KD columns: {sum(per.values()):.1f} bytes per generated token at k={args.k} "
              f"({', '.join(f'{c} {v:.1f}' for c, v in per.items())}; {ntok} tokens)")
        from datagen import records

        import numpy as np

        f = np.asarray(floats, dtype=np.float64)
        err = np.abs(records.dequantize_logprobs(records.quantize_logprobs(f.tolist())) - f)
        print(f"(c) stored log-prob max abs error {err.max():.4f} nats over {len(f)} real vLLM values "
              f"(mean {err.mean():.4f})")
    print(f"benchmark driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def watchdog_cost(args) -> None:
    speeds: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as d:
        job = write_job(Path(d), args, "async")
        for rep in range(args.watchdog):
            for mode, engine in (("off", {"stall_timeout_s": None}), ("on", {})):
                s, n = backend_in_actor(args, job, **engine)
                speeds[mode].append(n / s)
                print(f"backend in Ray actor, watchdog {mode:<3s} #{rep + 1}  {n:7d} tokens  {s:7.1f} s  "
                      f"{n / s:8.1f} tokens/s", flush=True)
    for mode, v in speeds.items():
        print(f"watchdog {mode:<3s} median {statistics.median(v):8.1f} tokens/s  ({', '.join(f'{x:.1f}' for x in v)})")


if __name__ == "__main__":
    main()
