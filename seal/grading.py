"""Graders: is a closed-book answer the gold answer?

Three rules, chosen by ``auditor.grader`` through :func:`build_grader`:

``committed`` (default)
    Grades only the answer the model commits to: the first sentence, boilerplate ("The answer
    is", "Answer:", "I think") stripped, cut at its first list separator (a comma, "or", "and",
    "also", "/", …). The gold answer is credited when it is that span, lies inside it, or the
    span is a part of the gold answer covering at least ``f1_threshold`` token-F1 ("San Diego" for
    "Port of San Diego"). Why: the lenient rule below credited "the Port of Los Angeles, also the
    Port of Long Beach, the Port of San Diego, and the…" for "Port of San Diego" — a model that
    lists every candidate it knows must not be rewarded for the one it did not pick. The price is
    that an appositive ("Oskarvik, Norway" for "Norway") is not credited either; the judge below
    is the remedy when that matters.
``judge``
    An LLM judge behind any OpenAI-compatible chat endpoint (a vLLM server in production), asked
    the SEAL paper's yes/no question: given the question, does the answer state the gold answer?
``any`` / ``exact_match`` / ``f1`` / ``containment``
    The older whole-reply rules of :class:`seal.domains.knowledge.LexicalGrader`; ``any`` is the
    lenient rule that credits lists, kept by name so earlier benchmark numbers can be reproduced.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from seal.domains.knowledge import (
    Grade,
    Grader,
    LexicalGrader,
    normalize_answer,
    token_f1,
)

if TYPE_CHECKING:
    from seal.config import AuditorSettings

log = logging.getLogger(__name__)

# --- the committed answer -------------------------------------------------------------------

# Phrases that introduce an answer without being part of it. Applied repeatedly at the start
# only, so "Answer: The answer is Paris" loses both and "Paris is the answer" keeps everything.
_BOILERPLATE = re.compile(
    r"^(?:"
    r"(?:sure|certainly|okay|ok|well|yes)\s*[,!.:]\s*"
    r"|(?:the\s+)?(?:final\s+|short\s+|correct\s+|right\s+)?answer"
    r"(?:\s+to\s+(?:the|this|your)\s+question)?\s*(?:is|would\s+be|:|-)\s*:?\s*"
    r"|a\s*:\s*"
    r"|i\s+(?:think|believe|guess)(?:\s+(?:that|it\s+is|it's|it\s+was))?\s*,?\s*"
    r"|(?:it|that)\s+(?:is|was|would\s+be)\s+"
    r"|(?:it|that)'s\s+"
    r")",
    re.IGNORECASE,
)
_LEADING_MARKUP = re.compile(r"^[\s*_\"'`“‘>#-]+")

# A period ends the sentence unless it closes an initial ("D.C.", "J. Smith") or one of these
# abbreviations; decimals ("3.5") never match because a sentence end needs whitespace after it.
_ABBREVIATIONS = frozenset(
    [
        "mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "prof", "gen", "col", "lt", "sgt", "capt",
        "rev", "vs", "etc", "inc", "ltd", "co", "corp", "approx", "ca", "est", "fig",
    ]
)
_SENTENCE_END = re.compile(r"[.!?;…]+(?=\s|$)|…")
# Where a list or a hedge continues: ", " (not the digit-grouping comma of "1,000"), "/",
# and the joining words. Whatever follows the first of these is not what the model committed to.
_CLAUSE_BREAK = re.compile(
    r",(?=\s|$)|/|\s(?:and|or|nor|also|plus|as\s+well\s+as|along\s+with|versus|vs\.?)(?=\s|$)",
    re.IGNORECASE,
)


def strip_boilerplate(text: str) -> str:
    text = _LEADING_MARKUP.sub("", text.strip())
    while True:
        stripped = _LEADING_MARKUP.sub("", _BOILERPLATE.sub("", text, count=1))
        if stripped == text:
            return text
        text = stripped


def _first_sentence_end(text: str) -> re.Match[str] | None:
    """The first sentence end of ``text`` that is not an initial's or an abbreviation's period."""
    for match in _SENTENCE_END.finditer(text):
        if match.group().startswith(".") and len(match.group()) == 1:
            word = text[: match.start()].rsplit(maxsplit=1)[-1] if text[: match.start()].strip() else ""
            bare = word.rstrip(".").lstrip("(\"'“‘")
            if re.fullmatch(r"(?:[A-Za-z]\.)*[A-Za-z]", bare) or bare.casefold() in _ABBREVIATIONS:
                continue
        return match
    return None


def first_sentence(text: str) -> str:
    """The first line, boilerplate stripped, up to the first sentence end."""
    lines = text.strip().splitlines()
    text = strip_boilerplate(lines[0] if lines else "")
    end = _first_sentence_end(text)
    return (text[: end.start()] if end is not None else text).strip()


def first_sentence_complete(text: str) -> bool:
    """Whether no continuation of ``text`` can change :func:`first_sentence`: its first line has
    ended, or a sentence end in it is followed by more text. Every grader reads only the first
    line of an answer (``extract_answer``) and the committed grader only its first sentence, so a
    generation graded by it may stop here (``SamplingParams.stop_after_first_sentence``).

    >>> first_sentence_complete("Paris."), first_sentence_complete("Paris. It is"), first_sentence_complete("Dr. ")
    (False, True, False)
    """
    stripped = text.lstrip()
    if not stripped:
        return False
    line = stripped.splitlines()[0]
    if len(line) < len(stripped):
        return True  # a line break after the first line's text
    body = strip_boilerplate(line)
    end = _first_sentence_end(body)
    if end is None:
        return False
    # A sentence end at the very end of the text may still grow ("3." + "5", "Dr" + "."): only
    # whitespace after it, already generated, settles it.
    return end.end() < len(body) or line != line.rstrip()


def _tokens_with_clauses(sentence: str) -> list[tuple[str, int]]:
    """Normalised tokens of ``sentence``, each with the index of the clause it starts in."""
    breaks = [m.start() for m in _CLAUSE_BREAK.finditer(sentence)]
    tokens: list[tuple[str, int]] = []
    for chunk in re.finditer(r"\S+", sentence):
        clause = sum(1 for position in breaks if position < chunk.start())
        # Normalising chunk by chunk equals normalising the whole string: punctuation removal
        # never creates or merges whitespace, so token boundaries are the same.
        tokens.extend((token, clause) for token in normalize_answer(chunk.group()).split())
    return tokens


def committed_span(prediction: str, gold: str = "") -> tuple[str, bool]:
    """The normalised span the model committed to, and whether the gold answer starts in it.

    The span is the first clause of the first sentence; when the gold answer starts inside that
    clause it is extended to the gold's end, so a gold answer that itself contains a separator
    ("Lewis and Clark", "Washington, D.C.") still matches exactly.
    """
    tokens = _tokens_with_clauses(first_sentence(prediction))
    span = [token for token, clause in tokens if clause == 0]
    gold_tokens = normalize_answer(gold).split()
    words = [token for token, _ in tokens]
    width = len(gold_tokens)
    if width:
        for start in range(len(words) - width + 1):
            if words[start : start + width] == gold_tokens:
                # Only the first occurrence counts: an earlier one is always the committed one.
                if tokens[start][1] == 0:
                    span = words[: max(len(span), start + width)]
                    return " ".join(span), True
                break
    return " ".join(span), False


@dataclass(frozen=True)
class CommittedGrader:
    """Grades the committed span only (see the module docstring)."""

    # It reads nothing past an answer's first sentence, so answers may stop there
    # (seal.auditor.Auditor.stops_after_first_sentence).
    reads_first_sentence_only: ClassVar[bool] = True

    f1_threshold: float = 0.5

    def grade(self, gold: str, prediction: str) -> Grade:
        span, contains = committed_span(prediction, gold)
        gold_normalized = normalize_answer(gold)
        em = bool(gold_normalized) and span == gold_normalized
        f1 = token_f1(span, gold)
        # Partial credit only for a *part* of the gold answer: every committed word must be a
        # gold word, or "Port of Los Angeles" would score F1 0.5 against "Port of San Diego".
        span_counts = Counter(span.split())
        is_part = bool(span_counts) and not (span_counts - Counter(gold_normalized.split()))
        correct = em or contains or (is_part and f1 >= self.f1_threshold)
        return Grade(correct=bool(gold_normalized) and correct, exact_match=em, f1=f1, contains=contains)

    def grade_batch(
        self, questions: Sequence[str], golds: Sequence[str], predictions: Sequence[str]
    ) -> list[Grade]:
        return [self.grade(gold, prediction) for gold, prediction in zip(golds, predictions, strict=True)]


# --- the LLM judge --------------------------------------------------------------------------

# The paper's judge (GPT-4.1) was asked, per question, whether the model's answer matches the
# gold answer and replied yes or no. This wording is ours; it tells the judge to rely on the gold
# answer rather than its own knowledge, and not to accept hedges, for the same reason as above.
JUDGE_SYSTEM_PROMPT = (
    "You grade short answers to quiz questions. You are shown a question, the gold answer and "
    "a model's answer. Decide only by comparing the model's answer with the gold answer, not by "
    "your own knowledge of the topic. The model's answer is correct if it states the same answer "
    "as the gold answer; extra detail that does not contradict it is fine. An answer that lists "
    "or hedges between several candidates is not correct unless it clearly commits to the gold "
    "answer. Reply with exactly one word: yes or no."
)


def build_judge_messages(question: str, gold: str, prediction: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
        {
            "role": "user",
            "content": (
                f"Question: {question}\nGold answer: {gold}\nModel's answer: {prediction}\n"
                "Is the model's answer correct? Reply yes or no."
            ),
        },
    ]


_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)


def parse_judge_verdict(text: str | None) -> bool | None:
    """True for yes, False for no, None for anything else (counted as not correct, logged).

    A reasoning model served by vLLM may put its thoughts in a leading <think> block; only the
    reply after it is read."""
    words = re.findall(r"[a-z]+", _THINK_BLOCK.sub(" ", text or "").casefold())
    if words and words[0] in {"yes", "no"}:
        return words[0] == "yes"
    return None


class JudgeError(RuntimeError):
    """The judge endpoint could not give a verdict: refused (4xx), unreachable or malformed."""


# Rate limiting and request timeouts are transient like a 5xx; every other 4xx is a mistake in
# the request (key, model name, URL) that a retry cannot fix.
_RETRYABLE_STATUS = frozenset({408, 429})
_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class JudgeGrader:
    """Asks an OpenAI-compatible ``POST {base_url}/chat/completions`` for a yes/no verdict per
    answer. Lexical scores of the committed span are reported beside the verdict."""

    base_url: str
    model: str
    api_key_env: str = "SEAL_JUDGE_API_KEY"
    timeout_s: float = 30.0
    max_retries: int = 3
    max_concurrency: int = 8
    max_tokens: int = 8
    backoff_s: float = 0.5
    lexical: CommittedGrader = field(default_factory=CommittedGrader)

    def __post_init__(self) -> None:
        if not self.base_url or not self.model:
            raise ValueError(
                "the judge grader needs auditor.judge_base_url (e.g. http://vllm:8000/v1) and "
                "auditor.judge_model"
            )

    @property
    def endpoint(self) -> str:
        return f"{self.base_url.rstrip('/')}/chat/completions"

    def grade_batch(
        self, questions: Sequence[str], golds: Sequence[str], predictions: Sequence[str]
    ) -> list[Grade]:
        lexical = self.lexical.grade_batch(questions, golds, predictions)
        items = list(zip(questions, golds, predictions, strict=True))
        # Read per batch, not at construction, so a rotated key is picked up without a restart.
        api_key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        asked = [i for i, (_, _, prediction) in enumerate(items) if normalize_answer(prediction)]
        replies: dict[int, str | None] = {}
        if asked:
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(asked))) as pool:
                for index, reply in zip(asked, pool.map(lambda i: self.ask(*items[i], api_key=api_key), asked)):
                    replies[index] = reply
        grades = []
        for index, ((question, _, _), grade) in enumerate(zip(items, lexical, strict=True)):
            # An empty answer is wrong without asking anyone.
            verdict = parse_judge_verdict(replies[index]) if index in replies else False
            if verdict is None:
                log.warning(
                    "judge %s gave no yes/no verdict for %r (counted as not correct): %r",
                    self.model, question[:200], (replies[index] or "")[:200],
                )
            grades.append(Grade(verdict is True, grade.exact_match, grade.f1, grade.contains))
        return grades

    def ask(self, question: str, gold: str, prediction: str, *, api_key: str = "") -> str | None:
        """The judge's reply text (None when the endpoint returns no content)."""
        body = {
            "model": self.model,
            "messages": build_judge_messages(question, gold, prediction),
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        data = self._post(body, api_key)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise JudgeError(f"{self.endpoint} did not return a chat completion: {str(data)[:300]}") from exc
        if content is not None and not isinstance(content, str):
            raise JudgeError(f"{self.endpoint} returned non-text content: {str(content)[:300]}")
        return content

    def _post(self, body: dict, api_key: str) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        payload = json.dumps(body).encode()
        last_error, delay = "", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(delay)  # set by the failed attempt before
            request = urllib.request.Request(self.endpoint, data=payload, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode(errors="replace")
                if exc.code < 500 and exc.code not in _RETRYABLE_STATUS:
                    raise JudgeError(self._refusal(exc.code, detail)) from None
                last_error = f"HTTP {exc.code}: {detail}"
                delay = self._delay(attempt, exc.headers.get("Retry-After"))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                # Connection refused or reset, DNS failure, read timeout: the server may be
                # restarting or overloaded, so wait and try again.
                last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
                delay = self._delay(attempt, None)
            else:
                try:
                    data = json.loads(raw)
                except ValueError as exc:
                    raise JudgeError(f"{self.endpoint} returned invalid JSON: {raw[:300]!r}") from exc
                if not isinstance(data, dict):
                    raise JudgeError(f"{self.endpoint} returned {type(data).__name__}, not a JSON object")
                return data
            log.warning("judge request to %s failed (attempt %d/%d): %s",
                        self.endpoint, attempt + 1, self.max_retries + 1, last_error)
        raise JudgeError(f"{self.endpoint} failed after {self.max_retries + 1} attempts: {last_error}")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff_s * 2**attempt
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass  # an HTTP date: the exponential delay is a fine stand-in
        return min(delay, _MAX_BACKOFF_S)

    def _refusal(self, status: int, detail: str) -> str:
        hint = {
            401: f"check the API key in the environment variable {self.api_key_env or '(none configured)'}",
            403: f"the key in {self.api_key_env or '(none configured)'} may not use model {self.model!r}",
            404: "check auditor.judge_base_url (usually ends in /v1) and auditor.judge_model",
        }.get(status, "the request was rejected; retrying will not help")
        return f"judge endpoint {self.endpoint} refused the request: HTTP {status}: {detail.strip()} ({hint})"


# --- selection ------------------------------------------------------------------------------


def build_grader(settings: AuditorSettings) -> Grader:
    """The one place a grader is made from settings: the auditor service, `seal eval`, continual
    runs and the benches all call this, so ``auditor.grader`` means the same everywhere."""
    if settings.grader == "committed":
        return CommittedGrader(f1_threshold=settings.f1_threshold)
    if settings.grader == "judge":
        return JudgeGrader(
            base_url=settings.judge_base_url,
            model=settings.judge_model,
            api_key_env=settings.judge_api_key_env,
            timeout_s=settings.judge_timeout_s,
            max_retries=settings.judge_max_retries,
            max_concurrency=settings.judge_max_concurrency,
            max_tokens=settings.judge_max_tokens,
            lexical=CommittedGrader(f1_threshold=settings.f1_threshold),
        )
    return LexicalGrader(mode=settings.grader, f1_threshold=settings.f1_threshold)
