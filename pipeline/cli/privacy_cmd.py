"""``privcam eval privacy``: options, thread settings and output of :func:`pipeline.lab.privacy.privacy_table`."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from sensor.config import SensorConfig
from sensor.keys import Key
from sensor.readout import SCHEMES

from ..lab.privacy import PrivacyBudget, format_table, privacy_table
from ..lab.protection import METHOD_NAMES
from ..resources import COLOUR_PROFILE, DEFAULT_CHECKPOINT, MONO_PROFILE, resolve


def add_privacy_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``privcam eval privacy`` (``--json`` comes from the CLI's common options)."""
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="plain classifier (.pt with manifest)")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset of the classifier (default fashion-mnist)")
    p.add_argument("--data", help="dataset path")
    p.add_argument("--sensor", default=MONO_PROFILE)
    p.add_argument("--scheme", default="pixel", choices=SCHEMES, help="readout scheme")
    p.add_argument("--key", help="key file (default: a fresh random key)")
    p.add_argument("--methods", default=",".join(METHOD_NAMES), help=f"comma list of {', '.join(METHOD_NAMES)}")
    p.add_argument("--block", type=int, default=4, help="EtC/ELE block side (default 4)")
    p.add_argument("--limit-test", type=int, default=2000, help="test images (default 2000)")
    p.add_argument("--attack-train-images", type=int, default=2000, help="attacker's labelled frames (default 2000)")
    p.add_argument("--attack-epochs", type=int, default=2, help="fine-tune and MLP attack epochs (default 2)")
    p.add_argument("--inversion-train-images", type=int, default=2000, help="inversion attack pairs (default 2000)")
    p.add_argument("--inversion-epochs", type=int, default=3, help="inversion attack epochs (default 3)")
    p.add_argument("--i2p-train-images", type=int, default=5000, help="I2P transform training frames (default 5000)")
    p.add_argument("--i2p-epochs", type=int, default=2, help="I2P transform epochs (default 2)")
    p.add_argument("--i2p-features", default="classifier", choices=["classifier", "random"],
                   help="I2P feature extractor: the classifier's first conv block or a fixed random conv stack")
    p.add_argument("--kpa-pairs", default="1,2,4,8", help="known-plaintext pair counts (default 1,2,4,8)")
    p.add_argument("--cifar", help="foolbox wheel or folder with cifar10_*.png (pip download --no-deps foolbox)")
    p.add_argument("--cifar-sensor", default=COLOUR_PROFILE)
    p.add_argument("--cifar-scheme", default="quad", choices=SCHEMES)
    p.add_argument("--cifar-attack-images", type=int, default=2000, help="CIFAR attacker's natural patches")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed (default 0)")
    p.add_argument("--threads", type=int, help="torch and numba threads (default: theirs; 1 is much faster for these "
                   "tiny frames when other jobs share the cores)")
    p.add_argument("--out", help="also write the table (JSON) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def privacy_cli(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`privacy_table` from :func:`add_privacy_arguments` options; prints the table unless --json."""
    from sensor.atomic import atomic_path
    from sensor.keys import load_key_file

    from ..stream.datasets import load_dataset

    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    key = load_key_file(args.key) if args.key else Key.generate()
    budget = PrivacyBudget(test_images=args.limit_test, attack_train_images=args.attack_train_images,
                           attack_epochs=args.attack_epochs, inversion_train_images=args.inversion_train_images,
                           inversion_epochs=args.inversion_epochs, i2p_train_images=args.i2p_train_images,
                           i2p_epochs=args.i2p_epochs, i2p_features=args.i2p_features,
                           kpa_pairs=tuple(int(k) for k in args.kpa_pairs.split(",")),
                           cifar_attack_images=args.cifar_attack_images, seed=args.seed)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sensor_cfg = SensorConfig.from_yaml(resolve(args.sensor))
    table = privacy_table(str(resolve(args.checkpoint)), load_dataset(args.dataset, "test", args.data),
                          load_dataset(args.dataset, "train", args.data), sensor_cfg, key,
                          args.scheme, budget, methods, args.cifar, SensorConfig.from_yaml(resolve(args.cifar_sensor)),
                          args.cifar_scheme, args.block, progress=not args.quiet)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(table, indent=2) + "\n")
    if getattr(args, "json", False):
        return table
    print(format_table(table))
    return {"out": args.out}
