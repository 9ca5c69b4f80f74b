"""Unit tests for the job cgroup module (services/worker/cgroups.py): parsers, limits, layout, and what the
drivers write, against a plain directory standing in for the cgroup file systems."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.cgroups import (
    CgroupDriver,
    CgroupLimits,
    Layout,
    Mount,
    limits_for,
    parse_keyed,
    parse_mounts,
    parse_proc_cgroup,
    plan_layout,
)

V1_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V1_OWN = "8:pids:/\n4:memory:/agents/a1\n2:cpuacct:/\n1:cpu:/\n0::/\n"


@pytest.mark.parametrize(
    ("memory_mb", "cpu_millis", "expected"),
    [
        pytest.param(64, 100, CgroupLimits(64 * 1024 * 1024, 25_000, 250_000, 512), id="a tenth of a core"),
        pytest.param(1024, 2500, CgroupLimits(1 << 30, 625_000, 250_000, 512), id="two and a half cores"),
        pytest.param(1, 1, CgroupLimits(1 << 20, 1_000, 250_000, 512), id="quota floored at the kernel's 1 ms"),
    ],
)
def test_limits_are_the_jobs_request(memory_mb: int, cpu_millis: int, expected: CgroupLimits) -> None:
    assert limits_for(memory_mb, cpu_millis, 512) == expected


def test_limits_refuse_nothing_to_give() -> None:
    with pytest.raises(ValueError):
        limits_for(0, 100, 512)


def test_keyed_files_parse_and_skip_what_is_not_a_number() -> None:
    text = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\nbroken line here\nlow x\n"

    assert parse_keyed(text) == {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 2}


def test_proc_cgroup_gives_each_controller_its_path_and_v2_under_the_empty_key() -> None:
    assert parse_proc_cgroup("5:cpu,cpuacct:/a\n4:memory:/b\n1:name=systemd:/\n0::/c\n") == {
        "cpu": "/a",
        "cpuacct": "/a",
        "memory": "/b",
        "name=systemd": "/",
        "": "/c",
    }


def test_mount_points_with_escaped_spaces_are_decoded() -> None:
    [mount] = parse_mounts("cgroup2 /sys/fs/my\\040cgroup cgroup2 rw,nsdelegate 0 0\n")

    assert mount == Mount("cgroup2", "/sys/fs/my cgroup", frozenset({"rw", "nsdelegate"}))


def test_v1_is_used_when_the_v2_mount_has_no_controllers_nested_under_the_agents_groups() -> None:
    layout = plan_layout(parse_mounts(V1_MOUNTS), parse_proc_cgroup(V1_OWN), v2_controllers=set())

    assert layout == Layout(
        1,
        {
            "memory": "/sys/fs/cgroup/memory/agents/a1",
            "pids": "/sys/fs/cgroup/pids",
            "cpu": "/sys/fs/cgroup/cpu",
            "cpuacct": "/sys/fs/cgroup/cpuacct",
        },
    )


def test_v2_is_preferred_when_it_has_memory_pids_and_cpu() -> None:
    mounts = parse_mounts("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")

    layout = plan_layout(mounts, {"": "/system.slice/jobmesh.service"}, {"cpu", "memory", "pids", "io"})

    assert layout == Layout(2, {"": "/sys/fs/cgroup/system.slice/jobmesh.service"})


@pytest.mark.parametrize(
    ("mounts", "v2", "says"),
    [
        pytest.param("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", {"memory", "cpu"}, "without pids", id="v2-no-pids"),
        pytest.param("proc /proc proc rw 0 0\n", set(), "no cgroup v2 mount", id="no-cgroups-at-all"),
    ],
)
def test_no_layout_says_what_is_missing(mounts: str, v2: set[str], says: str) -> None:
    reason = plan_layout(parse_mounts(mounts), {"": "/"}, v2)

    assert isinstance(reason, str) and says in reason


def v1_driver(root: Path) -> CgroupDriver:
    parents = {c: str(root / c) for c in ("memory", "pids", "cpu", "cpuacct")}
    for path in parents.values():
        Path(path).mkdir(parents=True)
    driver = CgroupDriver(Layout(1, parents), agent_pid=4242)
    driver.start()
    return driver


def test_a_v1_job_group_gets_its_limits_in_each_hierarchy_and_one_procs_file_per_hierarchy(tmp_path: Path) -> None:
    driver = v1_driver(tmp_path)

    group = driver.create("job-1-1", limits_for(64, 250, 100))

    mem = tmp_path / "memory" / "jobmesh-worker-4242" / "job-1-1"
    assert (mem / "memory.limit_in_bytes").read_text() == str(64 * 1024 * 1024)
    cpu = tmp_path / "cpu" / "jobmesh-worker-4242" / "job-1-1"
    assert ((cpu / "cpu.cfs_quota_us").read_text(), (cpu / "cpu.cfs_period_us").read_text()) == ("62500", "250000")
    assert (tmp_path / "pids" / "jobmesh-worker-4242" / "job-1-1" / "pids.max").read_text() == "100"
    assert len(group.procs_files) == 4 and all(f.endswith("/job-1-1/cgroup.procs") for f in group.procs_files)


def test_v1_usage_comes_from_cpuacct_and_the_memory_controller(tmp_path: Path) -> None:
    driver = v1_driver(tmp_path)
    group = driver.create("job-1-1", limits_for(64, 250, 100))
    mem = tmp_path / "memory" / "jobmesh-worker-4242" / "job-1-1"
    (tmp_path / "cpuacct" / "jobmesh-worker-4242" / "job-1-1" / "cpuacct.usage").write_text("1500000000\n")
    (mem / "memory.usage_in_bytes").write_text("1048576\n")
    (mem / "memory.max_usage_in_bytes").write_text("67108864\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")

    usage = group.usage()

    assert (usage.cpu_seconds, usage.memory_bytes, usage.peak_memory_bytes, usage.oom_kills) == (
        1.5,
        1 << 20,
        64 << 20,
        1,
    )


def test_a_v2_job_group_writes_max_files_and_reads_its_events(tmp_path: Path) -> None:
    (tmp_path / "cgroup.subtree_control").write_text("cpu memory pids")
    driver = CgroupDriver(Layout(2, {"": str(tmp_path)}), agent_pid=7)
    driver.start()

    group = driver.create("job-9-2", limits_for(128, 500, 64))

    job = tmp_path / "jobmesh-worker-7" / "job-9-2"
    assert (job / "memory.max").read_text() == str(128 << 20)
    assert (job / "cpu.max").read_text() == "125000 250000"
    assert (job / "pids.max").read_text() == "64"
    assert (tmp_path / "jobmesh-worker-7" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    (job / "cpu.stat").write_text("usage_usec 250000\nuser_usec 200000\n")
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    assert (group.usage().cpu_seconds, group.usage().oom_kills) == (0.25, 1)
    assert group.procs_files == (str(job / "cgroup.procs"),)


def test_groups_left_by_an_agent_that_died_are_swept_and_a_live_agents_are_not(tmp_path: Path) -> None:
    memory = tmp_path / "memory"
    dead = memory / "jobmesh-worker-999999999" / "job-1-1"  # no such pid
    dead.mkdir(parents=True)
    live = memory / "jobmesh-worker-1" / "job-2-1"  # pid 1 is always alive
    live.mkdir(parents=True)

    v1_driver_for_memory = CgroupDriver(Layout(1, {"memory": str(memory)}), agent_pid=4242)
    v1_driver_for_memory.start()

    assert not dead.parent.exists()
    assert live.exists()
    v1_driver_for_memory.close()
    assert not (memory / "jobmesh-worker-4242").exists()


def test_a_v1_group_is_reused_with_its_counters_reset_and_only_changed_limits_written(tmp_path: Path) -> None:
    driver = v1_driver(tmp_path)
    group = driver.create("slot-1", limits_for(64, 250, 100))
    mem = tmp_path / "memory" / "jobmesh-worker-4242" / "slot-1"
    pids = tmp_path / "pids" / "jobmesh-worker-4242" / "slot-1" / "pids.max"
    (mem / "memory.max_usage_in_bytes").write_text("67108864\n")
    (mem / "memory.oom_control").write_text("oom_kill 1\n")  # the last job was OOM-killed
    pids.write_text("unchanged")
    (tmp_path / "cpu" / "jobmesh-worker-4242" / "slot-1" / "cpu.cfs_quota_us").write_text("spent")

    assert group.reuse(limits_for(128, 250, 100)) is True

    assert (mem / "memory.limit_in_bytes").read_text() == str(128 << 20)
    assert (mem / "memory.max_usage_in_bytes").read_text() == "0"
    assert pids.read_text() == "unchanged"  # same limit: not written again
    quota = tmp_path / "cpu" / "jobmesh-worker-4242" / "slot-1" / "cpu.cfs_quota_us"
    assert quota.read_text() == "62500"  # always written: a fresh CPU budget for each job
    assert group.usage().oom_kills == 0  # counted from the reuse on
    (mem / "memory.oom_control").write_text("oom_kill 3\n")
    assert group.usage().oom_kills == 2


def test_a_v1_group_with_a_process_left_in_it_is_not_reused(tmp_path: Path) -> None:
    driver = v1_driver(tmp_path)
    group = driver.create("slot-1", limits_for(64, 250, 100))
    (tmp_path / "pids" / "jobmesh-worker-4242" / "slot-1" / "cgroup.procs").write_text("12345\n")

    assert group.reuse(limits_for(64, 250, 100)) is False
