"""``python -m fusion_pass.bench ...`` (the same as ``fusion-pass bench ...``)."""
import sys

from . import main

sys.exit(main())
