"""``python -m delf_pipeline`` is the ``delf-pipeline`` command."""
import sys

from .cli import main

sys.exit(main())
