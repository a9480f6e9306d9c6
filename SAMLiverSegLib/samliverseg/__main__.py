import sys
from samliverseg.cli.commands import main

sys.exit(main())
