"""The ``privcam`` command (:mod:`pipeline.cli.main`), the demo and the figure. All argparse lives here."""
