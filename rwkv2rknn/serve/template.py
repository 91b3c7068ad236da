"""The RWKV World chat template: OpenAI messages -> the text an RWKV chat model continues.

    System: {system prompt}\n\nUser: {message}\n\nAssistant: {reply}\n\nUser: {message}\n\nAssistant:

One line per message, `Role: content`, messages separated by a blank line ("\\n\\n"), the prompt ending in
"Assistant:" for the model to continue. That is the format ChatRWKV's API_DEMO_CHAT.py uses for RWKV World and
RWKV-7 models ("User: " + msg + "\\n\\nAssistant:", user text with runs of newlines collapsed so "\\n\\n" only
ever separates turns), and RWKV-Runner's chat template for RWKV-5 and later (backend-python/routes/completion.py:
system messages as "System: ...", roles user/assistant/system). Messages are rendered in the order given, so a
system prompt given first comes first. Generation stops at the next blank line.
"""

from __future__ import annotations

import re

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
TURN_END = "\n\n"
GENERATION_PROMPT = "Assistant:"


def normalize(content: str) -> str:
    """One message's text: CRLF/CR -> LF, runs of newlines -> one (a blank line ends a turn), trimmed."""
    text = content.replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"\n{2,}", "\n", text).strip()


def render(messages: list[tuple[str, str]], generation_prompt: bool = True) -> str:
    """messages: (role, content) pairs with roles in ROLES. With generation_prompt the text ends in 'Assistant:'."""
    text = "".join(f"{ROLES[role]}: {normalize(content)}{TURN_END}" for role, content in messages)
    return text + GENERATION_PROMPT if generation_prompt else text


def reply_content(generated: str) -> str:
    """The assistant's message from the generated text: the model writes 'Assistant: reply', so one space goes."""
    return generated[1:] if generated.startswith(" ") else generated
