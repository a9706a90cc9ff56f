"""``python -m viscpm.cli``: what ``accelerate launch -m viscpm.cli train …`` starts."""
import sys

from . import main

sys.exit(main())
