"""A user reward that always fails, loaded by dotted path in tests/test_rlp.py."""


def always_raises(inp):
    raise RuntimeError("this reward is broken on purpose")


always_raises.needs = frozenset()
