"""The engine over the torch backend on tiny random models: parity with the reference package's
generate, multi-turn state, cancel, save/restore, context overflow, sampling and detokenization."""

from __future__ import annotations

import codecs
import json
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from reference import ref_logits  # noqa: E402

from z2z_chat.backends.codec import CodecSession  # noqa: E402
from z2z_chat.backends.engine.events import Done, GenerationSettings, Notice, Token  # noqa: E402
from z2z_chat.backends.engine.kv_store import SavedKV, codes_digest  # noqa: E402
from z2z_chat.backends.engine.session import Session  # noqa: E402
from z2z_chat.backends.engine.sampling import SamplingSettings  # noqa: E402
from z2z_chat.backends.torch_backend import checkpoint  # noqa: E402
from z2z_chat.backends.torch_backend.backend import TorchState  # noqa: E402
from z2z_chat.backends.engine.utf8_guard import Utf8Guard  # noqa: E402

GREEDY = GenerationSettings(max_tokens=40)


class Recording:
    """Wraps a backend: keeps the last logits; can hide the candidate (the reference's rule)."""

    def __init__(self, inner, with_candidate=True, context_length=None):
        self.inner, self.with_candidate = inner, with_candidate
        self.context_length = context_length or inner.context_length
        self.last = None
        self.forwards = []

    def add_entries(self, entries, candidate=None):
        self.inner.add_entries(entries, candidate if self.with_candidate else None)

    def forward(self, codes, positions):
        self.forwards.append((list(codes), list(positions)))
        self.last = self.inner.forward(codes, positions)
        return self.last

    def forward_all(self, codes, positions, masks):
        self.forwards.append((list(codes), list(positions)))
        rows = self.inner.forward_all(codes, positions, masks)
        self.last = rows[-1]
        return rows

    def trim(self, n):
        self.inner.trim(n)

    def drop_entries(self, keep):
        self.inner.drop_entries(keep)

    def reset(self):
        self.inner.reset()

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def loaded(ref_checkpoints):
    return checkpoint.load(ref_checkpoints[("llama", "transformer", "compressed")][1])


class Runtime:
    """What the shared suite needs of a backend: a factory of fresh states, tokenizer, codec."""

    def __init__(self, name, factory, tokenizer, codec, position_mode):
        self.name, self.factory, self.tokenizer, self.codec = name, factory, tokenizer, codec
        self.config = type("C", (), {"position_mode": position_mode})


@pytest.fixture(scope="module", params=["torch", "mlx", "llamacpp"])
def rt(request, loaded, ref_checkpoints, tmp_path_factory):
    if request.param == "torch":
        return Runtime("torch", lambda: TorchState(loaded.model), loaded.tokenizer, loaded.codec,
                       loaded.config.position_mode)
    if request.param == "llamacpp":
        pytest.importorskip("llama_cpp", reason='llama.cpp backend: pip install "z2z-chat[llamacpp]"')
        from z2z_chat.backends.llamacpp_backend.convert import convert
        from z2z_chat.backends.llamacpp_backend.checkpoint import open_checkpoint

        dst = tmp_path_factory.mktemp("gguf") / "llama"
        convert(str(ref_checkpoints[("llama", "transformer", "compressed")][1]), dst)
        model = open_checkpoint(dst, n_threads=1, exact=True).model  # one context: every state shares it
        return Runtime("llamacpp", model.new_state, loaded.tokenizer,
                       loaded.codec, loaded.config.position_mode)
    pytest.importorskip("mlx_lm", reason='MLX backend: pip install "mlx[cpu]" mlx-lm')
    from z2z_chat.backends.mlx_backend.backend import MLXModel
    from z2z_chat.backends.mlx_backend.convert import convert

    dst = tmp_path_factory.mktemp("mlx") / "llama"
    convert(str(ref_checkpoints[("llama", "transformer", "compressed")][1]), dst, dtype="float32")
    return Runtime("mlx", MLXModel.open(dst)[0].new_state, loaded.tokenizer, loaded.codec, loaded.config.position_mode)


def new_session(rt, **kw):
    rec = Recording(rt.factory(), **kw)
    return Session(rec, rt.tokenizer, rt.codec, position_mode=rt.config.position_mode), rec


def run(session, text, settings=GREEDY, cancel=None):
    events = list(session.send(text, settings, cancel))
    codes = [e.code for e in events if isinstance(e, Token) and e.code is not None]
    done = events[-1]
    assert isinstance(done, Done)
    return codes, "".join(e.text for e in events if isinstance(e, Token)), done, events


def from_scratch_logits(rt, session):
    """Prefill the session's whole fed stream into a fresh backend in one forward."""
    backend = rt.factory()
    codec = CodecSession(rt.codec)
    for c in session.codes[:session.fed]:
        codec.push(c)
    backend.add_entries(codec.take_new_entries(), codec.candidate())
    return backend.forward(session.codes[:session.fed], session.positions[:session.fed]), codec


PROMPT = "def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 2\n\nprint(f(1), g(2))"


@pytest.mark.parametrize("case", [("llama", "transformer", "compressed"), ("llama", "res_latent_attn", "base_token_end")])
def test_greedy_codes_equal_reference_generate(case, ref_checkpoints):
    ref, d = ref_checkpoints[case]
    loaded = checkpoint.load(d)
    torch_rt = Runtime("torch", lambda: TorchState(loaded.model), loaded.tokenizer, loaded.codec,
                       loaded.config.position_mode)
    session, rec = new_session(torch_rt, with_candidate=False)  # the reference cannot predict a new id
    codes, _, done, _ = run(session, PROMPT, GenerationSettings(max_tokens=120))  # base tokens
    prompt = rec.forwards[0][0]
    if loaded.config.position_mode == "compressed":
        ref.codebook_manager.reset()
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor([prompt]), max_new_tokens=len(codes), do_sample=False,
                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        ref.codebook_manager.reset()
        want = out[0, len(prompt):].tolist()
    else:
        # The package's generate loses base_token_end positions when the decoder carries a PEFT
        # adapter (PeftModel.generate swaps in its own prepare_inputs_for_generation, bypassing
        # zip2zip's position hook), so its own forward, which places positions right, is the oracle.
        want = list(prompt)
        for _ in range(len(codes)):
            want.append(int(ref_logits(ref, want)[-1].argmax()))
        want = want[len(prompt):]
    assert codes == want[:len(codes)]
    assert len(codes) >= 32 or done.reason == "stop"
    assert sum(c >= loaded.codec.base_vocab_size for c in codes) >= 3  # hypertokens were emitted


def test_two_turns_equal_the_conversation_from_scratch(rt):
    session, rec = new_session(rt)
    run(session, PROMPT, GenerationSettings(max_tokens=12))
    n_after_1 = len(session.codes)
    run(session, "again: " + PROMPT, GenerationSettings(max_tokens=12))
    # the second turn prefilled only its new codes (plus the previous reply's last code)
    assert sum(len(c) for c, _ in rec.forwards) == session.fed  # nothing was fed twice
    second_prefill = next(c for c, _ in rec.forwards[1:] if len(c) > 1)
    # it starts at the first reply's last code (sampled, not yet fed) and holds only the new turn
    assert second_prefill == session.codes[n_after_1 - 1:n_after_1 - 1 + len(second_prefill)]
    want, codec = from_scratch_logits(rt, session)
    assert dict(codec.codebook.items()).items() <= dict(session.codec.codebook.items()).items()
    np.testing.assert_allclose(rec.last, want, atol=1e-4)


TURNS_A = ["def f(x):\n    return x + 1\n\ndef f(x):", "Now the same for g.", "And once more."]
TURNS_B = ["Tell me a story about a cat.", "The cat again, but shorter.", "Thanks."]


def test_interleaved_sessions_write_what_separate_runs_write(rt):
    """Two conversations of one model, turn by turn in alternation: each writes exactly the codes
    it writes alone (each has its own KV cache and hyper slots; on llama.cpp they share one
    context, parking the other's cache)."""
    want = []
    for turns in (TURNS_A, TURNS_B):
        alone, _ = new_session(rt)
        want.append([run(alone, t)[0] for t in turns])
    a, _ = new_session(rt)
    b, _ = new_session(rt)
    got = [[], []]
    for ta, tb in zip(TURNS_A, TURNS_B):
        got[0].append(run(a, ta)[0])
        got[1].append(run(b, tb)[0])
    assert got == want
    assert all(len(c) > 0 for turn in got for c in turn)


def test_runtime_sessions_get_their_own_state(loaded):
    from z2z_chat.backends.runtime import Runtime as RealRuntime
    from z2z_chat.backends.torch_backend.backend import TorchModel

    rt = RealRuntime(TorchModel(loaded.model), loaded.tokenizer, loaded.codec, loaded.config, "torch", "tiny", "cpu")
    a = rt.session()
    run(a, "hello there")
    fed = a.state.cache.get_seq_length()
    b = rt.session()  # used to reset the one backend every session shared
    run(b, "something else entirely")
    assert a.state is not b.state and a.state.hyper is not b.state.hyper
    assert fed == a.fed > 0 and a.state.cache.get_seq_length() == fed


def test_cancel_mid_reply_then_next_turn_works(rt):
    session, rec = new_session(rt)
    cancel = threading.Event()
    events = []
    for ev in session.send(PROMPT, GenerationSettings(max_tokens=40), cancel):
        events.append(ev)
        if sum(isinstance(e, Token) for e in events) == 3:
            cancel.set()
    assert isinstance(events[-1], Done) and events[-1].reason == "cancelled"
    assert session.messages[-1]["role"] == "assistant"  # the partial reply stays
    codes, _, done, _ = run(session, "next", GenerationSettings(max_tokens=8))
    assert done.reason in ("stop", "length") and codes
    want, _ = from_scratch_logits(rt, session)
    np.testing.assert_allclose(rec.last, want, atol=1e-4)


def test_consumer_that_stops_early_keeps_state_consistent(rt):
    session, rec = new_session(rt)
    gen = session.send(PROMPT, GenerationSettings(max_tokens=40))
    for ev in gen:
        if isinstance(ev, Token):
            break
    gen.close()
    codes, _, done, _ = run(session, "next", GenerationSettings(max_tokens=6))
    want, _ = from_scratch_logits(rt, session)
    np.testing.assert_allclose(rec.last, want, atol=1e-4)


def test_save_restore_resumes_identically(rt):
    a, _ = new_session(rt)
    run(a, PROMPT, GenerationSettings(max_tokens=10))
    snap = json.loads(json.dumps(a.to_dict()))
    b, rec_b = new_session(rt)
    b.restore(snap)
    ca, ta, _, _ = run(a, "more please", GenerationSettings(max_tokens=10))
    cb, tb, _, _ = run(b, "more please", GenerationSettings(max_tokens=10))
    assert (ca, ta) == (cb, tb)
    assert len(rec_b.forwards[0][0]) > 20  # the history was rebuilt by one prefill


def test_a_saved_kv_cache_resumes_without_reading_the_conversation_again(rt):
    """What reopening a chat does, on every backend: the state exported after two turns and
    imported into a fresh one holds the conversation; the next turn reads only the new message
    and writes what a full re-read writes. A cache that is damaged or does not hold the
    conversation is refused with the reason, and the conversation is read again."""
    settings = GenerationSettings(max_tokens=12)
    fresh = lambda: Session(rt.factory(), rt.tokenizer, rt.codec, position_mode=rt.config.position_mode)  # noqa: E731
    a = fresh()
    for text in TURNS_A[:2]:
        run(a, text, settings)
    saved, snap = json.loads(json.dumps(a.to_dict())), a.saved_kv()
    assert snap is not None and snap.fed == a.fed > 0
    warm, cold = fresh(), fresh()
    assert warm.restore(saved, snap) is None and warm.fed == snap.fed
    cold.restore(saved)
    assert cold.fed == 0
    (cw, tw, dw, _), (cc, tc, dc, _) = run(warm, TURNS_A[2], settings), run(cold, TURNS_A[2], settings)
    assert (cw, tw) == (cc, tc) and cw
    assert dw.stats.cached_codes == snap.fed and dc.stats.cached_codes == 0
    changed = dict(saved, codes=list(saved["codes"][:-1]) + [saved["codes"][0]])
    for d, kv in ((saved, SavedKV(snap.data[: len(snap.data) // 2], snap.fed, snap.digest)),
                  (saved, SavedKV(snap.data, snap.fed - 1, codes_digest(a.codes[: snap.fed - 1]))),
                  (changed, snap)):
        other = fresh()
        try:
            note = other.restore(d, kv)
        except ValueError:
            note = "the saved state itself was refused"
        assert note is not None and other.fed == 0
        codes, *_ = run(other, TURNS_A[2], settings)
        assert d is changed or codes == cc


def test_reset_clears_codebook_and_cache(rt):
    session, rec = new_session(rt)
    first, *_ = run(session, PROMPT, GenerationSettings(max_tokens=8))
    session.reset()
    assert len(session.codec) == 0 and session.messages == []
    again, *_ = run(session, PROMPT, GenerationSettings(max_tokens=8))
    assert first == again


def test_context_overflow_drops_oldest_turns(rt):
    session, rec = new_session(rt, context_length=160)
    notices = []
    for i in range(6):
        _, _, done, events = run(session, f"turn {i}: " + "x = 1\n" * 6, GenerationSettings(max_tokens=16))
        notices += [e for e in events if isinstance(e, Notice)]
        assert max(session.positions) < 160
    assert notices and "dropped" in notices[0].text
    want, _ = from_scratch_logits(rt, session)
    np.testing.assert_allclose(rec.last, want, atol=1e-4)


def test_message_too_long_for_context_is_a_clear_error(rt):
    from z2z_chat.backends.engine.prompt import ContextFullError

    session, _ = new_session(rt, context_length=64)
    with pytest.raises(ContextFullError, match="context window holds 64"):
        run(session, "word " * 200, GenerationSettings(max_tokens=8))


# --- lookahead: drafted codes verified in one forward give the same greedy codes --------------

REPETITIVE = ("def f(x):\n    return x + 1\n\ndef f(x):\n    return x + 1\n\n" * 3 +
              "Repeat the code above exactly, twice.")


@pytest.mark.parametrize("n", [2, 8])
def test_lookahead_gives_the_same_greedy_codes(rt, n):
    plain_s, _ = new_session(rt)
    plain_s.stop_ids = set()
    look_s, rec = new_session(rt)
    look_s.stop_ids = set()
    want, *_ = run(plain_s, REPETITIVE, GenerationSettings(max_tokens=150))
    got, _, done, events = run(look_s, REPETITIVE, GenerationSettings(max_tokens=150, lookahead=n))
    assert got == want
    # drafts were both accepted and rejected on the way
    assert done.stats.drafted_codes > 0
    # a second turn continues identically (state after rollbacks is exact)
    want2, *_ = run(plain_s, "Again: " + REPETITIVE, GenerationSettings(max_tokens=60))
    got2, *_ = run(look_s, "Again: " + REPETITIVE, GenerationSettings(max_tokens=60, lookahead=n))
    assert got2 == want2
    assert look_s.codec.to_dict() | {"fresh": 0} == plain_s.codec.to_dict() | {"fresh": 0}


def test_forward_all_rows_equal_step_by_step_logits(rt):
    """Row t of a verification forward == the logits a single-step forward gives after code t."""
    from z2z_chat.backends.codec import encode as lzw

    codes, _ = lzw(rt.tokenizer(PROMPT * 3, add_special_tokens=False)["input_ids"], rt.codec)
    k = 30
    a, b = rt.factory(), rt.factory()
    s = CodecSession(rt.codec)
    for c in codes[:k]:
        s.push(c)
    for be in (a, b):
        be.add_entries(s.take_new_entries() if be is a else list(s.codebook.items()), s.candidate())
        be.forward(codes[:k], list(range(k)))
    steps, masks = [], []
    mark = s.mark()
    for t in range(k, len(codes)):
        s.push(codes[t])
        new = s.take_new_entries()
        a.add_entries(new, s.candidate())
        steps.append(a.forward([codes[t]], [t]))
        masks.append((len(s), s.candidate()))
    s.rollback(mark)
    s.take_new_entries()
    for t in range(k, len(codes)):  # b gets every entry first, as a verification does
        s.push(codes[t])
    b.add_entries(s.take_new_entries(), s.candidate())
    rows = b.forward_all(codes[k:], list(range(k, len(codes))), masks)
    for want, got in zip(steps, rows):
        assert np.array_equal(np.isfinite(want), np.isfinite(got))
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], atol=2e-3)


def reply_bytes_valid(guard, codec, codes, whole: bool = False) -> bool:
    """Whether the reply's bytes are UTF-8 (``whole``: its last character complete too)."""
    data = b"".join(guard.bytes[i] for c in codes for i in codec.expand(c))
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=whole)
    except UnicodeDecodeError:
        return False
    return True


def test_utf8_guard_keeps_sampled_replies_valid(rt):
    """A random model sampled hot over multi-byte text writes broken UTF-8 without the guard
    (so this test can fail); with the guard, no reply ever splits a character, and a reply cut by
    the token limit finishes its last character (a few tokens past the limit at most)."""
    if rt.name != "torch":
        pytest.skip("the guard sits in the shared decode loop; one backend shows it")
    prompt = "日本語のテキスト。🙂 Über die Brücke gehen wir. " * 3
    guard = Utf8Guard(rt.tokenizer, rt.codec.base_vocab_size)
    broken = {True: 0, False: 0}
    for seed in range(4):
        settings = GenerationSettings(max_tokens=120, sampling=SamplingSettings(temperature=1.5, seed=seed))
        for guarded in (True, False):
            session, _ = new_session(rt)
            session.guard = guard if guarded else None
            codes, text, done, _ = run(session, prompt, settings)
            broken[guarded] += not reply_bytes_valid(guard, session.codec, codes, whole=guarded)
            if guarded:
                assert "\ufffd" not in text and done.stats.reply_tokens <= 120 + 3 + 2
    assert broken[False] > 0 and broken[True] == 0, broken
