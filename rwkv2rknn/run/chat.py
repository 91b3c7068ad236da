"""The terminal chat loop both `run --chat` entry points share (plain and speculative): User:/Bot: turns read from
stdin, each a prompt in the chat template; the conversation lives in the recurrent state, never re-fed."""

from __future__ import annotations

import sys
from collections.abc import Callable

TURN = "User: {line}\n\nBot:"  # what a user's line becomes before the model answers
STOP = "\n\n"                  # an answer ends at a blank line


def chat_loop(answer: Callable[[str], str], end_turn: Callable[[], None], write: Callable[[str], None]) -> int:
    """answer(prompt): feed the turn's prompt, write "Bot:" and the answer, return its text; end_turn(): feed the
    blank line an answer cut short did not end with, so the next "User:" starts a fresh paragraph."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            write("User: ")
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if line == "/quit":
            break
        if not line:
            continue
        text = answer(TURN.format(line=line))
        if not text.endswith(STOP):
            end_turn()
            write("\n\n" if not text.endswith("\n") else "\n")
    return 0
