"""GSM8K-style word problems: one to three arithmetic steps told in sentences, a numeric answer, and a worked
solution (chain of thought) that ends in "The answer is N." (the built-in task `word_problems`).

A problem is a person, a kind of object, a start (a count, or packs of a size) and `steps` operations on the
count, each with several phrasings: getting more, giving some away, a multiple, sharing equally. Every
intermediate count is a whole number >= 0, so the answer is an integer. `difficulty` sets the steps (1, 2, 3;
3 beyond) and the size of the numbers (up to 20, 50, 100, then 10 ** (difficulty - 1)).

Everything here only makes strings; optsys.data.tasks wraps them as a Task (split, rows, pairs, prompts).
"""

from __future__ import annotations

import random
from typing import NamedTuple

INSTRUCTION = "Solve it step by step, then give the final answer as 'The answer is N.'"

# (name, subject pronoun, possessive)
PEOPLE = [("Maya", "she", "her"), ("Liam", "he", "his"), ("Sofia", "she", "her"), ("Noah", "he", "his"),
          ("Aisha", "she", "her"), ("Mateo", "he", "his"), ("Chen", "he", "his"), ("Priya", "she", "her"),
          ("Omar", "he", "his"), ("Elena", "she", "her"), ("Kenji", "he", "his"), ("Zoe", "she", "her"),
          ("Lucas", "he", "his"), ("Amara", "she", "her"), ("Ivan", "he", "his"), ("Nora", "she", "her"),
          ("Diego", "he", "his"), ("Hana", "she", "her"), ("Tom", "he", "his"), ("Fatima", "she", "her")]
FRIENDS = ["a neighbour", "a classmate", "a cousin", "a friend", "a teacher", "a brother", "a sister", "a coworker"]
# (plural, container)
OBJECTS = [("apples", "bags"), ("marbles", "jars"), ("stickers", "sheets"), ("pencils", "boxes"), ("cookies", "tins"),
           ("stamps", "albums"), ("books", "crates"), ("shells", "buckets"), ("cards", "decks"), ("eggs", "cartons"),
           ("beads", "strings"), ("candles", "packs"), ("oranges", "baskets"), ("coins", "purses"),
           ("balloons", "bunches"), ("crayons", "boxes"), ("muffins", "trays"), ("toy cars", "cases"),
           ("flowers", "bunches"), ("buttons", "cups")]
OPS = ("add", "sub", "mul", "div")


class WordProblem(NamedTuple):
    question: str  # the story and the question (the prompt adds INSTRUCTION)
    answer: int
    solution: str  # worked steps, ending "The answer is {answer}."


def steps_of(difficulty: int) -> int:
    return min(max(difficulty, 1), 3)


def largest_number(difficulty: int) -> int:
    """The largest number a problem states at `difficulty` (its counts and amounts; multipliers are 2-5)."""
    return {1: 20, 2: 50, 3: 100}.get(difficulty, 10 ** (difficulty - 1))


def lower_bound_count(difficulty: int) -> int:
    """A lower bound on the distinct questions at `difficulty`: people x objects x plain start counts x their 4
    phrasings x the amounts of a first "add" step (the other steps and phrasings only add more)."""
    top = largest_number(difficulty)
    return len(PEOPLE) * len(OBJECTS) * (top - 1) * 4 * top


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _start(rng: random.Random, who: tuple, obj: tuple, top: int) -> tuple[int, str, str, int]:
    """(count, story sentence, solution sentence, steps it takes) of the start: a count (0 steps), or packs of a
    size (1 step: a multiplication)."""
    name, _, _ = who
    things, box = obj
    if rng.random() < 0.3:
        packs, size = rng.randint(2, 9), rng.randint(2, max(2, min(12, top // 4)))
        story = rng.choice([f"{name} buys {packs} {box} of {things}, with {size} {things} in each.",
                            f"{name} has {packs} {box} with {size} {things} in every one."])
        return packs * size, story, f"{name} starts with {packs} x {size} = {packs * size} {things}.", 1
    count = rng.randint(2, top)
    story = rng.choice([f"{name} has {count} {things}.", f"{name} collects {count} {things}.",
                        f"There are {count} {things} in {name}'s room.", f"{name} owns {count} {things}."])
    return count, story, f"{name} starts with {count} {things}.", 0


def _step(rng: random.Random, op: str, value: int, who: tuple, obj: tuple, top: int) -> tuple[int, str, str] | None:
    """(new count, story sentence, solution sentence) of one operation on `value`; None if it cannot apply (nothing
    to give away, no divisor)."""
    name, he, his = who
    things, _ = obj
    friend = rng.choice(FRIENDS)
    if op == "add":
        b = rng.randint(1, top)
        story = rng.choice([f"Then {he} buys {b} more {things}.", f"{_cap(friend)} gives {name} {b} {things}.",
                            f"{_cap(he)} finds {b} more {things} the next day.",
                            f"Later {he} gets {b} {things} as a gift."])
        return value + b, story, f"After getting {b} more, {he} has {value} + {b} = {value + b}."
    if op == "sub":
        if value < 2:
            return None
        b = rng.randint(1, min(value - 1, top))
        story = rng.choice([f"{_cap(he)} gives {b} {things} to {friend}.", f"{_cap(he)} loses {b} of {his} {things}.",
                            f"Then {he} sells {b} {things}.", f"{name} uses {b} of the {things}."])
        return value - b, story, f"After {b} go, {he} has {value} - {b} = {value - b}."
    if op == "mul":
        if value * 5 > 10 * top:  # keep numbers near the difficulty's size
            return None
        k = rng.randint(2, 5)
        word = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}[k]
        story = rng.choice([f"By the end of the week {he} has {word} as many {things} as that.",
                            f"Then {his} {things} multiply: {he} ends up with {word} as many.",
                            f"{_cap(friend)} gives {name} enough {things} to have {word} as many."])
        return value * k, story, f"{_cap(word)} as many is {value} x {k} = {value * k}."
    divisors = [k for k in range(2, 10) if value % k == 0 and value // k >= 1]
    if not divisors:
        return None
    k = rng.choice(divisors)
    story = rng.choice([f"{_cap(he)} shares the {things} equally among {k} people, {name} included, and keeps "
                        f"{his} share.",
                        f"{_cap(he)} splits the {things} into {k} equal groups and keeps one group."])
    return value // k, story, f"One of {k} equal shares is {value} / {k} = {value // k}."


def make_word_problem(rng: random.Random, difficulty: int) -> WordProblem:
    """One problem of `steps_of(difficulty)` arithmetic steps (the start's packs count as one)."""
    top = largest_number(difficulty)
    who, obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    value, story, solution, done = _start(rng, who, obj, top)
    sentences, worked = [story], [solution]
    while done < steps_of(difficulty):
        made = _step(rng, rng.choice(OPS), value, who, obj, top)
        if made is None:  # e.g. nothing to share equally: draw another operation (add always applies)
            continue
        value, story, solution = made
        sentences.append(story)
        worked.append(solution)
        done += 1
    name, things = who[0], obj[0]
    question = rng.choice([f"How many {things} does {name} have now?", f"How many {things} does {name} have in "
                           "the end?", f"How many {things} does {name} have at the end?"])
    worked.append(f"The answer is {value}.")
    return WordProblem(" ".join(sentences) + " " + question, value, " ".join(worked))


def wrong_solution(solution: str, answer: int, rng: random.Random) -> str:
    """The worked solution with its last result off by a small amount (a plausible slip), ending in that wrong
    answer: the rejected side of a preference pair."""
    delta = rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if answer + d >= 0])
    head, _, _ = solution.rpartition(f"= {answer}")
    return f"{head}= {answer + delta}. The answer is {answer + delta}."
