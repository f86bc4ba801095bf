"""How ComfyUI describes a Python exception in its JSON replies and events."""

import traceback


def full_type_name(exception: BaseException) -> str:
    """`KeyError`, `re.error`: the qualified name ComfyUI puts in `exception_type`."""
    klass = type(exception)
    if klass.__module__ == "builtins":
        return klass.__qualname__
    return f"{klass.__module__}.{klass.__qualname__}"


def traceback_lines(exception: BaseException) -> list[str]:
    return traceback.format_tb(exception.__traceback__)
