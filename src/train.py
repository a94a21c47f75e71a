"""Train an SGDD model: uv run python src/train.py --config configs/quickstart.yaml [section.key=value ...]

Also works under torchrun: uv run torchrun --nproc_per_node 2 src/train.py --config configs/X.yaml
"""

import argparse

from sgdd.cli import add_config_args, run_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args()

    from sgdd.config import load_config
    from sgdd.training import train_and_report

    train_and_report(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    run_main(main)
