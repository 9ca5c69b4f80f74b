"""jobmesh: the client of a jobmesh mesh (SDK and the `jobmesh` command).

    import jobmesh
    client = jobmesh.Client()            # $JOBMESH_URL, $JOBMESH_TOKEN
    job = client.submit(["sh", "-c", "echo hi"], name="hello", cpu_millis=100, memory_mb=64)
    print(jobmesh.JobState.Name(client.wait(job.job_id).state))     # JOB_STATE_SUCCEEDED
    print("".join(client.logs(job.job_id)))

`jobmesh.aio.Client` has the same methods as coroutines; errors are `jobmesh.errors.JobmeshError` subclasses.
"""

from __future__ import annotations

# In a jobmesh checkout the mesh's internal stubs (generated into gen/jobmesh) join this package's path.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

from jobmesh import aio  # jobmesh.aio.Client after a plain `import jobmesh`
from jobmesh.client import Client
from jobmesh.common.v1.types_pb2 import Job, JobSpec, JobState
from jobmesh.errors import JobmeshError

__version__ = "0.1.0"
__all__ = ["Client", "Job", "JobSpec", "JobState", "JobmeshError", "__version__", "aio"]
