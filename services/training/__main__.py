"""python -m services.training: run the training service."""

from libs.service import run
from services.training.bootstrap import MIGRATIONS, build
from services.training.settings import TrainingSettings

if __name__ == "__main__":
    run(TrainingSettings(), migrations=MIGRATIONS, build=build)
