"""Entrypoint for `ray job submit`: runs one federation on the cluster it is submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/quickstart.yaml [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedbip_ray.cli import main  # noqa: E402


def parse(argv: list[str]) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--output")
    p.add_argument("--resume")
    a = p.parse_args(argv)
    out = ["run", a.config] + [x for o in a.overrides for x in ("--set", o)]
    if a.output:
        out += ["--output", a.output]
    if a.resume:
        out += ["--resume", a.resume]
    return out


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:])))
