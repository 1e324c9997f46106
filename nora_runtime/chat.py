"""Conversations to token ids through a tokenizer's chat template, and the token that ends an
assistant turn.

    ids = chat_token_ids(tokenizer, [{"role": "user", "content": "Hi"}])  # + generation prompt
    stops = end_of_turn_ids(tokenizer)  # e.g. (2,) for SmolLM2's <|im_end|>

Messages are dicts {"role", "content"} of strings. `check_messages` refuses what no template
should see (no messages, an empty or unprintable role, a non-string content); the template
itself may refuse more (roles that must alternate, a system message not first): that is a
`ChatTemplateError`, a ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

MAX_ROLE_CHARS = 64
_PROBE = "nora-end-of-turn-probe"  # assistant content whose suffix shows the end-of-turn token


class NoChatTemplate(RuntimeError):
    """The tokenizer has no chat template (a base model): send text or token ids instead."""


class ChatTemplateError(ValueError):
    """The chat template refused the messages (its `raise_exception`) or failed on them."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_messages(messages: Sequence[Mapping[str, object]], max_messages: int) -> None:
    """Raise ValueError unless `messages` is 1 to `max_messages` dicts whose role is a non-empty
    printable string of at most MAX_ROLE_CHARS characters and whose content is a string."""
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    if len(messages) > max_messages:
        raise ValueError(f"{len(messages)} messages; the limit is {max_messages}")
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not (isinstance(role, str) and 0 < len(role) <= MAX_ROLE_CHARS and role.isprintable()):
            raise ValueError(f"messages[{i}].role must be a printable name of 1 to "
                             f"{MAX_ROLE_CHARS} characters (system, user, assistant, tool, "
                             f"...), got {role!r:.80}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, "
                             f"got {type(content).__name__}")


def chat_token_ids(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, ending with the assistant's
    generation prompt: exactly `tokenizer.apply_chat_template(messages,
    add_generation_prompt=True, tokenize=True)`'s input_ids. Raises NoChatTemplate,
    ChatTemplateError."""
    if not has_chat_template(tokenizer):
        raise NoChatTemplate("the served model has no chat template: send prompt (text) or "
                             "token_ids instead of messages")
    try:
        out = tokenizer.apply_chat_template([dict(m) for m in messages],
                                            add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja2's TemplateError, or whatever a template's code raises
        raise ChatTemplateError(f"the chat template refused the messages: {exc}") from exc
    ids = out["input_ids"] if isinstance(out, Mapping) else out  # transformers 5: BatchEncoding
    return [int(i) for i in ids]


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """The special token the chat template writes right after an assistant's content (SmolLM2
    and ChatML: <|im_end|>, Llama 3: <|eot_id|>, Gemma: <end_of_turn>), as a 1-tuple; () when
    the template has none there or cannot be probed. Generation of a chat answer stops there."""
    if not has_chat_template(tokenizer):
        return ()
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that wants another conversation shape: no probe
        return ()
    if not isinstance(text, str) or _PROBE not in text:
        return ()
    suffix = text[text.rindex(_PROBE) + len(_PROBE):].lstrip()
    ids = tokenizer.encode(suffix, add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(t, "special", False)}
    return (ids[0],) if ids and ids[0] in special else ()


__all__ = ["ChatTemplateError", "MAX_ROLE_CHARS", "NoChatTemplate", "chat_token_ids",
           "check_messages", "end_of_turn_ids", "has_chat_template"]
