"""
Conversations from your own JSONL file (e.g. identity / personality data for SFT). Training only.

Each non-empty line is either a JSON list of messages or an object {"messages": [...]}, each message
{"role": "user"|"assistant", "content": str}, alternating and starting with user (an optional leading
system message is folded into the first user turn). The whole file is checked on load; a bad line raises
ValueError naming the file and line number.
"""

import json
import os

from tasks.common import Task, fold_system_message, validate_messages


def read_conversations(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CustomJSON: no such file: {path}")
    conversations = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(item, dict):
                if "messages" not in item:
                    raise ValueError(f"{where}: an object line needs a 'messages' key")
                item = item["messages"]
            validate_messages(item, where=where)
            if item[-1]["role"] != "assistant":
                raise ValueError(f"{where}: the last message must be from the assistant (nothing to learn otherwise)")
            for k, message in enumerate(item):
                if not isinstance(message["content"], str) or not message["content"].strip():
                    raise ValueError(f"{where}: message {k} content must be a non-empty string")
            conversations.append(fold_system_message(item))
    if not conversations:
        raise ValueError(f"CustomJSON: {path} contains no conversations")
    return conversations


class CustomJSON(Task):

    def __init__(self, filepath, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.filepath = filepath
        self.conversations = read_conversations(filepath)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
