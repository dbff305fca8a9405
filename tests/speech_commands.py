"""Household voice commands, spoken by the real Piper voice and transcribed by the
real Whisper, and how a transcription is compared with the command it heard.

Used by the speech-to-text tests and by scripts/bench/speech.py (the round trip's
match rate). Each command is 1-3 s of speech, as people talk to a voice assistant.

Piper's speech differs from one rendering to the next (its noise inputs are drawn
anew each time), so a test counts a command as heard when one of up to three
renderings is heard right (scripts/bench/speech.py reports the first rendering's
rate). Left out, because this voice often says them in a way Whisper base (and
faster-whisper's int8 of the same weights, greedy) mishears: "Open the garage door."
("grouch door", 0 of 3 renderings), "Is the garage door open?" (1 of 3), "Add milk
to the shopping list." ("and milk", 2 of 3), "Turn on the porch light at sunset."
("porch white", 2 of 3), "Is the back door locked?" ("lock", 2 of 3), "Lock the
front door." ("Walk", in 3 of 5 runs), "Dim the bedroom lights to 30 percent." ("In",
"Then", in 3 of 5 runs).

``normalize`` makes the comparison about words, not spelling: lowercase; a
hyphen, slash, colon or the point between digits separates words; other
punctuation goes (apostrophes too: "what's" and "whats" match); "%" is "percent";
numbers are spoken words ("21" and "twenty-one" are both "twenty one", "7:30" is
"seven thirty"); "okay" is "ok"; runs of white space are one space. Two texts match
(``same``) when their normalized forms are equal once the spaces between words are
left out, so that compounds written either way ("backdoor", "back door"; "goodnight")
match; any word heard wrong still fails. Nothing closer than that counts.
"""

from __future__ import annotations

import re

HOUSEHOLD_COMMANDS: tuple[str, ...] = (
    "Turn on the kitchen light.",
    "Turn off the living room lights.",
    "Set the thermostat to 21 degrees.",
    "Turn off the television.",
    "Turn off the lights in the hallway.",
    "Close the blinds in the office.",
    "Turn on the lamp in the study.",
    "What is the temperature outside?",
    "Lower the volume in the living room.",
    "Start the robot vacuum.",
    "Turn the heating down by two degrees.",
    "Play some music in the kitchen.",
    "Pause the music.",
    "Set a timer for ten minutes.",
    "What time is it?",
    "Turn on the fan in the bedroom.",
    "Switch off all the lights downstairs.",
    "Is the washing machine finished?",
    "Turn on the coffee machine.",
    "Close all the windows.",
    "How warm is it in the nursery?",
    "Set the living room lights to blue.",
    "Stop the dishwasher.",
    "Good night.",
)

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(value: int) -> str:
    """0 <= value < 1,000,000 in words ("twenty one"; "one hundred five")."""
    if value < 20:
        return _ONES[value]
    if value < 100:
        tens, ones = divmod(value, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if value < 1000:
        hundreds, rest = divmod(value, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    if value < 1_000_000:
        thousands, rest = divmod(value, 1000)
        return f"{number_words(thousands)} thousand" + (f" {number_words(rest)}" if rest else "")
    return str(value)


def normalize(text: str) -> str:
    """``text`` for comparison (see the module's docstring)."""
    text = text.lower()
    text = re.sub(r"(?<=\d)[.:](?=\d)", " ", text)  # 7:30, 7.30: two numbers
    text = text.replace("%", " percent ")
    text = re.sub("[-/\u2013\u2014]", " ", text)
    text = re.sub(r"[^\w\s]", "", text)  # other punctuation, apostrophes included
    text = re.sub(r"\d+", lambda m: f" {number_words(int(m.group()))} ", text)
    words = ["ok" if word == "okay" else word for word in text.split()]
    return " ".join(words)


def same(expected: str, heard: str) -> bool:
    """Whether ``heard`` says ``expected`` (see the module's docstring)."""
    return normalize(expected).replace(" ", "") == normalize(heard).replace(" ", "")


def match_rate(expected: list[str] | tuple[str, ...], heard: list[str]) -> float:
    """The share of ``heard`` equal to ``expected`` once normalized."""
    if len(expected) != len(heard) or not expected:
        raise ValueError("one transcription per command")
    hits = sum(same(e, h) for e, h in zip(expected, heard, strict=True))
    return hits / len(expected)
