"""Train geocell's multitask geolocation model: ``python train/run.py [options]``.

The same program as ``geocell train``; see ``--help``. With no arguments it builds the
built-in Earth dataset in ./data/earth and trains the default recipe on it.
"""

import sys

from geocell.commands import main

if __name__ == "__main__":
    # through the geocell command, so its errors read as geocell train's (--debug for a traceback)
    sys.exit(main(["train", *sys.argv[1:]]))
