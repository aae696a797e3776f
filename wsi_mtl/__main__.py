"""``python -m wsi_mtl`` runs the ``wsimtl`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
