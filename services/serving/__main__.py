"""python -m services.serving: run the serving service."""

import uvloop

from libs.service import load_settings, serve
from services.serving.bootstrap import MIGRATIONS, build
from services.serving.settings import ServingSettings

if __name__ == "__main__":
    # uvloop, as `uvicorn` picks by itself: at a millisecond or less per request, the event loop's own
    # work (sockets, callbacks) is a visible share of it.
    uvloop.run(serve(load_settings(ServingSettings), migrations=MIGRATIONS, build=build))
