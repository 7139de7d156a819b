"""Entrypoint for `ray job submit`: a Ray Tune search on the cluster it is submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --config jobs/configs/tune.yaml [--set key=value ...] [--output DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedbip_ray.cli import main  # noqa: E402


def parse(argv: list[str]) -> list[str]:
    """``jobs/tune.py`` arguments -> ``fedbip tune`` arguments."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="tune config: a run config plus a 'tune:' section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--output", help="output directory (default runs/<name>-tune)")
    a = p.parse_args(argv)
    out = ["tune", a.config] + [x for o in a.overrides for x in ("--set", o)]
    if a.output:
        out += ["--output", a.output]
    return out


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:])))
