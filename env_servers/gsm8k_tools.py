"""GSM8K with a calculator tool: multi-turn. No torch.

Each turn the agent either calls the calculator, `<calc>12*7</calc>` (the observation is `<result>84</result>`; up to
four calls in one turn are all answered), or answers. A turn without a calculator call is the final answer, scored
like `gsm8k` (a `\\boxed{}` value, else the last number). After `max_calls` calculator turns the next turn is final.

The calculator is an arithmetic evaluator over Python's `ast` (numbers, + - * / // % ** and parentheses); it never
calls eval, and bounds exponents and result sizes so a call cannot hang the server.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable

from env_servers.api import Env, EnvError, Observation, StepResult
from env_servers.gsm8k import DEFAULT_DATA, check_index, load_gsm8k, score

INSTRUCTIONS = (
    "{question}\n\nYou may use a calculator: write <calc>EXPRESSION</calc> (numbers, + - * / ** and parentheses) and "
    "stop; the result comes back as <result>VALUE</result>. When you know the answer, reason briefly and put the "
    "final answer within \\boxed{{}}."
)
_CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
_MAX_CALLS_PER_TURN = 4
_MAX_EXPR_CHARS = 200
_MAX_ABS = 1e15
_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


class CalcError(ValueError):
    pass


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if not abs(node.value) <= _MAX_ABS:  # also catches inf/nan literals such as 1e999
            raise CalcError("number out of range")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or (abs(left) > 1e6 and abs(right) > 2)):
            raise CalcError("exponent too large")
        try:
            value = _BINOPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalcError("division by zero") from None
        if isinstance(value, complex) or not math.isfinite(value) or abs(value) > _MAX_ABS:
            raise CalcError("result is not a real number within ±1e15")
        return value
    raise CalcError(f"unsupported expression element: {type(node).__name__}")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression; returns the value as text, or 'error: …'. Never raises."""
    expr = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/").replace("$", "")
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr)  # 1,200 → 1200
    if not expr or len(expr) > _MAX_EXPR_CHARS:
        return f"error: the expression must have 1 to {_MAX_EXPR_CHARS} characters"
    try:
        value = _eval(ast.parse(expr, mode="eval").body)
    except (SyntaxError, CalcError, RecursionError, ValueError, OverflowError) as e:
        return f"error: {e.msg if isinstance(e, SyntaxError) else e or 'invalid expression'}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:.10g}" if isinstance(value, float) else str(value)


class GSM8KToolsEnv(Env):
    """Multi-turn GSM8K: calculator calls, then a final answer. Reward only on the final turn."""

    name = "gsm8k_tools"

    def __init__(self, items: list[dict[str, str]], format_reward: float = 0.0, max_calls: int = 8):
        self.items, self.format_reward, self.max_calls = items, format_reward, max_calls
        self._idx: int | None = None
        self._calls = 0
        self._done = False
        self._obs = ""

    def __len__(self) -> int:
        return len(self.items)

    def reset(self, idx: int) -> Observation:
        self._idx, self._calls, self._done = check_index(idx, len(self.items)), 0, False
        self._obs = INSTRUCTIONS.format(question=self.items[idx]["question"])
        return Observation(self._obs, {"data_idx": idx})

    def step(self, action: str) -> StepResult:
        if self._idx is None:
            raise EnvError("call reset before step")
        if self._done:
            raise EnvError("episode is done: call reset to start another")
        calls = _CALL.findall(action)
        if calls and "\\boxed" not in action and self._calls < self.max_calls:
            self._calls += 1
            self._obs = "\n".join(f"<result>{calculate(c)}</result>" for c in calls[:_MAX_CALLS_PER_TURN])
            return StepResult(self._obs, 0.0, False, {"calc_calls": self._calls})
        result = score(action, self.items[self._idx]["answer"], self.format_reward)
        self._done, self._obs = True, ""
        return StepResult("", result.pop("reward"), True, {**result, "calc_calls": self._calls})

    def observation(self) -> str:
        if self._idx is None:
            raise EnvError("no observation: call reset first")
        return self._obs


def factory(data: str | None = None, format_reward: float = 0.0, max_calls: int = 8) -> Callable[[], Env]:
    items = load_gsm8k(data or DEFAULT_DATA, "test")
    return lambda: GSM8KToolsEnv(items, format_reward, max_calls)
