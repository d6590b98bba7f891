"""``python -m shimfs`` is the ``shimfs`` command."""
import sys

from .cli import main

sys.exit(main())
