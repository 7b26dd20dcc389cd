"""`python -m webhook.cli`: the `kuberpc` command."""

import sys

from webhook.cli.main import main

sys.exit(main())
