"""`python -m mmdistill ...` is the `mmdistill` command (what `accelerate launch -m mmdistill train CONFIG` runs).

python -m mmdistill train configs/text/quickstart.yaml
"""

import sys

from mmdistill.cli import main

sys.exit(main())
