"""The spawner's messages (services/worker/spawner.py): a request survives its trip whole, a malformed one is refused
before anything is started, and the replies decode to what the agent acts on."""

from __future__ import annotations

import os
import resource
import struct
from pathlib import Path

import pytest

from services.worker.spawner import (
    MAX_REQUEST,
    Request,
    RequestError,
    compiled_spawner,
    decode_reply,
    decode_request,
    encode_request,
)


def request(**overrides: object) -> Request:
    fields: dict[str, object] = {
        "uid": 200_001,
        "gid": 200_001,
        "argv": [b"sh", b"-c", b"echo 'a b' \"$X\""],
        "env": [b"PATH=/usr/bin:/bin", b"X=a=b\nc", b"EMPTY="],
        "cwd": b"/scratch/sub",
        "rlimits": [(resource.RLIMIT_NOFILE, 4096), (resource.RLIMIT_FSIZE, 2**40)],
    }
    fields.update(overrides)
    return Request(**fields)  # type: ignore[arg-type]


def test_a_request_decodes_to_what_was_encoded() -> None:
    original = request()
    assert decode_request(encode_request(original)) == original


def test_a_request_with_no_environment_and_no_rlimits_round_trips() -> None:
    original = request(env=[], rlimits=[], cwd=b"/scratch")
    assert decode_request(encode_request(original)) == original


def test_the_representation_of_a_request_shows_no_environment_value() -> None:
    assert b"a=b" not in repr(request()).encode()
    assert "3 entries" in repr(request())


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"uid": 0}, "root"),
        ({"gid": 0}, "root"),
        ({"uid": 2**32 - 1}, "root"),
        ({"argv": []}, "empty command"),
        ({"argv": [b""]}, "empty command"),
        ({"argv": [b"sh", b"a\0b"]}, "NUL"),
        ({"env": [b"X=a\0b"]}, "NUL"),
        ({"env": [b"=value"]}, "NAME=value"),
        ({"env": [b"NOVALUE"]}, "NAME=value"),
        ({"cwd": b"/"}, "/scratch"),
        ({"cwd": b"/scratchy"}, "/scratch"),
        ({"cwd": b"/scratch/../etc"}, "/scratch"),
        ({"cwd": b"/scratch/.."}, "/scratch"),
    ],
)
def test_a_request_no_job_may_make_is_refused_on_both_sides(overrides: dict[str, object], why: str) -> None:
    bad = request(**overrides)
    with pytest.raises(RequestError, match=why):
        encode_request(bad)
    # The spawner checks again what it decodes: the agent's encoder is not the only way to its socket's bytes.
    good = encode_request(request())
    forged = _reencode_unchecked(bad)
    assert forged != good
    with pytest.raises(RequestError, match=why):
        decode_request(forged)


def _reencode_unchecked(req: Request) -> bytes:
    """The wire form of `req` without the encoder's checks (what a buggy or hostile sender could write)."""
    strings = [req.cwd, *req.argv, *req.env]
    out = [struct.pack("<4sIIHHH", b"JMS1", req.uid, req.gid, len(req.rlimits), len(req.argv), len(req.env))]
    out += [struct.pack("<IQ", limit, value) for limit, value in req.rlimits]
    for value in strings:
        out += [struct.pack("<I", len(value)), value]
    return b"".join(out)


def test_a_cut_short_or_padded_or_foreign_message_is_refused() -> None:
    data = encode_request(request())
    for cut in (0, 5, len(data) // 2, len(data) - 1):
        with pytest.raises(RequestError):
            decode_request(data[:cut])
    with pytest.raises(RequestError, match="trailing"):
        decode_request(data + b"\0")
    with pytest.raises(RequestError, match="not a spawner request"):
        decode_request(b"XXXX" + data[4:])


def test_a_length_pointing_past_the_end_is_refused_not_read() -> None:
    data = bytearray(encode_request(request(rlimits=[])))
    header = struct.calcsize("<4sIIHHH")
    data[header : header + 4] = struct.pack("<I", 2**31)  # the cwd's length
    with pytest.raises(RequestError, match="truncated"):
        decode_request(bytes(data))
    data = bytearray(encode_request(request(rlimits=[])))
    data[4 + 8 : 4 + 8 + 2] = struct.pack("<H", 60_000)  # an rlimit count far past the message
    with pytest.raises(RequestError, match="truncated"):
        decode_request(bytes(data))


def test_a_request_above_the_bound_is_refused() -> None:
    with pytest.raises(RequestError, match="at most"):
        encode_request(request(env=[b"X=" + b"x" * MAX_REQUEST]))
    with pytest.raises(RequestError, match="size"):
        decode_request(b"\0" * (MAX_REQUEST + 1))


def test_replies_decode_to_what_the_agent_acts_on() -> None:
    assert decode_reply(struct.pack("<cI", b"P", 4321)) == ("pid", 4321)
    assert decode_reply(struct.pack("<ci", b"X", 3 << 8)) == ("status", 3 << 8)
    assert decode_reply(b"Ecannot mount") == ("error", "cannot mount")
    assert decode_reply(b"") == ("gone", 0)
    for junk in (b"P12", b"Q", struct.pack("<ci", b"X", 1) + b"!"):
        with pytest.raises(RequestError):
            decode_reply(junk)


def _built(repo: Path, *, mode: int = 0o755, source_later: bool = False) -> str:
    (repo / "services" / "worker").mkdir(parents=True)
    (repo / "build").mkdir(mode=0o755)
    source, binary = repo / "services" / "worker" / "spawner.c", repo / "build" / "jobmesh-spawner"
    source.write_text("/* the source */\n")
    binary.write_bytes(b"\x7fELF")
    binary.chmod(mode)
    os.utime(source, (1_000_000, 2_000_000 if source_later else 1_000_000))
    os.utime(binary, (1_500_000, 1_500_000))
    return str(binary)


def test_the_compiled_spawner_is_used_only_when_built_private_and_not_older_than_its_source(tmp_path: Path) -> None:
    assert compiled_spawner(str(tmp_path / "not-built")) is None
    assert compiled_spawner(str(tmp_path / "good")) is None  # no repo there yet
    good = _built(tmp_path / "good")
    assert compiled_spawner(str(tmp_path / "good")) == good
    _built(tmp_path / "writable", mode=0o775)  # another user could put a root program in its place
    assert compiled_spawner(str(tmp_path / "writable")) is None
    _built(tmp_path / "stale", source_later=True)  # a build not remade after a change speaks an old protocol
    assert compiled_spawner(str(tmp_path / "stale")) is None
    _built(tmp_path / "not-executable", mode=0o644)
    assert compiled_spawner(str(tmp_path / "not-executable")) is None
