import pytest

from optsys.data.tasks import TASKS, get_task

SINGLE_TURN = sorted(n for n, t in TASKS.items() if not getattr(t, "environment", None))


@pytest.mark.parametrize("name", SINGLE_TURN)
def test_splits_are_disjoint_and_deterministic(name):
    task = get_task(name)
    diff = 2 if name.startswith("arithmetic") else 4
    train = task.problems("train", 300, difficulty=diff, seed=0)
    test = task.problems("test", 100, difficulty=diff, seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert len({p.prompt for p in train}) == 300
    assert task.problems("test", 100, difficulty=diff, seed=0) == test
    # a different seed draws different problems, still from the same fixed split
    other = task.problems("test", 100, difficulty=diff, seed=1)
    assert other != test and not {p.prompt for p in other} & {p.prompt for p in train}


def test_arithmetic_answers_and_checker():
    task = get_task("arithmetic")
    for p in task.problems("train", 50, difficulty=3):
        a, b = p.prompt.rstrip("=").split("+")
        assert int(p.answer) == int(a) + int(b)
        assert task.check(f" {p.answer} ", p.answer)
        assert not task.check(p.answer + "0", p.answer)


@pytest.mark.parametrize("name", SINGLE_TURN)
def test_rows_pairs_and_prompts(name):
    task = get_task(name)
    rows = task.sft_rows("train", 20, difficulty=3)
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    pairs = task.preference_pairs("test", 50, difficulty=3)
    for pair in pairs:
        assert pair["chosen"] != pair["rejected"]
        assert not task.check(pair["rejected"], pair["chosen"])
    prompts = task.rl_prompts("test", 10, difficulty=3)
    assert all(task.check(p["answer"], p["answer"]) for p in prompts)


def test_too_many_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct test problems"):
        get_task("arithmetic").problems("test", 100, difficulty=1)


def test_reversed_arithmetic_writes_sums_backwards():
    for p in get_task("arithmetic_reversed").problems("train", 30, difficulty=2, seed=3):
        a, b = p.prompt.rstrip("=").split("+")
        assert int(p.answer[::-1]) == int(a) + int(b)
    for pair in get_task("arithmetic_reversed").preference_pairs("train", 20, difficulty=2):
        a, b = pair["prompt"][-1]["content"].rstrip("=").split("+")
        assert int(pair["chosen"][::-1]) == int(a) + int(b) != int(pair["rejected"][::-1])


def test_the_multi_turn_guess_task_emits_games_transcripts_and_fixed_splits():
    """data.task=guess: RL rows carry the secret (n = 5 x difficulty), split by the game key; SFT rows are played
    transcripts of legal play that end with the winning guess."""
    task = get_task("guess")
    train, test = task.rl_prompts("train", 200, difficulty=2), task.rl_prompts("test", 30, difficulty=2)
    assert not {r["game"] for r in train} & {r["game"] for r in test}
    assert all(0 <= r["secret"] < 10 and r["answer"] == str(r["secret"]) for r in train + test)
    assert task.rl_prompts("test", 30, difficulty=2) == test
    rows = task.sft_rows("train", 20, difficulty=2)
    for row, game in zip(rows, task.rl_prompts("train", 20, difficulty=2)):
        turns = row["messages"]
        assert turns[-1]["role"] == "assistant" and turns[-1]["content"] == game["answer"]  # ends on the win
        assert [m["role"] for m in turns[:2]] == ["user", "assistant"]


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_word_problems_are_worked_out_right_at_each_difficulty(difficulty):
    """Every solution's equations are right and chain into the answer; it ends "The answer is N."; the steps are
    min(difficulty, 3) and the stated numbers stay within the difficulty's size; the answer rule reads the
    solution as the answer."""
    import re

    from optsys.data.answers import numeric_answer
    from optsys.data.word_problems import INSTRUCTION, largest_number

    ops = {"+": int.__add__, "-": int.__sub__, "x": int.__mul__, "/": int.__floordiv__}
    seen_ops = set()
    for p in get_task("word_problems").problems("train", 200, difficulty=difficulty, seed=5):
        question, instruction = p.prompt.split("\n")
        assert instruction == INSTRUCTION and "The answer is" in instruction
        equations = re.findall(r"(\d+) ([-+x/]) (\d+) = (\d+)", p.solution)
        assert len(equations) == min(difficulty, 3), p.solution
        for a, op, b, c in equations:
            assert ops[op](int(a), int(b)) == int(c), p.solution
            if op == "/":
                assert int(a) % int(b) == 0
            seen_ops.add(op)
        assert int(equations[-1][3]) == int(p.answer) >= 0
        assert p.solution.endswith(f"The answer is {p.answer}.")
        assert numeric_answer(p.solution) == int(p.answer)
        assert max(int(n) for n in re.findall(r"\d+", question)) <= largest_number(difficulty)
    if difficulty >= 2:
        assert seen_ops == set(ops)


def test_word_problems_vary_and_their_splits_share_no_question():
    task = get_task("word_problems")
    train = task.problems("train", 3000, difficulty=2, seed=0)
    test = task.problems("test", 400, difficulty=2, seed=0)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert task.problems("test", 400, difficulty=2, seed=0) == test  # seeded
    firsts = {p.prompt.split()[0] for p in train}
    questions = {p.prompt.split("?")[0].rsplit(". ", 1)[-1].split()[2] for p in train}  # "How many <object>"
    assert len(firsts) >= 15 and len(questions) >= 15  # names (and "There") and objects
    # SFT rows train the worked solution; a preference pair's rejected side is a solution with a wrong answer
    (row,) = task.sft_rows("train", 1, difficulty=2)
    assert row["messages"][-1]["content"] == train[0].solution
    from optsys.data.answers import numeric_answer

    for pair in task.preference_pairs("train", 50, difficulty=2):
        assert numeric_answer(pair["chosen"]) != numeric_answer(pair["rejected"])
        assert pair["rejected"].endswith(f"The answer is {numeric_answer(pair['rejected']):.0f}.")


def test_each_task_matches_answers_by_its_rule():
    """Numeric where the answer is a number; exact only where the answer's form is the task (the help says so)."""
    from optsys.eval.tasks import EVAL_TASKS

    assert {n: t.match for n, t in TASKS.items() if n in SINGLE_TURN} == {
        "arithmetic": "numeric", "word_problems": "numeric", "arithmetic_reversed": "exact", "sorting": "exact"}
    for name in SINGLE_TURN:
        assert EVAL_TASKS[name].match == TASKS[name].match
        assert TASKS[name].match in EVAL_TASKS[name].description


def test_a_natural_sentence_scores_on_numeric_tasks_only():
    """A real model answers "12+34=" with a sentence: numeric tasks read its number; exact tasks keep their form."""
    from optsys.data.answers import answers_match, canonical_answer, canonical_reference

    def right(task: str, completion: str, answer: str) -> bool:
        match = TASKS[task].match
        return answers_match(canonical_answer(completion, match), canonical_reference(answer, match), match)

    assert right("arithmetic", "The number 59 + 19 = 78.", "78")
    assert right("word_problems", "She has 9 + 3 = 12 now. The answer is 12.", "12")
    assert not right("arithmetic", "The number 59 + 19 = 79.", "78")
    assert not right("arithmetic_reversed", "2", "02") and right("arithmetic_reversed", " 02 ", "02")
