"""`offload serve`: the OpenAI-compatible server, driven by the real `openai` client and raw httpx requests,
against the demo model. Outputs are compared with the Python API's own greedy results."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import offload  # noqa: E402
from offload.server import ServerConfig, create_app  # noqa: E402

PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:", "To be, or not to be"]
CHATS = [[{"role": "user", "content": text}] for text in ("Hello", "Who art thou?")]
NEW = 8  # tokens per greedy request
BODY_LIMIT = 64 * 1024


def _start(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound before uvicorn starts: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def server():
    llm = offload.load(None, threads=1)
    # The references, from the Python API, before the server's worker owns the runtime.
    completions = {p: llm.generate(p, max_new_tokens=NEW) for p in PROMPTS}
    chats = {m[0]["content"]: llm.chat(m, max_new_tokens=NEW) for m in CHATS}
    app = create_app(llm, ServerConfig(model_name="demo", max_body_bytes=BODY_LIMIT))
    uv, thread, url = _start(app)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield SimpleNamespace(url=url, llm=llm, client=client, completions=completions, chats=chats,
                          context=llm.config.max_position_embeddings)
    uv.should_exit = True
    thread.join(15)
    llm.close()


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            key = s.name + "".join(f"[{k}={v}]" for k, v in sorted(s.labels.items()))
            samples[key] = s.value
    return samples


# ---- with the openai client ---------------------------------------------------

def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert server.client.models.retrieve("demo").id == "demo"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_chat_completion_matches_the_python_api(server):
    messages = CHATS[0]
    reply = server.client.chat.completions.create(model="demo", messages=messages, max_tokens=NEW, temperature=0)
    ref = server.chats[messages[0]["content"]]
    assert reply.object == "chat.completion" and reply.model == "demo"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == ref.text
    assert reply.choices[0].finish_reason == "length"
    prompt = len(server.llm.tokenizer.encode_chat(messages))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (prompt, NEW, prompt + NEW)
    # max_completion_tokens is the newer name of max_tokens
    again = server.client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=NEW,
                                                  temperature=0, seed=1, top_p=1.0, n=1)
    assert again.choices[0].message.content == ref.text


def test_completion_matches_the_python_api(server):
    for prompt, ref in server.completions.items():
        out = server.client.completions.create(model="demo", prompt=prompt, max_tokens=NEW, temperature=0)
        assert out.object == "text_completion"
        assert out.choices[0].text == ref.text and out.choices[0].finish_reason == "length"
        n = len(server.llm.tokenizer.encode(prompt))
        assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (n, NEW, n + NEW)
    # a prompt of token ids, and a list of one prompt
    ids = server.llm.tokenizer.encode(PROMPTS[0])
    out = server.client.completions.create(model="demo", prompt=ids, max_tokens=NEW, temperature=0)
    assert out.choices[0].text == server.completions[PROMPTS[0]].text
    out = server.client.completions.create(model="demo", prompt=[PROMPTS[1]], max_tokens=NEW, temperature=0)
    assert out.choices[0].text == server.completions[PROMPTS[1]].text


def test_streaming_chat_and_completion(server):
    messages = CHATS[1]
    stream = server.client.chat.completions.create(model="demo", messages=messages, max_tokens=NEW, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == server.chats[messages[0]["content"]].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW
    assert len({c.id for c in chunks}) == 1

    pieces = list(server.client.completions.create(model="demo", prompt=PROMPTS[2], max_tokens=NEW, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].text for c in pieces) == server.completions[PROMPTS[2]].text
    assert pieces[-1].choices[0].finish_reason == "length"


def test_raw_stream_ends_with_done(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings(server):
    ref = server.completions[PROMPTS[0]].text  # the greedy continuation, NEW tokens
    cut = ref.index(ref.strip()[2], 1)  # a stop string that first appears a few characters in
    stop = ref[cut:cut + 2]
    want = ref[:ref.index(stop)]
    out = server.client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=NEW, temperature=0,
                                           stop=[stop, "never appears"])
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < NEW
    stream = server.client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=NEW, temperature=0,
                                              stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server):
    def sample():
        return server.client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=NEW, temperature=0.9,
                                                top_p=0.9, seed=7).choices[0].text

    assert sample() == sample()


def test_32_concurrent_streams_are_not_interleaved(server):
    def run(i: int) -> tuple[str, str]:
        if i % 2:
            messages = CHATS[i // 2 % len(CHATS)]
            stream = server.client.chat.completions.create(model="demo", messages=messages, max_tokens=NEW,
                                                           temperature=0, stream=True)
            got = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            return got, server.chats[messages[0]["content"]].text
        prompt = PROMPTS[i // 2 % len(PROMPTS)]
        stream = server.client.completions.create(model="demo", prompt=prompt, max_tokens=NEW, temperature=0,
                                                  stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices), server.completions[prompt].text

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, range(32)))
    assert len(results) == 32
    for got, want in results:
        assert got == want


def test_disconnect_stops_the_generation(server):
    before = _metrics(server.url)
    long = server.context - 16  # far more tokens than run while the client reads two chunks
    body = {"prompt": PROMPTS[0], "max_tokens": long, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen == 2:
                break  # leaving the block closes the connection mid-stream
    start = time.monotonic()
    out = server.client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=NEW, temperature=0)
    assert out.choices[0].text == server.completions[PROMPTS[1]].text
    waited = time.monotonic() - start
    after = _metrics(server.url)
    cancelled = "offload_generations_total[outcome=cancelled]"
    assert after.get(cancelled, 0) == before.get(cancelled, 0) + 1
    generated = after["offload_completion_tokens_total"] - before["offload_completion_tokens_total"] - NEW
    assert generated < long / 2, (generated, waited)  # stopped soon after the disconnect, not run to the end


# ---- malformed requests --------------------------------------------------------

CHAT, COMPLETION = "/v1/chat/completions", "/v1/completions"
OK_CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
OK_COMPLETION = {"model": "demo", "prompt": "Hi", "max_tokens": 2}
ERRORS = [  # (route, body (bytes are sent as they are), status, param or None)
    (CHAT, b"{not json", 400, None),
    (CHAT, b"", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400, None),
    (CHAT, {**OK_CHAT, "frobnicate": True}, 400, "frobnicate"),
    (CHAT, {"model": "demo"}, 400, "messages"),
    (CHAT, {**OK_CHAT, "messages": "Hi"}, 400, "messages"),
    (CHAT, {**OK_CHAT, "messages": []}, 400, "messages"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "system", "content": "x"}]}, 400, "messages"),  # demo template
    (CHAT, {**OK_CHAT, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {**OK_CHAT, "temperature": 3}, 400, "temperature"),
    (CHAT, {**OK_CHAT, "top_p": 0}, 400, "top_p"),
    (CHAT, {**OK_CHAT, "max_tokens": 1.5}, 400, "max_tokens"),
    (CHAT, {**OK_CHAT, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {**OK_CHAT, "max_tokens": 100000}, 400, "max_tokens"),
    (CHAT, {**OK_CHAT, "max_tokens": True}, 400, "max_tokens"),
    (CHAT, {**OK_CHAT, "stream": "yes"}, 400, "stream"),
    (CHAT, {**OK_CHAT, "stop": 5}, 400, "stop"),
    (CHAT, {**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (CHAT, {**OK_CHAT, "n": 2}, 400, "n"),
    (CHAT, {**OK_CHAT, "presence_penalty": 0.5}, 400, "presence_penalty"),
    (CHAT, {**OK_CHAT, "model": "gpt-4o"}, 404, "model"),
    (COMPLETION, {"model": "demo", "max_tokens": 2}, 400, "prompt"),
    (COMPLETION, {**OK_COMPLETION, "prompt": ["a", "b"]}, 400, "prompt"),
    (COMPLETION, {**OK_COMPLETION, "prompt": [1, 99999]}, 400, "prompt"),
    (COMPLETION, {**OK_COMPLETION, "prompt": [1] * 600}, 400, None),  # over the 512-token context
    (COMPLETION, {**OK_COMPLETION, "seed": "x"}, 400, "seed"),
    (COMPLETION, {**OK_COMPLETION, "echo": True}, 400, "echo"),
    (COMPLETION, {**OK_COMPLETION, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (COMPLETION, {**OK_COMPLETION, "prompt": "x" * (BODY_LIMIT + 10)}, 413, None),
]


def _check_error(response, status: int, param) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    return body["error"]


def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for route, body, status, param in ERRORS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = http.post(route, content=content, headers={"content-type": "application/json"})
            _check_error(response, status, param)
        _check_error(http.get("/v1/nowhere"), 404, None)
        _check_error(http.post("/v1/embeddings", json={}), 404, None)
        _check_error(http.get(CHAT), 405, None)
        _check_error(http.get("/v1/models/gpt-4o"), 404, "model")
        # the neutral values of fields we do not implement are accepted
        ok = http.post(CHAT, json={**OK_CHAT, "n": 1, "presence_penalty": 0, "logprobs": False, "user": "u1"})
        assert ok.status_code == 200, ok.text
        assert http.get("/health").status_code == 200
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="demo", messages=OK_CHAT["messages"], max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2)


def test_metrics_parse_as_prometheus_text(server):
    server.client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=2, temperature=0)
    samples = _metrics(server.url)
    for name in ("offload_tokens_per_second", "offload_expert_hit_rate", "offload_bytes_from_disk_total",
                 "offload_bytes_to_device_total", "offload_stall_seconds_total", "offload_queue_depth",
                 "offload_requests_running", "offload_completion_tokens_total", "offload_prompt_tokens_total",
                 "offload_expert_hits_total", "offload_expert_misses_total"):
        assert name in samples, name
    assert samples["offload_requests_total[code=200][route=/v1/completions]"] >= 1
    assert samples["offload_tokens_per_second"] > 0
    assert samples["offload_queue_depth"] == 0


class _FakeRuntime:
    """Stands in for a Runtime: each stream yields one token per release of `tokens`."""

    def __init__(self):
        self.tokens = threading.Semaphore(0)
        self.calls, self.steps = 0, 0
        self.stats = SimpleNamespace(last=None)

    def stream(self, ids, max_new_tokens, **sampling):
        self.calls += 1
        made = 0
        try:
            for i in range(max_new_tokens):
                assert self.tokens.acquire(timeout=10)
                made += 1
                self.steps += 1
                yield f"t{i} "
        finally:  # as Runtime.stream: the run's stats are recorded however it ends
            reason = "length" if made == max_new_tokens else "stop"
            self.stats.last = SimpleNamespace(new_tokens=made, tokens_per_second=1.0, time_to_first_token=0.1,
                                              finish_reason=reason)


def test_worker_runs_in_order_skips_and_stops_cancelled_jobs_and_refuses_overload():
    from offload.sampling import SamplingParams
    from offload.server.errors import ApiError
    from offload.server.metrics import Metrics
    from offload.server.worker import Finish, Job, Worker

    async def scenario():
        fake, metrics = _FakeRuntime(), Metrics()
        worker = Worker(fake, metrics, max_queue=2)
        worker.start()
        try:
            a = Job([1, 2], SamplingParams.build(50), context=100)
            worker.submit(a)
            fake.tokens.release()
            assert await asyncio.wait_for(a.events.get(), 10) == ("text", "t0 ")
            b, c = Job([1], SamplingParams.build(50), context=100), Job([1], SamplingParams.build(2), context=100)
            worker.submit(b)
            worker.submit(c)
            with pytest.raises(ApiError) as full:
                worker.submit(Job([1], SamplingParams.build(2), context=100))
            assert full.value.status == 503 and metrics.queue_depth == 2
            b.cancel()  # still waiting: skipped
            a.cancel()  # running: stops after its next token
            fake.tokens.release(3)
            events = [await asyncio.wait_for(c.events.get(), 10) for _ in range(3)]
            assert events == [("text", "t0 "), ("text", "t1 "), ("done", Finish("length", 1, 2))]
            assert a.events.empty() and b.events.empty()
            assert (fake.calls, fake.steps) == (2, 4)  # a made 2 tokens, b none, c 2
            assert metrics.generations == {"cancelled": 2, "length": 1} and metrics.queue_depth == 0
        finally:
            worker.stop()

    asyncio.run(scenario())


def test_server_config_is_checked():
    with pytest.raises(offload.OffloadError, match="api-key"):
        ServerConfig(api_key="")
    with pytest.raises(offload.OffloadError, match="max_queue"):
        ServerConfig(max_queue=0)


# ---- the command -------------------------------------------------------------------

def test_offload_serve_command_with_api_key(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OFFLOAD_API_KEY": "sesame"}
    proc = subprocess.Popen([sys.executable, "-m", "offload.cli", "serve", "--threads", "1", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "offload serve did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        denied = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert client.models.list().data[0].id == "demo"
        reply = client.chat.completions.create(model="demo", messages=CHATS[0], max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens == 2
    finally:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: uvicorn shuts down, the worker stops
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stdout.read()
