import sys

from broker.cli.quick import main

sys.exit(main())
