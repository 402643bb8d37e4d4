"""Load test for `offload serve`: N concurrent clients send a bounded number of requests, for a bounded time,
to a running server, then print requests/s, latency percentiles and tokens/s.

    offload serve --threads 1 &            # the demo model on 127.0.0.1:8000
    python scripts/load_test.py            # 8 clients, 64 streamed chat requests of 16 tokens, at most 120 s
    python scripts/load_test.py http://127.0.0.1:8000 --clients 32 --requests 128 --completions --no-stream

Only loopback addresses are targets unless --i-know is given. Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_REQUESTS = 10_000
MAX_SECONDS = 3600


@dataclass
class Outcome:
    ok: bool
    seconds: float  # request sent -> last byte
    first: float | None  # request sent -> first text (streaming)
    tokens: int
    error: str = ""


def is_loopback(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def one_request(conn: http.client.HTTPConnection, path: str, body: dict, headers: dict, stream: bool) -> Outcome:
    start = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers=headers)
    response = conn.getresponse()
    if response.status != 200:
        text = response.read().decode(errors="replace")
        return Outcome(False, time.perf_counter() - start, None, 0, f"{response.status}: {text[:200]}")
    if not stream:
        data = json.loads(response.read())
        return Outcome(True, time.perf_counter() - start, None, data["usage"]["completion_tokens"])
    first, tokens = None, 0
    for raw in response:  # server-sent events, one "data: ..." line each
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            return Outcome(False, time.perf_counter() - start, first, tokens, event["error"]["message"])
        choice = event["choices"][0] if event["choices"] else {}
        if first is None and (choice.get("text") or (choice.get("delta") or {}).get("content")):
            first = time.perf_counter() - start
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    return Outcome(True, time.perf_counter() - start, first, tokens)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (threads)")
    parser.add_argument("--requests", type=int, default=64, help=f"requests in all (at most {MAX_REQUESTS})")
    parser.add_argument("--duration", type=float, default=120, help=f"stop sending after this many seconds "
                                                                    f"(at most {MAX_SECONDS})")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request")
    parser.add_argument("--prompt", default="ROMEO:", help="the prompt (the user message for chat)")
    parser.add_argument("--completions", action="store_true", help="use /v1/completions instead of chat")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="non-streaming requests")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--model", default=None, help="model id to send (default: the server's first)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    parser.add_argument("--i-know", action="store_true", help="allow a host that is not a loopback address")
    args = parser.parse_args(argv)

    if not 1 <= args.requests <= MAX_REQUESTS or not 0 < args.duration <= MAX_SECONDS or args.clients < 1:
        parser.error(f"--requests must be in 1..{MAX_REQUESTS}, --duration in (0, {MAX_SECONDS}], --clients >= 1")
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        parser.error(f"{args.url} is not an http(s) URL")
    if not is_loopback(url.hostname) and not args.i_know:
        parser.error(f"{url.hostname} is not a loopback address; this load test only targets this machine "
                     "(pass --i-know for a server you run elsewhere)")
    port = url.port or (443 if url.scheme == "https" else 80)
    connection = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    base = url.path.rstrip("/")

    probe = connection(url.hostname, port, timeout=30)
    probe.request("GET", base + "/v1/models", headers=headers)
    models = json.loads(probe.getresponse().read())
    probe.close()
    model = args.model or models["data"][0]["id"]

    path = base + ("/v1/completions" if args.completions else "/v1/chat/completions")
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": args.stream}
    body.update({"prompt": args.prompt} if args.completions else
                {"messages": [{"role": "user", "content": args.prompt}]})
    if args.stream:
        body["stream_options"] = {"include_usage": True}

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    sent = 0
    start = time.perf_counter()
    deadline = start + args.duration

    def client() -> None:
        nonlocal sent
        conn = connection(url.hostname, port, timeout=args.timeout)
        try:
            while True:
                with lock:
                    if sent >= args.requests or time.perf_counter() >= deadline:
                        return
                    sent += 1
                try:
                    outcome = one_request(conn, path, body, headers, args.stream)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    conn.close()
                    conn = connection(url.hostname, port, timeout=args.timeout)
                    outcome = Outcome(False, 0.0, None, 0, f"{type(exc).__name__}: {exc}")
                with lock:
                    outcomes.append(outcome)
        finally:
            conn.close()

    print(f"{args.clients} clients -> {url.scheme}://{url.hostname}:{port}{path}, model {model!r}, "
          f"{args.requests} requests at most, {args.duration:g} s at most, max_tokens {args.max_tokens}, "
          f"{'streamed' if args.stream else 'not streamed'}")
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start

    ok = [o for o in outcomes if o.ok]
    errors = [o for o in outcomes if not o.ok]
    latency = [o.seconds for o in ok]
    first = [o.first for o in ok if o.first is not None]
    tokens = sum(o.tokens for o in ok)
    print(f"{len(ok)} ok, {len(errors)} failed in {wall:.2f} s: {len(ok) / wall:.2f} requests/s, "
          f"{tokens / wall:.1f} tokens/s ({tokens} tokens)")
    print(f"latency p50 {percentile(latency, 0.5):.3f} s, p99 {percentile(latency, 0.99):.3f} s, "
          f"mean {statistics.fmean(latency) if latency else float('nan'):.3f} s")
    if first:
        print(f"time to first text p50 {percentile(first, 0.5):.3f} s, p99 {percentile(first, 0.99):.3f} s")
    for o in errors[:5]:
        print(f"  error: {o.error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
