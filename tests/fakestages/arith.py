"""A helper only `square` imports, so tests can edit it and see only square go stale."""


def square(value: int) -> int:
    return value * value
