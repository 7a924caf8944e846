"""`python -m rtc` is `rtc`."""

from rtc.cli import main

raise SystemExit(main())
