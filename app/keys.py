"""Every key of the chat app in one table, without Textual: the app binds them and lists them in
its command palette, ``z2z-chat --help`` prints them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    name: str
    keys: str
    title: str
    help: str
    show: bool = True


# One table makes both the key bindings and the command palette (Ctrl+P).
ACTIONS = [
    Action("stop", "escape", "Stop reply", "Stop the reply being written"),
    Action("new_chat", "ctrl+n", "New chat", "Start a new conversation"),
    Action("regenerate", "ctrl+r", "Regenerate", "Answer the last message again (the old reply stays as a branch)"),
    Action("toggle_units", "ctrl+t", "Hypertokens", "Colour replies by base token / hypertoken (plain text)"),
    Action("stats", "f3", "Stats", "Compression per turn"),
    Action("export", "f4", "Export", "Write this conversation, every branch, to a Markdown file"),
    Action("export_all", "f6", "Export all", "Write every conversation, every branch, to a JSON Lines file", False),
    Action("import_file", "f7", "Import", "Import conversations: our JSON Lines, or a JSON list of {role, content}",
           False),
    Action("system_prompt", "f5", "System prompt", "Change the system prompt of this conversation", False),
    Action("settings", "f8", "Settings", "max_tokens, temperature, top_p, top_k, repetition_penalty, "
           "lookahead (greedy only)", False),
    Action("rename", "f2", "Rename", "Change the title of this conversation", False),
    Action("delete", "f12", "Delete chat", "Delete this conversation from the history", False),
    Action("open_model", "f9", "Open model", "Load another zip2zip checkpoint", False),
    Action("attach", "ctrl+o", "Attach file", "Attach a text file to the next message (also: /file PATH)"),
    Action("search", "ctrl+f", "Search", "Search every conversation; Enter opens one at the message found"),
    Action("toggle_sidebar", "ctrl+b", "Chats", "Show or hide the list of chats (hidden by itself under 60 columns)"),
]

# keys of a chat entry once it has the focus (Tab / Shift+Tab, or a click); widgets.py binds them
ENTRY_KEYS = [("e", "edit your message: Enter sends it as a new branch, the old one is kept"),
              ("c", "copy the message"), ("y", "copy the code blocks of a reply"),
              ("< >", "switch between the branches at this message")]
INPUT_KEYS = [("Enter", "send"), ("Ctrl+J", "new line"), ("Up/Down", "in an empty input: messages sent before"),
              ("Tab", "after /file: complete the path")]
# Textual's own keys, listed so --help names every key
APP_KEYS = [("Ctrl+Q", "quit (a reply being written is saved, marked stopped)"),
            ("Ctrl+P", "every action, searchable (the command palette)"),
            ("Ctrl+C", "copy the selected text")]
# typed in the message box instead of a message; anything else starting with "/" and one word is refused
SLASH_COMMANDS = [("/file PATH ...", "attach text files to the next message (Tab completes the path)"),
                  ("/detach [NAME]", "remove an attached file (all of them without a name)"),
                  ("/help", "list these commands")]


def _key(k: str) -> str:
    return {"escape": "Esc"}.get(k, k.replace("ctrl+", "Ctrl+").upper() if k.startswith("f") else k.replace("ctrl+", "Ctrl+").title())


def help_text() -> str:
    """The keys, for ``--help``."""
    sections = [("keys in the app:", [(_key(a.keys), a.help) for a in ACTIONS] + APP_KEYS),
                ("in the message box:", INPUT_KEYS + SLASH_COMMANDS),
                ("on a message (Shift+Tab from the message box reaches them):", ENTRY_KEYS)]
    width = max(len(k) for _, rows in sections for k, _ in rows)
    return "\n".join(line for title, rows in sections for line in [title] + [f"  {k:<{width}}  {h}" for k, h in rows])
