"""The launchers' dry runs: every command a 2-slice v5p job would run, without gcloud or kubectl.

Each printed line is one command, shell-quoted; the test splits it as a shell would (shlex) and
compares argument lists, and splits the command each TPU worker runs once more."""

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from loopjax.parallel import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GC = ["gcloud", "--project", "proj", "compute", "tpus"]
ZONE = ["--zone", "us-east5-a"]


def _tpu_pod(action, *extra, **env):
  base = {k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}
  base.update({"DRY_RUN": "1", "PROJECT": "proj", "ZONE": "us-east5-a", "TPU_NAME": "lj",
               "NUM_SLICES": "2", "ACCELERATOR_TYPE": "v5p-16", "RUNTIME_VERSION": "v2-alpha-tpuv5",
               "SPOT": "1", "WORKDIR": "gs://bkt/run", "CONFIG": "experiments/owt.py:loopmdm",
               "TMPDIR": "/tmp", **env})
  run = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), action, "--", *extra],
                       env=base, capture_output=True, text=True, timeout=60, cwd="/")
  assert run.returncode == 0, run.stderr
  return [shlex.split(line) for line in run.stdout.splitlines()]


def _ssh(node, command):
  return GC + ["tpu-vm", "ssh", node, *ZONE, "--worker=all", "--command", command]


def _split_ssh(cmds):
  """(argv up to --command, the worker's command split as its shell would) per ssh line."""
  return [(c[:-1], shlex.split(c[-1])) if "ssh" in c else (c, None) for c in cmds]


CLEANUP = ("sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo kill -9; "
           "sudo rm -f /tmp/libtpu_lockfile")
DESCRIBE_QR = GC + ["queued-resources", "describe", "lj", *ZONE, "--format=value(state.state)"]
COORDINATOR_IP = GC + ["tpu-vm", "describe", "lj-0", *ZONE,
                       "--format=value(networkEndpoints[0].ipAddress)"]


def _train_words(slice_id):
  flags = xla_flags.flag_string("v5p")
  return ["cd", "~/loopjax", "&&", "MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080",
          "MEGASCALE_PORT=8080", "MEGASCALE_NUM_SLICES=2", f"MEGASCALE_SLICE_ID={slice_id}",
          "LOOPJAX_DISTRIBUTED=1", f"LIBTPU_INIT_ARGS={flags}",
          "JAX_COMPILATION_CACHE_DIR=gs://bkt/run/jax_cache", "~/.venv-loopjax/bin/python", "-m",
          "loopjax.cli", "train", "--config", "experiments/owt.py:loopmdm", "--workdir",
          "gs://bkt/run", "--config.train.steps=10", "2>&1"]


def test_tpu_pod_run_dry_run_for_two_v5p_slices():
  got = _split_ssh(_tpu_pod("run", "--config.train.steps=10"))
  install = ("set -e; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | "
             "sh; export PATH=$HOME/.local/bin:$PATH; cd ~/loopjax; uv venv --python 3.11 "
             "--allow-existing ~/.venv-loopjax; VIRTUAL_ENV=~/.venv-loopjax uv pip install -c "
             "launch/constraints.txt -e '.[tpu,gcs]' requests; ~/.venv-loopjax/bin/python -c "
             "'import jax, loopjax; print(\"jax\", jax.__version__)'")
  untar = "mkdir -p ~/loopjax && tar xzf ~/loopjax.tar.gz -C ~/loopjax"
  tar = (f"cd {ROOT} && git ls-files -z --cached --others --exclude-standard "
         "| grep -zv -E '^(data|raw|runs|workdirs)/' | tar czf /tmp/loopjax-lj.tar.gz --null -T -")
  want = [
      DESCRIBE_QR,  # none yet (the dry run answers MISSING): create it
      GC + ["queued-resources", "create", "lj", "--node-count", "2", "--node-prefix", "lj", *ZONE,
            "--accelerator-type", "v5p-16", "--runtime-version", "v2-alpha-tpuv5", "--spot"],
      DESCRIBE_QR,  # until ACTIVE
      ["bash", "-c", tar],
      GC + ["tpu-vm", "scp", "/tmp/loopjax-lj.tar.gz", "lj-0:loopjax.tar.gz", *ZONE, "--worker=all"],
      GC + ["tpu-vm", "scp", "/tmp/loopjax-lj.tar.gz", "lj-1:loopjax.tar.gz", *ZONE, "--worker=all"],
      _ssh("lj-0", untar), _ssh("lj-1", untar),
      ["rm", "-f", "/tmp/loopjax-lj.tar.gz"],
      _ssh("lj-0", install), _ssh("lj-1", install),
      _ssh("lj-0", CLEANUP), _ssh("lj-1", CLEANUP),
      COORDINATOR_IP,
      _ssh("lj-0", shlex.join(_train_words(0))), _ssh("lj-1", shlex.join(_train_words(1))),
      DESCRIBE_QR,  # still ACTIVE after training: not preempted, done
  ]
  want = _split_ssh(want)
  assert [w[0] for w in got] == [w[0] for w in want]
  assert got == want


def test_tpu_pod_train_detached_and_the_flag_override():
  cmds = _tpu_pod("train", LIBTPU_INIT_ARGS="--xla_a=1 --xla_b=2")
  assert cmds[:3] == [_ssh("lj-0", CLEANUP), _ssh("lj-1", CLEANUP), COORDINATOR_IP]
  for slice_id, c in enumerate(cmds[3:]):
    assert c[:-1] == _ssh(f"lj-{slice_id}", "")[:-1]
    nohup = shlex.split(c[-1])
    assert nohup[:3] == ["nohup", "bash", "-c"] and nohup[4:] == [">", "~/loopjax_train.log",
                                                                  "2>&1", "<", "/dev/null", "&"]
    words = shlex.split(nohup[3])
    assert f"MEGASCALE_SLICE_ID={slice_id}" in words
    assert "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2" in words  # the environment's flags win
    assert words[-4:] == ["--config", "experiments/owt.py:loopmdm", "--workdir", "gs://bkt/run"]
  assert len(cmds) == 5


@pytest.mark.parametrize("accelerator,gen", [("v5litepod-32", "v5e"), ("v6e-16", "v6e"),
                                             ("v4-32", "v4")])
def test_tpu_pod_single_slice_takes_its_generations_flags(accelerator, gen):
  cmds = _tpu_pod("train", NUM_SLICES="1", ACCELERATOR_TYPE=accelerator, DETACH="0")
  assert [c[:8] for c in cmds] == [GC + ["tpu-vm", "ssh", "lj"]] * 2
  words = shlex.split(cmds[1][-1])
  assert not any(w.startswith("MEGASCALE") for w in words)
  assert f"LIBTPU_INIT_ARGS={xla_flags.flag_string(gen)}" in words


def test_flag_table_cli_prints_what_the_launchers_export():
  # The launchers' host may have no jax: the command must not import it.
  env = {**os.environ, "PYTHONPATH": ROOT}
  code = ("import runpy, sys; sys.argv = ['xla_flags', 'v5p-64', '--env']\n"
          "try:\n  runpy.run_module('loopjax.cli.xla_flags', run_name='__main__')\n"
          "finally:\n  print('jax imported' if 'jax' in sys.modules else '', file=sys.stderr)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  assert "jax imported" not in proc.stderr, proc.stderr
  assert shlex.split(proc.stdout) == [f"LIBTPU_INIT_ARGS={xla_flags.flag_string('v5p')}"]
  bad = subprocess.run([sys.executable, "-m", "loopjax.cli.xla_flags", "v3-8"],
                       capture_output=True, text=True, env=env)
  assert bad.returncode == 2 and "'v3-8'" in bad.stderr and "v5p:2x4x4" in bad.stderr


def test_gpu_flags_are_known_to_this_jaxlib():
  # XLA parses XLA_FLAGS when the first backend starts, also on CPU, and aborts on an unknown
  # flag: the GPU set is checked here although no GPU is present.
  env = {**os.environ, "XLA_FLAGS": xla_flags.flag_string("gpu"), "JAX_PLATFORMS": "cpu"}
  ok = subprocess.run([sys.executable, "-c", "import jax; print(len(jax.devices()))"], env=env,
                      capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr[-500:]
  env["XLA_FLAGS"] += " --xla_gpu_pipeline_all_gather=on"  # an old name: must be refused
  bad = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "xla_gpu_pipeline_all_gather" in bad.stderr


def _gke(*args):
  run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "gke_jobset.py"), *args],
                       capture_output=True, text=True, timeout=60, cwd="/")
  return run


GKE_JOB = ["--topology", "v5p:2x2x2", "--num-slices", "2", "--image", "reg/loopjax:1",
           "--workdir", "gs://bkt/run", "--config", "experiments/owt.py:loopmdm", "--name", "lj"]


def test_jobset_for_two_v5p_slices():
  run = _gke("render", *GKE_JOB, "--", "--config.train.steps=10")
  assert run.returncode == 0, run.stderr
  js = yaml.safe_load(run.stdout)
  assert js["kind"] == "JobSet" and js["metadata"]["name"] == "lj"
  (job,) = js["spec"]["replicatedJobs"]
  assert job["replicas"] == 2  # one replicated job per slice
  spec = job["template"]["spec"]
  assert spec["parallelism"] == spec["completions"] == 2  # v5p 2x2x2: 8 chips, 4 per host
  pod = spec["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "2x2x2"}
  (c,) = pod["containers"]
  assert c["image"] == "reg/loopjax:1" and c["resources"]["limits"]["google.com/tpu"] == 4
  assert c["command"][:2] == ["bash", "-c"]
  assert shlex.split(c["command"][2]) == [
      "exec", "python", "-m", "loopjax.cli", "train", "--config", "experiments/owt.py:loopmdm",
      "--workdir", "gs://bkt/run", "--config.train.steps=10"]
  env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
  assert env["LIBTPU_INIT_ARGS"] == xla_flags.flag_string("v5p")
  assert env["MEGASCALE_NUM_SLICES"] == "2"
  assert env["MEGASCALE_SLICE_ID"]["fieldRef"]["fieldPath"].endswith("['jobset.sigs.k8s.io/job-index']")
  assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"
  # One slice's render has no slice variables; v5e 2x4 is one host of 8 chips.
  one = yaml.safe_load(_gke("render", "--topology", "v5e:2x4", "--image", "i", "--workdir",
                            "gs://b/r").stdout)
  one_spec = one["spec"]["replicatedJobs"][0]["template"]["spec"]
  one_c = one_spec["template"]["spec"]["containers"][0]
  assert one_spec["parallelism"] == 1 and one_c["resources"]["limits"]["google.com/tpu"] == 8
  assert not any(e["name"].startswith("MEGASCALE") for e in one_c["env"])


def test_jobset_submit_and_xpk_dry_runs_print_every_command():
  run = _gke("submit", *GKE_JOB, "--build", "--dry-run")
  assert run.returncode == 0, run.stderr
  cmds = [shlex.split(line) for line in run.stdout.splitlines()
          if line.startswith(("docker", "kubectl"))]
  manifest = os.path.join(tempfile.gettempdir(), "lj-jobset.yaml")
  assert cmds == [["docker", "build", "-f", os.path.join(ROOT, "launch", "Dockerfile"), "-t",
                   "reg/loopjax:1", ROOT],
                  ["docker", "push", "reg/loopjax:1"],
                  ["kubectl", "apply", "-f", manifest]]
  assert f"# {manifest}:" in run.stdout and "kind: JobSet" in run.stdout
  xpk = _gke("xpk", *GKE_JOB, "--cluster", "c1", "--dry-run")
  (cmd,) = [shlex.split(line) for line in xpk.stdout.splitlines()]
  assert cmd[:-2] == ["xpk", "workload", "create", "--cluster", "c1", "--workload", "lj",
                      "--tpu-type", "v5p-16", "--num-slices", "2", "--docker-image",
                      "reg/loopjax:1", "--max-restarts", "10"]
  words = shlex.split(cmd[-1])
  assert words[0] == f"LIBTPU_INIT_ARGS={xla_flags.flag_string('v5p')}"
  assert words[2:6] == ["exec", "python", "-m", "loopjax.cli"]


def test_jobset_refuses_a_bad_topology_before_anything_runs():
  run = _gke("submit", "--topology", "v5p", "--image", "i", "--workdir", "gs://b/r", "--dry-run")
  assert run.returncode == 2 and "--topology 'v5p'" in run.stderr and run.stdout == ""


FAKE_SRUN = """#!/usr/bin/env bash
# Two tasks that checkpoint on SIGTERM (exit 0), as slurmd would start them.
echo "srun $* XLA_FLAGS=$XLA_FLAGS" >> "$LOG"
for t in 0 1; do
  bash -c 'trap "echo task $0 checkpointed >> \\"$LOG\\"; exit 0" TERM; while :; do sleep 0.1; done' $t &
  echo $! >> "$PIDS"
done
wait
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
# slurmd's side of `scancel --signal=TERM JOBID`: the signal goes to every task of every step.
echo "scancel $*" >> "$LOG"
[[ "$1" == --signal=TERM && "$2" == 42 ]] && xargs kill -TERM < "$PIDS"
"""


def test_slurm_usr1_reaches_every_task_then_requeues(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL),
                     ("scontrol", '#!/usr/bin/env bash\necho "scontrol $*" >> "$LOG"\n')):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  (tmp_path / "venv" / "bin").mkdir(parents=True)
  (tmp_path / "venv" / "bin" / "activate").write_text("")
  log, pids = tmp_path / "log", tmp_path / "pids"
  env = {**os.environ, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
         "LOG": str(log), "PIDS": str(pids), "VENV": str(tmp_path / "venv"),
         "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "lj", "SLURM_JOB_NUM_NODES": "2",
         "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_SUBMIT_DIR": ROOT, "WORKDIR": str(tmp_path / "w"),
         "XLA_FLAGS": "--xla_mine=1"}
  job = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for _ in range(600):  # both tasks started
    if pids.exists() and len(pids.read_text().split()) == 2:
      break
    time.sleep(0.05)
  job.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1 near the time limit
  out, _ = job.communicate(timeout=60)
  assert job.returncode == 0, out
  lines = log.read_text().splitlines()
  srun = lines[0]
  assert srun.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=8 python -m loopjax.cli "
                         "train --config experiments/sudoku.py")
  assert f"XLA_FLAGS={xla_flags.flag_string('gpu')} --xla_mine=1" in srun  # the user's last
  assert "scancel --signal=TERM 42" in lines
  assert sorted(l for l in lines if "checkpointed" in l) == ["task 0 checkpointed",
                                                             "task 1 checkpointed"]
  assert lines[-1] == "scontrol requeue 42"


FAKE_GCLOUD = """#!/usr/bin/env bash
# Logs every call; `queued-resources describe` answers the next state of $STATES.
echo "$*" >> "$LOG"
case "$*" in
  *"queued-resources describe"*) head -n 1 "$STATES"; sed -i 1d "$STATES" ;;
  *"tpu-vm describe"*) echo 10.1.2.3 ;;
esac
"""


def _run_with_states(tmp_path, states, **env):
  (tmp_path / "bin").mkdir()
  gcloud = tmp_path / "bin" / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  (tmp_path / "states").write_text("\n".join(states) + "\n")
  log = tmp_path / "log"
  full = {k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}
  full.update({"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "LOG": str(log),
               "STATES": str(tmp_path / "states"), "TMPDIR": str(tmp_path), "PROJECT": "proj",
               "ZONE": "us-east5-a", "TPU_NAME": "lj", "NUM_SLICES": "2",
               "ACCELERATOR_TYPE": "v5p-16", "SPOT": "1", "WORKDIR": "gs://bkt/run", **env})
  run = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "run"], env=full,
                       capture_output=True, text=True, timeout=120, cwd="/")
  return run, log.read_text().splitlines()


def _kinds(lines):
  """The calls, named: describe, create, delete, scp, cleanup, train, install, untar, ip."""
  out = []
  for line in lines:
    if "queued-resources" in line:
      out.append(line.split()[5])
    elif "tpu-vm describe" in line:
      out.append("ip")
    elif "tpu-vm scp" in line:
      out.append("scp")
    elif "ssh" in line:
      out.append("train" if "loopjax.cli train" in line else "cleanup" if "libtpu_lockfile"
                 in line else "install" if "uv pip install" in line else "untar")
  return out


def test_tpu_pod_run_recreates_a_preempted_spot_slice_and_resumes(tmp_path):
  # Attempt 1 trains on the existing slice, which is preempted (SUSPENDED) meanwhile; attempt 2
  # deletes it, creates it again, ships and installs the code and trains again (resuming from
  # WORKDIR); the slice is still ACTIVE afterwards: done.
  run, lines = _run_with_states(tmp_path, ["ACTIVE", "SUSPENDED", "SUSPENDED", "ACTIVE", "ACTIVE"])
  assert run.returncode == 0, run.stderr
  attempt = ["cleanup", "cleanup", "ip", "train", "train", "describe"]
  assert _kinds(lines) == (["describe"] + attempt + ["describe", "delete", "create", "describe",
                           "scp", "scp", "untar", "untar", "install", "install"] + attempt)
  assert "training finished" in run.stderr
  assert sum("MEGASCALE_COORDINATOR_ADDRESS=10.1.2.3:8080" in l for l in lines) == 4


def test_tpu_pod_run_gives_up_after_max_attempts(tmp_path):
  run, lines = _run_with_states(tmp_path, ["ACTIVE", "SUSPENDED"], MAX_ATTEMPTS="1")
  assert run.returncode == 1 and "gave up after 1 attempts" in run.stderr
  assert _kinds(lines).count("train") == 2 and "delete" not in _kinds(lines)
