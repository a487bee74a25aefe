"""python -m services.validation: run the validation service."""

from libs.service import load_settings, run
from services.validation.bootstrap import MIGRATIONS, build
from services.validation.settings import ValidationSettings

if __name__ == "__main__":
    run(load_settings(ValidationSettings), migrations=MIGRATIONS, build=build)
