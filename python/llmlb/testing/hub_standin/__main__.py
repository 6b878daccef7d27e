"""``python -m llmlb.testing.hub_standin``: serve the hub stand-in."""

import sys

from llmlb.testing.hub_standin.server import main

sys.exit(main())
