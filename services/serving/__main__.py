"""python -m services.serving: run the serving service."""

from libs.service import run
from services.serving.bootstrap import MIGRATIONS, build
from services.serving.settings import ServingSettings

if __name__ == "__main__":
    run(ServingSettings(), migrations=MIGRATIONS, build=build)
