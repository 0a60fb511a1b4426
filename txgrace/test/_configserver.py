"""
A server that builds its own L{GraceService}, for the process tests: run as
C{python -m txgrace.test._configserver CONFIG}, where CONFIG is a JSON file
C{{"endpoints": [...]}} read at each start, so that a successor can have
another set of endpoints than its predecessor.
"""

import json
import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, jsonFileLogObserver

from txgrace import GraceService
from txgrace.test._apps import site


def main(configPath: str) -> None:
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout, "")])
    with open(configPath) as f:
        config = json.load(f)
    service = GraceService(hammerTimeout=10)
    for description in config["endpoints"]:
        service.listen(description, site)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
