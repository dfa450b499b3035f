"""``python -m simulations.benchmark`` (``xmfl benchmark``): the command of :mod:`simulations.benchmarks.command`."""

from common.runtime.command import run_command
from simulations.benchmarks.command import main
from simulations.flower_runtime import exit_cleanly_on_sigterm

if __name__ == "__main__":
    exit_cleanly_on_sigterm()
    run_command(main)
