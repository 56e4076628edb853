"""``python -m proxy serve ...``: the same as the ``key-evt-amqp`` script."""

from proxy.cli import main

raise SystemExit(main())
