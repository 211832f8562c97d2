"""``python -m diffmem.cli``: the ``diffmem`` command."""

from diffmem.cli import run

if __name__ == "__main__":
    run()
