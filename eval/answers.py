"""Answer scoring: exact match, token F1, closed-set labels, citations, refusals, judge output.

Plain functions over strings and id sets, so each is testable on its own and
the answer runner (:mod:`eval.answer_runner`) only has to collect inputs.

* ``exact_match`` / ``token_f1`` use SQuAD's normalisation (lower case, no
  punctuation, no articles ``a an the``, single spaces), max over references.
* ``extract_label`` reads a closed-set label (``yes``/``no``/``maybe``) from
  free text: the first word, an ``answer: X`` / ``answer is X`` phrase, or the
  only label word present; otherwise None (counted as unparsed, never guessed).
* ``citation_scores`` gives precision and recall of cited documents against gold ones.
* ``is_refusal`` spots "I don't know"-style answers.
* ``parse_judge_score`` reads a faithfulness score out of an LLM judge's text;
  unparseable output gives ``score=None`` and the raw text is kept.

Example:
    >>> token_f1("The cat sat.", ["a cat sat down"])
    0.8
    >>> extract_label("No. The trial found no benefit.")
    'no'
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

DEFAULT_LABELS: tuple[str, ...] = ("yes", "no", "maybe")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WORD = re.compile(r"[a-z]+")

_REFUSAL_PATTERNS = [
    r"\bi (?:do not|don't|dont) know\b",
    r"\bi(?: am|'m) not (?:sure|able|certain)\b",
    r"\b(?:cannot|can't|can not|unable to) (?:answer|find|determine|tell|say|help)\b",
    r"\b(?:not|no) enough (?:information|context|evidence)\b",
    r"\binsufficient (?:information|context|evidence)\b",
    r"\bno (?:relevant )?(?:information|sources?|documents?) (?:was |were |is )?"
    r"(?:found|available|provided)\b",
    r"\b(?:couldn't|could not|did not|didn't) find\b",
    r"\bthe (?:provided |given )?(?:context|sources?|documents?|passages?) "
    r"(?:do|does) not (?:contain|mention|provide|say|include|address)\b",
    r"\bnot (?:mentioned|covered|addressed) in the (?:provided |given )?"
    r"(?:context|sources?|documents?)\b",
]
_REFUSAL = re.compile("|".join(_REFUSAL_PATTERNS))


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, strip punctuation and articles, squeeze spaces."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    return [r for r in refs if r is not None]


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(r) for r in _references(references)))


def _f1(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
    if not prediction_tokens or not reference_tokens:
        # both empty counts as a match, one empty as a miss (SQuAD v2 convention)
        return float(prediction_tokens == reference_tokens)
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token F1 between prediction and the best-matching reference."""
    refs = _references(references)
    if not refs:
        return 0.0
    tokens = normalize_answer(prediction).split()
    return max(_f1(tokens, normalize_answer(r).split()) for r in refs)


def extract_label(text: str, labels: Sequence[str] = DEFAULT_LABELS) -> str | None:
    """The closed-set label an answer gives, or None when it cannot be told.

    Tried in order: the first word (``"Yes, ..."``), an explicit phrase
    (``"answer: maybe"``, ``"the answer is no"``), then the only label word
    present anywhere. Labels are matched as whole words, case-insensitively.
    """
    wanted = {label.lower(): label for label in labels}
    words = _WORD.findall(text.lower())
    if not words:
        return None
    if words[0] in wanted:
        return wanted[words[0]]
    pattern = "|".join(re.escape(w) for w in sorted(wanted, key=len, reverse=True))
    explicit = re.search(
        rf"\b(?:answer|verdict|label|decision|conclusion)\s*(?:is|:|=|-)?\s*\**\s*({pattern})\b",
        text.lower(),
    )
    if explicit:
        return wanted[explicit.group(1)]
    present = {w for w in words if w in wanted}
    if len(present) == 1:
        return wanted[present.pop()]
    return None


@dataclass(frozen=True, slots=True)
class CitationScores:
    """Precision and recall of cited documents against gold documents.

    Attributes:
        precision: Cited-and-gold / cited; None when nothing was cited.
        recall: Cited-and-gold / gold; None when there are no gold documents.
        cited: Number of distinct documents cited.
        correct: Number of cited documents that are gold.
    """

    precision: float | None
    recall: float | None
    cited: int
    correct: int


def citation_scores(cited: Iterable[Collection[str]], gold: Collection[str]) -> CitationScores:
    """Score citations: each cited document is given as the set of ids it is known by.

    A document may be known by several ids (its BEIR ``_id``, a row id, its
    source path...); it counts as correct when any of them is a gold id. Gold
    documents found by more than one citation count once for recall.

    Args:
        cited: One id set per distinct cited document.
        gold: The gold document ids.
    """
    gold_set = {g for g in gold if g}
    documents = [set(ids) for ids in cited if ids]
    correct = [ids & gold_set for ids in documents]
    hits = sum(1 for found in correct if found)
    found_gold = set().union(*correct) if correct else set()
    precision = hits / len(documents) if documents else None
    recall = len(found_gold) / len(gold_set) if gold_set else None
    return CitationScores(precision=precision, recall=recall, cited=len(documents), correct=hits)


def is_refusal(text: str) -> bool:
    """Whether an answer declines to answer (empty, "I don't know", "not in the sources"...)."""
    normalized = " ".join(text.lower().replace("’", "'").split())
    if not normalized:
        return True
    return _REFUSAL.search(normalized) is not None


# -- the LLM judge --------------------------------------------------------------------

JUDGE_SYSTEM_PROMPT = (
    "You grade whether an answer is supported by the given context. Reply with a JSON "
    'object only: {"score": N, "reason": "..."} where N is 1 (not supported at all) '
    "to 5 (every claim supported by the context)."
)


def judge_prompt(question: str, answer: str, contexts: Sequence[str]) -> str:
    """The user message asking the judge to grade ``answer`` against ``contexts``."""
    numbered = "\n\n".join(f"[{i}] {c.strip()}" for i, c in enumerate(contexts, start=1))
    return (
        f"QUESTION: {question.strip()}\n\nCONTEXT:\n{numbered or '(none)'}\n\n"
        f"ANSWER: {answer.strip()}\n\nGrade the answer's faithfulness to the context "
        "from 1 to 5 as JSON."
    )


@dataclass(frozen=True, slots=True)
class JudgeVerdict:
    """What a judge said about one answer.

    Attributes:
        score: Faithfulness in [0, 1] (a 1-5 grade mapped linearly), None if unparseable.
        raw: The judge's text, always kept.
        error: Why the text could not be parsed, or why the judge call failed.
    """

    score: float | None
    raw: str
    error: str | None = None


_KEYED_NUMBER = re.compile(
    r"\b(?:score|rating|grade|faithfulness)\b\W{0,3}\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?",
    re.IGNORECASE,
)
_LONE_NUMBER = re.compile(r"^\W*(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+))?\W*$")
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)


def _scale(value: float, out_of: float | None, raw: str) -> JudgeVerdict:
    if out_of is not None and out_of not in (5.0, 1.0):
        if out_of <= 0 or not 0 <= value <= out_of:
            return JudgeVerdict(None, raw, f"score {value:g}/{out_of:g} is out of range")
        return JudgeVerdict(value / out_of, raw)
    if out_of == 1.0 or (out_of is None and 0.0 <= value <= 1.0 and value != int(value)):
        if not 0.0 <= value <= 1.0:
            return JudgeVerdict(None, raw, f"score {value:g} is out of range 0-1")
        return JudgeVerdict(value, raw)
    if not 1.0 <= value <= 5.0:
        return JudgeVerdict(None, raw, f"score {value:g} is outside 1-5")
    return JudgeVerdict((value - 1.0) / 4.0, raw)


def parse_judge_score(raw: str) -> JudgeVerdict:
    """Read a 1-5 (or 0-1 fractional, or N/M) faithfulness grade from a judge's reply.

    Accepts a JSON object with ``score``/``rating``/``faithfulness``, a phrase like
    ``Score: 4/5``, or a reply that is only a number. Anything else is unparseable:
    ``score`` is None and ``error`` says why.
    """
    text = raw.strip()
    if not text:
        return JudgeVerdict(None, raw, "empty reply")
    for match in _JSON_OBJECT.finditer(text):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            for key in ("score", "rating", "faithfulness", "grade"):
                value = obj.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return _scale(float(value), None, raw)
                if isinstance(value, str):
                    try:
                        return _scale(float(value), None, raw)
                    except ValueError:
                        break
    keyed = _KEYED_NUMBER.search(text)
    lone = keyed or _LONE_NUMBER.match(text)
    if lone:
        out_of = float(lone.group(2)) if lone.group(2) else None
        return _scale(float(lone.group(1)), out_of, raw)
    return JudgeVerdict(None, raw, "no score found in the reply")
