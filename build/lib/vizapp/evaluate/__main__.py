"""``python -m vizapp.evaluate``: see :mod:`vizapp.evaluate`."""

from vizapp.evaluate.run import main

raise SystemExit(main())
