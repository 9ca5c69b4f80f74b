"""The pure parts of `jobmesh admin etcd` (libs/etcd/maintenance.py): what to compact to, the defragmentation order
and sizes as printed."""

from __future__ import annotations

import pytest

from devtools.cli import main
from libs.etcd.maintenance import MemberStatus, compaction_revision, defrag_order, size


def member(endpoint: str, leader: bool) -> MemberStatus:
    return MemberStatus(endpoint, 1, leader, 100, 10, 5, 0, ())


def test_compaction_keeps_the_newest_revisions_and_never_goes_below_zero() -> None:
    assert compaction_revision(50_000, 10_000) == 40_000
    assert compaction_revision(5_000, 10_000) == 0


def test_followers_are_defragmented_before_the_leader() -> None:
    order = defrag_order([member("c:2379", False), member("a:2379", True), member("b:2379", False)])
    assert [m.endpoint for m in order] == ["b:2379", "c:2379", "a:2379"]


@pytest.mark.parametrize(
    ("n", "text"),
    [(512, "512 B"), (2048, "2.0 KiB"), (27 * 1024**2 + 512 * 1024, "27.5 MiB"), (4 * 1024**3, "4.0 GiB")],
)
def test_sizes_print_in_binary_units(n: int, text: str) -> None:
    assert size(n) == text


def test_the_admin_etcd_verbs_exist(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["admin", "etcd", "--help"])
    out = capsys.readouterr().out
    for verb in ("status", "compact", "defrag", "disarm", "recover"):
        assert verb in out
