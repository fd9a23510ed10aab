#!/usr/bin/env bash
# Whole-system check on a real kind cluster: build both images, load them into kind, `helm install` the chart
# (webhook through its Service, cert from the chart), create the tiny model on the nodes, apply
# examples/tiny-local.yaml and wait until the LLMService is Ready and answers a completion through the router.
#
# Needs Docker, kind and kubectl on PATH (not available on the CI machines of this repository, which run the
# local control plane in e2e/cluster.py instead). Usage:
#   e2e/kind/run.sh                 # create cluster "baton", run, keep it
#   KEEP=0 e2e/kind/run.sh          # delete the cluster at the end
#   TORCH_INDEX=<PyTorch CPU wheel index URL> e2e/kind/run.sh   # small CPU torch in the worker image
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER="${CLUSTER:-baton}"
TAG="${TAG:-0.1.0}"
NS=baton-system
say() { printf '[kind] %s\n' "$*" >&2; }
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { say "$tool is required"; exit 1; }
done
HELM="${HELM:-$(tools/install-helm.sh)}"

if ! kind get clusters | grep -qx "$CLUSTER"; then
  say "creating kind cluster $CLUSTER (1 control plane + 2 workers: prefill and decode pools)"
  kind create cluster --name "$CLUSTER" --wait 120s --config - <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
    labels: {baton.dev/pool: prefill}
  - role: worker
    labels: {baton.dev/pool: decode}
KIND
fi
trap '[ "${KEEP:-1}" = 0 ] && kind delete cluster --name "$CLUSTER"' EXIT

say "building images"
docker build -f docker/operator.Dockerfile -t "baton/operator:$TAG" .
docker build -f docker/worker.Dockerfile ${TORCH_INDEX:+--build-arg TORCH_INDEX="$TORCH_INDEX"} -t "baton/worker:$TAG" .
kind load docker-image --name "$CLUSTER" "baton/operator:$TAG" "baton/worker:$TAG"

say "creating the tiny model on every worker node (hostPath /var/lib/baton/models/tiny-llama)"
for node in $(kind get nodes --name "$CLUSTER" | grep -v control-plane); do
  docker exec "$node" mkdir -p /var/lib/baton/models
  docker exec "$node" chown 1000:1000 /var/lib/baton/models
done
kubectl create namespace baton-models --dry-run=client -o yaml | kubectl apply -f -
for pool in prefill decode; do
  kubectl -n baton-models delete job "tiny-$pool" --ignore-not-found
  kubectl -n baton-models apply -f - <<JOB
apiVersion: batch/v1
kind: Job
metadata: {name: tiny-$pool}
spec:
  template:
    spec:
      restartPolicy: Never
      nodeSelector: {baton.dev/pool: $pool}
      securityContext: {runAsUser: 1000, runAsGroup: 1000}
      containers:
        - name: model
          image: baton/worker:$TAG
          imagePullPolicy: Never
          args: [model, tiny, /models/tiny-llama]
          volumeMounts: [{name: models, mountPath: /models}]
      volumes: [{name: models, hostPath: {path: /var/lib/baton/models}}]
JOB
done
kubectl -n baton-models wait --for=condition=complete job --all --timeout=300s

say "helm install"
"$HELM" upgrade --install baton charts/baton -n "$NS" --create-namespace --wait --timeout 180s \
  --set image.tag="$TAG" --set image.pullPolicy=Never

say "LLMService"
kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f -
# Refused by the webhook (through the chart's Service and certificate):
if kubectl apply -n demo -f - <<'BAD' 2>/tmp/baton-kind-bad.txt
apiVersion: baton.dev/v1alpha1
kind: LLMService
metadata: {name: bad}
spec: {model: {name: x, source: {hostPath: {path: /x}}}, prefill: {tensorParallel: 3}}
BAD
then say "the webhook accepted a bad LLMService"; exit 1; fi
grep -q "power of two" /tmp/baton-kind-bad.txt || { cat /tmp/baton-kind-bad.txt; exit 1; }
kubectl apply -n demo -f examples/tiny-local.yaml
kubectl -n demo wait --for=jsonpath='{.status.phase}'=Ready llmservice/tiny --timeout=600s
kubectl -n demo get llms,deploy,pods -o wide

say "a completion through the router"
kubectl -n demo run curl --rm -i --restart=Never --image=baton/worker:$TAG --image-pull-policy=Never \
  --command -- python -c "import httpx,json; r=httpx.post('http://tiny.demo.svc/v1/completions', json={'model':'tiny-llama','prompt':'The baton passes','max_tokens':8,'temperature':0}, timeout=120); print(r.status_code, r.text[:300]); assert r.status_code==200"
say "OK"
