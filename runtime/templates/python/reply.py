"""The addon's logic, apart from the host so that ``python3 -m unittest`` runs it."""

import re


def reply_chunks(message):
    """The reply to ``message``, in the chunks it is streamed in: one per word."""
    return [chunk for chunk in re.findall(r"[^ ]* ?", f"You said: {message}") if chunk]
