"""`python -m deploy ...` is the `driftloop` command, for places without the console script (containers)."""

from deploy.cli import main

raise SystemExit(main())
