"""python -m services.training: run the training service."""

from libs.service import load_settings, run
from services.training.bootstrap import MIGRATIONS, build
from services.training.settings import TrainingSettings

if __name__ == "__main__":
    run(load_settings(TrainingSettings), migrations=MIGRATIONS, build=build)
