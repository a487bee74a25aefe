"""``python -m services.registry``: run the registry until SIGTERM or SIGINT."""

from libs.service import run
from services.registry.bootstrap import MIGRATIONS, build
from services.registry.settings import RegistrySettings

if __name__ == "__main__":
    run(RegistrySettings(), migrations=MIGRATIONS, build=build)
