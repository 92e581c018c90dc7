"""``privcam eval privacy``: options, thread settings and output of :func:`pipeline.lab.privacy.privacy_table`."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from sensor.config import SensorConfig
from sensor.errors import ConfigError
from sensor.keys import Key
from sensor.readout import SCHEMES

from ..lab.attacks import ConvergenceBudget
from ..lab.floors import FloorBudget
from ..lab.privacy import PrivacyBudget, format_table, privacy_table
from ..lab.protection import METHOD_NAMES
from ..resources import COLOUR_PROFILE, DEFAULT_CHECKPOINT, MONO_PROFILE, resolve
from .options import COUNT, EPOCHS, check_outputs, int_range


def add_privacy_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``privcam eval privacy`` (``--json`` comes from the CLI's common options)."""
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="plain classifier (.pt with manifest)")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset of the classifier (default fashion-mnist)")
    p.add_argument("--data", help="dataset path")
    p.add_argument("--sensor", default=MONO_PROFILE)
    p.add_argument("--scheme", default="pixel", choices=SCHEMES, help="readout scheme")
    p.add_argument("--key", help="key file (default: a fresh random key)")
    p.add_argument("--methods", default=",".join(METHOD_NAMES),
                   help=f"comma list of {', '.join(METHOD_NAMES)}, or none (the floors alone)")
    p.add_argument("--floors", default=",".join(SCHEMES),
                   help="readout schemes whose floor attacks run (invariant learner to convergence, jigsaw solver, "
                   "cross-session known-plaintext), comma list, or none (default all)")
    p.add_argument("--floor-train-images", type=COUNT, default=20_000,
                   help="invariant learner's labelled frames, validation split included (default 20000)")
    p.add_argument("--floor-max-epochs", type=EPOCHS, default=200,
                   help="invariant learner's epoch cap; it stops earlier on its validation split (default 200)")
    p.add_argument("--floor-patience", type=EPOCHS, default=10,
                   help="epochs without a better validation accuracy before the invariant learner stops (default 10)")
    p.add_argument("--jigsaw-frames", type=COUNT, default=100, help="single test frames per jigsaw run (default 100)")
    p.add_argument("--block", type=int_range(1, 64), default=4, help="EtC/ELE block side, 1-64 (default 4)")
    p.add_argument("--limit-test", type=COUNT, default=2000, help="test images (default 2000)")
    p.add_argument("--attack-train-images", type=COUNT, default=2000, help="attacker's labelled frames (default 2000)")
    p.add_argument("--attack-epochs", type=EPOCHS, default=2, help="fine-tune and MLP attack epochs (default 2)")
    p.add_argument("--inversion-train-images", type=COUNT, default=2000, help="inversion attack pairs (default 2000)")
    p.add_argument("--inversion-epochs", type=EPOCHS, default=3, help="inversion attack epochs (default 3)")
    p.add_argument("--i2p-train-images", type=COUNT, default=5000, help="I2P transform training frames (default 5000)")
    p.add_argument("--i2p-epochs", type=EPOCHS, default=2, help="I2P transform epochs (default 2)")
    p.add_argument("--i2p-features", default="classifier", choices=["classifier", "random"],
                   help="I2P feature extractor: the classifier's first conv block or a fixed random conv stack")
    p.add_argument("--kpa-pairs", default="1,2,4,8", help="known-plaintext pair counts (default 1,2,4,8)")
    p.add_argument("--cifar", help="foolbox wheel or folder with cifar10_*.png (pip download --no-deps foolbox)")
    p.add_argument("--cifar-sensor", default=COLOUR_PROFILE)
    p.add_argument("--cifar-scheme", default="quad", choices=SCHEMES)
    p.add_argument("--cifar-attack-images", type=COUNT, default=2000, help="CIFAR attacker's natural patches")
    p.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0, help="training and sampling seed (default 0)")
    p.add_argument("--threads", type=int_range(1, 1024),
                   help="torch and numba threads (default: theirs; 1 is much faster for these tiny frames when other "
                   "jobs share the cores)")
    p.add_argument("--out", help="also write the table (JSON) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def privacy_cli(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`privacy_table` from :func:`add_privacy_arguments` options; prints the table unless --json."""
    from sensor.atomic import atomic_path
    from sensor.keys import load_key_file

    from ..stream.datasets import load_dataset

    check_outputs([(args.out, "--out", (".json",))],
                  [args.key, args.data, args.cifar, resolve(args.checkpoint), resolve(args.sensor)])
    try:
        kpa_pairs = tuple(int(k) for k in args.kpa_pairs.split(","))
    except ValueError:
        raise ConfigError("--kpa-pairs", "kpa_pairs", "a comma list of integers >= 1 such as 1,2,4,8",
                          args.kpa_pairs) from None
    methods = [] if args.methods.strip() == "none" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or (not methods and args.methods.strip() != "none"):
        raise ConfigError("--methods", "methods", f"a comma list of {', '.join(METHOD_NAMES)}, or none",
                          args.methods)
    floors = floor_budget(args, kpa_pairs)
    if not methods and floors is None:
        raise ConfigError("--methods", "methods", "some methods when --floors is none (nothing to measure)",
                          args.methods)
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    key = load_key_file(args.key) if args.key else Key.generate()
    budget = PrivacyBudget(test_images=args.limit_test, attack_train_images=args.attack_train_images,
                           attack_epochs=args.attack_epochs, inversion_train_images=args.inversion_train_images,
                           inversion_epochs=args.inversion_epochs, i2p_train_images=args.i2p_train_images,
                           i2p_epochs=args.i2p_epochs, i2p_features=args.i2p_features,
                           kpa_pairs=kpa_pairs,
                           cifar_attack_images=args.cifar_attack_images, seed=args.seed)
    sensor_cfg = SensorConfig.from_yaml(resolve(args.sensor))
    table = privacy_table(str(resolve(args.checkpoint)), load_dataset(args.dataset, "test", args.data),
                          load_dataset(args.dataset, "train", args.data), sensor_cfg, key,
                          args.scheme, budget, methods, args.cifar, SensorConfig.from_yaml(resolve(args.cifar_sensor)),
                          args.cifar_scheme, args.block, progress=not args.quiet, floors=floors)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(table, indent=2) + "\n")
    if getattr(args, "json", False):
        return table
    print(format_table(table))
    return {"out": args.out}


def floor_budget(args: argparse.Namespace, kpa_pairs: tuple[int, ...]) -> FloorBudget | None:
    """The floors' budget from ``--floors``, ``--floor-*``, ``--jigsaw-frames`` and ``--kpa-pairs`` (None: none)."""
    if args.floors.strip() == "none":
        return None
    schemes = tuple(s.strip() for s in args.floors.split(",") if s.strip())
    if not schemes or any(s not in SCHEMES for s in schemes):
        raise ConfigError("--floors", "floors", f"a comma list of {', '.join(SCHEMES)}, or none", args.floors)
    if args.floor_train_images < 2:
        raise ConfigError("--floor-train-images", "floor_train_images", "at least 2 (a validation split is held out)",
                          args.floor_train_images)
    invariant = ConvergenceBudget(train_images=args.floor_train_images, max_epochs=args.floor_max_epochs,
                                  patience=args.floor_patience, seed=args.seed)
    return FloorBudget(schemes=schemes, invariant=invariant, jigsaw_frames=args.jigsaw_frames, kpa_pairs=kpa_pairs)
