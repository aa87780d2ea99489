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
