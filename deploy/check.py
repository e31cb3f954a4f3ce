"""Checks the deploy/ files that can be checked without a cluster: Kubernetes manifests parse
and carry what the DaemonSets need, the Grafana dashboard uses only metric names the code
exports, the Dockerfiles copy binaries that exist. (promtool checks prometheus.yml; see
scripts/test.sh.) Prints 'N passed, N failed'."""
import json, os, re, sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
results = []


def check(name, ok, why=""):
    results.append(ok)
    print(("PASS " if ok else "FAIL ") + name + ("" if ok else f": {why}"))


docs = {}
for f in sorted(os.listdir(os.path.join(HERE, "k8s"))):
    with open(os.path.join(HERE, "k8s", f)) as fh:
        for d in yaml.safe_load_all(fh):
            check(f"k8s/{f} has apiVersion/kind/metadata.name", all(k in d for k in ("apiVersion", "kind")) and "name" in d["metadata"])
            docs[(d["kind"], d["metadata"]["name"])] = d

for name, gpu in (("pool-managerd-gpu", True), ("pool-managerd-cpu", False)):
    d = docs.get(("DaemonSet", name))
    check(f"DaemonSet {name} exists", d is not None)
    if not d:
        continue
    spec = d["spec"]["template"]["spec"]
    c = spec["containers"][0]
    check(f"{name}: selector matches template labels",
          d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items())
    check(f"{name}: liveness and readiness on /health",
          c["livenessProbe"]["httpGet"]["path"] == "/health" and c["readinessProbe"]["httpGet"]["path"] == "/health")
    ann = d["spec"]["template"]["metadata"]["annotations"]
    check(f"{name}: prometheus scrape annotations", ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "9200")
    check(f"{name}: node selector", bool(spec.get("nodeSelector")))
    if gpu:
        check(f"{name}: requests nvidia.com/gpu", c["resources"]["limits"].get("nvidia.com/gpu") == 1)
    cm = docs[("ConfigMap", "llorch-pool")]
    cfg = c["args"][c["args"].index("--config") + 1].split("/")[-1]
    check(f"{name}: its config {cfg} is in the ConfigMap", cfg in cm["data"])

# metric names used by the dashboard exist in the code
src = ""
for d in ("crates/llorch-http/src", "crates/pool-core/src"):
    for f in os.listdir(os.path.join(ROOT, d)):
        src += open(os.path.join(ROOT, d, f)).read()
dash = json.load(open(os.path.join(HERE, "grafana", "llorch.json")))
names = set()
for p in dash["panels"]:
    for t in p["targets"]:
        names |= set(re.findall(r"\b((?:llorch|pool_mgr)_[a-z_]+)", t["expr"]))
for n in sorted(names):
    base = re.sub(r"_(bucket|sum|count)$", "", n)
    check(f"dashboard metric {n} is exported", f'"{base}"' in src, "not found in the code")

for f in ("Dockerfile.cpu", "Dockerfile.cuda"):
    text = open(os.path.join(HERE, "docker", f)).read()
    bins = re.findall(r"target/release/([a-z-]+)", text)
    check(f"docker/{f} copies known binaries", bins and set(bins) <= {"pool-managerd", "llorch-cpu", "llorch-cuda", "llorch"}, bins)

unit = open(os.path.join(HERE, "systemd", "pool-managerd.service")).read()
check("systemd unit starts pool-managerd with a config", "ExecStart=/usr/local/bin/pool-managerd --config" in unit)

failed = results.count(False)
print(f"{len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
