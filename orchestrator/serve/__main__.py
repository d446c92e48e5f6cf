"""``python -m orchestrator.serve DIR HOST PORT``: the daemon ``buildsmart serve --detach`` starts."""

import sys

from orchestrator.serve.daemon import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
