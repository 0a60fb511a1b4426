"""
C{python -m txgrace restart --pidfile P}: see L{txgrace.command}.
"""

import sys

from txgrace.command import main

sys.exit(main())
