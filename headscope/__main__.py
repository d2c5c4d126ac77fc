"""``python -m headscope``: the ``headscope`` command line, also under ``torchrun -m headscope``."""

from headscope.cli import main

if __name__ == "__main__":
    main()
