"""``python -m services.registry``: run the registry until SIGTERM or SIGINT."""

import uvloop

from libs.service import load_settings, run
from services.registry.bootstrap import MIGRATIONS, build
from services.registry.settings import RegistrySettings

if __name__ == "__main__":
    # uvloop (shipped with uvicorn[standard]) under the whole service: the version page is read far more
    # often than anything else, and the loop's own overhead is a visible share of its latency.
    uvloop.install()
    run(load_settings(RegistrySettings), migrations=MIGRATIONS, build=build)
