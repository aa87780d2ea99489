"""The guessing game's rows: RL prompt rows (a hidden secret in 0..n-1), played transcripts as SFT rows.

The rules live here as two pure functions, `guess_prompt` (the first user turn) and `guess_reply` (a turn's text
-> "higher" / "lower" / "invalid", or None for the right number), shared by the transcripts below and the
environment that plays the game (optsys.rollout.games.GuessingGame). Everything here only makes dicts: no
engine, no tokenizer.
"""

from __future__ import annotations

import hashlib
import math
import random
import re


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def guess_prompt(n: int) -> str:
    return f"Guess a number from 0 to {n - 1}."


def _parse_guess(text: str) -> int | None:
    m = re.fullmatch(r"\s*(\d{1,6})\s*", text)
    return int(m.group(1)) if m else None


def guess_reply(text: str, *, secret: int, n: int) -> str | None:
    """The game's reply to a turn's text: None for the right number, else "higher" / "lower", or "invalid" (not
    a number in 0..n-1)."""
    guess = _parse_guess(text)
    if guess is None or guess >= n:
        return "invalid"
    if guess == secret:
        return None
    return "higher" if secret > guess else "lower"


def guess_rows(split: str, count: int, *, n: int = 10, seed: int = 0) -> list[dict]:
    """`count` games of `split` ("train" / "test"): each a row {"secret", "n", "game", "prompt", "answer"}.

    Game keys f"guess-{n}-{seed}-{k}" fall into test for 1 key in 8 (by hash) and the secret is another hash
    of the key, so the split is fixed and deterministic. The prompt text is the same for every game (the
    secret is hidden), so held-out games test play against unseen secret sequences, not unseen prompts."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rows, k = [], 0
    while len(rows) < count:
        key = f"guess-{n}-{seed}-{k}"
        k += 1
        if ("test" if _hash(key) % 8 == 0 else "train") != split:
            continue
        secret = _hash(key + "/secret") % n
        rows.append({"secret": secret, "n": n, "game": key, "answer": str(secret),
                     "prompt": [{"role": "user", "content": guess_prompt(n)}]})
    return rows


def guess_transcript(row: dict, strategy: str = "binary", *, max_turns: int | None = None) -> list[dict]:
    """A played game as chat messages. "binary": guess the middle of the interval still possible (always wins in
    ceil(log2(n+1)) turns); "random": a uniform guess in that interval (seeded by the game: legal but slower
    play, an SFT start that RL can improve on). Stops after max_turns guesses if given."""
    if strategy not in ("binary", "random"):
        raise ValueError(f"strategy must be 'binary' or 'random', got {strategy!r}")
    if row["n"] < 2:
        raise ValueError(f"GuessingGame needs n >= 2, got {row['n']}")
    n, secret = int(row["n"]), int(row["secret"])
    if not 0 <= secret < n:
        raise ValueError(f"GuessingGame: secret {secret} is outside 0..{n - 1}")
    rng = random.Random(row["game"] + "/play")
    messages = [{"role": "user", "content": guess_prompt(n)}]
    lo, hi = 0, row["n"] - 1
    turns = 0
    while max_turns is None or turns < max_turns:
        guess = (lo + hi) // 2 if strategy == "binary" else rng.randint(lo, hi)
        messages.append({"role": "assistant", "content": str(guess)})
        turns += 1
        reply = guess_reply(str(guess), secret=secret, n=n)
        if reply is None:
            break
        messages.append({"role": "user", "content": reply})
        lo, hi = (guess + 1, hi) if reply == "higher" else (lo, guess - 1)
    return messages


def guess_sft_rows(split: str, count: int, *, n: int = 10, seed: int = 0, strategy: str = "binary",
                   max_turns: int | None = None) -> list[dict]:
    """SFT rows {"messages": [...]} of played games: they teach the format (one number per turn) and the rules."""
    return [{"messages": guess_transcript(r, strategy, max_turns=max_turns)}
            for r in guess_rows(split, count, n=n, seed=seed)]


def binary_search_turns(n: int) -> int:
    """Turns binary search needs in the worst case: the max_turns at which perfect play always wins."""
    return math.ceil(math.log2(n + 1))
