"""The calculator: right answers, and refusals that cannot be talked around."""

from __future__ import annotations

import time

import pytest

from agents.calculator import evaluate, format_number
from agents.errors import CalculatorError
from agents.tools import make_calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 * (3 + 4) ** 2", 98),
        ("7 // 2 + 7 % 2", 4),
        ("-3 + +5", 2),
        ("2 ** -1", 0.5),
        ("2^10", 1024),
        ("sqrt(16) + abs(-2)", 6.0),
        ("log(100, 10)", 2.0),
        ("max(1, 7, 3) - min(4, 2)", 5),
        ("factorial(10)", 3628800),
        ("round(pi, 3)", 3.142),
    ],
)
def test_evaluates_arithmetic(expression: str, expected: float) -> None:
    assert evaluate(expression) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "function '__import__' is not allowed"),
        ("__import__('os').system('true')", "is not allowed"),
        ("(1).real", "Attribute is not allowed"),
        ("(2).__class__.__bases__", "Attribute is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("[x for x in range(9)]", "ListComp is not allowed"),
        ("open('/etc/passwd')", "function 'open' is not allowed"),
        ("os", "unknown name 'os'"),
        ("'a' * 3", "only numbers are allowed"),
        ("sqrt(x=4)", "keyword arguments are not allowed"),
        ("1 if 1 else 2", "IfExp is not allowed"),
        ("1 < 2", "Compare is not allowed"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("sqrt(-1)", "math domain error"),
        ("exp(1000)", "too large for a floating-point"),
        ("1e308 * 10", "too large for a floating-point"),
        ("(-8) ** 0.5", "not a real number"),
        ("factorial(100000)", "too large"),
        ("factorial(-1)", "non-negative"),
        ("", "empty"),
        ("2 +", "not a valid expression"),
    ],
)
def test_refuses_with_a_clear_message(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=message):
        evaluate(expression)


@pytest.mark.parametrize("expression", ["9**9**9", "10**10**10", "2**(2**64)", "(10**1000)**10"])
def test_huge_powers_are_refused_instantly(expression: str) -> None:
    started = time.perf_counter()
    with pytest.raises(CalculatorError, match="too large"):
        evaluate(expression)
    assert time.perf_counter() - started < 1.0  # computing any of them would take forever


def test_huge_products_are_refused() -> None:
    with pytest.raises(CalculatorError, match="too large"):
        evaluate("(2**4000) * (2**4000)")


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(CalculatorError, match="nested too deeply"):
        evaluate("-" * 60 + "1")
    with pytest.raises(CalculatorError, match="too long"):
        evaluate("(" * 400 + "1" + ")" * 400)
    with pytest.raises(CalculatorError, match=r"too long|too deeply"):
        evaluate("+".join(["1"] * 240))


def test_format_number() -> None:
    assert format_number(4.0) == "4"
    assert format_number(1 / 3) == "0.333333333333"
    assert format_number(10**20) == "100000000000000000000"


def test_tool_returns_errors_as_results() -> None:
    tool = make_calculator()
    assert tool.invoke({"expression": "6 * 7"}) == "42"
    assert "division by zero" in tool.invoke({"expression": "1/0"})
    assert "is not allowed" in tool.invoke({"expression": "__import__('os')"})
