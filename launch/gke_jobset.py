"""Train loopjax on GKE TPU node pools: one JobSet (or an xpk workload) running `loopjax train`.

  python launch/gke_jobset.py render --topology v5p:2x2x2 --num-slices 2 --image IMAGE \\
      --workdir gs://BUCKET/run [-- --config.train.steps=1000 ...]      # the manifest, to stdout
  python launch/gke_jobset.py submit ... [--build] [--dry-run]   # (docker build+push,) kubectl apply
  python launch/gke_jobset.py xpk --cluster CLUSTER ... [--dry-run] # the same job through xpk

The image is launch/Dockerfile's (`--build` builds and pushes it from this checkout). Every pod
runs the same command as launch/tpu_pod.sh's workers: `python -m loopjax.cli train --config ...
--workdir ...` with LIBTPU_INIT_ARGS from the generation's set in loopjax/parallel/xla_flags.py.
One replicated job per slice: JobSet numbers them (the `job-index` annotation becomes
MEGASCALE_SLICE_ID), GKE gives each pod TPU_WORKER_ID and TPU_WORKER_HOSTNAMES, and pod 0 of
slice 0 (a stable DNS name through JobSet's headless service) coordinates, so
jax.distributed.initialize joins every host of every slice. A preempted or failed pod restarts
the whole JobSet (up to --max-restarts), which resumes from the workdir's newest checkpoint.
--dry-run prints every command instead of running it.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "loopjax", "parallel"))
import xla_flags  # noqa: E402  (the table only: no jax needed to launch)

# GKE's node label for each generation's TPU slices.
GKE_ACCELERATOR = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice",
                   "v5p": "tpu-v5p-slice", "v6e": "tpu-v6e-slice"}


def slice_shape(topology: str) -> tuple[str, str, int, int]:
  """(generation, chip topology, hosts per slice, chips per host) of e.g. `v5p:2x2x2`."""
  gen = xla_flags.generation(topology)
  _, sep, dims = topology.partition(":")
  try:
    chips = math.prod(int(d) for d in dims.split("x"))
  except ValueError:
    chips = 0
  if gen == "gpu" or not sep or chips < 1:
    raise ValueError(f"--topology {topology!r}: want GENERATION:AxB[xC] with a TPU generation "
                     f"({', '.join(xla_flags.TPU_FLAGS)}), e.g. v5p:2x2x2 or v5e:4x4")
  # v5e/v6e slices of up to 8 chips are one host; larger slices, and v4/v5p, have 4 per host.
  per_host = chips if gen in ("v5e", "v6e") and chips <= 8 else min(chips, 4)
  return gen, dims, chips // per_host, per_host


def train_command(args) -> str:
  cmd = ["exec", "python", "-m", "loopjax.cli", "train", "--config", args.config, "--workdir",
         args.workdir, *args.overrides]
  return shlex.join(cmd)


def jobset(args) -> dict:
  gen, dims, hosts, per_host = slice_shape(args.topology)
  env = [{"name": "LIBTPU_INIT_ARGS", "value": xla_flags.flag_string(gen)},
         {"name": "LOOPJAX_DISTRIBUTED", "value": "1"},
         {"name": "JAX_COMPILATION_CACHE_DIR", "value": f"{args.workdir}/jax_cache"}]
  if args.num_slices > 1:
    annotation = lambda key: {"valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['jobset.sigs.k8s.io/{key}']"}}}
    env += [{"name": "JOBSET_NAME", **annotation("jobset-name")},
            {"name": "REPLICATED_JOB_NAME", **annotation("replicatedjob-name")},
            {"name": "MEGASCALE_SLICE_ID", **annotation("job-index")},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(args.num_slices)},
            {"name": "MEGASCALE_COORDINATOR_ADDRESS",
             "value": "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"}]
  container = {
      "name": "loopjax", "image": args.image, "imagePullPolicy": "Always",
      "command": ["bash", "-c", train_command(args)],
      "env": env,
      "ports": [{"containerPort": 8471}, {"containerPort": 8080}, {"containerPort": 8476}],
      "securityContext": {"privileged": True},
      "resources": {"limits": {"google.com/tpu": per_host}},
  }
  pod = {"restartPolicy": "Never", "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
         "terminationGracePeriodSeconds": args.grace_s,
         "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATOR[gen],
                          "cloud.google.com/gke-tpu-topology": dims},
         "containers": [container]}
  if args.spot:
    pod["nodeSelector"]["cloud.google.com/gke-spot"] = "true"
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
      "metadata": {"name": args.name, "annotations": {
          # one slice per node pool: a replicated job never spans two slices
          "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
      "spec": {
          "failurePolicy": {"maxRestarts": args.max_restarts},
          "network": {"enableDNSHostnames": True},
          "replicatedJobs": [{"name": "slice", "replicas": args.num_slices, "template": {"spec": {
              "parallelism": hosts, "completions": hosts, "completionMode": "Indexed",
              "backoffLimit": 0, "template": {"spec": pod}}}}]},
  }


def render(args) -> str:
  return yaml.safe_dump(jobset(args), sort_keys=False, width=1000)


def accelerator_type(topology: str) -> str:
  """Cloud TPU's name of a slice: v4/v5p count TensorCores (2 per chip), v5e/v6e chips."""
  gen, _, hosts, per_host = slice_shape(topology)
  chips = hosts * per_host
  return {"v4": f"v4-{2 * chips}", "v5p": f"v5p-{2 * chips}", "v5e": f"v5litepod-{chips}",
          "v6e": f"v6e-{chips}"}[gen]


def xpk_command(args) -> list[str]:
  gen = xla_flags.generation(args.topology)
  env = f"LIBTPU_INIT_ARGS={shlex.quote(xla_flags.flag_string(gen))} LOOPJAX_DISTRIBUTED=1"
  return ["xpk", "workload", "create", "--cluster", args.cluster, "--workload", args.name,
          "--tpu-type", accelerator_type(args.topology), "--num-slices", str(args.num_slices),
          "--docker-image", args.image, "--max-restarts", str(args.max_restarts),
          "--command", f"{env} {train_command(args)}"]


def build_commands(image: str) -> list[list[str]]:
  return [["docker", "build", "-f", os.path.join(ROOT, "launch", "Dockerfile"), "-t", image, ROOT],
          ["docker", "push", image]]


def run(cmds: list[list[str]], dry_run: bool) -> None:
  for cmd in cmds:
    if dry_run:
      print(shlex.join(cmd), flush=True)
    else:
      subprocess.run(cmd, check=True)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(prog="launch/gke_jobset.py", description=__doc__.split("\n")[0])
  p.add_argument("action", choices=("render", "submit", "xpk"))
  p.add_argument("--topology", required=True, help="one slice, e.g. v5p:2x2x2, v5e:4x4, v6e:2x4")
  p.add_argument("--num-slices", type=int, default=1)
  p.add_argument("--image", required=True, help="the launch/Dockerfile image in your registry")
  p.add_argument("--workdir", required=True, help="gs:// path every pod can write")
  p.add_argument("--config", default="experiments/sudoku.py")
  p.add_argument("--name", default="loopjax")
  p.add_argument("--max-restarts", type=int, default=10)
  p.add_argument("--grace-s", type=int, default=300,
                 help="seconds between SIGTERM and SIGKILL: time to write a checkpoint")
  p.add_argument("--spot", action="store_true")
  p.add_argument("--build", action="store_true", help="submit/xpk: docker build and push first")
  p.add_argument("--cluster", help="xpk: the GKE cluster")
  p.add_argument("--dry-run", action="store_true", help="print the commands instead")
  args = p.parse_args(argv)
  args.overrides = overrides
  if args.num_slices < 1:
    p.error(f"--num-slices {args.num_slices}: want 1 or more slices")
  if args.action == "xpk" and not args.cluster:
    p.error("xpk needs --cluster CLUSTER (the GKE cluster xpk created)")
  try:
    manifest = render(args)
  except ValueError as e:
    p.error(str(e))
  if args.action == "render":
    print(manifest, end="")
    return 0
  cmds = build_commands(args.image) if args.build else []
  if args.action == "xpk":
    run(cmds + [xpk_command(args)], args.dry_run)
    return 0
  path = os.path.join(tempfile.gettempdir(), f"{args.name}-jobset.yaml")
  if args.dry_run:
    print(f"# {path}:\n{manifest}", end="")
  else:
    with open(path, "w", encoding="utf-8") as f:
      f.write(manifest)
  run(cmds + [["kubectl", "apply", "-f", path]], args.dry_run)
  return 0


if __name__ == "__main__":
  sys.exit(main())
