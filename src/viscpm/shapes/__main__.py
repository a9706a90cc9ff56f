"""``python -m viscpm.shapes --out DIR``: write the ShapesWorld corpora."""
import sys

from .corpus import main

sys.exit(main())
