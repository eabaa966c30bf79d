"""Verifiers: math-verify equivalence table, hostile inputs under the time limit, exact numeric match,
the countdown expression parser, and the registry."""

from __future__ import annotations

import json
import signal
import threading
import time

import numpy as np
import pytest

from next_jax.rl import rewards
from next_jax.rl.rewards import (
  ExprError,
  countdown_reward,
  eval_expression,
  exact_reward,
  extract_answer,
  math_reward,
)

LIMIT_S = 1.0
SLACK_S = 1.0  # signal delivery + a loaded shared machine (as in test_hostile_rewards)

# A deadline interrupt that lands inside a gc callback (jax registers one) is printed as "Exception ignored"
# by Python and re-fires 50 ms later; pytest reports that print as a warning.
pytestmark = [pytest.mark.filterwarnings("ignore:(?s).*_Deadline:pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.usefixtures("frozen_heap")]

# (response, ground truth, expected) — what math-verify 0.9.0 actually does on the extracted answer.
MATH_TABLE = [
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),  # decimal vs fraction
    ("The answer is $\\dfrac{1}{2}$.", "\\frac{1}{2}", 1.0),  # \dfrac, "answer is" fallback, $…$
    ("so \\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt2}{2}", 1.0),
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),  # units in \text are dropped
    ("Answer: 5 cm", "5", 1.0),  # plain-text unit too
    ("\\boxed{(1,2)}", "(1,2]", 0.0),  # interval ends matter
    ("\\boxed{(1,2]}", "(1,2]", 1.0),
    ("\\boxed{[1,2)}", "[1,2]", 0.0),
    ("\\boxed{\\{3,2,1\\}}", "\\{1,2,3\\}", 1.0),  # sets are unordered
    ("\\boxed{2, 1}", "1,2", 1.0),  # a bare list is read as a set
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{3}", "-3", 0.0),  # sign matters
    ("\\boxed{1500}", "1.5\\times10^{3}", 1.0),  # scientific notation in LaTeX
    ("\\boxed{1.5e3}", "1500", 0.0),  # "e" is Euler's number to math-verify: 1.5·e·3 ≠ 1500
    ("\\boxed{50\\%}", "0.5", 1.0),  # percent = /100 …
    ("\\boxed{50}", "50\\%", 1.0),  # … and also accepted without the sign (math-verify is lenient)
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),  # symbolic equality
    ("\\boxed{x=5}", "5", 1.0),  # an equation's right side
    ("\\boxed{3.14159}", "\\pi", 0.0),  # not within 6-decimal rounding
    ("\\boxed{6.283185307}", "2\\pi", 1.0),
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),
    ("\\boxed{0.333333}", "\\frac{1}{3}", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),  # thousands separator
    ("\\boxed{10.0}", "10", 1.0),
    ("\\boxed{2^{2024}}", "2^{2024}", 1.0),  # a big (allowed) power
    ("\\boxed{\\text{(A)}}", "A", 1.0),  # multiple-choice letter
    ("\\boxed{\\infty}", "\\infty", 1.0),
    ("The final answer is 7", "7", 1.0),
    ("\\boxed{1} … wait, actually \\boxed{2}", "2", 1.0),  # the last box wins
    ("\\boxed{1} … wait, actually \\boxed{2}", "1", 0.0),
    ("no final answer here: 42", "42", 0.0),  # no box, no "Answer:" → nothing parsed
]


@pytest.mark.parametrize("response,gold,expected", MATH_TABLE)
def test_math_reward_table(response, gold, expected):
  assert math_reward(response, gold, timeout_s=LIMIT_S) == expected


ONE_MB = ("Let us think about this. " * 43_700)[:1_000_000]
HOSTILE = {
    "tower": "\\boxed{9^{9^{9^{9}}}}",
    "py_tower": "\\boxed{10**10**10}",
    "paren_tower": "\\boxed{\\left(9^{99}\\right)^{9999}}",
    "huge_exponent": "\\boxed{9^{387420489}}",
    "long_base_power": "\\boxed{" + "7" * 250 + "^{9999}}",
    "factorial": "\\boxed{1000000!}",
    "group_factorial": "\\boxed{(10^{9})!}",
    "nested_5000": "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "parens_500": "\\boxed{" + "(" * 500 + "1" + ")" * 500 + "}",
    "unbalanced": "\\boxed{\\frac{1}{2" + "{" * 1000,
    "only_closers": "}" * 10_000 + "\\boxed{",
    "control_chars": "\\boxed{1\x00\x07\x1b[2J}",
    "long_answer": "\\boxed{" + "1+" * 5000 + "1}",
    "many_boxes": "\\boxed{" * 100_000,
    "text_100kB": "Answer: " + "x" * 100_000,
    "text_1MB": ONE_MB,
    "text_1MB_braces": "{" * 500_000 + "}" * 500_000,
    "slow_sympy": "\\boxed{(x+y+z+1)^{40}}",  # passes the guards; sympy needs ~50 s: the deadline stops it
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_math_reward_hostile_is_zero_within_limit(name):
  gold = "(x+y+z)^{40}" if name == "slow_sympy" else "1"
  math_reward("\\boxed{1}", "1")  # import math-verify outside the timed call
  t = time.perf_counter()
  assert math_reward(HOSTILE[name], gold, timeout_s=LIMIT_S) == 0.0
  assert time.perf_counter() - t < LIMIT_S + SLACK_S


def test_deadline_restores_state_and_later_calls_work():
  previous = signal.getsignal(signal.SIGALRM)
  t = time.perf_counter()
  assert math_reward(HOSTILE["slow_sympy"], "(x+y+z)^{40}", timeout_s=0.3) == 0.0
  assert time.perf_counter() - t < 0.3 + SLACK_S
  assert signal.getsignal(signal.SIGALRM) == previous
  assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
  assert math_reward("\\boxed{(x+1)^2}", "x^2+2x+1") == 1.0  # sympy state intact after the interrupt


def test_deadline_keeps_an_outer_timer():
  fired = []
  old = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
  try:
    signal.setitimer(signal.ITIMER_REAL, 0.6)
    assert math_reward(HOSTILE["slow_sympy"], "(x+y+z)^{40}", timeout_s=0.2) == 0.0
    remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    assert 0.0 < remaining < 0.6
    time.sleep(remaining + 0.1)
    assert fired == [True]
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def test_math_reward_outside_main_thread_uses_guards_only():
  out = []
  th = threading.Thread(target=lambda: out.extend([math_reward("\\boxed{0.5}", "1/2"),
                                                   math_reward(HOSTILE["tower"], "1")]))
  th.start()
  th.join(timeout=10)
  assert out == [1.0, 0.0]


def test_math_reward_large_text_with_answer_is_fast():
  t = time.perf_counter()
  assert math_reward(ONE_MB + " so \\boxed{\\frac{3}{4}}", "0.75") == 1.0
  assert time.perf_counter() - t < LIMIT_S + SLACK_S


def test_math_reward_bad_inputs_never_raise():
  assert math_reward(None, "1") == 0.0  # type: ignore[arg-type]
  assert math_reward("\\boxed{1}", "") == 0.0
  assert math_reward("\\boxed{}", "1") == 0.0


# --------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text,expected", [
    ("x \\boxed{1} y \\boxed{2} z", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\fbox{7}", "7"),
    ("\\boxed {3}", "3"),
    ("\\boxed{\\boxed{1}}", "1"),  # innermost of nested boxes (opened last)
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not count
    ("\\boxed{1} then \\boxed{2", "1"),  # an unclosed last box: the last closed one
    ("}}} \\boxed{4}", "4"),  # stray closers are ignored
    ("Answer: 42", "42"),
    ("**Answer:** $x = 5$. Done.", "x = 5"),
    ("The final answer is 17.", "17"),
    ("answer: 1\nmore text\nThe answer is 2", "2"),  # the last occurrence
    ("The answer island", None),
    ("no answer marker", None),
    ("", None),
])
def test_extract_answer(text, expected):
  assert extract_answer(text) == expected


def test_extract_answer_is_linear_on_1mb():
  for text in (ONE_MB + "\\boxed{9}", "\\boxed{" * 150_000, "{" * 1_000_000, "Answer: x\n" * 100_000):
    t = time.perf_counter()
    extract_answer(text)
    assert time.perf_counter() - t < 1.0


def test_answer_guard_allows_normal_answers():
  for ok in ("\\frac{\\sqrt{2}}{2}", "2^{2024}", "e^{-x^2}", "(n+1)!", "999!", "x^2+y^2", "(1,2]",
             "10^{100}"):
    assert rewards.answer_guard(ok) is None, ok


# --------------------------------------------------------------------------------------------- exact


@pytest.mark.parametrize("response,truth,expected", [
    ("182", "182", 1.0),
    ("007", "7", 1.0),  # zero-padded toy answers compare by value
    ("7", "007", 1.0),
    (" 42\n", "42", 1.0),
    ("7.0", "7", 1.0),
    ("0.50", ".5", 1.0),
    ("-3", "-3", 1.0),
    ("-3", "3", 0.0),
    ("so \\boxed{12}", "12", 1.0),
    ("Answer: 12", "12", 1.0),
    ("12 apples", "12", 0.0),
    ("1e3", "1000", 0.0),
    ("1,000", "1000", 0.0),
    ("0123456", "12", 0.0),  # an unstopped toy response
    ("", "1", 0.0),
    ("9" * 100, "9" * 100, 0.0),  # longer than MAX_NUMBER_CHARS
    ("5", "five", 0.0),
])
def test_exact_reward(response, truth, expected):
  assert exact_reward(response, truth) == expected


def test_exact_reward_bare_off_needs_a_marker():
  assert exact_reward("12", "12", bare=False) == 0.0
  assert exact_reward("\\boxed{12}", "12", bare=False) == 1.0


# ----------------------------------------------------------------------------------------- countdown


def _cd(target, numbers, use_all=False):
  return json.dumps({"target": target, "numbers": numbers, "use_all": use_all})


@pytest.mark.parametrize("response,truth,expected", [
    ("(3+5)*(9-6)", _cd(24, [3, 5, 6, 9]), 1.0),
    ("\\boxed{(3+5)*(9-6)}", _cd(24, [3, 5, 6, 9]), 1.0),
    ("Answer: 3 \\times 8 = 24", _cd(24, [3, 8, 1]), 1.0),
    ("$3 \\cdot 8$", _cd(24, [3, 8]), 1.0),
    ("6/(1-3/4)", _cd(24, [1, 3, 4, 6]), 1.0),  # exact rational intermediates
    ("3*8", _cd(24, [3, 8, 5, 7]), 1.0),  # a subset is fine by default …
    ("3*8", _cd(24, [3, 8, 5, 7], use_all=True), 0.0),  # … but not with use_all
    ("3*8*1", _cd(24, [1, 3, 8], use_all=True), 1.0),
    ("3*8+5-5", _cd(24, [3, 8, 5]), 0.0),  # 5 reused
    ("5+5+14", _cd(24, [5, 5, 14]), 1.0),  # a duplicate given twice may be used twice
    ("4*6", _cd(24, [3, 8]), 0.0),  # numbers not in the list
    ("3*8", _cd(25, [3, 8]), 0.0),  # wrong value
    ("8/(3-3)", _cd(24, [3, 3, 8]), 0.0),  # division by zero
    ("3**8", _cd(6561, [3, 8]), 0.0),  # powers are not in the grammar
    ("3^8", _cd(6561, [3, 8]), 0.0),
    ("-3+27", _cd(24, [3, 27]), 0.0),  # no unary minus
    ("__import__('os')", _cd(24, [3, 8]), 0.0),
    ("3*8", "not json", 0.0),
    ("(" * 100 + "3*8" + ")" * 100, _cd(24, [3, 8]), 0.0),  # deeper than MAX_EXPR_DEPTH
    ("1+" * 150 + "1", _cd(151, [1] * 151), 0.0),  # longer than MAX_EXPR_CHARS
])
def test_countdown_reward(response, truth, expected):
  assert countdown_reward(response, truth) == expected


def test_eval_expression_values_and_limits():
  from fractions import Fraction
  assert eval_expression("6/(1-3/4)") == (Fraction(24), [6, 1, 3, 4])
  assert eval_expression("2*3+4*5-6/4") == (Fraction(49, 2), [2, 3, 4, 5, 6, 4])
  assert eval_expression("((7))")[0] == 7
  assert eval_expression("(" * 16 + "1" + ")" * 16)[0] == 1  # exactly MAX_EXPR_DEPTH levels
  bad = ["(" * 17 + "1" + ")" * 17, "1" * 7, "1+", "(1", "1)", "", "1 2", "2**3", "1/0", "1/(2-2)", "a+1",
         "1" + "+1" * 150]
  for expr in bad:
    with pytest.raises(ExprError):
      eval_expression(expr)
  with pytest.raises(ExprError):
    eval_expression("1+1+1", max_chars=4)
  with pytest.raises(ExprError):
    eval_expression("((1))", max_depth=1)


def test_countdown_hostile_is_fast():
  t = time.perf_counter()
  for text in (ONE_MB, "(" * 1_000_000, "9" * 1_000_000, "\\boxed{" + "(" * 100_000 + "}"):
    assert countdown_reward(text, _cd(24, [3, 8])) == 0.0
  assert time.perf_counter() - t < 2.0


# ------------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize("response, want", [
    ("43 + 30 = 73", 1.0), ("73", 1.0), ("73.0", 1.0), ("The sum is 73.", 1.0),
    ("The answer is 73. Then 5 more.", 1.0),  # a marked answer wins over the last number
    ("\\boxed{73} because 40 + 33", 1.0), ("Answer: seventy, 73", 1.0),
    ("83 + 57 equals 130.", 0.0), ("73 is not 74", 0.0), ("The answer is 74, not 73", 0.0),
    ("seventy-three", 0.0), ("", 0.0), ("1e3", 0.0)])
def test_last_number_reward(response, want):
  assert rewards.last_number_reward(response, "73") == want


def test_last_number_reward_scans_only_the_tail_of_huge_responses():
  t = time.perf_counter()
  assert rewards.last_number_reward("9 " * 1_000_000 + "73", "73") == 1.0
  assert rewards.last_number_reward("73 " + "x" * rewards.MAX_TAIL_CHARS, "73") == 0.0
  assert time.perf_counter() - t < 1.0


def test_registry_and_score_batch():
  # next_jax.rl.rg_tasks (imported by next_jax.rl.tasks) registers its two verifiers
  assert set(rewards.REWARDS) - {"rg", "rg_number"} == {"math", "exact", "last_number", "countdown"}
  assert rewards.get_reward("exact") is exact_reward
  with pytest.raises(ValueError, match="known: \\['countdown', 'exact', 'last_number', 'math'"):
    rewards.get_reward("nope")
  out = rewards.score_batch("exact", ["1", "2", "x"], ["1", "3", "x"])
  assert out.dtype == np.float32 and out.tolist() == [1.0, 0.0, 0.0]
  out = rewards.score_batch(rewards.math_reward, ["\\boxed{0.5}", "\\boxed{2}"], ["1/2", "3"])
  assert out.tolist() == [1.0, 0.0]
  with pytest.raises(ValueError, match="2 responses but 1 truths"):
    rewards.score_batch("exact", ["1", "2"], ["1"])


# --------------------------------------------------- real benchmark answers (../shared/data/math_eval)

# rows every file is checked on (1-based lines), plus rows whose answers once tripped the verifier
SAMPLE_LINES = (1, 2, 3, 7, 13, 29)
TRICKY = ("math500:1", "math500:243", "math500:460", "minerva:73", "olympiadbench:14", "olympiadbench:77")


def _benchmark_or_skip(name):
  from next_jax.rl import data  # noqa: PLC0415

  try:
    data.math_eval_dir()
  except FileNotFoundError as e:
    pytest.skip(f"the math-eval data directory is absent: {e}")
  return data.load_benchmark(name)


@pytest.mark.parametrize("name", ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench", "gsm8k"])
def test_ground_truths_written_as_a_model_would_score_one(name):
  from experiments.verify_math_eval import model_forms  # noqa: PLC0415

  problems = _benchmark_or_skip(name)
  rows = [p for i, p in enumerate(problems, 1) if i in SAMPLE_LINES or p.id in TRICKY]
  rows.append(max(problems, key=lambda p: len(p.answer)))  # the longest answer, under the time bound
  for p in rows:
    for form, text in model_forms(p.answer).items():
      t0 = time.perf_counter()
      assert math_reward(text, p.answer) == float(form != "wrong"), (p.id, form, text)
      assert time.perf_counter() - t0 < rewards.MATH_TIMEOUT_S + SLACK_S, (p.id, form)


@pytest.mark.parametrize("answer,gold", [
    ("27", "27.0"), ("27.00", "27.0"),                                           # AMC23's JSON floats
    ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),                    # MATH500's polar pair
    ("\\left(3,\\dfrac{\\pi}{2}\\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("18.90", "\\$18.90"), ("32348", "\\$32,\\!348"), ("1024", "1,024"),       # MATH's dollars, commas
    ("69, 84", "$69$,$84$"), ("84, 69", "$69$,$84$"),                          # OlympiadBench's lists
    ("(-\\infty, 0) \\cup \\{1\\}", "$(-\\infty, 0) \\cup\\{1\\}$."),
    ("1.60", "1.6"),                                                           # Minerva's decimals
])
def test_equivalent_forms_of_real_answers_score_one(answer, gold):
  assert math_reward(f"so \\boxed{{{answer}}}", gold) == 1.0
  assert math_reward(f"The answer is ${answer}$.", gold) == 1.0


@pytest.mark.parametrize("answer,gold", [
    ("205", "204"),                                                            # AIME
    ("28", "27.0"), ("2.7", "27.0"),                                           # AMC23
    ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("(\\pi/2, 3)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("1.7", "1.6"), ("16", "1.6"),                                             # Minerva
    ("69", "$69$,$84$"), ("\\frac{1}{2}", "$\\frac{32}{9}$,$\\frac{1}{2}$"),  # OlympiadBench: a part
    ("19", "18"), ("180", "18"),                                               # GSM8K
])
def test_plausible_wrong_answers_score_zero(answer, gold):
  assert math_reward(f"so \\boxed{{{answer}}}", gold) == 0.0


def test_an_echoed_empty_box_falls_back_to_the_answer_line():
  text = "I put the final answer within \\boxed{}.\n12 x 2 = 24\nThe answer is 24 minutes."
  assert extract_answer(text) == "24 minutes" and math_reward(text.replace(" minutes", ""), "24") == 1.0
