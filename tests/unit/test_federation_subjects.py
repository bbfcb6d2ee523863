"""Channel and bus names as NATS subject tokens (ipcbus._federation_subjects): every name maps
to one valid token that decodes back to it; long ones are hashed and stay distinct."""
from __future__ import annotations

from hypothesis import given, strategies as st

from ipcbus._federation_subjects import MAX_TOKEN, Subjects, decode_token, encode_token

_FORBIDDEN = set(". \t\r\n*>")


@given(st.text(max_size=42))  # at most 12 characters of token each: never hashed
def test_round_trip(name: str) -> None:
    token = encode_token(name)
    assert token and not (_FORBIDDEN & set(token))
    assert token.isascii()
    assert decode_token(token) == name


@given(st.text(max_size=60), st.text(max_size=60))
def test_distinct_names_distinct_tokens(a: str, b: str) -> None:
    if a != b:
        assert encode_token(a) != encode_token(b)


def test_plain_names_stay_readable() -> None:
    assert encode_token("jobs") == "jobs"
    assert encode_token("/ipcbus/queryState") == "/ipcbus/queryState"
    assert encode_token("a.b") == "a%2Eb"
    assert encode_token("x y*>") == "x%20y%2A%3E"
    assert encode_token("") == "%"
    assert encode_token("%") == "%25"


def test_long_names_are_hashed_and_distinct() -> None:
    long_a, long_b = "é" * 1000, "é" * 999 + "e"
    ta, tb = encode_token(long_a), encode_token(long_b)
    assert ta.startswith("#") and len(ta) <= MAX_TOKEN and ta != tb
    assert decode_token(ta) is None


def test_subjects_of_a_bus() -> None:
    s = Subjects("my.bus", "L1")
    assert s.channel("a.b") == "ipcbus.my%2Ebus.c.a%2Eb"
    assert s.inbox == "ipcbus.my%2Ebus.l.L1" and s.to_link("L2") == "ipcbus.my%2Ebus.l.L2"
    assert s.reply(7) == "ipcbus.my%2Ebus.r.L1.7" and s.ctl == "ipcbus.my%2Ebus.ctl"
