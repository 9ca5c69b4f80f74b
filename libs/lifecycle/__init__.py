"""One home for the job lifecycle: states and transitions, the records' codec, routing and fit, and every etcd
transaction on a job record. Services call in here; none of them writes a job record any other way.

- `codec`: bytes <-> Job, Worker, Assignment (the one decoder of each).
- `routing`: which pools a spec fits (`fits`), which queue a job waits in, which queues a pool serves.
- `transitions`: every state change of a job, as a pure function of the record and the time.
- `txns`: the etcd transactions (compares + ops) that write those changes, built from what the caller read.
- `store`: `JobStore`, the I/O: it reads, calls `txns`, and commits.
"""
