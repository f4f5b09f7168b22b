import sys

from edge_agent.cli.main import main

sys.exit(main())
