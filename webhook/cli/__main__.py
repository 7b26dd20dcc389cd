"""`python -m webhook.cli`: the `kuberpc` command."""

import sys

from webhook.cli.main import main

if __name__ == "__main__":  # importing the module (as the image test does for every module) runs nothing
    sys.exit(main())
