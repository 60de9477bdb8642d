"""``python -m pure_reasoner.train.evaluation --checkpoint DIR ...``: see ``evaluate``."""

import sys

from pure_reasoner.train.evaluation.evaluate import main

sys.exit(main())
