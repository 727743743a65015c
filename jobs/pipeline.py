"""Ray job entry point: the whole pipeline (`ktray run`).

ray job submit --working-dir . -- python jobs/pipeline.py CONFIG key=value ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("run"))
