"""Generated code that is checked in: the client package's gRPC stubs (clients/python/jobmesh), so that
`pip install ./clients/python` needs nothing else from the repository. `make client-stubs` writes them;
tests/integration/test_client_package.py checks they match the protos."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "clients" / "python"
# The public protos: the gateway's services and the types they use.
PUBLIC = ("jobmesh/common/v1", "jobmesh/gateway/v1")


def _protos() -> list[str]:
    return sorted(str(p.relative_to(REPO / "protos")) for d in PUBLIC for p in (REPO / "protos" / d).glob("*.proto"))


def generate_client_stubs(dest: Path) -> list[Path]:
    """Writes the stubs (with mypy-protobuf's typed .pyi for messages and services) under `dest`; returns them."""
    site = Path(sysconfig.get_paths()["purelib"])
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    grpc_plugin = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    deps = REPO / "build" / "proto-deps"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable, "-m", "grpc_tools.protoc",
                "-I", str(REPO / "protos"), "-I", str(deps), "-I", str(site / "grpc_tools" / "_proto"),
                f"--plugin=protoc-gen-mypy={plugin}", f"--plugin=protoc-gen-mypy_grpc={grpc_plugin}",
                f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--mypy_out={tmp}", f"--mypy_grpc_out={tmp}",
                *_protos(),
            ],
            check=True,
            capture_output=True,
            cwd=REPO / "protos",
        )  # fmt: skip
        written = []
        for d in PUBLIC:
            out = dest / d.removeprefix("jobmesh/")
            out.mkdir(parents=True, exist_ok=True)
            for part in (dest / d.split("/")[1], out):
                (part / "__init__.py").touch()
            for f in sorted((Path(tmp) / d).iterdir()):
                shutil.copyfile(f, out / f.name)
                written.append(out / f.name)
        return written


if __name__ == "__main__":
    for path in generate_client_stubs(CLIENT / "jobmesh"):
        print(path.relative_to(REPO))
