"""``python -m mmke ...`` (and ``torchrun ... -m mmke run ...``): the ``mmke`` command line."""

from mmke.cli import main

if __name__ == "__main__":
    main()
