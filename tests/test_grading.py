"""The honest grader: only the answer a model commits to is graded, and the LLM judge speaks the
real OpenAI chat-completions protocol (checked against a local HTTP server, not a mock)."""

from __future__ import annotations

import json
import logging
import socket
import string
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seal.config import AuditorSettings
from seal.domains.knowledge import LexicalGrader, extract_answer
from seal.grading import (
    CommittedGrader,
    JudgeError,
    JudgeGrader,
    build_grader,
    committed_span,
    first_sentence,
    first_sentence_complete,
    parse_judge_verdict,
)

PORT_REPLY = (
    "The second busiest port is the Port of Los Angeles, also the Port of Long Beach, "
    "the Port of San Diego, and the…"
)
GRADER = CommittedGrader()


# --- the committed answer -------------------------------------------------------------------

# Pieces answers are made of, boilerplate, abbreviations and number formats included, so that
# random texts hit the corners where a sentence end is still open.
ANSWER_PIECES = st.lists(
    st.sampled_from([
        "Paris", "Dr", "Mt", "St", "J", "D.C", "3", "5", "1,000", "Sure", "Okay", "The answer is", "Answer",
        "I think", "It is", "it's", "and", "or", ".", "..", "?", "!", ";", "…", ",", ":", " ", "  ", "\n", "\r",
        "\t", "*", '"', "(", "x",
    ]),
    max_size=12,
).map("".join)


@settings(max_examples=600, deadline=None)
@given(ANSWER_PIECES, ANSWER_PIECES)
def test_a_complete_first_sentence_is_never_changed_by_what_follows(text: str, more: str) -> None:
    if first_sentence_complete(text):
        assert first_sentence(text + more) == first_sentence(text)
        # What every grader reads (the first line) keeps the committed answer too.
        assert first_sentence(extract_answer(text + more)) == first_sentence(extract_answer(text))


def test_a_first_sentence_is_complete_only_once_something_follows_its_end() -> None:
    assert not first_sentence_complete("")
    assert not first_sentence_complete("Paris")
    assert not first_sentence_complete("Paris.")  # "Paris.5"? only what follows settles it
    assert first_sentence_complete("Paris. ")
    assert first_sentence_complete("Paris. It is the capital")
    assert first_sentence_complete("Paris\nLyon") and first_sentence_complete("Paris\n")
    assert not first_sentence_complete("Dr. ")  # an abbreviation, not a sentence end
    assert first_sentence_complete("Dr. Smith. He")
    assert not first_sentence_complete("Sure. ")  # boilerplate: the answer has not started
    assert not first_sentence_complete("The answer is 3.")


def test_the_demo_list_is_not_credited_for_a_later_item() -> None:
    assert not GRADER.grade("Port of San Diego", PORT_REPLY).correct
    assert not GRADER.grade("Port of Long Beach", PORT_REPLY).correct
    # The item the model did commit to is still credited.
    assert GRADER.grade("Port of Los Angeles", PORT_REPLY).correct
    # The old lenient rule, kept by name, credited the list: that is the bug being fixed.
    assert build_grader(AuditorSettings(grader="any")).grade_batch(["q"], ["Port of San Diego"], [PORT_REPLY])[0].correct


@pytest.mark.parametrize(
    ("gold", "prediction", "expected"),
    [
        ("Lyon", "Paris or Lyon", False),
        ("Paris", "Paris or Lyon", True),
        ("Lyon", "It is either Paris or Lyon.", False),
        ("Mars", "Jupiter, Saturn, Mars and Venus", False),
        ("Mars", "Jupiter / Mars", False),
        # F1 0.5 on the whole reply, but the committed answer names a different port.
        ("Port of San Diego", "The Port of Los Angeles.", False),
        # A part of the gold answer, with nothing wrong added, reaches the F1 threshold.
        ("Port of San Diego", "San Diego", True),
        ("187 meters", "187", True),
        # Separators inside the gold answer itself do not cut it.
        ("Lewis and Clark", "Lewis and Clark led the expedition.", True),
        ("Washington, D.C.", "Washington, D.C. is the capital.", True),
        ("St. Louis", "St. Louis, Missouri", True),
        # Only the first sentence counts; an abbreviation or a decimal does not end it.
        ("Lyon", "Paris. Some say Lyon.", False),
        ("3.5", "About 3.5 km.", True),
        ("Jupiter", "**Answer:** Jupiter", True),
        ("Mars", "I think it is Mars, the red planet.", True),
        ("1,000", "1,000 soldiers", True),
        ("", "", False),
        ("Paris", "", False),
    ],
)
def test_committed_cases(gold: str, prediction: str, expected: bool) -> None:
    assert GRADER.grade(gold, prediction).correct is expected


def test_committed_span_reports_the_graded_text() -> None:
    assert committed_span("The answer is Paris, or maybe Lyon.", "Paris") == ("paris", True)
    assert committed_span("The answer is Paris, or maybe Lyon.", "Lyon") == ("paris", False)
    grade = GRADER.grade("Paris", "The answer is Paris.")
    assert grade.exact_match and grade.f1 == 1.0 and grade.contains


# Words that can never act as a list separator or boilerplate, so a generated item is one item.
_RESERVED = {
    "and", "nor", "also", "plus", "versus", "along", "with", "well", "the", "answer", "final",
    "short", "correct", "right", "sure", "certainly", "okay", "yes", "think", "believe", "guess",
    "that", "was", "would", "its", "either", "etc", "inc", "ltd", "est", "approx", "corp",
}  # fmt: skip
WORD = (
    st.text(alphabet=string.ascii_lowercase, min_size=3, max_size=8)
    .filter(lambda w: w not in _RESERVED)
    .map(str.capitalize)
)


@st.composite
def items_with_disjoint_words(draw: st.DrawFn, count: int) -> list[str]:
    words = draw(st.lists(WORD, min_size=3 * count, max_size=3 * count, unique_by=str.casefold))
    sizes = draw(st.lists(st.integers(1, 3), min_size=count, max_size=count))
    return [" ".join(words[3 * i : 3 * i + size]) for i, size in enumerate(sizes)]


@st.composite
def hedged_reply(draw: st.DrawFn) -> tuple[str, str]:
    """A reply listing candidates, the gold answer somewhere after a wrong first item."""
    items = draw(st.integers(2, 5).flatmap(items_with_disjoint_words))
    gold = items[draw(st.integers(1, len(items) - 1))]
    style = draw(st.sampled_from(["comma", "or", "also", "slash", "and"]))
    if style == "comma":
        last = draw(st.sampled_from([", and ", " and ", ", or ", " or ", ", "]))
        listed = ", ".join(items[:-1]) + last + items[-1]
    elif style == "also":
        listed = items[0] + ", also " + ", ".join(items[1:])
    else:
        listed = {"or": " or ", "slash": " / ", "and": " and "}[style].join(items)
    prefix = draw(st.sampled_from(["", "The answer is ", "Answer: ", "I think ", "It is either ", "Possibly the "]))
    suffix = draw(st.sampled_from(["", ".", "…", ", and the…", ". All of these are ports."]))
    return gold, prefix + listed + suffix


@settings(max_examples=300, deadline=None)
@given(hedged_reply())
def test_a_gold_answer_after_a_wrong_first_item_is_never_credited(case: tuple[str, str]) -> None:
    gold, reply = case
    assert not GRADER.grade(gold, reply).correct, reply


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 3).flatmap(lambda n: items_with_disjoint_words(n + 1)),
    st.sampled_from(
        [
            "{g}",
            "{g}.",
            "The answer is {g}.",
            "Answer: {g}",
            "The answer is: {g}\nOr {w}, on a second line.",
            "{g}. It is named in the passage, next to {w}.",
            "{g}, because the passage says so; not {w}.",
            "I think it is {g}.",
            "**{g}**",
            "It was {g} all along",
        ]
    ),
)
def test_a_committed_gold_answer_is_credited(words: list[str], template: str) -> None:
    gold, other = words[0], words[-1]
    reply = template.format(g=gold, w=other)
    grade = GRADER.grade(gold, reply)
    assert grade.correct and grade.contains, reply
    if template in {"{g}", "{g}.", "The answer is {g}.", "Answer: {g}", "**{g}**"}:
        assert grade.exact_match, reply


# --- selection ------------------------------------------------------------------------------


def test_build_grader_follows_the_setting() -> None:
    assert AuditorSettings().grader == "committed"
    assert build_grader(AuditorSettings()) == CommittedGrader(0.5)
    assert build_grader(AuditorSettings(grader="any", f1_threshold=0.7)) == LexicalGrader("any", 0.7)
    with pytest.raises(ValueError, match="judge_base_url"):
        build_grader(AuditorSettings(grader="judge"))
    judge = build_grader(
        AuditorSettings(grader="judge", judge_base_url="http://h:1/v1/", judge_model="m", judge_timeout_s=3)
    )
    assert isinstance(judge, JudgeGrader)
    assert judge.endpoint == "http://h:1/v1/chat/completions" and judge.timeout_s == 3


def test_every_auditor_setting_is_documented() -> None:
    undocumented = [name for name, f in AuditorSettings.model_fields.items() if not f.description]
    assert undocumented == []


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("yes", True), ("Yes.", True), (" NO ", False), ("no, it names another port", False),
        ("<think>the gold says Paris, the answer says Paris</think>\nyes", True),
        ("maybe", None), ("", None), (None, None), ("The answer is yes", None),
    ],
)  # fmt: skip
def test_parse_judge_verdict(reply: str | None, verdict: bool | None) -> None:
    assert parse_judge_verdict(reply) is verdict


# --- the judge against a local OpenAI-compatible endpoint -----------------------------------


class FakeChatServer:
    """Answers POST /v1/chat/completions as an OpenAI-compatible server does. ``respond`` maps
    (request number, parsed body, headers) to (status, body dict, delay seconds)."""

    def __init__(self, respond: Callable[[int, dict, dict], tuple[int, dict, float]]) -> None:
        self.requests: list[tuple[str, dict, dict]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {key.lower(): value for key, value in self.headers.items()}
                with server._lock:
                    number = len(server.requests)
                    server.requests.append((self.path, body, headers))
                status, payload, delay = (
                    respond(number, body, headers)
                    if self.path == "/v1/chat/completions"
                    else (404, {"error": {"message": "not found"}}, 0.0)
                )
                time.sleep(delay)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the timeout case)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def completion(content: str | None, model: str) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51},
    }


def judging(number: int, body: dict, headers: dict) -> tuple[int, dict, float]:
    """A judge that says yes when the model's answer starts with the gold answer."""
    user = body["messages"][-1]["content"]
    fields = dict(line.split(": ", 1) for line in user.splitlines() if ": " in line)
    gold, said = fields["Gold answer"].casefold(), fields["Model's answer"].casefold()
    if "undecided" in said:
        return 200, completion("I cannot tell.", body["model"]), 0.0
    return 200, completion("Yes" if said.startswith(gold) else "No", body["model"]), 0.0


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeChatServer]]:
    servers: list[FakeChatServer] = []

    def start(respond: Callable[[int, dict, dict], tuple[int, dict, float]] = judging) -> FakeChatServer:
        servers.append(FakeChatServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def judge_for(server: FakeChatServer, **overrides: object) -> JudgeGrader:
    options: dict = {"base_url": server.base_url, "model": "judge-7b", "api_key_env": "SEAL_TEST_JUDGE_KEY",
                     "timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01}  # fmt: skip
    return JudgeGrader(**{**options, **overrides})


def test_judge_speaks_the_chat_completions_protocol(serve, monkeypatch, caplog) -> None:
    monkeypatch.setenv("SEAL_TEST_JUDGE_KEY", "sk-local-test")
    server = serve()
    grader = judge_for(server, max_concurrency=3)
    questions = ["Second busiest port?", "Capital of France?", "Red planet?", "Largest planet?", "Tallest?"]
    golds = ["Port of San Diego", "Paris", "Mars", "Jupiter", "Brindle Tower"]
    predictions = ["Port of Los Angeles, Port of San Diego", "Paris, the capital", "", "Jupiter", "undecided"]
    with caplog.at_level(logging.WARNING, logger="seal.grading"):
        grades = grader.grade_batch(questions, golds, predictions)

    assert [g.correct for g in grades] == [False, True, False, True, False]
    # The lexical scores of the committed span travel with the verdict.
    assert grades[1].contains and not grades[0].contains
    # An empty answer is wrong without a request; every other answer is one request.
    assert len(server.requests) == 4
    for path, body, headers in server.requests:
        assert path == "/v1/chat/completions"
        assert headers["authorization"] == "Bearer sk-local-test"
        assert headers["content-type"] == "application/json"
        assert body["model"] == "judge-7b" and body["temperature"] == 0 and body["max_tokens"] == 8
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert "yes or no" in body["messages"][0]["content"]
    asked = {body["messages"][-1]["content"] for _, body, _ in server.requests}
    assert "Question: Capital of France?\nGold answer: Paris\nModel's answer: Paris, the capital" in "\n".join(asked)
    # The reply that was neither yes nor no is logged, never the key.
    assert "I cannot tell." in caplog.text and "Tallest?" in caplog.text
    assert "sk-local-test" not in caplog.text


def test_judge_sends_no_authorization_without_a_key(serve, monkeypatch) -> None:
    monkeypatch.delenv("SEAL_TEST_JUDGE_KEY", raising=False)
    server = serve()
    assert judge_for(server).grade_batch(["q"], ["Paris"], ["Paris"])[0].correct
    assert "authorization" not in server.requests[0][2]


def test_judge_retries_a_server_error_then_succeeds(serve) -> None:
    def flaky(number: int, body: dict, headers: dict) -> tuple[int, dict, float]:
        if number == 0:
            return 500, {"error": {"message": "engine restarting"}}, 0.0
        return judging(number, body, headers)

    server = serve(flaky)
    grades = judge_for(server).grade_batch(["q"], ["Paris"], ["Paris"])
    assert grades[0].correct
    assert len(server.requests) == 2


def test_judge_retries_a_timeout(serve) -> None:
    def slow_once(number: int, body: dict, headers: dict) -> tuple[int, dict, float]:
        status, payload, _ = judging(number, body, headers)
        return status, payload, 1.0 if number == 0 else 0.0

    server = serve(slow_once)
    assert judge_for(server, timeout_s=0.2).grade_batch(["q"], ["Paris"], ["Paris"])[0].correct
    assert len(server.requests) == 2


def test_judge_gives_up_after_its_retries(serve) -> None:
    server = serve(lambda n, b, h: (503, {"error": {"message": "overloaded"}}, 0.0))
    with pytest.raises(JudgeError, match=r"failed after 3 attempts: HTTP 503"):
        judge_for(server).grade_batch(["q"], ["Paris"], ["Paris"])
    assert len(server.requests) == 3


def test_judge_fails_clearly_on_401_without_retrying(serve, monkeypatch) -> None:
    monkeypatch.setenv("SEAL_TEST_JUDGE_KEY", "sk-wrong")

    def refuse(number: int, body: dict, headers: dict) -> tuple[int, dict, float]:
        if headers.get("authorization") != "Bearer sk-right":
            return 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}, 0.0
        return judging(number, body, headers)

    server = serve(refuse)
    with pytest.raises(JudgeError, match=r"HTTP 401.*Incorrect API key.*SEAL_TEST_JUDGE_KEY") as raised:
        judge_for(server).grade_batch(["q"], ["Paris"], ["Paris"])
    assert "sk-wrong" not in str(raised.value)
    assert len(server.requests) == 1
    monkeypatch.setenv("SEAL_TEST_JUDGE_KEY", "sk-right")  # read per batch: a fixed key works at once
    assert judge_for(server).grade_batch(["q"], ["Paris"], ["Paris"])[0].correct


def test_judge_wrong_path_is_a_clear_404(serve) -> None:
    server = serve()
    grader = JudgeGrader(base_url=server.base_url.removesuffix("/v1"), model="m", max_retries=2, backoff_s=0.01)
    with pytest.raises(JudgeError, match="HTTP 404.*judge_base_url"):
        grader.grade_batch(["q"], ["Paris"], ["Paris"])
    assert len(server.requests) == 1


def test_judge_rejects_a_reply_that_is_not_a_chat_completion(serve) -> None:
    server = serve(lambda n, b, h: (200, {"object": "list", "data": []}, 0.0))
    with pytest.raises(JudgeError, match="did not return a chat completion"):
        judge_for(server).grade_batch(["q"], ["Paris"], ["Paris"])


def test_judge_retries_connection_errors_then_fails() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    grader = JudgeGrader(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff_s=0.01, timeout_s=2)
    with pytest.raises(JudgeError, match="failed after 2 attempts"):
        grader.grade_batch(["q"], ["Paris"], ["Paris"])
