"""`loopjax memory`: per-device memory of a config's train step on a mesh, read off the program
compiled ahead of time for fake CPU devices or, with --topology and libtpu, for a real TPU
topology (nothing is allocated, no accelerator is needed)."""

from __future__ import annotations

import argparse
import json

from loopjax.cli.config import CONFIG_HELP, OVERRIDES_EPILOG, parse_config_command


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="loopjax memory", description=__doc__, epilog=OVERRIDES_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", metavar="FILE[:VARIANT]", help=CONFIG_HELP)
  p.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (default: config.mesh)")
  p.add_argument("--devices", type=int, default=None,
                 help="fake CPU devices to compile for (default: the mesh's size, else 8)")
  p.add_argument("--topology", default=None,
                 help="compile for this TPU topology instead, e.g. v5e:2x4 (needs libtpu)")
  p.add_argument("--num-slices", type=int, default=1, help="TPU slices of --topology")
  p.add_argument("--device-memory-gib", type=float, default=None,
                 help="memory per device to compare with (default: known for TPU/GPU kinds)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  return p


def main(argv) -> int:
  spec, overrides, args = parse_config_command(build_parser(), argv)
  from loopjax.parallel import topology as topology_lib  # jax and the step: only when compiling
  from loopjax.config.run import resolve
  from loopjax.train.memory import compile_devices, format_report, memory_report, parse_mesh
  mesh_cfg = parse_mesh(args.mesh) if args.mesh else None
  devices, flags_source = compile_devices(args.topology, args.num_slices, args.devices, mesh_cfg)
  run = resolve(spec, overrides)
  if mesh_cfg is not None:
    mesh_cfg = {**{k: v for k, v in dict(run.mesh).items() if k.startswith("dcn_")},
                "data": 1, "fsdp": 1, "tensor": 1, **mesh_cfg}
  report = memory_report(run, devices, mesh_cfg, args.device_memory_gib)
  text = None if args.json else format_report(report)
  if args.topology:
    report["libtpu_init_args"] = topology_lib.libtpu_flags()
    text = text and f"{text}\nlibtpu flags ({flags_source}): {report['libtpu_init_args']}"
  print(json.dumps(report) if args.json else text, flush=True)
  return 0
