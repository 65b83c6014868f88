"""`python -m segtrain` runs the command-line interface."""

from segtrain.cli import main

if __name__ == "__main__":
    main()
