"""The developer's tools, not part of any deployable: the launcher of a whole mesh on this machine (`jobmesh run`)
with its supervisor, and the dev CLI (`.venv/bin/jobmesh`: tokens, PKI, cost reports, etcd maintenance)."""
