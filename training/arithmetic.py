"""Worked arithmetic: problems whose answer a few written steps decide, sized for a small model.

Sums of two two-digit numbers and products of a two-digit by a one-digit number, each worked
column by column, so that every step is a one-digit fact and a carry:

    Question: What is 47 + 85?
    Solution: 7 + 5 = 12
    4 + 8 + 1 = 13
    47 + 85 = 132
    Answer: 132

Without the steps the answer's digits must be computed in one forward pass; with them, each digit
is a one-digit fact away (the tokenizer splits numbers into digits, training/tokenizer.py). That
is where RLP's thoughts can help a model that has learned to write them (methods.md §1): the
benchmark of pipelines/compare.py.
"""

from __future__ import annotations

import random

TASK = "worked_arithmetic"


def add_columns(x: int, y: int) -> list[str]:
    """Column addition of x + y: one line per column (its digits plus the carry), then the sum."""
    steps, carry, column = [], 0, 1
    while x // column or y // column or carry:
        dx, dy = x // column % 10, y // column % 10
        if not (x // (column * 10) or y // (column * 10)):  # the last column: its sum is the answer's head
            steps.append(" + ".join(map(str, [dx, dy] + ([carry] if carry else []))) + f" = {dx + dy + carry}")
            break
        total = dx + dy + carry
        steps.append(" + ".join(map(str, [dx, dy] + ([carry] if carry else []))) + f" = {total}")
        carry, column = total // 10, column * 10
    return steps + [f"{x} + {y} = {x + y}"]


def column_sum(rng: random.Random) -> tuple[str, str, int]:
    x, y = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {x} + {y}?", "\n".join(add_columns(x, y)), x + y


def product(rng: random.Random) -> tuple[str, str, int]:
    """A two-digit by a one-digit number: the ones, then the tens with the carry."""
    a, b = rng.choice([n for n in range(12, 100) if n % 10]), rng.randint(3, 9)
    ones = a % 10 * b
    steps = [f"{a % 10} * {b} = {ones}", f"{a // 10} * {b} + {ones // 10} = {a // 10 * b + ones // 10}", f"{a} * {b} = {a * b}"]
    return f"What is {a} * {b}?", "\n".join(steps), a * b


def worked_arithmetic(count: int, seed: int) -> list[dict[str, str]]:
    """`count` problems (question, solution, answer), half sums and half products, in an
    order and with numbers fixed by `seed`."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        question, solution, answer = (column_sum if i % 2 == 0 else product)(rng)
        rows.append({"question": question, "solution": solution, "answer": str(answer)})
    return rows


def score_answer(answer: str | None, expected: str) -> float:
    """1 for the exact number, else 0."""
    return float(answer is not None and answer.strip() == expected.strip())
