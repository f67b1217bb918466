"""Grade-school arithmetic word problems generated from a seed, GSM8K style.

A problem is a start value and a few operations among + − ×, told as a short story: "Lena has 14
marbles. She gives 5 to her brother. Then she finds 8 more. How many marbles does Lena have now?" (17).
The operations are drawn first and the story is rendered from one of many scenes, each with several
phrasings per operation, names and objects, so a policy cannot learn one surface form; the answer is
computed from the operations, never from the text. Answers are whole numbers >= 0: a subtraction never
takes away more than there is.

This is the task a small chat model learns on a CPU, so most problems are short: the number of
operations is drawn with weight halving per extra step (two thirds are one step at ``max_steps=2``),
operands are at most ``max_value`` and multipliers at most ``min(max_value, 9)``. Those two settings
and the operators allowed (``ops``) are the difficulty knobs.

As in :class:`~areal_hpc.tasks.arithmetic.ArithmeticTask`, held-out problems are drawn first from their
own stream and their texts are excluded from training; problem ``i`` is a pure function of (seed, i).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from areal_hpc.tasks.base import Problem

# (name, subject pronoun, object pronoun, possessive)
NAMES = [(n, "she", "her", "her") for n in ("Lena", "Maya", "Sofia", "Emma", "Aisha", "Grace", "Nora", "Priya",
                                            "Hannah", "Chloe", "Zoe", "Mia")] + \
        [(n, "he", "him", "his") for n in ("Omar", "Liam", "Noah", "Ben", "Carlos", "Ravi", "Jack", "Leo",
                                           "Samuel", "Kenji", "Tom", "Ethan")]
RELATIVES = ["brother", "sister", "friend", "cousin", "neighbour", "teacher"]


@dataclass(frozen=True)
class Scene:
    """One kind of story. Slots: {name} {he} {him} {his} (capitalised {He} {His}), {other} (a second
    person), {rel} (a relative), {obj} (one of ``objects``), {a} {b} (start operands), {n} (an operand).

    ``start``: "{name} has {a} {obj}."; ``start_mul``: a start of {a} groups of {b} (one × operation);
    ``gain``/``lose``: a sentence adding/taking away {n}; ``times``: the last operation as "{other} has
    {n} times as many" together with its question; ``question``: the question after gains/losses.
    """

    objects: tuple[str, ...]
    start: tuple[str, ...]
    start_mul: tuple[str, ...]
    gain: tuple[str, ...]
    lose: tuple[str, ...]
    times: tuple[str, ...]
    question: tuple[str, ...]


_POSSESS_Q = ("How many {obj} does {name} have now?", "How many {obj} does {name} have in the end?")
_TIMES = ("{other} has {n} times as many {obj} as {name} has now. How many {obj} does {other} have?",)

SCENES = [
    Scene(("marbles", "stickers", "stamps", "trading cards", "seashells", "coins"),
          ("{name} has {a} {obj}.", "{name} collects {obj} and has {a} of them."),
          ("{name} has {a} bags of {obj} with {b} {obj} in each bag.",
           "{name} has {a} albums, and each album holds {b} {obj}."),
          ("{He} finds {n} more.", "{His} {rel} gives {him} {n} more {obj}.", "Then {he} buys {n} more {obj}.",
           "{He} wins {n} {obj} in a game."),
          ("{He} gives {n} to {his} {rel}.", "{He} loses {n} of them.", "{He} trades away {n} {obj}."),
          _TIMES, _POSSESS_Q),
    Scene(("apples", "oranges", "lemons", "peaches", "plums"),
          ("{name} picks {a} {obj}.", "There are {a} {obj} in {name}'s basket."),
          ("{name} fills {a} baskets with {b} {obj} in each basket.",
           "{name} picks {a} {obj} from each of {b} trees."),
          ("{He} picks {n} more {obj}.", "{His} {rel} adds {n} {obj} to the basket."),
          ("{He} eats {n} of them.", "{He} gives {n} {obj} to {his} {rel}.", "{He} sells {n} {obj} at the market."),
          _TIMES, ("How many {obj} does {name} have now?", "How many {obj} does {name} have left?")),
    Scene(("passengers",),
          ("A bus has {a} passengers.", "There are {a} passengers on a train."),
          ("A bus has {a} rows of seats, and {b} passengers sit in each row.",),
          ("At the next stop, {n} more passengers get on.", "Then {n} people get on."),
          ("At the next stop, {n} passengers get off.", "Then {n} people get off."),
          (), ("How many passengers are there now?",)),
    Scene(("birds", "ducks", "pigeons"),
          ("There are {a} {obj} in a tree.", "{a} {obj} sit on a fence."),
          ("There are {a} trees, and {b} {obj} sit in each tree.",),
          ("Then {n} more {obj} land.", "{n} more {obj} fly in to join them."),
          ("Then {n} of them fly away.", "{n} {obj} fly off."),
          (), ("How many {obj} are there now?", "How many {obj} are left?")),
    Scene(("cookies", "muffins", "cupcakes", "pancakes"),
          ("{name} bakes {a} {obj}.", "{name} makes {a} {obj} for a party."),
          ("{name} bakes {a} trays of {obj} with {b} {obj} on each tray.",),
          ("{His} {rel} bakes {n} more.", "Then {he} makes {n} more {obj}."),
          ("{He} eats {n} of them.", "{He} gives {n} {obj} to {his} {rel}.", "{His} friends eat {n} {obj}."),
          ("{other} bakes {n} times as many {obj} as {name} has now. How many {obj} does {other} bake?",),
          ("How many {obj} does {name} have now?", "How many {obj} are left?")),
    Scene(("dollars",),
          ("{name} has {a} dollars.", "{name} saves {a} dollars."),
          ("{name} saves {b} dollars every week for {a} weeks.", "{name} earns {b} dollars a day for {a} days."),
          ("{His} {rel} gives {him} {n} dollars.", "{He} earns {n} more dollars.", "Then {he} finds {n} dollars."),
          ("{He} spends {n} dollars on a book.", "{He} buys a toy for {n} dollars.",
           "{He} pays {n} dollars for lunch."),
          _TIMES, ("How many dollars does {name} have now?", "How much money, in dollars, does {name} have left?")),
    Scene(("pages",),
          ("{name} reads {a} pages on Monday.", "{name} has read {a} pages of {his} book.",
           "On Saturday {name} reads {a} pages."),
          ("{name} reads {b} pages a day for {a} days.",),
          ("On the next day {he} reads {n} more pages.", "Then {he} reads another {n} pages."),
          (),
          ("{other} reads {n} times as many pages as {name} has read. How many pages does {other} read?",),
          ("How many pages has {name} read in total?",)),
    Scene(("books",),
          ("A shelf holds {a} books.", "The library has {a} books on a cart."),
          ("A bookcase has {a} shelves with {b} books on each shelf.",),
          ("The librarian adds {n} more books.", "Then {n} books are returned."),
          ("Children borrow {n} books.", "Then {n} books are taken away."),
          (), ("How many books are there now?",)),
    Scene(("students",),
          ("A class has {a} students.", "There are {a} students in the gym."),
          ("A school has {a} classes with {b} students in each class.",),
          ("Then {n} more students arrive.", "{n} new students join."),
          ("Then {n} students go home.", "{n} students leave for a trip."),
          (), ("How many students are there now?",)),
    Scene(("tomato plants", "flowers", "carrots", "trees"),
          ("{name} plants {a} {obj}.", "{name}'s garden has {a} {obj}."),
          ("{name} plants {a} rows of {obj} with {b} {obj} in each row.",),
          ("{He} plants {n} more.", "{His} {rel} plants {n} more {obj}."),
          ("Rabbits eat {n} of them.", "{n} of the {obj} dry up."),
          ("{other} has {n} times as many {obj} as {name} has now. How many {obj} does {other} have?",),
          ("How many {obj} does {name} have now?", "How many {obj} are in the garden now?")),
    Scene(("fish",),
          ("{name}'s aquarium has {a} fish.", "{name} has {a} fish in a tank."),
          ("{name} has {a} tanks with {b} fish in each tank.",),
          ("{He} buys {n} more fish.", "Then {n} baby fish are born."),
          ("{He} gives {n} fish to {his} {rel}.", "{He} moves {n} fish to a pond."),
          _TIMES, ("How many fish does {name} have now?",)),
    Scene(("eggs",),
          ("A farmer collects {a} eggs.", "{name} has {a} eggs."),
          ("A farmer has {a} cartons with {b} eggs in each carton.", "{name} buys {a} boxes of {b} eggs."),
          ("The hens lay {n} more eggs.", "Then {n} more eggs are collected."),
          ("{n} eggs break.", "{n} eggs are used for a cake."),
          (), ("How many eggs are there now?",)),
    Scene(("laps", "kilometres"),
          ("{name} runs {a} {obj} on Saturday.", "{name} swims {a} {obj} in the morning.",
           "{name} cycles {a} {obj} before lunch."),
          ("{name} runs {b} {obj} every day for {a} days.", "{name} swims {b} {obj} a day for {a} days."),
          ("Later {he} does {n} more {obj}.", "Then {he} adds another {n} {obj}."),
          (),
          ("{other} goes {n} times as far as {name}. How many {obj} does {other} go?",),
          ("How many {obj} does {name} do in total?", "How many {obj} is that in total?")),
    Scene(("pencils", "crayons", "markers", "erasers"),
          ("{name} has {a} {obj} in a box.", "There are {a} {obj} on {name}'s desk."),
          ("{name} buys {a} packs of {obj} with {b} {obj} in each pack.",),
          ("{His} {rel} gives {him} {n} more {obj}.", "{He} buys {n} more {obj}."),
          ("{He} lends {n} {obj} to {other}.", "{He} loses {n} {obj} at school."),
          _TIMES, ("How many {obj} does {name} have now?",)),
    Scene(("balloons",),
          ("{name} has {a} balloons for a party.", "{name} blows up {a} balloons.",
           "There are {a} balloons at {name}'s party."),
          ("{name} buys {a} bags of balloons with {b} balloons in each bag.",),
          ("{His} {rel} brings {n} more balloons.",),
          ("{n} balloons pop.", "{n} balloons fly away."),
          (), ("How many balloons are left?", "How many balloons does {name} have now?")),
    Scene(("toy cars", "blocks", "puzzles", "dolls"),
          ("{name} owns {a} {obj}.", "{name} has {a} {obj} in {his} room.",
           "There are {a} {obj} in {name}'s toy box."),
          ("{name} has {a} shelves with {b} {obj} on each shelf.",),
          ("For {his} birthday {he} gets {n} more {obj}.", "{He} buys {n} new {obj}."),
          ("{He} donates {n} {obj}.", "{He} gives {n} {obj} to {other}."),
          _TIMES, ("How many {obj} does {name} own now?",)),
]


@dataclass(frozen=True)
class WordProblem:
    """The operations a story tells: ``start`` (one number, or two multiplied), then ``steps`` in order."""

    text: str
    start: tuple[int, ...]
    steps: tuple[tuple[str, int], ...]

    @property
    def value(self) -> int:
        v = self.start[0] if len(self.start) == 1 else self.start[0] * self.start[1]
        for op, n in self.steps:
            v = v + n if op == "+" else v - n if op == "-" else v * n
        return v


class WordProblemTask:
    def __init__(self, max_value: int, max_steps: int, ops: str, seed: int, n_eval: int) -> None:
        if max_value < 3:
            raise ValueError(f"task.max_value must be >= 3, got {max_value}")
        if max_steps < 1:
            raise ValueError(f"task.max_steps must be >= 1, got {max_steps}")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"task.word_ops {ops!r} may only contain '+', '-', '*'")
        self.max_value, self.max_steps, self.ops, self.seed = max_value, max_steps, ops, seed
        self._max_mul = min(max_value, 9)
        # scenes that can tell at least one of the allowed + / - operations (all of them for ops='*')
        self._scenes = [s for s in SCENES if ("+" in ops and s.gain) or ("-" in ops and s.lose)] or SCENES
        rng = random.Random(f"{seed}-words-eval")
        self._held: set[str] = set()
        self.eval_problems: list[Problem] = []
        for _ in range(50 * n_eval):  # bounded: a tiny space (max_value=2, ops='*') holds few distinct texts
            if len(self.eval_problems) == n_eval:
                break
            wp = self.generate(rng)
            if wp.text not in self._held:
                self._held.add(wp.text)
                self.eval_problems.append(Problem(-(len(self.eval_problems) + 1), wp.text, str(wp.value)))

    def _n_steps(self, rng: random.Random) -> int:
        return rng.choices(range(1, self.max_steps + 1), weights=[2.0**-k for k in range(self.max_steps)])[0]

    def generate(self, rng: random.Random) -> WordProblem:
        """One problem drawn from ``rng``: the operations first, then a scene and phrasings to tell them."""
        k = self._n_steps(rng)
        scene = rng.choice(self._scenes)
        plain = [o for o in self.ops if (o == "+" and scene.gain) or (o == "-" and scene.lose)]
        p_mul = 1 / len(set(self.ops))  # each allowed operator about as often as the others
        mul_start = "*" in self.ops and (not plain or rng.random() < p_mul)
        # at most one multiplication per story: two make answers in the hundreds, too hard for a small model
        times_end = (not mul_start and k >= 1 and "*" in self.ops and bool(scene.times)
                     and (not plain or rng.random() < p_mul))
        n_plain = (k - int(mul_start) - int(times_end)) if plain else 0
        ops = [rng.choice(plain) for _ in range(n_plain)]
        # Every number is at least 2 (the objects are plural nouns) and a subtraction leaves at least 1, so
        # the start is large enough for all the subtractions that follow: 1 + 2 per subtraction.
        if mul_start:
            start: tuple[int, ...] = (rng.randint(2, self._max_mul), rng.randint(2, self._max_mul))
        else:
            start = (rng.randint(min(self.max_value, 1 + 2 * max(1, ops.count("-"))), self.max_value),)
        value = start[0] if len(start) == 1 else start[0] * start[1]
        steps: list[tuple[str, int]] = []
        for j, op in enumerate(ops):
            room = min(self.max_value, value - 1 - 2 * ops[j + 1:].count("-"))
            if op == "-" and room < 2:  # only where max_value is too small for every subtraction
                if "+" not in plain:
                    continue
                op = "+"
            n = rng.randint(2, room) if op == "-" else rng.randint(2, self.max_value)
            steps.append((op, n))
            value = value + n if op == "+" else value - n
        if times_end:
            steps.append(("*", rng.randint(2, self._max_mul)))
        text, start = self._render(rng, scene, start, steps)
        return WordProblem(text, start, tuple(steps))

    @staticmethod
    def _render(rng: random.Random, scene: Scene, start: tuple[int, ...],
                steps: list[tuple[str, int]]) -> tuple[str, tuple[int, ...]]:
        """The story, and the start's operands in the order it mentions them."""
        name, he, him, his = rng.choice(NAMES)
        other = rng.choice([n for n, *_ in NAMES if n != name])
        slots = {"name": name, "he": he, "him": him, "his": his, "He": he.capitalize(), "His": his.capitalize(),
                 "other": other, "rel": rng.choice(RELATIVES), "obj": rng.choice(scene.objects)}
        if len(start) == 1:
            parts = [rng.choice(scene.start).format(a=start[0], **slots)]
        else:
            template = rng.choice(scene.start_mul)
            parts = [template.format(a=start[0], b=start[1], **slots)]
            if template.index("{b}") < template.index("{a}"):
                start = start[::-1]
        used: set[str] = set()
        for op, n in steps:
            if op == "*":
                parts.append(rng.choice(scene.times).format(n=n, **slots))
                break
            options = scene.gain if op == "+" else scene.lose
            template = rng.choice([t for t in options if t not in used] or options)  # no sentence twice
            used.add(template)
            parts.append(template.format(n=n, **slots))
        else:  # "... left?" only reads right after something was taken away
            took = any(op == "-" for op, _ in steps)
            parts.append(rng.choice([q for q in scene.question if took or "left" not in q]).format(**slots))
        return " ".join(p[0].upper() + p[1:] for p in parts), start

    def train_problem(self, index: int) -> Problem:
        """Training problem number ``index`` (deterministic, never a held-out text)."""
        rng = random.Random(f"{self.seed}-words-train-{index}")
        while True:
            wp = self.generate(rng)
            if wp.text not in self._held:
                return Problem(index, wp.text, str(wp.value))

    def epoch_of(self, index: int) -> int:
        """0: a generated stream draws fresh problems, it never completes a pass over a fixed set."""
        return 0

    @property
    def alphabet(self) -> str:
        chars = set(string.digits) | {c for s in _all_strings() for c in s}
        chars |= {c.upper() for s in _all_strings() for c in s[:1]}  # sentence starts are capitalised
        return "".join(sorted(chars))

    def max_prompt_chars(self) -> int:
        """A bound: the longest start, steps and question, every slot filled with its longest value."""
        longest = {"name": max((n for n, *_ in NAMES), key=len), "other": max((n for n, *_ in NAMES), key=len),
                   "he": "she", "him": "him", "his": "his", "He": "She", "His": "His",
                   "rel": max(RELATIVES, key=len), "a": "9" * len(str(self.max_value)),
                   "b": "9" * len(str(self.max_value)), "n": "9" * len(str(self.max_value))}

        def size(templates: tuple[str, ...], fill: dict[str, str]) -> int:  # longest rendering, with its space
            return max((len(t.format(**fill)) + 1 for t in templates), default=0)

        best = 0
        for s in SCENES:
            fill = dict(longest, obj=max(s.objects, key=len))
            start = max(size(s.start, fill), size(s.start_mul, fill))
            step = max(size(s.gain, fill), size(s.lose, fill))
            end = max(size(s.question, fill), size(s.times, fill))
            best = max(best, start + self.max_steps * step + end)
        return best

    def max_answer_chars(self) -> int:
        v = max(self.max_value, self._max_mul**2 if "*" in self.ops else 0)
        for _ in range(self.max_steps):
            v = max(v + self.max_value, v * self._max_mul if "*" in self.ops else 0)
        return len(str(v))


def _all_strings() -> list[str]:
    """Every piece of text a story is made of, template slots removed."""
    out = [n for n, *_ in NAMES] + ["she", "he", "her", "him", "his"] + RELATIVES + [" "]
    for s in SCENES:
        out += [*s.objects, *s.start, *s.start_mul, *s.gain, *s.lose, *s.times, *s.question]
    return [re.sub(r"\{\w+\}", "", t) for t in out]
