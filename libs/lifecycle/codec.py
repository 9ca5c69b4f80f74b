"""The one decoder of each stored record: job, worker, assignment, a worker's usage samples."""

from __future__ import annotations

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm


def decode_job(raw: bytes) -> t.Job:
    job = t.Job()
    job.ParseFromString(raw)
    return job


def decode_worker(raw: bytes) -> t.Worker:
    worker = t.Worker()
    worker.ParseFromString(raw)
    return worker


def decode_assignment(raw: bytes) -> t.Assignment:
    assignment = t.Assignment()
    assignment.ParseFromString(raw)
    return assignment


def assignment_for_worker(raw: bytes) -> t.Assignment:
    """An assignment as its worker gets it: without the job record it carries for recording the result."""
    assignment = decode_assignment(raw)
    assignment.ClearField("job")
    return assignment


def decode_worker_usage(raw: bytes) -> pm.WorkerUsage:
    usage = pm.WorkerUsage()
    usage.ParseFromString(raw)
    return usage
