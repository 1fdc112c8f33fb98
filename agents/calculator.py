"""A safe arithmetic evaluator for the ``calculator`` tool.

The expression is parsed with :mod:`ast` and walked over an allow-list: number
literals, ``+ - * / // % **``, unary ``+``/``-``, parentheses, and a few
functions and constants from :mod:`math`. Anything else (names, attributes,
calls of other things, lambdas, comprehensions, strings, subscripts, ...) is
refused before any evaluation happens; ``eval``/``exec`` are never used.

Time is bounded by bounding sizes rather than by a watchdog: the expression
length and node count are capped, every integer result must fit in
``MAX_INT_BITS`` bits, and a power is refused *before* it is computed when its
result would exceed that (so ``9**9**9`` fails instantly); ``factorial`` takes
at most ``MAX_FACTORIAL``. Each allowed operation on such operands takes
microseconds, so a whole evaluation does too.

Example:
    >>> evaluate("2 * (3 + 4) ** 2")
    98
    >>> evaluate("sqrt(16) + pi")
    7.141592653589793
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from agents.errors import CalculatorError

MAX_EXPRESSION_CHARS = 500
MAX_NODES = 200
MAX_DEPTH = 40
MAX_INT_BITS = 4096
MAX_FACTORIAL = 500

Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _factorial(n: Number) -> int:
    if isinstance(n, float):
        if not n.is_integer():
            raise CalculatorError(f"factorial needs a whole number, got {n}")
        n = int(n)
    if n < 0:
        raise CalculatorError(f"factorial needs a non-negative number, got {n}")
    if n > MAX_FACTORIAL:
        raise CalculatorError(f"factorial({n}) is too large (at most {MAX_FACTORIAL})")
    return math.factorial(n)


_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {
    # name -> (function, min args, max args)
    "abs": (abs, 1, 1),
    "round": (round, 1, 2),
    "min": (min, 1, 20),
    "max": (max, 1, 20),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "exp": (math.exp, 1, 1),
    "log": (math.log, 1, 2),
    "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1),
    "acos": (math.acos, 1, 1),
    "atan": (math.atan, 1, 1),
    "hypot": (math.hypot, 2, 2),
    "factorial": (_factorial, 1, 1),
}


def allowed_names() -> list[str]:
    """The function and constant names an expression may use."""
    return sorted([*_FUNCTIONS, *_CONSTANTS])


def _check_int(value: Any) -> Any:
    """Refuse an integer over ``MAX_INT_BITS`` and a float that overflowed to inf/nan."""
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result is too large (more than {MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is too large for a floating-point number")
    return value


def _check_power(base: Number, exponent: Number) -> None:
    """Refuse a power whose result would be huge, before computing it."""
    if isinstance(base, int) and isinstance(exponent, int):
        if exponent < 0 or abs(base) <= 1:
            return  # a float, or 0 / 1 / -1
        # bits of |base| ** exponent ~= exponent * log2(|base|)
        if exponent * math.log2(abs(base)) > MAX_INT_BITS:
            raise CalculatorError(
                f"{base} ** {exponent} is too large (more than {MAX_INT_BITS} bits)"
            )
        return
    # float powers overflow into OverflowError (caught by the caller); complex
    # results (a negative base to a fractional power) are refused.
    if base < 0 and not float(exponent).is_integer():
        raise CalculatorError(f"({base}) ** {exponent} is not a real number")


class _Evaluator:
    def __init__(self) -> None:
        self.nodes = 0

    def visit(self, node: ast.AST, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CalculatorError(f"expression is too long (more than {MAX_NODES} parts)")
        if depth > MAX_DEPTH:
            raise CalculatorError(f"expression is nested too deeply (more than {MAX_DEPTH})")
        if isinstance(node, ast.Expression):
            return self.visit(node.body, depth + 1)
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CalculatorError(f"only numbers are allowed, not {value!r}")
            return _check_int(value)
        if isinstance(node, ast.BinOp):
            op = _BINARY.get(type(node.op))
            if op is None:
                raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
            left = self.visit(node.left, depth + 1)
            right = self.visit(node.right, depth + 1)
            if isinstance(node.op, ast.Pow):
                _check_power(left, right)
            if (
                isinstance(node.op, ast.Mult)
                and isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1
            ):
                raise CalculatorError(f"result is too large (more than {MAX_INT_BITS} bits)")
            return _check_int(op(left, right))
        if isinstance(node, ast.UnaryOp):
            unary = _UNARY.get(type(node.op))
            if unary is None:
                raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
            return _check_int(unary(self.visit(node.operand, depth + 1)))
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            raise CalculatorError(
                f"unknown name {node.id!r}; allowed: {', '.join(allowed_names())}"
            )
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        raise CalculatorError(f"{type(node).__name__} is not allowed in an arithmetic expression")

    def _call(self, node: ast.Call, depth: int) -> Any:
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            shown = node.func.id if isinstance(node.func, ast.Name) else type(node.func).__name__
            raise CalculatorError(
                f"function {shown!r} is not allowed; allowed: {', '.join(sorted(_FUNCTIONS))}"
            )
        if node.keywords:
            raise CalculatorError("keyword arguments are not allowed")
        function, least, most = _FUNCTIONS[node.func.id]
        if not least <= len(node.args) <= most:
            raise CalculatorError(
                f"{node.func.id} takes {least}..{most} arguments, got {len(node.args)}"
            )
        args = [self.visit(arg, depth + 1) for arg in node.args]
        return _check_int(function(*args))


def evaluate(expression: str) -> Number:
    """Evaluate an arithmetic expression over the allow-list.

    Args:
        expression: e.g. ``"(17 + 3) * 2 / 5"`` or ``"log(100, 10)"``.

    Returns:
        The value, an ``int`` or ``float``.

    Raises:
        CalculatorError: the expression is empty, too long, not arithmetic, uses
            something outside the allow-list, divides by zero, leaves the domain
            of a function, or its result would be too large.
    """
    text = expression.strip()
    if not text:
        raise CalculatorError("expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(
            f"expression is too long ({len(text)} characters, at most {MAX_EXPRESSION_CHARS})"
        )
    text = text.replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not a valid expression: {exc.msg}") from None
    except (RecursionError, MemoryError):
        raise CalculatorError("expression is nested too deeply") from None
    try:
        return _Evaluator().visit(tree, 0)  # type: ignore[no-any-return]
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result is too large for a floating-point number") from None
    except (ValueError, TypeError) as exc:
        raise CalculatorError(f"cannot evaluate: {exc}") from None
    except RecursionError:
        raise CalculatorError("expression is nested too deeply") from None


def format_number(value: Number) -> str:
    """A number as the calculator tool shows it (floats to 12 significant digits)."""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)
