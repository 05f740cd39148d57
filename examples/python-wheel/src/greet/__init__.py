"""A tiny package for buildcell's wheel example."""


def greet(name: str) -> str:
    return f"hello, {name}"
