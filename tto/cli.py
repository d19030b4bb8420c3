"""Shared pieces of the command-line entry points."""

from __future__ import annotations

import argparse


class OneLineErrors(argparse.ArgumentParser):
    """Bad usage ends with one line on stderr and exit status 2, not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
