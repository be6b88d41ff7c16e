"""``python -m app.cli``: the ``rlpips`` command."""

import sys

from app.cli.main import main

sys.exit(main())
