"""``z2z-chat serve`` as clients see it: a real server process on a free port, driven by the
``openai`` package and raw HTTP (httpx). Tiny random model on torch (CPU), greedy."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("starlette", reason='the server: pip install "z2z-chat[serve]"')
openai = pytest.importorskip("openai", reason="the tests drive the server with the openai client")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str, cache_dir: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cache_dir = cache_dir or Path(tempfile.mkdtemp(prefix="z2z-serve-"))  # parked conversations: its own
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "z2z_chat.app.cli", "serve", "--model", str(model), "--model-id", "tiny", "--backend",
             "torch", "--device", "cpu", "--port", str(self.port), "--cache-dir", str(self.cache_dir), *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=os.environ | {"HF_HUB_OFFLINE": "1"})
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start in 120 s")

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, body, key: str | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + "/v1/chat/completions", content=content, headers=headers, **({"timeout": 60} | kw))

    def metrics(self, key: str | None = None) -> dict[str, float]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        lines = httpx.get(self.url + "/metrics", headers=headers).text.splitlines()
        return {k: float(v) for k, v in (ln.split() for ln in lines if not ln.startswith("#"))}

    def stop(self) -> int:
        """SIGTERM: uvicorn shuts down gracefully, then re-raises the signal (exit status 143)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(30)
        self.log = self.proc.stdout.read()
        return status


@pytest.fixture(scope="module")
def model(ref_checkpoints):
    return ref_checkpoints[("llama", "transformer", "compressed")][1]


@pytest.fixture(scope="module")
def server(model):
    s = Server(model)
    yield s
    assert s.stop() == -signal.SIGTERM and "Traceback" not in s.log, s.log


@pytest.fixture(scope="module")
def small(model):
    """One conversation held at a time (every turn of another evicts it), a key, a queue of 1."""
    s = Server(model, "--slots", "1", "--api-key", KEY, "--max-queue", "1")
    yield s
    s.stop()


def ask(client, messages, **kw):
    r = client.chat.completions.create(model="tiny", messages=messages, **({"temperature": 0, "max_tokens": 40} | kw))
    return r.choices[0].message.content, r


def ask_stream(client, messages, **kw):
    parts, usage, finish = [], None, None
    for ch in client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                             stream_options={"include_usage": True},
                                             **({"temperature": 0, "max_tokens": 40} | kw)):
        if ch.usage is not None:
            assert not ch.choices
            usage = ch.usage
        for c in ch.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(parts), usage, finish


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_streaming_and_not_give_the_same_reply_with_usage(server):
    msgs = [{"role": "user", "content": "def f(x):\n    return x + 1"}]
    text, r = ask(server.client(), msgs)
    streamed, usage, finish = ask_stream(server.client(), msgs)
    assert text and streamed == text and finish == r.choices[0].finish_reason
    assert r.usage.prompt_tokens == usage.prompt_tokens > 0 and usage.completion_tokens == r.usage.completion_tokens
    z = r.usage.model_extra["zip2zip"]
    assert z["completion_codes"] <= r.usage.completion_tokens and z["prompt_codes"] > 0


def test_text_parts_are_joined(server):
    a, _ = ask(server.client(), [{"role": "user", "content": "hello there"}])
    b, _ = ask(server.client(), [{"role": "user", "content": [{"type": "text", "text": "hello "},
                                                               {"type": "text", "text": "there"}]}])
    assert a == b


def test_max_tokens_and_stop_strings(server):
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    text, r = ask(server.client(), msgs, max_tokens=12)
    assert r.choices[0].finish_reason == "length" and 12 <= r.usage.completion_tokens <= 12 + 2
    full, _ = ask(server.client(), msgs, max_tokens=60)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), "the reply has nothing to stop on"
    cut, r = ask(server.client(), msgs, max_tokens=60, stop=[stop])
    assert cut == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed, _, finish = ask_stream(server.client(), msgs, max_tokens=60, stop=stop)
    assert streamed == cut and finish == "stop"
    # the conversation continues from the text the client got
    follow = msgs + [{"role": "assistant", "content": cut}, {"role": "user", "content": "More."}]
    assert ask(server.client(), follow)[0]


@pytest.mark.parametrize("body,status,code", [
    ("{not json", 400, None),
    ({"model": "tiny"}, 400, None),
    ({"messages": []}, 400, None),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "unsupported_content"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}, 400,
     "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400, "unknown_parameter"),
    ('{"messages": [{"role": "user", "content": "a\\ud800"}]}', 400, None),
    ("[" * 100000 + "]" * 100000, 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model_not_found"),
    ({"messages": [{"role": "user", "content": "word " * 5000}]}, 400, "context_length_exceeded"),
])
def test_errors_have_openais_body_and_status(server, body, status, code):
    r = server.post(body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code or code is None


def test_a_client_that_disconnects_frees_the_worker(server):
    before = server.metrics()["z2z_requests_cancelled_total"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 100000,
            "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    t = time.perf_counter()
    text, _ = ask(server.client(), [{"role": "user", "content": "hi"}], max_tokens=5)
    assert time.perf_counter() - t < 10
    assert server.metrics()["z2z_requests_cancelled_total"] == before + 1


A = ["def add(a, b):\n    return a + b", "Now write sub the same way.", "And mul."]
B = ["Tell me about cats.", "Shorter, please.", "Thanks."]


def conversation(client, turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    out = []
    for t in turns:
        msgs.append({"role": "user", "content": t})
        text, r = ask(client, msgs)
        out.append((text, r.usage.prompt_tokens_details.cached_tokens))
        msgs.append({"role": "assistant", "content": text})
    return out


def interleaved(client, *convs):
    msgs = [[] for _ in convs]
    out = [[] for _ in convs]
    for turn in zip(*convs):
        for i, t in enumerate(turn):
            msgs[i].append({"role": "user", "content": t})
            text, r = ask(client, msgs[i])
            out[i].append((text, r.usage.prompt_tokens_details.cached_tokens))
            msgs[i].append({"role": "assistant", "content": text})
    return out


def test_interleaved_conversations_reuse_their_cache_and_reply_as_alone(server):
    alone = [conversation(server.client(), A), conversation(server.client(), B)]
    hits = server.metrics()["z2z_conversation_cache_hits_total"]
    both = interleaved(server.client(), A, B)
    assert [[t for t, _ in c] for c in both] == [[t for t, _ in c] for c in alone]
    assert all(cached > 0 for c in both for _, cached in c[1:])
    assert server.metrics()["z2z_conversation_cache_hits_total"] == hits + 4


def test_with_one_slot_evicted_conversations_are_rebuilt_exactly(server, small):
    alone = [[t for t, _ in conversation(server.client(), c)] for c in (A, B)]
    both = interleaved(small.client(KEY), A, B)
    assert [[t for t, _ in c] for c in both] == alone
    m = small.metrics(KEY)
    assert m["z2z_conversation_cache_restores_total"] >= 4 and m["z2z_conversation_cache_hits_total"] == 0


def test_api_key(small):
    msgs = [{"role": "user", "content": "hi"}]
    for key in (None, "wrong"):
        r = small.post({"messages": msgs}, key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert small.post({"messages": msgs, "max_tokens": 3}, KEY).status_code == 200
    assert httpx.get(small.url + "/health").status_code == 200  # health needs no key


def test_a_full_queue_answers_429(small):
    body = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 3000}
    codes: list[int] = []

    def send() -> None:
        codes.append(small.post(body, KEY).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert 429 in codes and 200 in codes and all(c in (200, 429) for c in codes)


def test_sigterm_during_a_reply_exits_cleanly(model):
    s = Server(model)
    body = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 100000, "stream": True}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        t = time.perf_counter()
        assert s.stop() == -signal.SIGTERM
        rest = [ln for ln in lines if ln]  # the stream ends properly: the reply was cancelled, not cut off
    assert time.perf_counter() - t < 20 and "Traceback" not in s.log, s.log
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(rest)


# --- what chat front ends and scripts do -----------------------------------------------------------

def test_a_regenerate_and_an_edit_reuse_the_cache_and_a_regenerate_repeats_the_reply(server):
    c = server.client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": A[0]}]
    first, _ = ask(c, msgs)
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": A[1]}]
    second, _ = ask(c, msgs)
    again, r = ask(c, msgs)  # the client's "regenerate": the same messages again
    assert again == second and r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens > 0
    msgs[-1] = {"role": "user", "content": "Write sub, but in one line."}  # an edit of the last message
    _, r = ask(c, msgs)
    assert 0 < r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    title, r = ask(c, [{"role": "user", "content": "Title for: " + A[0]}], max_tokens=8)  # on the side
    assert ask(c, msgs[:3] + [{"role": "user", "content": A[1]}])[0] == second  # the first branch is kept


def test_a_non_streaming_client_that_disconnects_stops_its_reply(server):
    before = server.metrics()["z2z_requests_cancelled_total"]
    body = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 100000}
    with pytest.raises(httpx.TimeoutException):
        server.post(body, timeout=1.5)
    deadline = time.time() + 20
    while server.metrics()["z2z_requests_cancelled_total"] == before and time.time() < deadline:
        time.sleep(0.2)
    assert server.metrics()["z2z_requests_cancelled_total"] == before + 1
    assert httpx.get(server.url + "/health").json()["busy"] is False


def test_http_details_clients_rely_on(server, small):
    m = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert m["created"] > 1_600_000_000
    assert httpx.get(server.url + "/v1/models/tiny").json()["id"] == "tiny"
    assert httpx.get(server.url + "/v1/models/other").status_code == 404
    pre = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in ("*", "http://localhost:3000")
    before = server.metrics()["z2z_request_client_errors_total"]
    assert server.post({"messages": []}).status_code == 400
    assert server.metrics()["z2z_request_client_errors_total"] == before + 1
    assert httpx.get(small.url + "/metrics").status_code == 401  # the key guards the figures too


def test_a_body_over_the_limit_is_a_413_before_it_is_read(model):
    s = Server(model, "--max-body-mb", "1")
    try:
        big = {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}
        r = s.post(big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert s.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200
    finally:
        s.stop()


def test_a_busy_port_is_said_before_the_model_loads(model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "z2z_chat.app.cli", "serve", "--model", str(model), "--backend",
                            "torch", "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"127.0.0.1:{port}" in r.stderr and "--port" in r.stderr
    assert "serving" not in r.stderr and "Traceback" not in r.stderr and time.perf_counter() - t < 30


def test_conversations_survive_a_restart(model, tmp_path):
    s = Server(model, cache_dir=tmp_path)
    c = s.client()
    msgs = [{"role": "user", "content": B[0]}]
    msgs.append({"role": "assistant", "content": ask(c, msgs)[0]})
    msgs.append({"role": "user", "content": B[1]})
    kept, _ = ask(c, msgs)  # the reply of the conversation kept in memory
    first_reply = msgs[1]["content"]
    assert s.stop() == -signal.SIGTERM
    s = Server(model, cache_dir=tmp_path)
    try:
        again, r = ask(s.client(), msgs)  # a regenerate after the restart: the same reply, nothing re-read
        assert again == kept and r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens
        assert s.metrics()["z2z_conversation_cache_restores_total"] == 1
        assert first_reply
    finally:
        s.stop()


async def _async_ask(url: str) -> tuple[str, str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": A[0]}]
    r = await client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=20)
    parts = []
    async for ch in await client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=20,
                                                         stream=True):
        parts += [c.delta.content or "" for c in ch.choices]
    return r.choices[0].message.content, "".join(parts)


def test_the_async_openai_client(server):
    import asyncio

    whole, streamed = asyncio.run(_async_ask(server.url))
    assert whole and whole == streamed


def test_the_llm_cli(server, tmp_path):
    pytest.importorskip("llm", reason="the llm CLI: pip install llm")
    home = tmp_path / "llm"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: z2z\n  model_name: tiny\n  api_base: {server.url}/v1\n")
    env = os.environ | {"LLM_USER_PATH": str(home), "OPENAI_API_KEY": "none"}
    r = subprocess.run([sys.executable, "-m", "llm", "-m", "z2z", "-o", "temperature", "0", "-o", "max_tokens", "20",
                        A[0]], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ask(server.client(), [{"role": "user", "content": A[0]}], max_tokens=20)[0].strip()


def test_litellm(server):
    litellm = pytest.importorskip("litellm", reason="litellm: pip install litellm")
    msgs = [{"role": "user", "content": A[0]}]
    r = litellm.completion(model="openai/tiny", api_base=server.url + "/v1", api_key="none", messages=msgs,
                           temperature=0, max_tokens=20)
    assert r.choices[0].message.content == ask(server.client(), msgs, max_tokens=20)[0]
    parts = [ch.choices[0].delta.content or "" for ch in litellm.completion(
        model="openai/tiny", api_base=server.url + "/v1", api_key="none", messages=msgs, temperature=0,
        max_tokens=20, stream=True) if ch.choices]
    assert "".join(parts) == r.choices[0].message.content


def test_structured_output_follows_the_schema_streamed_or_not(server):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]},
                                               "tags": {"type": "array", "maxItems": 2,
                                                        "items": {"type": "string", "maxLength": 5}}},
              "required": ["colour", "tags"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}
    msgs = [{"role": "user", "content": "Describe a thing."}]
    text, r = ask(server.client(), msgs, response_format=fmt, max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)
    streamed, _, _ = ask_stream(server.client(), msgs, response_format=fmt, max_tokens=200)
    assert streamed == text
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}}}
    r = server.post({"messages": msgs, "response_format": bad})
    assert r.status_code == 400 and "schema" in r.json()["error"]["message"]
    assert server.post({"messages": msgs, "response_format": {"type": "json_schema"}}).status_code == 400


def test_a_client_error_the_worker_raises_is_counted_once(server):
    before = server.metrics()["z2z_request_client_errors_total"]
    r = server.post({"messages": [{"role": "user", "content": "word " * 5000}]})  # found too long by the worker
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert server.metrics()["z2z_request_client_errors_total"] == before + 1
