"""The Ray engine's notice inbox reads hostile input: nothing is parsed before the
token, lines are bounded, and a bad connection is closed alone."""

from __future__ import annotations

from kiln.compute.backends.ray import MAX_NOTICE, Inbox

TOKEN = "t0k3n"  # noqa: S105  a test token


def test_notices_after_the_token_are_read_across_chunks() -> None:
    inbox = Inbox(TOKEN)
    assert inbox.feed("a", b"t0k") == ([], True)
    assert inbox.feed("a", b'3n\n{"run": "r", "att') == ([], True)
    assert inbox.feed("a", b'empt": 1}\n{"run": "s"}\n') == (
        [{"run": "r", "attempt": 1}, {"run": "s"}],
        True,
    )


def test_nothing_is_parsed_before_the_token_and_a_wrong_one_closes() -> None:
    inbox = Inbox(TOKEN)
    assert inbox.feed("a", b'{"run": "r"}\n') == ([], False)
    assert inbox.feed("b", b"x" * 200) == ([], False)  # no token line within 128 bytes
    assert inbox.feed("c", b"t0k3n-but-longer\n") == ([], False)


def test_garbage_or_huge_lines_close_only_their_connection() -> None:
    inbox = Inbox(TOKEN)
    assert inbox.feed("good", b"t0k3n\n") == ([], True)
    assert inbox.feed("bad", b"t0k3n\nnot json\n") == ([], False)
    assert inbox.feed("list", b"t0k3n\n[1]\n") == ([], False)
    assert inbox.feed("huge", b"t0k3n\n" + b"x" * (MAX_NOTICE + 1)) == ([], False)
    assert inbox.feed("good", b'{"run": "r"}\n') == ([{"run": "r"}], True)
