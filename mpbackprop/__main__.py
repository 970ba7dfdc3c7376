"""``python -m mpbackprop``: the same as the ``mpbackprop`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="mpbackprop")
