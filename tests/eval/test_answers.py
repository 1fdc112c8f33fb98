"""Answer scoring functions, checked against values worked out by hand."""

from __future__ import annotations

import pytest

from eval.answers import (
    citation_scores,
    exact_match,
    extract_label,
    is_refusal,
    normalize_answer,
    parse_judge_score,
    token_f1,
)


def test_squad_normalisation_and_exact_match() -> None:
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the eiffel tower.", "Eiffel Tower") == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower", "tower"]) == 0.0
    assert exact_match("Tower", ["Eiffel Tower", "tower"]) == 1.0


def test_token_f1_by_hand() -> None:
    # prediction "cat sat" (after dropping "the"), reference "cat sat down" (after "a")
    # overlap 2, precision 2/2, recall 2/3 -> F1 = 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: "a a b" vs "a b b": overlap 2 of 3 each
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("nothing shared", "entirely different") == 0.0
    assert token_f1("cat", ["dog", "cat"]) == 1.0  # best reference wins
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes, tailored telephone counselling increased mammography use.", "yes"),
        ("No. The trial found no benefit.", "no"),
        ("MAYBE - results were mixed", "maybe"),
        ("Based on the context, the answer is no [1].", "no"),
        ("Final answer: **Yes**", "yes"),
        ("The study suggests maybe a modest effect.", "maybe"),
        ("The context does not say.", None),
        ("It could be yes or no depending on dose.", None),
        ("Nothing here mentions it; not clear.", None),
        ("", None),
    ],
)
def test_extract_label(text: str, label: str | None) -> None:
    assert extract_label(text) == label


def test_extract_label_custom_set() -> None:
    assert extract_label("Verdict: SUPPORTED", ("supported", "refuted")) == "supported"
    assert extract_label("yes", ("supported", "refuted")) is None


def test_citation_precision_and_recall() -> None:
    # three cited documents, each known by its id sets; gold = {g1, g2, g3}
    scores = citation_scores([{"g1", "row-7"}, {"x"}, {"g2"}], {"g1", "g2", "g3"})
    assert scores.precision == pytest.approx(2 / 3)
    assert scores.recall == pytest.approx(2 / 3)
    assert (scores.cited, scores.correct) == (3, 2)
    nothing = citation_scores([], {"g1"})
    assert nothing.precision is None and nothing.recall == 0.0
    no_gold = citation_scores([{"a"}], [])
    assert no_gold.precision == 0.0 and no_gold.recall is None
    # two citations of the same gold document count once for recall
    twice = citation_scores([{"g1"}, {"g1", "alias"}], {"g1", "g2"})
    assert twice.recall == 0.5 and twice.precision == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "I don't know.",
        "I do not know based on the sources.",
        "The provided context does not contain this information.",
        "I cannot answer that from the documents.",
        "There is not enough information to say.",
        "No relevant information was found.",
        "",
        "   ",
    ],
)
def test_refusals(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Yes, the drug lowered blood pressure [1].",
        "No. The knowledge of the disease is limited, but the trial shows no effect.",
        "The answer is maybe.",
    ],
)
def test_not_refusals(text: str) -> None:
    assert not is_refusal(text)


@pytest.mark.parametrize(
    ("raw", "score"),
    [
        ('{"score": 5, "reason": "all supported"}', 1.0),
        ('Sure! ```json\n{"score": 3, "reason": "partly"}\n```', 0.5),
        ("Score: 2", 0.25),
        ("Faithfulness rating: 4/5", 0.75),
        ("4", 0.75),
        ("score = 8/10", 0.8),
        ('{"faithfulness": "1"}', 0.0),
        ('{"score": 0.9}', 0.9),
    ],
)
def test_judge_scores_parse(raw: str, score: float) -> None:
    verdict = parse_judge_score(raw)
    assert verdict.score == pytest.approx(score)
    assert verdict.raw == raw and verdict.error is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("The answer looks fine to me.", "no score"),
        ("Score: 9", "outside 1-5"),
        ("score 12/10", "out of range"),
        ('{"score": "high"}', "no score"),
    ],
)
def test_judge_unparseable_keeps_raw_and_reason(raw: str, reason: str) -> None:
    verdict = parse_judge_score(raw)
    assert verdict.score is None
    assert verdict.raw == raw
    assert verdict.error is not None and reason in verdict.error
