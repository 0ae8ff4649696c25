"""Worked arithmetic: problems whose answer a few written steps decide, sized for a small model.

Chain sums of two-digit numbers and products of a two-digit by a one-digit number, each with the
steps that carry the tens:

    Question: What is 47 + 85 + 19?
    Solution: 47 + 85 = 132
    132 + 19 = 151
    Answer: 151

Without the steps the answer's digits must be computed in one forward pass; with them, every
digit is one short addition away. That is where RLP's thoughts can help a model that has learned
to write them (methods.md §1): the benchmark of pipelines/compare.py.
"""

from __future__ import annotations

import random

TASK = "worked_arithmetic"


def chain_sum(rng: random.Random) -> tuple[str, str, int]:
    terms = [rng.randint(10, 99) for _ in range(rng.choice((2, 3)))]
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total} + {t} = {total + t}")
        total += t
    return f"What is {' + '.join(map(str, terms))}?", "\n".join(steps), total


def product(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.choice([n for n in range(12, 100) if n % 10]), rng.randint(3, 9)
    tens, ones = a - a % 10, a % 10
    steps = [f"{tens} * {b} = {tens * b}", f"{ones} * {b} = {ones * b}", f"{tens * b} + {ones * b} = {a * b}"]
    return f"What is {a} * {b}?", "\n".join(steps), a * b


def worked_arithmetic(count: int, seed: int) -> list[dict[str, str]]:
    """`count` problems (question, solution, answer), half chain sums and half products, in an
    order and with numbers fixed by `seed`."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        question, solution, answer = (chain_sum if i % 2 == 0 else product)(rng)
        rows.append({"question": question, "solution": solution, "answer": str(answer)})
    return rows


def score_answer(answer: str | None, expected: str) -> float:
    """1 for the exact number, else 0."""
    return float(answer is not None and answer.strip() == expected.strip())
