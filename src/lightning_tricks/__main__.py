"""``python -m lightning_tricks`` runs the ``lightning-tricks`` command."""

from lightning_tricks.cli import main

if __name__ == "__main__":
    main()
