"""`loopjax export`: a run's weights as safetensors + config.json, a folder that is also a
Hugging Face model repository (optionally pushed to the Hub)."""

from __future__ import annotations

import argparse
import os
import tempfile

from loopjax.cli.args import parse_step
from loopjax.io.export_format import DTYPES


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="loopjax export",
                              description="write a run's weights as safetensors + config.json, a "
                              "folder that is also a Hugging Face model repository")
  p.add_argument("--workdir", required=True, help="training run folder")
  p.add_argument("--out", default=None, help="output folder (written atomically); optional "
                 "with --push-to-hub (then a temporary folder)")
  p.add_argument("--params", choices=("ema", "raw"), default="ema",
                 help="which weights of the run (default ema)")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved tensors")
  p.add_argument("--step", type=parse_step, default=None, help="checkpoint step, or best (the "
                 "lowest held-out NELBO of training); default: the newest")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  p.add_argument("--push-to-hub", default=None, metavar="REPO",
                 help="upload the export to this Hugging Face model repository (NAME or "
                 "ORG/NAME; created if missing) through huggingface_hub")
  p.add_argument("--private", action="store_true", help="--push-to-hub: create it private")
  p.add_argument("--license", default="other",
                 help="model card license (a Hub license id such as apache-2.0; default other)")
  p.add_argument("--language", default=None,
                 help="model card languages, comma-separated ISO codes (e.g. en)")
  p.add_argument("--datasets", default=None,
                 help="model card training datasets, comma-separated Hub dataset ids")
  return p


def main(argv) -> int:
  p = build_parser()
  args = p.parse_args(argv)
  if args.out is None and not args.push_to_hub:
    p.error("--out is required (or give --push-to-hub REPO)")
  from loopjax import folders, storage  # the library: only when exporting
  from loopjax.errors import UserError
  from loopjax.io.export import export_run, format_report
  from loopjax.hf import hub
  if args.push_to_hub:  # before any work: a bad id, offline mode, no token, a remote OUT
    hub.check_push(args.push_to_hub)
    if args.out and storage.is_remote(args.out):
      raise UserError(f"--push-to-hub uploads a local folder; --out {args.out} is remote: give "
                      "a local --out (or none)")
  for path in (args.workdir, args.out):  # a gs:// path without its client: named up front
    if path:
      storage.check_client(path)
  if args.out:  # even --overwrite keeps a run or corpus
    folders.claim(args.out, "export", flag="--out")
  split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None
  card = {"license": args.license, "language": split(args.language),
          "datasets": split(args.datasets)}
  with tempfile.TemporaryDirectory(prefix="loopjax-hub-") as tmp:
    out = args.out or os.path.join(tmp, args.push_to_hub.rsplit("/", 1)[-1])
    config = export_run(args.workdir, out, params=args.params, dtype=args.dtype,
                        step=args.step, overwrite=args.overwrite, card=card)
    print(f"{storage.resolve(out) if args.out else '(temporary folder)'}\n"
          f"{format_report(config)}")
    if args.push_to_hub:
      run = storage.basename(storage.resolve(args.workdir))
      url = hub.push_folder(storage.resolve(out), args.push_to_hub, private=args.private or None,
                            commit_message=f"loopjax export of {run} (step "
                                           f"{config['weights'].get('step')})")
      print(f"pushed to {args.push_to_hub}: {url}")
  return 0
