"""``python -m bench.loadgen SCENARIO ...``."""

from bench.loadgen.cli import main

raise SystemExit(main())
