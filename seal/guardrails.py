"""Checks on a self-edit's text, run before any training.

A self-edit becomes LoRA training data, so whatever it contains can end up in the adapter's
weights and be repeated to every later user. These rules refuse text that would teach the model
secrets, personal data, instructions addressed to itself, links it never saw, or facts about
entities the passage never mentions.

They are deliberately plain-text heuristics: deterministic, fast enough to run on every
candidate, and explainable — each result names what matched and where, so an operator can
either fix the prompt or tune the rule. Every rule is switched and parameterised through
``GuardrailSettings``; nothing here imports torch.
"""

from __future__ import annotations

import bisect
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The order results come back in; callers and dashboards rely on it being stable.
RULES: tuple[str, ...] = (
    "length",
    "secrets",
    "personal_data",
    "prompt_injection",
    "urls",
    "unknown_entities",
)

# Details name at most this many findings; a self-edit full of matches needs fixing at the
# source, not a wall of text in the event stream.
_MAX_LISTED = 5


@dataclass(frozen=True)
class GuardrailResult:
    rule: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --- settings --------------------------------------------------------------------------------


class _Rule(BaseModel):
    # Typos in a governance setting must fail loudly instead of silently leaving a default.
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="run this rule (off: it neither reports nor blocks)")


def _compile_all(patterns: Sequence[str], flags: int) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, flags))
        except re.error as exc:
            raise ValueError(f"pattern {pattern!r} does not compile: {exc}") from exc
    return compiled


class LengthRule(_Rule):
    """Bounds on size, so one degenerate sample cannot dominate (or stall) an update."""

    max_chars: int = Field(8_000, ge=1, description="total characters")
    max_lines: int = Field(200, ge=1, description="lines, empty ones included")
    max_line_chars: int = Field(1_000, ge=1, description="characters in any one line")
    min_usable_lines: int = Field(1, ge=0, description="non-blank lines needed to train on anything")


class SecretsRule(_Rule):
    """Known credential formats, plus long random-looking tokens that match no known format."""

    min_token_length: int = Field(32, ge=16, description="shortest token the entropy check looks at")
    # Uniformly random base64/alphanumeric tokens of 32+ chars score about 4.5-5 bits per char;
    # identifiers and paths built from words stay well below 4.
    min_entropy_bits: float = Field(4.0, gt=0, le=6, description="bits/char for a mixed-case alphanumeric token")
    # Hex has only 16 symbols (max 4 bits/char); random digests score ~3.5-3.9.
    min_hex_entropy_bits: float = Field(3.0, gt=0, le=4, description="bits/char for a hex token")
    # Identifiers glued from words ("getUserAccountSettingsV2") are long and varied too; above
    # this share of characters in word-like segments a token is not treated as random.
    # Uniformly random 32-char keys exceed 0.6 about once in a thousand.
    max_word_share: float = Field(0.6, gt=0, le=1, description="share of word-like characters that marks an identifier")
    # The entropy check cannot tell a key from a content digest or a commit id that the passage
    # itself states; known credential formats are refused wherever they came from.
    allow_high_entropy_from_context: bool = Field(
        True, description="let random-looking tokens through when the context contains them verbatim"
    )
    extra_patterns: list[str] = Field(default_factory=list, description="more regexes that count as secrets")

    @field_validator("extra_patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        _compile_all(value, 0)
        return value


class PersonalDataRule(_Rule):
    emails: bool = Field(True, description="refuse e-mail addresses, even ones the context contains")
    phones: bool = Field(
        True,
        description="refuse phone numbers (international, North American, trunk-prefixed national, or 7-15 "
        "digits after a word like 'phone'), even ones the context contains",
    )
    # Luhn-valid 13-19 digit numbers with a card-network prefix; such numbers are rare in
    # encyclopaedic text, and a leaked card number is costly.
    credit_cards: bool = Field(
        True, description="refuse Luhn-valid 13-19 digit numbers with a card-network prefix"
    )


# Role and chat-template markers are listed separately from phrases only for readability;
# all of them are matched case-insensitively, in multi-line mode.
DEFAULT_INJECTION_PATTERNS: tuple[str, ...] = (
    # "ignore all previous instructions", "forget the prior prompt", ...
    (
        r"\b(?:ignore|disregard|forget|override)\s+(?:(?:all|any|every|the|of|your|my|these|those)\s+){0,3}"
        r"(?:previous|prior|above|earlier|preceding|foregoing|former|original|system)\s+(?:\w+\s+)?"
        r"(?:instructions?|prompts?|directions?|directives?|messages?|commands?)\b"
    ),
    r"\b(?:ignore|disregard|forget)\s+(?:(?:all|everything|anything|the|of)\s+){0,3}(?:above|before\s+this)\b",
    r"\byou\s+are\s+now\b",
    r"\bsystem\s+prompt\b",
    r"\b(?:new|updated|real|actual|hidden)\s+instructions?\s*:",
    r"\bfrom\s+now\s+on,?\s+(?:you|ignore|respond|answer|always|only|never)\b",
    r"\bpretend\s+(?:that\s+)?you\s+are\b",
    r"\b(?:developer|god|jailbreak|dan)\s+mode\b",
    r"\bdo\s+anything\s+now\b",
    # chat-template special tokens: <|im_start|>, <|system|>, <|eot_id|>, <|start_header_id|>, ...
    r"<\|[a-z0-9_]{2,40}\|>",
    r"\[/?inst\]",
    r"<</?sys>>",
    r"</?(?:start|end)_of_turn>",
    r"^[ \t]*#{1,6}[ \t]*(?:system|instructions?|assistant|user|human|response)[ \t]*:",
    r"^[ \t]*(?:system|assistant|user|human)[ \t]*:",
)

# Zero-width and bidirectional-override characters are invisible to a reviewer but not to the
# tokenizer; they are the usual way to smuggle text past both people and keyword lists.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


class PromptInjectionRule(_Rule):
    patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_INJECTION_PATTERNS),
        description="regexes (case-insensitive, ^/$ per line); replacing the list drops the defaults",
    )
    extra_patterns: list[str] = Field(default_factory=list, description="added to `patterns`")
    flag_invisible_characters: bool = Field(
        True, description="refuse zero-width and bidirectional-override characters (invisible to a reviewer)"
    )

    @field_validator("patterns", "extra_patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        _compile_all(value, re.IGNORECASE | re.MULTILINE)
        return value


class UrlRule(_Rule):
    allowed_domains: list[str] = Field(
        default_factory=list, description="hosts (and their subdomains) allowed even when absent from the context"
    )


class UnknownEntitiesRule(_Rule):
    """Names and numbers the self-edit states but the context never mentions.

    A paraphrase or an implication mostly reuses the passage's entities; a self-edit dominated by
    new ones is more likely recalling (or inventing) facts from elsewhere, which is exactly what
    a knowledge update must not teach. Both limits must be exceeded, so one derived number
    ("over 280 years old") or one outside name does not reject an otherwise faithful edit.
    """

    max_unknown_entity_ratio: float = Field(0.5, ge=0, le=1, description="fail above this share of unknown entities")
    min_unknown_entities: int = Field(3, ge=1, description="…and only with at least this many unknown")
    include_numbers: bool = Field(
        True, description="count numbers the context does not state as unknown entities too"
    )
    # Single digits are mostly counts and enumerations ("3 towers", "step 2") rather than facts
    # that identify something.
    min_number_digits: int = Field(2, ge=1, description="numbers with fewer digits are ignored")
    ignore_words: list[str] = Field(default_factory=list, description="words never counted as unknown")


class GuardrailSettings(BaseModel):
    """One section per rule in ``RULES``; each has ``enabled`` and its own parameters."""

    model_config = ConfigDict(extra="forbid")

    length: LengthRule = Field(default_factory=LengthRule, description="bounds on a self-edit's size")
    secrets: SecretsRule = Field(default_factory=SecretsRule, description="credentials and random-looking tokens")
    personal_data: PersonalDataRule = Field(
        default_factory=PersonalDataRule, description="e-mail addresses, phone numbers and card numbers"
    )
    prompt_injection: PromptInjectionRule = Field(
        default_factory=PromptInjectionRule, description="instructions and chat-template markers aimed at the model"
    )
    urls: UrlRule = Field(default_factory=UrlRule, description="links the context does not contain")
    unknown_entities: UnknownEntitiesRule = Field(
        default_factory=UnknownEntitiesRule, description="names and numbers the context never mentions"
    )


# Adding a rule means adding both a section and a RULES entry; fail at import, not in production.
if tuple(GuardrailSettings.model_fields) != RULES:
    raise RuntimeError(f"GuardrailSettings sections {tuple(GuardrailSettings.model_fields)} != RULES {RULES}")


# --- helpers ---------------------------------------------------------------------------------


class _Locator:
    """Turns string offsets into "line L, col C" so a person can find the match."""

    def __init__(self, text: str) -> None:
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def __call__(self, index: int) -> str:
        line = bisect.bisect_right(self._starts, index) - 1
        return f"line {line + 1}, col {index - self._starts[line] + 1}"


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mask(token: str, keep: int = 4) -> str:
    """Enough of a secret to find it in the text, never enough to use it."""
    if len(token) <= keep * 2:
        return "*" * len(token)
    return f"{token[:keep]}…({len(token)} chars)"


def _overlaps(span: tuple[int, int], taken: Iterable[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in taken)


def _entropy(token: str) -> float:
    counts = Counter(token)
    n = len(token)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


# --- length ----------------------------------------------------------------------------------


def _check_length(text: str, rule: LengthRule) -> GuardrailResult:
    lines = text.splitlines()
    usable = sum(1 for line in lines if line.strip())
    problems = []
    if len(text) > rule.max_chars:
        problems.append(f"{len(text)} characters > max {rule.max_chars}")
    if len(lines) > rule.max_lines:
        problems.append(f"{len(lines)} lines > max {rule.max_lines}")
    long_lines = [(i + 1, len(line)) for i, line in enumerate(lines) if len(line) > rule.max_line_chars]
    if long_lines:
        where = _listing([f"line {n} has {length}" for n, length in long_lines])
        problems.append(f"lines longer than {rule.max_line_chars} characters: {where}")
    if usable < rule.min_usable_lines:
        problems.append(f"{usable} non-blank lines < min {rule.min_usable_lines}")
    if problems:
        return GuardrailResult("length", False, "; ".join(problems))
    longest = max((len(line) for line in lines), default=0)
    return GuardrailResult(
        "length", True, f"{len(text)} characters, {len(lines)} lines ({usable} non-blank), longest line {longest}"
    )


# --- secrets ---------------------------------------------------------------------------------

_SECRET_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # The whole block (to its END line, else over the base64 lines that follow the header): the
    # key material is what must never be kept, the header alone is harmless.
    (
        "private key block",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|(?:\s*[A-Za-z0-9+/=]{16,})*)"
        ),
    ),
    ("API key (sk-…)", re.compile(r"(?<![\w-])sk-[A-Za-z0-9_-]{20,}")),
    ("Stripe secret key", re.compile(r"(?<!\w)(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}")),
    ("AWS access key id", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Z])")),
    ("GitHub token", re.compile(r"(?<!\w)(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,})")),
    ("Slack token", re.compile(r"(?<!\w)xox[baprs]-[A-Za-z0-9-]{10,}")),
    ("Google API key", re.compile(r"(?<!\w)AIza[0-9A-Za-z_-]{35}")),
    ("JSON web token", re.compile(r"(?<!\w)eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
)

# key=value / key: value credentials. A value after ":" must contain a non-letter, so prose
# such as "The secret: patience" is not a credential, while "password: hunter2" is.
_CREDENTIAL = re.compile(
    r"(?i)\b(password|passwd|pwd|passphrase|secret|api[_-]?key|access[_-]?key|access[_-]?token|"
    r"auth[_-]?token|client[_-]?secret|private[_-]?key)\s*([=:])\s*[\"']?([^\s\"'<>,;]{4,})"
)
_TOKEN = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{16,}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_WORDLIKE = re.compile(r"[A-Z]?[a-z]{2,}")
_VOWEL = re.compile(r"[aeiouy]")


def _word_share(token: str) -> float:
    covered = sum(len(m) for m in _WORDLIKE.findall(token) if _VOWEL.search(m[1:] if m[0].isupper() else m))
    return covered / len(token)


def _looks_random(token: str, rule: SecretsRule) -> bool:
    if not any(c.isdigit() for c in token):
        return False
    if _HEX.fullmatch(token):
        # Letters too, so long decimal numbers don't count.
        return any(c.isalpha() for c in token) and _entropy(token) >= rule.min_hex_entropy_bits
    return (
        any(c.isupper() for c in token)
        and any(c.islower() for c in token)
        and _entropy(token) >= rule.min_entropy_bits
        and _word_share(token) < rule.max_word_share
    )


@dataclass(frozen=True)
class _Finding:
    """One sensitive match: where it is, what kind, and the masked form shown instead of it."""

    start: int
    end: int
    kind: str
    shown: str


def _secret_findings(
    text: str, context: str, rule: SecretsRule, urls: Sequence[tuple[int, int]]
) -> list[_Finding]:
    found: list[_Finding] = []
    taken: list[tuple[int, int]] = []

    def add(kind: str, start: int, end: int, shown: str) -> None:
        taken.append((start, end))
        found.append(_Finding(start, end, kind, shown))

    patterns = list(_SECRET_PATTERNS) + [
        (f"custom pattern {p.pattern!r}", p) for p in _compile_all(rule.extra_patterns, 0)
    ]
    for kind, pattern in patterns:
        for m in pattern.finditer(text):
            if not _overlaps(m.span(), taken):
                add(kind, *m.span(), _mask(m.group()))
    for m in _CREDENTIAL.finditer(text):
        key, separator, value = m.groups()
        if separator == ":" and value.rstrip(".!?)").isalpha():
            continue
        if not _overlaps(m.span(3), taken):
            add("credential assignment", m.start(), m.end(), f"{key}{separator}***")
    for m in _TOKEN.finditer(text):
        token = m.group()
        if len(token) < rule.min_token_length or _overlaps(m.span(), taken) or _overlaps(m.span(), urls):
            continue
        if rule.allow_high_entropy_from_context and token in context:
            continue
        if _looks_random(token, rule):
            add(f"high-entropy token ({_entropy(token):.1f} bits/char)", *m.span(), _mask(token))
    return found


def _check_secrets(
    text: str, context: str, rule: SecretsRule, urls: Sequence[tuple[int, int]]
) -> GuardrailResult:
    where = _Locator(text)
    findings = [f"{f.kind} '{f.shown}' at {where(f.start)}" for f in _secret_findings(text, context, rule, urls)]
    if findings:
        return GuardrailResult(
            "secrets", False, f"possible secret: {_listing(findings)} — remove credentials before training"
        )
    return GuardrailResult("secrets", True, "no credential-like strings")


# --- personal data ---------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
# International: "+" and a country code; possessive groups keep matching linear on long digit runs.
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d+)++")
# North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1-555-123-4567.
_PHONE_NANP = re.compile(
    r"(?<![\w.+-])(?:1[ .-])?(?:\(\d{3}\)[ ]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-]|[.,]\d)"
)
# Trunk-prefixed national numbers (020 7946 0958, 06 12 34 56 78, (030) 1234567). Dates such as
# 01.02.2003 also start with 0, but have at most 8 digits; these need 9-12.
_PHONE_TRUNK = re.compile(
    r"(?<![\w.+-])(?:\(0\d{1,4}\)[ ]?|0\d{1,4}[ .-])\d{2,8}(?:[ .-]\d{2,8}){0,3}(?![\w-]|[.,]\d)"
)
# Any 7-15 digit number right after a word like "phone" or "call".
_PHONE_KEYWORD = re.compile(
    r"(?i)\b(?:phone|telephone|tel|mobile|cell|fax|call|whatsapp|sms)\b\.?[ \t]*"
    r"(?:(?:number|no\.?|#|us|me|at|on|is)[ \t]*){0,3}[:\-]?[ \t]*(\+?\(?\d[\d ().-]{5,20}\d)"
)
# Card numbers are printed unbroken or in groups of 3+ digits ("4111 1111 1111 1111", Amex
# "3782 822463 10005"); requiring that keeps enumerations like "4 5 6 7 …" out.
_CARD = re.compile(r"(?<![\d-])\d{3,19}(?:[ -]\d{3,19}){0,5}(?!\d|-\d)")
# Visa, Mastercard (51-55, 22-27), Amex/Diners/JCB (3x), Discover/UnionPay/Maestro (6x).
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[0-9]|6[0-9]")


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _mask_digits(text: str, keep: int) -> str:
    remaining = len(_digits(text))
    out = []
    for char in text:
        if char.isdigit():
            out.append(char if remaining <= keep else "*")
            remaining -= 1
        else:
            out.append(char)
    return "".join(out)


def _mask_email(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[0]}***@{domain}"


def _phone_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for m in _PHONE_INTL.finditer(text):
        # A greedy match can swallow a following count ("+44 20 7946 0958 2 times"); drop
        # trailing groups until the number fits E.164's 15 digits.
        raw = m.group()
        while len(_digits(raw)) > 15 and re.search(r"[ .-]\d+$", raw):
            raw = re.sub(r"[ .-]\d+$", "", raw)
        if 8 <= len(_digits(raw)) <= 15:
            spans.append((m.start(), m.start() + len(raw)))
    for m in _PHONE_NANP.finditer(text):
        spans.append(m.span())
    for m in _PHONE_TRUNK.finditer(text):
        if 9 <= len(_digits(m.group())) <= 12:
            spans.append(m.span())
    for m in _PHONE_KEYWORD.finditer(text):
        if 7 <= len(_digits(m.group(1))) <= 15:
            spans.append(m.span(1))
    merged: list[tuple[int, int]] = []
    for span in sorted(spans):
        if merged and span[0] < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], span[1]))
        else:
            merged.append(span)
    return merged


def _personal_data_findings(text: str, rule: PersonalDataRule) -> list[_Finding]:
    found: list[_Finding] = []
    taken: list[tuple[int, int]] = []
    if rule.emails:
        for m in _EMAIL.finditer(text):
            taken.append(m.span())
            found.append(_Finding(*m.span(), "e-mail address", _mask_email(m.group())))
    if rule.credit_cards:
        for m in _CARD.finditer(text):
            digits = _digits(m.group())
            if 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) and _luhn_ok(digits) and not _overlaps(m.span(), taken):
                taken.append(m.span())
                found.append(_Finding(*m.span(), "card-like number", _mask_digits(m.group(), 4)))
    if rule.phones:
        for start, end in _phone_spans(text):
            if not _overlaps((start, end), taken):
                found.append(_Finding(start, end, "phone number", _mask_digits(text[start:end], 2)))
    return sorted(found, key=lambda f: f.start)


def _check_personal_data(text: str, rule: PersonalDataRule) -> GuardrailResult:
    where = _Locator(text)
    findings = _personal_data_findings(text, rule)
    if findings:
        listed = [f"{f.kind} '{f.shown}' at {where(f.start)}" for f in findings]
        return GuardrailResult(
            "personal_data", False, f"personal data: {_listing(listed)} — training would memorise it"
        )
    checked = [name for name, on in (("e-mail", rule.emails), ("phone", rule.phones), ("card", rule.credit_cards)) if on]
    return GuardrailResult("personal_data", True, f"no personal data found (checked: {', '.join(checked) or 'nothing'})")


# --- prompt injection ------------------------------------------------------------------------


def _check_prompt_injection(text: str, rule: PromptInjectionRule) -> GuardrailResult:
    findings: list[str] = []
    if rule.flag_invisible_characters:
        where = _Locator(text)
        for m in _INVISIBLE.finditer(text):
            findings.append(f"invisible character U+{ord(m.group()):04X} at {where(m.start())}")
    # NFKC folds full-width and other look-alike forms ("ｉｇｎｏｒｅ") into ASCII, and the
    # invisible characters are dropped, so neither can split a keyword. Line structure is
    # kept, so reported lines still match the original.
    normalised = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    where = _Locator(normalised)
    patterns = _compile_all([*rule.patterns, *rule.extra_patterns], re.IGNORECASE | re.MULTILINE)
    hits: list[tuple[int, str]] = []
    for pattern in patterns:
        for m in pattern.finditer(normalised):
            hits.append((m.start(), f"'{_clip(m.group())}' at {where(m.start())}"))
    findings.extend(message for _, message in sorted(set(hits)))
    if findings:
        return GuardrailResult(
            "prompt_injection", False, f"instructions aimed at the model: {_listing(findings)}"
        )
    return GuardrailResult("prompt_injection", True, f"none of {len(patterns)} injection patterns matched")


# --- urls ------------------------------------------------------------------------------------

_URL = re.compile(r"(?i)\b(?:https?://|www\.)[^\s<>\"'`]+")
_OPENER = {")": "(", "]": "[", "}": "{"}


def _strip_trailing(url: str) -> str:
    # Sentence punctuation and a bracket closing around the link are not part of it, but a
    # balanced bracket is (https://en.wikipedia.org/wiki/Mercury_(planet)).
    while url:
        last = url[-1]
        if last in ".,;:!?*" or (last in _OPENER and url.count(last) > url.count(_OPENER[last])):
            url = url[:-1]
        else:
            break
    return url


def _find_urls(text: str) -> list[tuple[int, int, str]]:
    found = []
    for m in _URL.finditer(text):
        url = _strip_trailing(m.group())
        if re.fullmatch(r"(?i)(?:https?://|www\.)", url):
            continue
        found.append((m.start(), m.start() + len(url), url))
    return found


def _normalise_url(url: str) -> str:
    url = url.lower()
    url = re.sub(r"^https?://", "", url)
    url = re.sub(r"^www\.", "", url)
    return url.rstrip("/")


def _host(url: str) -> str:
    return re.split(r"[/?#:]", _normalise_url(url), maxsplit=1)[0]


def _check_urls(
    text: str, context: str, rule: UrlRule, urls: Sequence[tuple[int, int, str]]
) -> GuardrailResult:
    known = {_normalise_url(url) for _, _, url in _find_urls(context)}
    allowed = [d.lower().lstrip(".") for d in rule.allowed_domains]
    where = _Locator(text)
    unknown = []
    for start, _, url in urls:
        host = _host(url)
        if _normalise_url(url) in known or url in context:
            continue
        if any(host == d or host.endswith("." + d) for d in allowed):
            continue
        unknown.append(f"'{_clip(url, 80)}' at {where(start)}")
    if unknown:
        return GuardrailResult("urls", False, f"URLs not in the context: {_listing(unknown)}")
    if urls:
        return GuardrailResult("urls", True, f"{len(urls)} URL(s), all present in the context or allowed")
    return GuardrailResult("urls", True, "no URLs")


# --- unknown entities ------------------------------------------------------------------------

_WORD = re.compile(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*")
_NUMBER = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_LIST_NUMBER = re.compile(r"^[ \t]*\(?(\d{1,3})[.)](?=\s)", re.MULTILINE)
# What may sit between a sentence boundary and its first word: spaces, quotes, brackets, bullets.
_LEADING_JUNK = " \t\"'“”‘’«»([{*•·–—-"
_SENTENCE_END = ".!?:\n…"
# Connectors inside multi-word names: "Bank of England", "Isle of the Dead", "Ludwig van Beethoven".
_CONNECTOR_GAP = re.compile(
    r"[ \t]+(?:(?:of|de|da|di|du|del|della|der|den|van|von|la|le|bin|ibn|al|the|y)[ \t]+){0,2}"
)
# Capitalised function words: never names themselves, and stripped from the front of a run
# ("The Grey Lantern" → "Grey Lantern", "In Velmora" → "Velmora").
_STOPWORDS = frozenset(
    """
    a an the this that these those it its it's he she they we you i me my his her their our your
    in on at by for from with without into onto over under about above below after before during
    since until while when where what which who whom whose why how there here then than thus so
    and or but nor yet if as because although though however therefore also moreover furthermore
    besides meanwhile instead both each every either neither many most much more some any all no
    not one none other another such only just even yes according among between through throughout
    upon within against toward towards around near beyond despite unlike like is are was were be
    been being has have had do does did can could will would shall should may might must let
    today yesterday tomorrow overall finally first second third next last initially eventually
    additionally notably similarly consequently hence indeed perhaps
    """.split()  # noqa: SIM905 — a word list reads better as text
)


@dataclass(frozen=True)
class _Entity:
    text: str
    words: tuple[str, ...]  # folded, for matching the whole name against the context
    judged: tuple[str, ...]  # the words that must occur in the context for it to count as known


def _fold(word: str) -> str:
    word = word.casefold().replace("’", "'")
    return word.removesuffix("'s")


def _is_sentence_initial(text: str, start: int) -> bool:
    i = start - 1
    while i >= 0 and text[i] in _LEADING_JUNK:
        i -= 1
    return i < 0 or text[i] in _SENTENCE_END


def _name_entities(text: str) -> list[_Entity]:
    words = [m for m in _WORD.finditer(text)]
    runs: list[list[re.Match[str]]] = []
    current: list[re.Match[str]] = []
    for m in words:
        word = m.group()
        capitalised = word[0].isupper() and len(word) > 1 and _fold(word) not in _STOPWORDS
        if capitalised:
            joined = bool(current) and _CONNECTOR_GAP.fullmatch(text, current[-1].end(), m.start()) is not None
            if not joined and current:
                runs.append(current)
                current = []
            current.append(m)
        elif current and not (word.islower() and _CONNECTOR_GAP.fullmatch(f" {word} ")):
            runs.append(current)
            current = []
    if current:
        runs.append(current)

    entities = []
    for run in runs:
        initial = _is_sentence_initial(text, run[0].start())
        if len(run) == 1 and initial:
            # A capitalised first word is usually just a capitalised first word.
            continue
        judged = run[1:] if initial else run
        entities.append(
            _Entity(
                text=" ".join(text[run[0].start() : run[-1].end()].split()),
                words=tuple(_fold(m.group()) for m in _WORD.finditer(text, run[0].start(), run[-1].end())),
                judged=tuple(_fold(m.group()) for m in judged),
            )
        )
    return entities


def _normalise_number(raw: str) -> str:
    value = raw.replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value.lstrip("0") or "0"


def _numbers(text: str) -> list[tuple[str, str]]:
    # list enumerators ("1. …", "2) …") carry no facts
    markers = {m.start(1) for m in _LIST_NUMBER.finditer(text)}
    found = []
    for m in _NUMBER.finditer(text):
        if m.start() in markers:
            continue
        found.append((m.group(), _normalise_number(m.group())))
    return found


def _blank_urls(text: str) -> str:
    # Path segments and numbers inside links are the `urls` rule's business, not entities.
    for start, end, _ in reversed(_find_urls(text)):
        text = text[:start] + " " * (end - start) + text[end:]
    return text


def _check_unknown_entities(text: str, context: str, rule: UnknownEntitiesRule) -> GuardrailResult:
    text, context = _blank_urls(text), _blank_urls(context)
    context_sequence = [_fold(m.group()) for m in _WORD.finditer(context)]
    context_words = set(context_sequence)
    # Word-delimited, so a name is found as a whole ("Ann" is not in "announced").
    context_phrase = f" {' '.join(context_sequence)} "
    context_numbers = {normalised for _, normalised in _numbers(context)}
    ignored = {_fold(w) for w in rule.ignore_words}

    entities: dict[str, bool] = {}  # display text → known, first occurrence wins the spelling
    seen: set[str] = set()
    for entity in _name_entities(text):
        key = entity.text.casefold()
        if key in seen:
            continue
        seen.add(key)
        known = f" {' '.join(entity.words)} " in context_phrase or all(
            w in context_words or w in ignored for w in entity.judged
        )
        entities[entity.text] = known
    if rule.include_numbers:
        for raw, normalised in _numbers(text):
            if len(normalised.replace(".", "")) < rule.min_number_digits or normalised in seen:
                continue
            seen.add(normalised)
            entities[raw] = normalised in context_numbers

    unknown = [name for name, known in entities.items() if not known]
    total = len(entities)
    if not total:
        return GuardrailResult("unknown_entities", True, "no names or numbers to check")
    ratio = len(unknown) / total
    listed = _listing([f"'{_clip(name, 40)}'" for name in unknown])
    limits = f"fails above {rule.max_unknown_entity_ratio:.0%} and at least {rule.min_unknown_entities}"
    if ratio > rule.max_unknown_entity_ratio and len(unknown) >= rule.min_unknown_entities:
        return GuardrailResult(
            "unknown_entities",
            False,
            f"{len(unknown)} of {total} names/numbers are not in the context ({ratio:.0%}; {limits}): {listed}"
            " — the self-edit may state facts the passage does not support",
        )
    if unknown:
        return GuardrailResult(
            "unknown_entities", True, f"{len(unknown)} of {total} names/numbers not in the context ({limits}): {listed}"
        )
    return GuardrailResult("unknown_entities", True, f"all {total} names/numbers occur in the context")


# --- entry points ----------------------------------------------------------------------------


def check_self_edit(
    self_edit: str, context: str, settings: GuardrailSettings | None = None
) -> list[GuardrailResult]:
    """One result per enabled rule, in ``RULES`` order. Never short-circuits: a rejected
    self-edit reports every rule it broke, so whoever tunes the prompt sees all of them."""
    settings = settings or GuardrailSettings()
    url_matches = _find_urls(self_edit)
    url_spans = [(start, end) for start, end, _ in url_matches]
    results = []
    for name in RULES:
        rule = getattr(settings, name)
        if not rule.enabled:
            continue
        if name == "length":
            results.append(_check_length(self_edit, rule))
        elif name == "secrets":
            results.append(_check_secrets(self_edit, context, rule, url_spans))
        elif name == "personal_data":
            results.append(_check_personal_data(self_edit, rule))
        elif name == "prompt_injection":
            results.append(_check_prompt_injection(self_edit, rule))
        elif name == "urls":
            results.append(_check_urls(self_edit, context, rule, url_matches))
        else:
            results.append(_check_unknown_entities(self_edit, context, rule))
    return results


def failed(results: Iterable[GuardrailResult]) -> list[GuardrailResult]:
    return [result for result in results if not result.passed]


# --- redaction -------------------------------------------------------------------------------

# The rules whose findings must never be written anywhere: a refused self-edit's record keeps
# the masked text and a hash instead (an append-only audit log can never be purged).
SENSITIVE_RULES: tuple[str, ...] = ("secrets", "personal_data")


@dataclass(frozen=True)
class Redaction:
    text: str  # the text with every sensitive finding replaced by its masked form
    rules: tuple[str, ...]  # the SENSITIVE_RULES that found something; () = the text is unchanged

    @property
    def redacted(self) -> bool:
        return bool(self.rules)


def redact_sensitive(text: str, context: str, settings: GuardrailSettings | None = None) -> Redaction:
    """``text`` fit to be stored: what the enabled secrets and personal-data rules find (the same
    matches their results report) replaced by the masked form the results show, e.g.
    ``AKIA…(20 chars)`` or ``i***@velmora.example``. Everything else is kept as written."""
    settings = settings or GuardrailSettings()
    spans: list[_Finding] = []
    rules: list[str] = []
    if settings.secrets.enabled:
        urls = [(start, end) for start, end, _ in _find_urls(text)]
        found = _secret_findings(text, context, settings.secrets, urls)
        spans.extend(found)
        rules.extend(["secrets"] if found else [])
    if settings.personal_data.enabled:
        found = [f for f in _personal_data_findings(text, settings.personal_data) if not _overlaps(
            (f.start, f.end), [(s.start, s.end) for s in spans])]
        spans.extend(found)
        rules.extend(["personal_data"] if found else [])
    if not spans:
        return Redaction(text, ())
    pieces, cursor = [], 0
    for finding in sorted(spans, key=lambda f: f.start):
        pieces.append(text[cursor:finding.start])
        pieces.append(f"[{finding.kind}: {finding.shown}]")
        cursor = finding.end
    pieces.append(text[cursor:])
    return Redaction("".join(pieces), tuple(rules))
