#!/usr/bin/env bash
# Submit the SSIM audit to a running Ray cluster with `ray job submit`.
#
#   RAY_ADDRESS=http://HEAD:8265 scripts/submit_cluster.sh source=parquet \
#       source.url=s3://bucket/pairs/manifest.parquet output.url=s3://bucket/audits/run1 [more overrides]
#
# - The working folder (this repository, without .git, .venv, outputs, docs) is uploaded; every node's
#   Python must already have ssim_ray's dependencies (`pip install '.[s3]'`, or a CUDA torch first).
# - output.url is required: the job's working folder on the cluster is temporary, so results must go to
#   storage every node and you can reach (s3://, gs://, a shared file system).
# - No secrets travel with the job: runtime-environment variables show in the dashboard and logs
#   (ray issue #28276). Nodes read storage credentials from their own environment or instance roles.
# - Token authentication: this shell needs the cluster's token (RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN or
#   ~/.ray/auth_token) when the cluster runs with RAY_AUTH_MODE=token.
# - Resuming: submit again with the same output.url; committed shards are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265}"
has_output=""
for arg in "$@"; do
  case "$arg" in output.url=*) has_output=1 ;; esac
done
if [ -z "$has_output" ]; then
  echo "submit_cluster.sh: pass output.url=<URL every node can write, e.g. s3://bucket/audit>" >&2
  exit 2
fi
exec "${RAY:-ray}" job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env-json '{"excludes": [".git", ".venv", "outputs", "multirun", "docs", ".whl", ".peers", ".pytest_cache"]}' \
  -- "${PYTHON:-python}" -m jobs.ssim_audit "$@"
