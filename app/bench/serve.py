"""``z2z-bench serve``: ``z2z-chat serve`` beside llama-cpp-python's own server, over HTTP.

Both servers are started here, on free loopback ports, over the same base GGUF with the same
threads (one at a time, so they never share the CPU), and driven with streaming requests,
greedy. Measured per turn: time to the first content chunk and decode speed after it (reply
tokens counted with the model's tokenizer for both, so the units agree); per server: peak RSS
(``VmHWM``). Runs:

1. ``single``: one 10-turn conversation, the client sending the whole history each turn (what
   chat clients do);
2. ``interleaved`` (z2z only): 4 such conversations, turn by turn in rotation; each turn's time
   to first token against the same turn in the single run;
3. ``load`` (z2z only): 8 concurrent clients, 200 requests over 8 prompts (a third streamed, one in
   ten abandoned after two chunks): status codes, whether every completed reply equals the reply
   its prompt gets alone (so no reply went to another request), RSS after warm-up and at the end.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from z2z_chat.app.bench.memory import proc_kb
from z2z_chat.app.bench.peer import peer_ggufs

TURNS = [
    "Write a Python function is_prime(n) that returns True when n is prime.",
    "Now write primes_below(n) that returns the list of primes below n, using is_prime.",
    "Add a docstring to both functions.",
    "Rename is_prime to check_prime everywhere in the code.",
    "Write three unit tests for the two functions.",
    "What is the time complexity of primes_below?",
    "Rewrite primes_below with the sieve of Eratosthenes.",
    "Which of the two versions is faster for n = 10**6, and why?",
    "Summarize what we wrote so far in two sentences.",
    "Show the final code again, with the tests.",
]
TOPICS = ["Python", "a cooking recipe", "the solar system", "a short story about a cat"]
LOAD_PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "What is 12 * 12?",
                "Name three colors.", "Translate 'good morning' to French.", "What is a Python list?",
                "Who wrote Hamlet?", "Give me a word that rhymes with cat."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, name: str, cmd: list[str], port: int, progress: Callable[[str], None]):
        import httpx

        self.name, self.url = name, f"http://127.0.0.1:{port}"
        progress(f"starting {name}")
        self.log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would fill and block the server
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True,
                                     env=os.environ | {"HF_HUB_OFFLINE": "1"})
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{name} exited while starting: {self.log.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError(f"{name} did not start in 300 s")

    def peak_mb(self) -> float | None:
        kb = proc_kb(self.proc.pid, "VmHWM")
        return kb / 1024 if kb else None

    def rss_mb(self) -> float | None:
        kb = proc_kb(self.proc.pid, "VmRSS")
        return kb / 1024 if kb else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _stream(url: str, messages: list[dict], max_tokens: int, cancel_after: int | None = None) -> dict[str, Any]:
    """One streamed chat request: text, seconds to the first content chunk, seconds in all."""
    import httpx

    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.0,
            "stream": True}
    t0 = time.perf_counter()
    ttft, parts, chunks = None, [], 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "text": "", "ttft": 0.0, "total": time.perf_counter() - t0}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for ch in json.loads(line[6:]).get("choices", []):
                piece = ch.get("delta", {}).get("content") or ""
                if piece:
                    ttft = ttft or time.perf_counter() - t0
                    parts.append(piece)
                    chunks += 1
            if cancel_after is not None and chunks >= cancel_after:
                break
    total = time.perf_counter() - t0
    return {"status": 200, "text": "".join(parts), "ttft": ttft or total, "total": total}


def _conversation(url: str, turns: list[str], max_tokens: int, count: Callable[[str], int],
                  system: str | None = None) -> list[dict[str, Any]]:
    msgs = [{"role": "system", "content": system}] if system else []
    rows = []
    for i, t in enumerate(turns):
        msgs.append({"role": "user", "content": t})
        r = _stream(url, msgs, max_tokens)
        msgs.append({"role": "assistant", "content": r["text"]})
        n = count(r["text"])
        rows.append({"turn": i + 1, "ttft_s": r["ttft"], "reply_tokens": n,
                     "decode_tok_s": n / (r["total"] - r["ttft"]) if r["total"] > r["ttft"] else 0.0})
    return rows


def _interleaved(url: str, n: int, turns: list[str], max_tokens: int, count: Callable[[str], int]) -> list[list[dict]]:
    convs = [[{"role": "system", "content": f"You are a helpful assistant. Today's topic: {TOPICS[i % len(TOPICS)]}."}]
             for i in range(n)]
    rows: list[list[dict]] = [[] for _ in range(n)]
    for k, t in enumerate(turns):
        for i in range(n):
            convs[i].append({"role": "user", "content": t})
            r = _stream(url, convs[i], max_tokens)
            convs[i].append({"role": "assistant", "content": r["text"]})
            rows[i].append({"turn": k + 1, "ttft_s": r["ttft"], "reply_tokens": count(r["text"])})
    return rows


def _load(server: _Server, clients: int, requests: int, max_tokens: int,
          progress: Callable[[str], None]) -> dict[str, Any]:
    import httpx

    def alone(p: str) -> str:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=600, json={
            "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens, "temperature": 0})
        return r.json()["choices"][0]["message"]["content"]

    want = {p: alone(p) for p in LOAD_PROMPTS}
    rng = random.Random(0)
    jobs = [(rng.choice(LOAD_PROMPTS), rng.random()) for _ in range(requests)]
    lock, statuses, wrong, done, rss_warm = threading.Lock(), {}, 0, 0, None

    def client() -> None:
        nonlocal wrong, done, rss_warm
        while True:
            with lock:
                if not jobs:
                    return
                prompt, u = jobs.pop()
            msgs = [{"role": "user", "content": prompt}]
            if u < 0.1:
                r = _stream(server.url, msgs, max_tokens, cancel_after=2)
                ok = True
            elif u < 0.4:
                r = _stream(server.url, msgs, max_tokens)
                ok = r["status"] != 200 or r["text"] == want[prompt]
            else:
                resp = httpx.post(server.url + "/v1/chat/completions", timeout=600, json={
                    "messages": msgs, "max_tokens": max_tokens, "temperature": 0})
                r = {"status": resp.status_code}
                ok = resp.status_code != 200 or resp.json()["choices"][0]["message"]["content"] == want[prompt]
            with lock:
                statuses[r["status"]] = statuses.get(r["status"], 0) + 1
                wrong += not ok
                done += 1
                if done == requests // 5:
                    rss_warm = server.rss_mb()
                if done % 50 == 0:
                    progress(f"load: {done}/{requests} requests")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"requests": requests, "clients": clients, "seconds": time.perf_counter() - t,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors": sum(v for k, v in statuses.items() if k >= 500),
            "wrong_replies": wrong, "rss_after_warmup_mb": rss_warm, "rss_end_mb": server.rss_mb()}


def run(*, model: str | None, gguf: str, tokenizer: Any, threads: int, turns: int, max_tokens: int,
        conversations: int, load_requests: int, progress: Callable[[str], None]) -> dict[str, Any]:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"llama-cpp-python's server is not installed ({e}): "
                           'pip install "llama-cpp-python[server]==0.3.36"') from None

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    script = TURNS[:turns]
    out: dict[str, Any] = {"turns": len(script), "max_tokens": max_tokens, "threads": threads}
    env_threads = {"Z2Z_THREADS": str(threads)}
    os.environ.update(env_threads)
    peers = {}
    for label, path in peer_ggufs(gguf, progress):  # the shipped type and the merged model's (peer.py)
        port = _free_port()
        llama = _Server(f"{label} server", [
            sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--n_ctx", "8192", "--n_threads",
            str(threads), "--n_threads_batch", str(threads), "--port", str(port), "--host", "127.0.0.1"],
            port, progress)
        try:
            progress(f"{label} server: single conversation")
            peers[label] = {"single": _conversation(llama.url, script, max_tokens, count), "peak_mb": llama.peak_mb()}
        finally:
            llama.stop()
    # the report compares with the faster peer (its total time to first token), and lists both
    best = min(peers, key=lambda k: sum(t["ttft_s"] for t in peers[k]["single"]))
    out |= {"peers": peers, "fastest_peer": best, "llama_single": peers[best]["single"],
            "llama_peak_mb": peers[best]["peak_mb"]}
    port = _free_port()
    cmd = [sys.executable, "-m", "z2z_chat.app.cli", "serve", "--backend", "llamacpp", "--port", str(port),
           "--slots", str(max(conversations, 4))] + (["--model", model] if model else [])
    z2z = _Server("z2z-chat serve", cmd, port, progress)
    try:
        progress("z2z-chat serve: single conversation")
        out["z2z_single"] = _conversation(z2z.url, script, max_tokens, count)
        out["z2z_peak_mb_single"] = z2z.peak_mb()
        progress(f"z2z-chat serve: {conversations} interleaved conversations")
        out["z2z_interleaved"] = _interleaved(z2z.url, conversations, script, max_tokens, count)
        progress(f"z2z-chat serve: load, 8 clients, {load_requests} requests")
        out["z2z_load"] = _load(z2z, 8, load_requests, 24, progress)
        out["z2z_peak_mb"] = z2z.peak_mb()
    finally:
        z2z.stop()
    return out


def format_report(r: dict[str, Any]) -> str:
    lines = [f"single conversation, {r['turns']} turns, up to {r['max_tokens']} tokens per reply, "
             f"{r['threads']} threads (time to first token, s; decode, tokens/s); llama: the faster peer, "
             f"{r['fastest_peer']}",
             f"{'turn':>4} {'z2z ttft':>9} {'llama ttft':>10} {'ratio':>6} {'z2z tok/s':>9} {'llama tok/s':>11}"]
    for z, l in zip(r["z2z_single"], r["llama_single"]):
        lines.append(f"{z['turn']:>4} {z['ttft_s']:9.3f} {l['ttft_s']:10.3f} {z['ttft_s'] / l['ttft_s']:6.2f} "
                     f"{z['decode_tok_s']:9.1f} {l['decode_tok_s']:11.1f}")
    inter = r["z2z_interleaved"]
    lines.append(f"\n{len(inter)} interleaved conversations: time to first token per turn, worst conversation "
                 "vs the single run")
    for k, z in enumerate(r["z2z_single"]):
        worst = max(c[k]["ttft_s"] for c in inter)
        lines.append(f"{z['turn']:>4} {worst:9.3f} {worst / z['ttft_s']:6.2f}x")
    ld = r["z2z_load"]
    lines.append(f"\nload: {ld['requests']} requests from {ld['clients']} clients in {ld['seconds']:.1f} s, statuses "
                 f"{ld['statuses']}, 5xx {ld['server_errors']}, wrong replies {ld['wrong_replies']}, RSS after "
                 f"warm-up {ld['rss_after_warmup_mb']:.0f} MB, at the end {ld['rss_end_mb']:.0f} MB")
    lines.append(f"peak RSS: z2z-chat serve {r['z2z_peak_mb']:.0f} MB ({r['z2z_peak_mb_single']:.0f} MB after the "
                 f"single conversation), llama-cpp-python server {r['llama_peak_mb']:.0f} MB")
    return "\n".join(lines)
